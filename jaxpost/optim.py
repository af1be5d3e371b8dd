"""Optimizers, learning-rate schedules and weight-decay masks for the train steps.

`make_optimizer(name=..., learning_rate=..., ...)` takes plain keyword arguments or an
`OptimizerConfig` (`config_from(config.optimizer, total_steps)` maps the config section). The
result is an optax transformation (gradient clipping by global norm, then the optimizer with
its schedule and decay mask) that also carries the schedule, so the step can report the
learning rate it applied.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adam", "adafactor", "lion", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer hyper-parameters (`config_from` maps `config.optimizer` onto them: its
    grad_clip_norm is max_grad_norm here, and total_steps is the stage's length).

    b1, b2, eps: None takes the optimizer's own default (`DEFAULTS`: torch's AdamW, the Lion
    paper's b2 = 0.99, Adafactor's eps = 1e-30); a value the optimizer has no use for is refused.
    b1 is SGD's momentum (torch.optim.SGD's, default 0) and Adafactor's (HF's beta1, default
    none). weight_decay skips norms, biases and 1-D leaves (`decay_mask`); it is decoupled and
    scaled by the learning rate (p -= lr * weight_decay * p, as torch's AdamW and HF's
    Adafactor) for every optimizer but SGD, where it is torch.optim.SGD's L2 term (added to the
    gradient, so it passes through the momentum). max_grad_norm <= 0 or None disables clipping.
    min_lr_ratio: the cosine / linear schedules end at learning_rate * min_lr_ratio.
    """

    name: str = "adamw"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    b1: float | None = None
    b2: float | None = None
    eps: float | None = None
    warmup_steps: int = 0
    schedule: str = "cosine"
    total_steps: int = 1000
    max_grad_norm: float | None = 1.0
    min_lr_ratio: float = 0.0


# Each optimizer's defaults for the hyper-parameters left None; a key it lacks, it does not use.
# Adafactor's second-moment decay is not a constant b2 but 1 - t^-0.8 (Shazeer & Stern 2018).
DEFAULTS: dict[str, dict[str, float]] = {
    "adamw": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "adafactor": {"b1": 0.0, "eps": 1e-30},
    "lion": {"b1": 0.9, "b2": 0.99},
    "sgd": {"b1": 0.0},
}


def config_from(o, total_steps: int = 1000, learning_rate: float | None = None) -> OptimizerConfig:
    """The OptimizerConfig of `config.optimizer` (an ml_collections section, where clipping is
    `grad_clip_norm`) for a stage of total_steps, at learning_rate (default: the section's).
    The warmup is capped at the stage: a stage shorter than it warms up throughout."""
    return OptimizerConfig(
        name=o.name,
        learning_rate=o.learning_rate if learning_rate is None else learning_rate,
        weight_decay=o.weight_decay,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        warmup_steps=min(o.warmup_steps, total_steps),
        schedule=o.schedule,
        total_steps=total_steps,
        max_grad_norm=o.grad_clip_norm,
        min_lr_ratio=o.min_lr_ratio,
    )


