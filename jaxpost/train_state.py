"""The train state and its layout over the mesh: `TrainState`, shardings from logical axes, and
`init_train_state` (eval_shape, then jitted inits with out_shardings).

params = {"base": model params, "lora": LoraParams | plain LoRA tree | None}. The trainable part
is params["lora"] (trainable="lora") or params["base"] (trainable="full"); optimizer state exists
for that part only, and each optimizer-state leaf shaped like a parameter takes its sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxpost import models, nf4, sharding
from jaxpost.models.config import ModelConfig
from jaxpost.optim import Optimizer

TRAINABLE = ("lora", "full")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["step", "params", "opt_state", "rng"],
    meta_fields=[],
)
@dataclasses.dataclass
class TrainState:
    """step: int32 []; params: {"base", "lora"}; opt_state: of the trainable part only; rng: key."""

    step: jax.Array
    params: dict
    opt_state: Any
    rng: jax.Array


# Trainable / frozen split ------------------------------------------------------------------------


def _check_trainable(params: dict, trainable: str) -> None:
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable={trainable!r}; expected 'lora' or 'full'")
    if not isinstance(params, dict) or "base" not in params:
        raise ValueError("params must be {'base': model params, 'lora': LoRA params or None}")
    if trainable == "lora" and params.get("lora") is None:
        raise ValueError("trainable='lora' but params['lora'] is None; build it with lora.init")
    if trainable == "full":
        if params.get("lora") is not None:
            raise ValueError(
                "trainable='full' expects params['lora'] None (merge the adapter first)"
            )
        bad = [
            jax.tree_util.keystr(p)
            for p, x in jax.tree_util.tree_leaves_with_path(params["base"])
            if not jnp.issubdtype(x.dtype, jnp.floating)
        ]
        if bad:
            raise ValueError(
                f"trainable='full' needs floating-point base params; {bad[:3]} are not "
                "(an NF4-quantized base can only be trained with LoRA)"
            )


def split_trainable(params: dict, trainable: str) -> tuple[Any, dict]:
    """(trainable part, the rest of params) for trainable "lora" or "full"."""
    key = "lora" if trainable == "lora" else "base"
    return params[key], {k: v for k, v in params.items() if k != key}


def join_trainable(train_part, frozen: dict, trainable: str) -> dict:
    """Inverse of `split_trainable`."""
    return {**frozen, ("lora" if trainable == "lora" else "base"): train_part}


# Shardings ---------------------------------------------------------------------------------------


def param_logical_axes(cfg: ModelConfig, params: dict) -> dict:
    """Logical axis names shaped like {"base": ..., "lora": ...} (NF4 bases and plain LoRA trees
    included)."""
    axes = models.logical_axes(cfg)
    base_axes = nf4.quantized_logical_axes(axes, params["base"])
    lora = params.get("lora")
    if lora is None:
        lora_axes = None
    else:
        from jaxpost import lora as lora_lib  # lazy: lora imports the model stack

        if isinstance(lora, dict):
            lora_axes = lora_lib.factor_logical_axes(cfg, lora)
        else:
            lora_axes = lora_lib.logical_axes(lora)
    return {**params, "base": base_axes, "lora": lora_axes}


def _path_keys(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _opt_state_shardings(abstract_opt, train_abstract, train_shardings, mesh: Mesh):
    """Optimizer-state leaves shaped like a parameter (Adam moments, momentum) take the
    parameter's sharding (found by path suffix); everything else (counts, Adafactor's factored
    rows / columns) is replicated."""
    by_path = {}
    for (path, x), s in zip(
        jax.tree_util.tree_leaves_with_path(train_abstract), jax.tree.leaves(train_shardings)
    ):
        by_path[_path_keys(path)] = (tuple(x.shape), s)

    def pick(path, x):
        keys = _path_keys(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == tuple(x.shape):
                return hit[1]
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def state_shardings(
    cfg: ModelConfig,
    abstract_state: TrainState,
    mesh: Mesh,
    trainable: str,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> TrainState:
    """NamedShardings for every leaf of a (possibly abstract) train state."""
    params = abstract_state.params
    p_shard = sharding.tree_shardings(params, param_logical_axes(cfg, params), mesh, rules)
    train_abs, _ = split_trainable(params, trainable)
    train_shard, _ = split_trainable(p_shard, trainable)
    rep = sharding.replicated(mesh)
    return TrainState(
        step=rep,
        params=p_shard,
        opt_state=_opt_state_shardings(abstract_state.opt_state, train_abs, train_shard, mesh),
        rng=rep,
    )


# Initialisation ----------------------------------------------------------------------------------


def quantize_base(
    cfg: ModelConfig,
    base: dict,
    mesh: Mesh,
    targets=None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> dict:
    """`nf4.quantize_base` of a base laid out over `mesh`, under jit with the NF4 tree's own
    shardings as out_shardings: each device quantizes its shard of every kernel and keeps its
    shard of the codes. (Eagerly, XLA gathered each kernel and left the whole NF4 base on every
    device until the train state re-placed it: under fsdp=8, 8x the codes' share per device.)"""
    quantize = lambda b: nf4.quantize_base(cfg, b, targets=targets)
    abstract = jax.eval_shape(quantize, base)
    axes = nf4.quantized_logical_axes(models.logical_axes(cfg), abstract)
    return jax.jit(quantize, out_shardings=sharding.tree_shardings(abstract, axes, mesh, rules))(
        base
    )


def init_train_state(
    cfg: ModelConfig,
    params: dict | Callable[[jax.Array], dict],
    optimizer: Optimizer | optax.GradientTransformation,
    mesh: Mesh,
    *,
    trainable: str = "lora",
    rng: jax.Array | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> TrainState:
    """A train state laid out over `mesh`.

    params: {"base", "lora"} arrays (placed onto their shardings; already-placed arrays are not
    copied), or a function key -> params for a fresh model, which is shaped with jax.eval_shape
    and then run under jit with out_shardings, so no full copy ever exists on the host or on one
    device. The optimizer state is created the same way, for the trainable part only.
    The state takes ownership of the arrays: the train step donates the trainable ones and the
    optimizer state, so those passed in are invalid after the first step (read the trained ones
    from the returned state's params); the frozen base stays valid (`steps._Jitted`).
    """
    rng = jax.random.key(0) if rng is None else rng
    # The key enters the jitted inits as a constant, so every process builds the same values
    # straight into its own shards (a host array cannot be device_put onto another host).
    key_data, impl = np.asarray(jax.random.key_data(rng)), jax.random.key_impl(rng)
    keys = lambda: jax.random.split(jax.random.wrap_key_data(jnp.asarray(key_data), impl=impl))
    if callable(params):
        params_fn = params
        abstract = jax.eval_shape(lambda: params_fn(keys()[0]))
        shard = sharding.tree_shardings(abstract, param_logical_axes(cfg, abstract), mesh, rules)
        params = jax.jit(lambda: params_fn(keys()[0]), out_shardings=shard)()
    _check_trainable(params, trainable)
    abstract_params = jax.eval_shape(lambda: params)
    shard = sharding.tree_shardings(
        abstract_params, param_logical_axes(cfg, abstract_params), mesh, rules
    )
    sharding.warn_replicated(abstract_params, shard, mesh)
    params = jax.tree.map(_place, params, shard)
    train_part, _ = split_trainable(params, trainable)
    warn_low_precision_training(train_part)
    train_shard, _ = split_trainable(shard, trainable)
    abstract_opt = jax.eval_shape(optimizer.init, train_part)
    opt_shard = _opt_state_shardings(abstract_opt, train_part, train_shard, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shard)(train_part)
    rep = sharding.replicated(mesh)
    step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32), keys()[1]), out_shardings=(rep, rep))()
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def warn_low_precision_training(train_part) -> list[str]:
    """Warn when trained weights are 16-bit floats, and return their dtypes. With no float32
    master copy an update smaller than half the spacing of neighbouring values is lost (for
    bfloat16 about 0.4% of the weight: an audit measured 94% of a 1e-5 AdamW step's weights
    unchanged). HF Trainer over a bfloat16 model behaves the same; MaxText keeps float32."""
    low = sorted(
        {
            str(x.dtype)
            for x in jax.tree.leaves(train_part)
            if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32
        }
    )
    if low:
        warnings.warn(
            f"training {'/'.join(low)} parameters directly: there is no float32 master copy, so "
            "updates smaller than half a unit in the last place round away (for bfloat16 about "
            "0.4% of a weight, most updates at fine-tuning learning rates); for mixed precision "
            "keep the parameters float32 and compute in bfloat16 (config: model.dtype=float32 "
            "with model.compute_dtype=bfloat16)",
            stacklevel=3,
        )
    return low


def _place(x, s):
    """x laid out as sharding s; no copy when it already is."""
    if isinstance(x, jax.Array) and x.sharding == s:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, s)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=s)(x)
    host = np.asarray(x)  # the same on every process (same checkpoint or seed)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
