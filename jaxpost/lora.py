"""LoRA as an explicit partition of the parameters: `{"base": params, "lora": LoraParams}`.

`LoraParams.params` mirrors the targeted layer kernels with factors
  {"layers": {"attn": {"q": {"a": [L, in, r], "b": [L, r, out]}, ...}, "mlp": {...}}},
and is the pytree's only child: rank, alpha, rsLoRA, dropout and the targets are static
metadata, so gradients and optimizer state exist for the factors only. The model computes
  y = x @ W + scale * dropout(x) @ a @ b,   scale = alpha / r   (alpha / sqrt(r) with rsLoRA),
which is PEFT's convention (its lora_A.weight is a.T [r, in], lora_B.weight is b.T [out, r]).
`models.forward(cfg, params, tokens, lora=None)` is the base model exactly; the reference policy
of preference and RL losses is that call, without a second copy of the weights.

Targets are regexes, fully matched against '/'-joined parameter paths of the layer kernels,
e.g. "layers/attn/q/kernel" or r"layers/mlp/.*/kernel". Layer parameters are stacked over L, so
a target covers a module in every layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import nf4
from jaxpost.models import transformer
from jaxpost.models.config import ModelConfig

DEFAULT_TARGETS = nf4.DEFAULT_TARGETS

# (block, module) -> the module's name inside HF's model.layers.{i}.
HF_MODULES = {
    ("attn", "q"): "self_attn.q_proj",
    ("attn", "k"): "self_attn.k_proj",
    ("attn", "v"): "self_attn.v_proj",
    ("attn", "o"): "self_attn.o_proj",
    ("mlp", "gate"): "mlp.gate_proj",
    ("mlp", "up"): "mlp.up_proj",
    ("mlp", "down"): "mlp.down_proj",
}


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params"],
    meta_fields=[
        "rank",
        "alpha",
        "use_rslora",
        "dropout",
        "targets",
        "kernel_axes",
        "base_model_name_or_path",
    ],
)
@dataclasses.dataclass(frozen=True)
class LoraParams:
    """LoRA factors plus their static hyper-parameters.

    params: {"layers": {block: {module: {"a": [L, in, r], "b": [L, r, out]}}}}.
    targets: the kernel paths the target regexes selected (sorted), so two adapters of the same
      modules have equal tree structure however they were specified or loaded.
    kernel_axes: ((kernel path, in logical axis, out logical axis), ...) for `logical_axes`.
    """

    params: dict
    rank: int
    alpha: float
    use_rslora: bool = False
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    kernel_axes: tuple[tuple[str, str, str], ...] = ()
    base_model_name_or_path: str | None = None

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def modules(self) -> tuple[tuple[str, str], ...]:
        """The (block, module) pairs that carry factors, e.g. ("attn", "q")."""
        return tuple(
            (block, module)
            for block, mods in sorted(self.params["layers"].items())
            for module in sorted(mods)
        )


def adaptable_kernels(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every layer kernel that can carry LoRA: path -> (shape [L, in, out], logical axes)."""
    return dict(_adaptable_kernels(cfg))


@functools.cache  # an abstract init, 35-170 ms for the 50M benchmark model; `check` runs per call
def _adaptable_kernels(cfg: ModelConfig):
    abstract = jax.eval_shape(lambda: transformer.init(cfg, jax.random.key(0)))
    axes = transformer.logical_axes(cfg)
    out = {}
    for block, mods in abstract["layers"].items():
        for module, leaves in mods.items() if isinstance(mods, dict) else ():
            if (block, module) in HF_MODULES and "kernel" in leaves:
                names = axes["layers"][block][module]["kernel"]
                out[f"layers/{block}/{module}/kernel"] = (tuple(leaves["kernel"].shape), names)
    return out


def check(cfg: ModelConfig, lora, plain_tree_ok: bool = False) -> None:
    """Raise an error that names the problem unless `lora`, a `LoraParams` (or, with
    plain_tree_ok, a plain factor tree: its `.params`, scale 1, which the model's forward also
    takes), fits the model of `cfg`: a [L, in, r] and b [L, r, out] on kernels the model has,
    with its L, in and out and one rank r (the adapter's). Catches an adapter made for another
    model, or a dict that is no adapter at all."""
    if isinstance(lora, LoraParams):
        tree, rank = lora.params, lora.rank
    elif isinstance(lora, dict) and plain_tree_ok:
        tree, rank = lora, None
    else:
        raise TypeError(
            f"expected a jaxpost.lora.LoraParams (from lora.init or lora.load_peft) as the LoRA "
            f"adapter, got {type(lora).__name__}"
        )
    layers = tree.get("layers") if isinstance(tree, dict) else None
    if not isinstance(layers, dict) or not all(isinstance(m, dict) for m in layers.values()):
        raise ValueError(
            "LoRA factors must be {'layers': {block: {module: {'a', 'b'}}}} (lora.init's tree), "
            f"got {jax.tree.structure(tree)}"
        )
    kernels = adaptable_kernels(cfg)
    for block, mods in sorted(layers.items()):
        for module, factors in sorted(mods.items()):
            path = f"layers/{block}/{module}/kernel"
            if path not in kernels:
                raise ValueError(
                    f"LoRA factors at {path}, which the model has no kernel for (it has "
                    f"{sorted(kernels)}); an adapter for another model?"
                )
            shapes = {k: getattr(factors.get(k), "shape", None) for k in ("a", "b")}
            if rank is None and shapes["a"] is not None:
                rank = shapes["a"][-1]
            n_layers, fan_in, fan_out = kernels[path][0]
            want = {"a": (n_layers, fan_in, rank), "b": (n_layers, rank, fan_out)}
            for name, shape in want.items():
                got = None if shapes[name] is None else tuple(shapes[name])
                if got != shape:
                    raise ValueError(
                        f"LoRA {path} factor {name} has shape {got}, expected {shape} ([layers, "
                        f"in, rank] / [layers, rank, out] of this model, rank {rank}); an "
                        f"adapter for another model?"
                    )