def hyperparameter_problems(c: OptimizerConfig) -> list[str]:
    """What is wrong with c, one message per problem (empty when nothing is)."""
    if c.name not in OPTIMIZERS:
        return [f"optimizer name={c.name!r}; expected one of {', '.join(OPTIMIZERS)}"]
    problems = []
    if not math.isfinite(c.learning_rate) or c.learning_rate <= 0:
        problems.append(f"learning_rate={c.learning_rate} must be finite and > 0")
    if not math.isfinite(c.weight_decay) or c.weight_decay < 0:
        problems.append(f"weight_decay={c.weight_decay} must be finite and >= 0")
    for key in ("b1", "b2", "eps"):
        value = getattr(c, key)
        if value is None:
            continue
        if key not in DEFAULTS[c.name]:
            problems.append(f"{key}={value} is not used by {c.name}; leave it None")
        elif key == "eps" and not (math.isfinite(value) and value >= 0):
            problems.append(f"eps={value} must be finite and >= 0")
        elif key != "eps" and not 0.0 <= value < 1.0:
            problems.append(f"{key}={value} must be in [0, 1)")
    if not 0.0 <= c.min_lr_ratio <= 1.0:
        problems.append(f"min_lr_ratio={c.min_lr_ratio} must be in [0, 1]")
    return problems


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax GradientTransformation (`init`, `update`) plus its learning-rate `schedule`."""

    init: Callable
    update: Callable
    schedule: Callable[[jax.Array], jax.Array]
    config: OptimizerConfig


def make_schedule(
    learning_rate: float,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    total_steps: int = 1000,
    min_lr_ratio: float = 0.0,
) -> Callable[[jax.Array], jax.Array]:
    """lr(s) for the update at 0-based step s.

    Warmup: lr * s / warmup_steps for s < warmup_steps (the first update at lr 0, as in
    transformers' get_*_schedule_with_warmup and optax's warmup schedules, so a run reproduces
    one trained with them step for step). Then, with p = (s - warmup_steps) / (total_steps -
    warmup_steps) clipped to [0, 1] and end = lr * min_lr_ratio: cosine end + (lr - end)
    (1 + cos(pi p)) / 2; linear lr + (end - lr) p; constant lr.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(
            f"warmup_steps={warmup_steps}, total_steps={total_steps}; expected warmup_steps >= 0 "
            "and total_steps > 0"
        )
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} exceeds total_steps={total_steps}: the learning rate "
            "would never reach its peak"
        )
    peak, end = float(learning_rate), float(learning_rate) * float(min_lr_ratio)
    decay_steps = max(total_steps - warmup_steps, 1)

    def lr(step):
        s = jnp.asarray(step, jnp.float32)
        # The fraction of the decay still ahead, from integer step counts: near the end of a
        # long run, 1 - p in float32 would lose most of its digits.
        left = jnp.asarray(total_steps - jnp.asarray(step, jnp.int32), jnp.float32) / decay_steps
        left = jnp.clip(left, 0.0, 1.0)
        if schedule == "cosine":
            # (1 + cos(pi p)) / 2 written as sin^2(pi (1 - p) / 2): exact where it nears 0.
            value = end + (peak - end) * jnp.sin(0.5 * math.pi * left) ** 2
        elif schedule == "linear":
            value = end + (peak - end) * left
        else:
            value = jnp.full_like(s, peak)
        if warmup_steps > 0:
            value = jnp.where(s < warmup_steps, peak * s / warmup_steps, value)
        return value

    return lr


