"""Optimizers, learning-rate schedules and weight-decay masks for the train steps.

`make_optimizer(name=..., learning_rate=..., ...)` takes plain keyword arguments (or an
`OptimizerConfig`), so `make_optimizer(**config.optimizer)` works from an ml_collections
ConfigDict. The result is an optax transformation (gradient clipping by global norm, then the
optimizer with its schedule and decay mask) that also carries the schedule, so the step can
report the learning rate it applied.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adam", "adafactor", "lion", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer hyper-parameters; field names match `config.optimizer`.

    b1 is SGD's momentum (0 = plain SGD). weight_decay is decoupled (AdamW / Lion style) and
    skips norms, biases and 1-D leaves (`decay_mask`). max_grad_norm <= 0 or None disables
    clipping. min_lr_ratio: the cosine / linear schedules end at learning_rate * min_lr_ratio.
    """

    name: str = "adamw"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    total_steps: int = 1000
    max_grad_norm: float | None = 1.0
    min_lr_ratio: float = 0.0


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
    peak, end = float(learning_rate), float(learning_rate) * float(min_lr_ratio)
    decay_steps = max(total_steps - warmup_steps, 1)

    def lr(step):
        s = jnp.asarray(step, jnp.float32)
        p = jnp.clip((s - warmup_steps) / decay_steps, 0.0, 1.0)
        if schedule == "cosine":
            value = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * p))
        elif schedule == "linear":
            value = peak + (end - peak) * p
        else:
            value = jnp.full_like(s, peak)
        if warmup_steps > 0:
            value = jnp.where(s < warmup_steps, peak * s / warmup_steps, value)
        return value

    return lr


def _decays(path, leaf) -> bool:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if keys and keys[-1] in ("bias", "scale"):
        return False
    if any(k.endswith("norm") for k in keys):
        return False
    stacked = 1 if "layers" in keys else 0  # layer leaves carry a leading [L] axis
    return leaf.ndim - stacked >= 2


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: matrices (kernels, embeddings, LoRA factors); False
    for norm scales, biases and other 1-D leaves (per layer: the stacked [L] axis is not counted).
    """
    return jax.tree_util.tree_map_with_path(_decays, params)


def make_optimizer(config: OptimizerConfig | None = None, **kwargs) -> Optimizer:
    """The optimizer named by `config.name` (or kwargs), with clipping, schedule and decay mask.

    Names: adamw (adam is the same with its weight_decay), adafactor (optax's factored second
    moments; learning_rate is absolute, not relative to parameter scale), lion, sgd (b1 is the
    momentum, 0 for none).
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
    if c.name not in OPTIMIZERS:
        raise ValueError(f"optimizer name={c.name!r}; expected one of {', '.join(OPTIMIZERS)}")
    lr = make_schedule(c.learning_rate, c.schedule, c.warmup_steps, c.total_steps, c.min_lr_ratio)
    wd = float(c.weight_decay)
    if c.name in ("adamw", "adam"):
        tx = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=wd, mask=decay_mask)
    elif c.name == "adafactor":
        tx = optax.adafactor(
            lr,
            weight_decay_rate=wd or None,
            weight_decay_mask=decay_mask,
            eps=max(c.eps, 1e-30),
            # learning_rate is the step size itself, as for the other optimizers (HF's
            # scale_parameter=False), not a fraction of each parameter's RMS.
            multiply_by_parameter_scale=False,
        )
    elif c.name == "lion":
        tx = optax.lion(lr, b1=c.b1, b2=c.b2, weight_decay=wd, mask=decay_mask)
    else:
        parts = [optax.add_decayed_weights(wd, decay_mask)] if wd else []
        parts.append(optax.sgd(lr, momentum=c.b1 or None))
        tx = optax.chain(*parts)
    if c.max_grad_norm is not None and c.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(c.max_grad_norm), tx)
    return Optimizer(tx.init, tx.update, lr, c)