def select_targets(cfg: ModelConfig, targets=None) -> list[str]:
    """The kernel paths of cfg's model that `targets` selects (`nf4.match_targets`)."""
    return nf4.match_targets(targets, list(adaptable_kernels(cfg)), "LoRA")


def _check_base(params: dict, path: str, shape: tuple[int, ...]) -> None:
    """The base must hold this kernel (plain or NF4) with the shape cfg implies."""
    _, block, module, _ = path.split("/")
    node = params.get("layers", {}).get(block, {}).get(module)
    if not isinstance(node, dict) or not ({"kernel", nf4.KERNEL_KEY} & set(node)):
        raise ValueError(f"params have no {path} (nor an NF4 {nf4.KERNEL_KEY} there); wrong model?")
    if "kernel" in node and tuple(node["kernel"].shape) != shape:
        raise ValueError(
            f"params {path} has shape {tuple(node['kernel'].shape)}, expected {shape} from cfg"
        )


def validate_hparams(rank: int, alpha: float, dropout: float) -> None:
    """Raise a ValueError naming the first LoRA hyper-parameter out of range."""
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"LoRA rank={rank!r}; expected a positive integer")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha={alpha!r}; expected a positive number")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout={dropout!r}; expected 0 <= dropout < 1")


def axes_meta(paths, kernels: dict) -> tuple[tuple[str, str, str], ...]:
    """LoraParams.kernel_axes for `paths`: (path, in axis, out axis) from adaptable_kernels."""
    return tuple((p, kernels[p][1][1], kernels[p][1][2]) for p in paths)


def init(
    cfg: ModelConfig,
    params: dict,
    rank: int = 8,
    alpha: float = 16,
    targets=None,
    key: jax.Array | None = None,
    use_rslora: bool = False,
    dropout: float = 0.0,
    dtype=jnp.float32,
) -> LoraParams:
    """Fresh LoRA factors for the targeted kernels of `params` (plain, NF4 or abstract).

    a [L, in, r] ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform with a=sqrt(5)) and
    b [L, r, out] = 0, so the adapted model equals the base exactly at init. Works under
    jax.eval_shape. key defaults to jax.random.key(0). targets: see `select_targets`.
    """
    validate_hparams(rank, alpha, dropout)
    key = jax.random.key(0) if key is None else key
    kernels = adaptable_kernels(cfg)
    paths = select_targets(cfg, targets)
    tree: dict = {"layers": {}}
    for path, k in zip(paths, jax.random.split(key, len(paths))):
        shape = kernels[path][0]
        _check_base(params, path, shape)
        n_layers, fan_in, fan_out = shape
        bound = 1.0 / math.sqrt(fan_in)
        _, block, module, _ = path.split("/")
        tree["layers"].setdefault(block, {})[module] = {
            "a": jax.random.uniform(k, (n_layers, fan_in, rank), dtype, -bound, bound),
            "b": jnp.zeros((n_layers, rank, fan_out), dtype),
        }
    return LoraParams(
        tree,
        int(rank),
        float(alpha),
        bool(use_rslora),
        float(dropout),
        tuple(paths),
        axes_meta(paths, kernels),
    )


def logical_axes(lora: LoraParams) -> LoraParams:
    """Logical axis names shaped like `lora`: a ("layers", in, "lora_rank"), b ("layers",
    "lora_rank", out). Use with `sharding.tree_shardings(lora, logical_axes(lora), mesh)`."""
    return dataclasses.replace(lora, params=_axes_tree(lora.kernel_axes))


def factor_logical_axes(cfg: ModelConfig, tree: dict) -> dict:
    """`logical_axes` of a plain factor tree ({"layers": {block: {module: {"a", "b"}}}}, e.g.
    a `LoraParams.params`, which carries no `kernel_axes`), from cfg's kernels."""
    paths = [
        f"layers/{block}/{module}/kernel"
        for block, mods in tree["layers"].items()
        for module in mods
    ]
    return _axes_tree(axes_meta(paths, adaptable_kernels(cfg)))