def _keys(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def _layer_axes(path) -> int:
    """1 for a per-layer leaf of a scanned model (a leading [L] axis stacks the layers' arrays),
    else 0: an update rule written for one layer's array maps over that axis."""
    return 1 if "layers" in _keys(path) else 0


def _decays(path, leaf) -> bool:
    keys = _keys(path)
    if keys and keys[-1] in ("bias", "scale"):
        return False
    if any(k.endswith("norm") for k in keys):
        return False
    return leaf.ndim - _layer_axes(path) >= 2


class AdafactorState(NamedTuple):
    count: jax.Array
    moments: Any  # per leaf {"row", "col"} (a matrix, factored) or {"full"} (other leaves)


def scale_by_adafactor(eps: float = 1e-30, decay_rate: float = 0.8, clip_threshold: float = 1.0):
    """HF's Adafactor update before the learning rate (Shazeer & Stern 2018): second moments
    factored into row and column means for every matrix (each layer's own, the stacked [L] axis
    mapped over), kept whole for vectors, decayed by 1 - t^-decay_rate; the update g / sqrt(v)
    clipped to RMS clip_threshold per layer's array. optax's scale_by_factored_rms factors only
    arrays at least 128 on both sides (so not LoRA's [in, r] factors) and clips a stacked leaf
    over all its layers at once."""

    def moments(path, p):
        if p.ndim - _layer_axes(path) >= 2:
            return {
                "row": jnp.zeros(p.shape[:-1], jnp.float32),
                "col": jnp.zeros(p.shape[:-2] + p.shape[-1:], jnp.float32),
            }
        return {"full": jnp.zeros(p.shape, jnp.float32)}

    def init(params):
        count = jnp.zeros((), jnp.int32)
        return AdafactorState(count, jax.tree_util.tree_map_with_path(moments, params))

    def update(grads, state, params=None):
        del params
        count = state.count + 1
        beta = 1.0 - count.astype(jnp.float32) ** -decay_rate

        def one(path, g, m):
            g32 = g.astype(jnp.float32)
            sq = g32 * g32 + eps
            if "row" in m:
                row = beta * m["row"] + (1 - beta) * jnp.mean(sq, axis=-1)
                col = beta * m["col"] + (1 - beta) * jnp.mean(sq, axis=-2)
                r = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))
                u = g32 * r[..., :, None] * jax.lax.rsqrt(col)[..., None, :]
                new = {"row": row, "col": col}
            else:
                full = beta * m["full"] + (1 - beta) * sq
                u, new = g32 * jax.lax.rsqrt(full), {"full": full}
            own = tuple(range(_layer_axes(path), u.ndim))  # one layer's array
            rms = jnp.sqrt(jnp.mean(u * u, axis=own, keepdims=True))
            u = u / jnp.maximum(rms / clip_threshold, 1.0)
            return {"u": u.astype(g.dtype), "m": new}

        out = jax.tree_util.tree_map_with_path(one, grads, state.moments)
        is_out = lambda x: isinstance(x, dict) and set(x) == {"u", "m"}
        updates = jax.tree.map(lambda o: o["u"], out, is_leaf=is_out)
        new_moments = jax.tree.map(lambda o: o["m"], out, is_leaf=is_out)
        return updates, AdafactorState(count, new_moments)

    return optax.GradientTransformation(init, update)


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: matrices (kernels, embeddings, LoRA factors); False
    for norm scales, biases and other 1-D leaves (per layer: the stacked [L] axis is not counted).
    """
    return jax.tree_util.tree_map_with_path(_decays, params)


def make_optimizer(config: OptimizerConfig | None = None, **kwargs) -> Optimizer:
    """The optimizer named by `config.name` (or kwargs), with clipping, schedule and decay mask.

    Names: adamw (adam is the same with its weight_decay), adafactor (factored second moments;
    learning_rate is absolute, not relative to parameter scale), lion, sgd. Hyper-parameters
    out of range, or set for an optimizer that has no use for them, are a ValueError.
    """
    if config is None:
        known = {f.name for f in dataclasses.fields(OptimizerConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"make_optimizer got unknown options {unknown}; known: {sorted(known)}")
        config = OptimizerConfig(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    c = config
    problems = hyperparameter_problems(c)
    if problems:
        raise ValueError("; ".join(problems))
    h = {
        **DEFAULTS[c.name],
        **{k: v for k in ("b1", "b2", "eps") if (v := getattr(c, k)) is not None},
    }
    lr = make_schedule(c.learning_rate, c.schedule, c.warmup_steps, c.total_steps, c.min_lr_ratio)
    wd = float(c.weight_decay)
    if c.name in ("adamw", "adam"):
        tx = optax.adamw(lr, b1=h["b1"], b2=h["b2"], eps=h["eps"], weight_decay=wd, mask=decay_mask)
    elif c.name == "adafactor":
        # HF's Adafactor with scale_parameter=False: learning_rate is the step size itself, as
        # for the other optimizers, not a fraction of each parameter's RMS; the decay is scaled
        # by the rate (p -= lr * wd * p; optax.adafactor adds wd * p after the rate).
        parts = [scale_by_adafactor(eps=h["eps"])]
        if h["b1"]:
            parts.append(optax.ema(h["b1"], debias=False, accumulator_dtype=jnp.float32))
        if wd:
            parts.append(optax.add_decayed_weights(wd, decay_mask))
        parts.append(optax.scale_by_learning_rate(lr))
        tx = optax.chain(*parts)
    elif c.name == "lion":
        tx = optax.lion(lr, b1=h["b1"], b2=h["b2"], weight_decay=wd, mask=decay_mask)
    else:
        parts = [optax.add_decayed_weights(wd, decay_mask)] if wd else []
        parts.append(optax.sgd(lr, momentum=h["b1"] or None))
        tx = optax.chain(*parts)
    if c.max_grad_norm is not None and c.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(c.max_grad_norm), tx)
    return Optimizer(tx.init, tx.update, lr, c)