def _axes_tree(kernel_axes) -> dict:
    tree: dict = {"layers": {}}
    for path, in_axis, out_axis in kernel_axes:
        _, block, module, _ = path.split("/")
        tree["layers"].setdefault(block, {})[module] = {
            "a": ("layers", in_axis, "lora_rank"),
            "b": ("layers", "lora_rank", out_axis),
        }
    return tree


def combine(base: dict, lora: LoraParams) -> dict:
    """The partitioned parameters {"base": base, "lora": lora}."""
    return {"base": base, "lora": lora}


def split(params: dict) -> tuple[dict, LoraParams]:
    """(base, lora) from `combine`'s output."""
    if not isinstance(params, dict) or set(params) != {"base", "lora"}:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"expected partitioned params with keys ['base', 'lora'], got {got}")
    return params["base"], params["lora"]


def _delta(lora: LoraParams, factors: dict) -> jax.Array:
    """scale * a @ b per layer, [L, in, out] in float32."""
    ab = jnp.einsum(
        "lir,lro->lio",
        factors["a"].astype(jnp.float32),
        factors["b"].astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return lora.scale * ab


def _map_targeted(params: dict, lora: LoraParams, fn) -> dict:
    """params with each targeted module's dict replaced by fn(module dict, factors)."""
    layers = dict(params["layers"])
    for block, module in lora.modules:
        if module not in layers.get(block, {}):
            raise ValueError(f"params have no layers/{block}/{module} for the LoRA factors there")
        layers[block] = dict(layers[block])
        layers[block][module] = fn(layers[block][module], lora.params["layers"][block][module])
    return {**params, "layers": layers}


def merge(cfg: ModelConfig, params: dict, lora: LoraParams) -> dict:
    """Plain params with W + scale * a @ b in every targeted kernel. Pure and jittable.

    NF4 kernels are dequantized first, so merging a QLoRA model gives plain kernels in
    cfg.param_dtype.
    """
    check(cfg, lora)

    def fn(node, factors):
        delta = _delta(lora, factors)
        node = dict(node)
        if "kernel" in node:
            w = node["kernel"]
            node["kernel"] = (w.astype(jnp.float32) + delta).astype(w.dtype)
        else:
            w = nf4.dequantize_kernel(node.pop(nf4.KERNEL_KEY), delta.shape, jnp.float32)
            node["kernel"] = (w + delta).astype(cfg.param_dtype)
        return node

    return _map_targeted(params, lora, fn)


def unmerge(cfg: ModelConfig, merged: dict, lora: LoraParams) -> dict:
    """The base back from `merge`'s output: W - scale * a @ b (up to float rounding)."""
    check(cfg, lora)

    def fn(node, factors):
        if "kernel" not in node:
            raise ValueError(
                f"unmerge expects plain kernels (merge's output), found {nf4.KERNEL_KEY}"
            )
        w = node["kernel"]
        return {**node, "kernel": (w.astype(jnp.float32) - _delta(lora, factors)).astype(w.dtype)}

    return _map_targeted(merged, lora, fn)


def save_merged_hf(cfg: ModelConfig, params: dict, lora: LoraParams, path) -> None:
    """Write the merged model as an HF checkpoint directory (`models.save_hf`)."""
    from jaxpost.models.hf_save import save_hf

    save_hf(cfg, merge(cfg, params, lora), path)


# PEFT adapter directories (implemented in jaxpost.lora_peft) ---------------------------------


def save_peft(
    cfg: ModelConfig,
    lora: LoraParams,
    path: str | os.PathLike,
    base_model_name_or_path: str | os.PathLike | None = None,
) -> None:
    """Write an HF PEFT LoRA adapter directory that `peft.PeftModel.from_pretrained` loads.

    adapter_model.safetensors holds, per layer i and module,
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in] (float32) and
    ....lora_B.weight [out, r]; adapter_config.json the matching LoraConfig. A local
    multimodal Gemma 3 base (`base_model_name_or_path`) gets its own layer names
    (model.language_model.layers), where peft finds its language model.
    """
    from jaxpost import lora_peft  # it imports this module

    lora_peft.save_peft(cfg, lora, path, base_model_name_or_path)


def load_peft(cfg: ModelConfig, path: str | os.PathLike, dtype=jnp.float32) -> LoraParams:
    """Read an HF PEFT LoRA adapter directory (save_peft's or peft's save_pretrained output).

    Every targeted module must be adapted in every layer with the config's rank; DoRA,
    per-module rank/alpha patterns, LoRA biases, modules_to_save and the like are rejected.
    """
    from jaxpost import lora_peft

    return lora_peft.load_peft(cfg, path, dtype)
