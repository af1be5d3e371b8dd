"""Jittable train and eval steps over a device mesh: `step(state, batch) -> (state, metrics)`.

The step is a module-level pure function (`train_step`, `eval_step`) of the state, the batch and
static settings; `make_train_step` / `make_eval_step` bind the settings and jit it once with
explicit in/out shardings derived from logical axes (`models.logical_axes`, `lora.logical_axes`,
`jaxpost.sharding`), the state donated (but for the frozen base, see below).

Trainable part: under trainable="lora" only params["lora"] is differentiated and has optimizer
state; params["base"] enters the step as an argument of its own, neither donated nor returned,
so the state after a step holds the same base arrays (`_Jitted`), and JAX never forms the base
kernels' weight gradients. Under trainable="full", params["base"] is.

Gradient accumulation: the batch [B, ...] is split into k micro-batches of B/k rows taken with
stride k (row i*k + j is in micro-batch j), so every device keeps its rows and each micro-batch
stays spread over the data axes; a `lax.scan` sums the loss sums, weights and gradients, and the
step divides by the total weight: the exact token mean of the whole batch, whatever each
micro-batch's token count. A loss sees one micro-batch at a time, so its rows must stand alone:
a preference pair goes in one row (the `preference` format's chosen_ / rejected_ keys), and a
statistic over a group of rows (GRPO's group-normalised advantages) is computed before the step
and passed in the batch as a per-row or per-token array.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxpost import sharding
from jaxpost.models.config import ModelConfig
from jaxpost.optim import Optimizer, OptimizerConfig, decay_mask, make_optimizer, make_schedule
from jaxpost.train_state import (
    TRAINABLE,
    TrainState,
    init_train_state,
    join_trainable,
    param_logical_axes,
    split_trainable,
    state_shardings,
)

__all__ = [
    "Optimizer",
    "OptimizerConfig",
    "Stopwatch",
    "TrainState",
    "decay_mask",
    "eval_step",
    "init_train_state",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "param_logical_axes",
    "state_shardings",
    "tokens_per_second",
    "train_step",
]

LossFn = Callable[..., tuple[jax.Array, jax.Array, dict]]


def _batch_shardings(batch: dict, mesh: Mesh, rules: sharding.Rules) -> dict:
    scalars = sorted(k for k, v in batch.items() if np.ndim(v) == 0)
    if scalars:
        raise ValueError(f"batch entries {scalars} are scalars; every entry has a row per example")
    rows = {k: np.shape(v)[0] for k, v in batch.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"the batch's arrays differ in their rows (leading dimension): {rows}")
    for v in batch.values():
        sharding.check_batch_rows(np.shape(v)[0], mesh, rules)
    return {
        k: sharding.logical_to_sharding(
            np.shape(v), ("batch",) + (None,) * (np.ndim(v) - 1), mesh, rules
        )
        for k, v in batch.items()
    }


def _to_global(batch: dict, mesh: Mesh, rules: sharding.Rules) -> dict:
    """With several processes, each passes its own rows: assemble global jax.Arrays."""
    if jax.process_count() == 1:
        return batch
    local = {k: v for k, v in batch.items() if not isinstance(v, jax.Array)}
    return {**batch, **sharding.global_batch(local, mesh, rules)}


# The steps ---------------------------------------------------------------------------------------


def _micro_batches(batch: dict, k: int) -> dict:
    """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ... (see module doc)."""
    out = {}
    for name, x in batch.items():
        if x.shape[0] % k:
            raise ValueError(
                f"batch {name!r} has {x.shape[0]} rows, not divisible by grad_accum={k}"
            )
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        out[name] = jnp.swapaxes(x, 0, 1)
    return out


def _token_count(batch: dict) -> jax.Array:
    """Trained tokens: the loss's weight under the loss mask."""
    if "loss_mask" in batch:
        return jnp.sum(batch["loss_mask"].astype(jnp.float32))
    return jnp.asarray(batch["tokens"].size, jnp.float32)


def _input_token_count(batch: dict) -> jax.Array:
    """Input tokens, padding (segment 0) left out: what throughput counts, as HF's Trainer."""
    if "segment_ids" in batch:
        return jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32))
    return jnp.asarray(batch["tokens"].size, jnp.float32)


def _normalise(loss_sum, weight, aux) -> dict:
    denom = jnp.where(weight > 0, weight, 1.0)
    out = {"loss": loss_sum / denom, "loss_sum": loss_sum, "weight_sum": weight}
    out.update({k: v / denom for k, v in aux.items() if k not in out})
    return out


def train_step(
    state: TrainState,
    batch: dict,
    *,
    cfg: ModelConfig,
    loss_fn: LossFn,
    optimizer: Optimizer | optax.GradientTransformation,
    trainable: str = "lora",
    grad_accum: int = 1,
) -> tuple[TrainState, dict]:
    """One optimizer update on `batch` (leading dim = global batch). Pure; jit it with
    `make_train_step`. Metrics: loss (global token mean), grad_norm (before clipping),
    learning_rate (applied in this update), tokens (trained: sum of loss_mask), input_tokens
    (every non-padding token), loss_sum, weight_sum and the loss's aux sums / weight_sum."""
    rng, step_rng = jax.random.split(state.rng)
    train_part, frozen = split_trainable(state.params, trainable)

    def loss_of(tp, mb, key):
        loss_sum, weight, aux = loss_fn(cfg, join_trainable(tp, frozen, trainable), mb, key)
        return loss_sum, (weight, aux)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
    if grad_accum == 1:
        (loss_sum, (weight, aux)), grads = grad_fn(train_part, batch, step_rng)
        grads = f32(grads)
    else:
        micro = _micro_batches(batch, grad_accum)
        active = sharding.active_mesh()
        if active is not None:
            rows = jax.tree.leaves(micro)[0].shape[1]
            sharding.check_batch_rows(rows, *active, what=f"micro-batch (grad_accum={grad_accum})")

        def body(carry, xs):
            mb, j = xs
            mb = {
                k: sharding.constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in mb.items()
            }
            (ls, (w, ax)), g = grad_fn(train_part, mb, jax.random.fold_in(step_rng, j))
            add = lambda a, b: jax.tree.map(lambda x, y: x + y.astype(jnp.float32), a, b)
            return (add(carry[0], g), carry[1] + ls, carry[2] + w, add(carry[3], ax)), None

        first = jax.tree.map(lambda x: x[0], micro)
        aux_shape = jax.eval_shape(loss_of, train_part, first, step_rng)[1][1]
        zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), t)
        init = (zeros(train_part), jnp.zeros(()), jnp.zeros(()), zeros(aux_shape))
        (grads, loss_sum, weight, aux), _ = jax.lax.scan(
            body, init, (micro, jnp.arange(grad_accum))
        )
    denom = jnp.where(weight > 0, weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)  # float32, however the weights are stored
    grad_norm = optax.tree.norm(grads)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, train_part)
    updates, opt_state = optimizer.update(grads, state.opt_state, train_part)
    # A batch with no trained token has no gradient: the weights stay as they are (AdamW's
    # momentum alone would still move them; TRL's loss would be 0 / 0). The optimizer's state
    # takes the step as a zero gradient, so its count keeps to the schedule's.
    updates = jax.tree.map(lambda u: jnp.where(weight > 0, u, jnp.zeros_like(u)), updates)
    new_train = optax.apply_updates(train_part, updates)
    metrics = _normalise(loss_sum, weight, aux)
    metrics["grad_norm"] = grad_norm
    metrics["tokens"] = _token_count(batch)
    metrics["input_tokens"] = _input_token_count(batch)
    schedule = getattr(optimizer, "schedule", None)
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = TrainState(
        state.step + 1, join_trainable(new_train, frozen, trainable), opt_state, rng
    )
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, cfg: ModelConfig, loss_fn: LossFn) -> dict:
    """Loss metrics of `batch` without an update: loss, loss_sum, weight_sum (sum those over
    batches for the exact eval mean), tokens and the aux sums / weight_sum."""
    loss_sum, weight, aux = loss_fn(cfg, state.params, batch, None)
    metrics = _normalise(loss_sum, weight, aux)
    metrics["tokens"] = _token_count(batch)
    return metrics


class _Jitted:
    """Jits `fn` with shardings derived from the first state / batch it sees (per tree / shape
    signature), so the builders need no example state. `traces` counts how often the step was
    traced (each trace is one compilation); `lower(state, batch)` lowers it for inspection.

    The frozen part of the params (the base under trainable="lora", `split_trainable`) enters
    the jitted step as an argument of its own that is neither donated nor returned: the state
    after the step holds the very arrays it held before. Donated, they would be deleted by every
    step, and with them any other holder of the base, such as a rollout engine decoding from
    the trainer's weights (`rollout.weights`); returned, XLA would copy them."""

    def __init__(self, fn, cfg, mesh, trainable, rules, train: bool):
        self._fn, self._cfg, self._mesh = fn, cfg, mesh
        self._trainable, self._rules, self._train = trainable, rules, train
        self._cache: dict = {}
        self.traces = 0

    def _split(self, state: TrainState) -> tuple[dict, TrainState]:
        """(frozen params, the state with only the trainable params)."""
        train_part, frozen = split_trainable(state.params, self._trainable)
        params = join_trainable(train_part, {}, self._trainable)
        return frozen, dataclasses.replace(state, params=params)

    def _build(self, state, batch):
        s_shard = state_shardings(self._cfg, state, self._mesh, self._trainable, self._rules)
        frozen_shard, rest_shard = self._split(s_shard)
        b_shard = _batch_shardings(batch, self._mesh, self._rules)
        rep = sharding.replicated(self._mesh)
        mesh, rules, fn, split, train = self._mesh, self._rules, self._fn, self._split, self._train

        def run(frozen, rest, batch):
            self.traces += 1  # Python side effect: runs once per trace, i.e. per compilation
            state = dataclasses.replace(rest, params={**frozen, **rest.params})
            with sharding.use_mesh(mesh, rules):  # activation constraints at trace time
                out = fn(state, batch)
            return (split(out[0])[1], out[1]) if train else out

        return jax.jit(
            run,
            in_shardings=(frozen_shard, rest_shard, b_shard),
            out_shardings=(rest_shard, rep) if train else rep,
            donate_argnums=(1,) if train else (),
        )

    def _jitted_args(self, state: TrainState, batch: dict):
        batch = _to_global(batch, self._mesh, self._rules)
        shapes = tuple((k, np.shape(v), str(np.result_type(v))) for k, v in sorted(batch.items()))
        key = (jax.tree.structure(state), shapes)
        if key not in self._cache:
            self._cache[key] = self._build(state, batch)
        return self._cache[key], (*self._split(state), batch)

    def lower(self, state: TrainState, batch: dict):
        """The step's `jax.jit(...).lower` for this state and batch (compiled HLO, memory)."""
        jitted, args = self._jitted_args(state, batch)
        return jitted.lower(*args)

    def __call__(self, state: TrainState, batch: dict):
        jitted, (frozen, rest, batch) = self._jitted_args(state, batch)
        if not self._train:
            return jitted(frozen, rest, batch)
        new, metrics = jitted(frozen, rest, batch)
        return dataclasses.replace(new, params={**frozen, **new.params}), metrics


def make_train_step(
    cfg: ModelConfig,
    loss_fn: LossFn,
    optimizer: Optimizer | optax.GradientTransformation,
    mesh: Mesh,
    *,
    trainable: str = "lora",
    grad_accum: int = 1,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)`, jitted over `mesh` with the state donated
    (all but its frozen params, `_Jitted`).

    The batch's leading dimension is the global batch; with several processes each passes its
    own rows as numpy arrays (or global jax.Arrays). Compiles once per batch shape.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable={trainable!r}; expected 'lora' or 'full'")
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum!r}; expected a positive integer")
    fn = functools.partial(
        train_step,
        cfg=cfg,
        loss_fn=loss_fn,
        optimizer=optimizer,
        trainable=trainable,
        grad_accum=grad_accum,
    )
    return _Jitted(fn, cfg, mesh, trainable, rules, train=True)


def make_eval_step(
    cfg: ModelConfig,
    loss_fn: LossFn,
    mesh: Mesh,
    *,
    trainable: str | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> Callable[[TrainState, dict], dict]:
    """`eval_step(state, batch) -> metrics`, jitted over `mesh` (state not donated).

    trainable only picks the optimizer-state layout; by default it is inferred from the state
    (LoRA present -> "lora")."""
    fn = functools.partial(eval_step, cfg=cfg, loss_fn=loss_fn)
    inner: dict = {}

    def call(state: TrainState, batch: dict) -> dict:
        mode = trainable or ("full" if state.params.get("lora") is None else "lora")
        if mode not in inner:
            inner[mode] = _Jitted(fn, cfg, mesh, mode, rules, train=False)
        return inner[mode](state, batch)

    return call


def tokens_per_second(tokens: float, seconds: float) -> float:
    """Throughput from a token count and wall time (host-side; the step cannot see the clock)."""
    if seconds <= 0:
        raise ValueError(f"seconds={seconds}; expected a positive wall time")
    return float(tokens) / seconds


class Stopwatch:
    """Tokens/s between successive `lap(tokens)` calls: lap returns tokens / elapsed seconds.
    Block on the step's outputs (e.g. float(metrics["loss"])) before lapping."""

    def __init__(self):
        self._t = time.perf_counter()

    def lap(self, tokens: float) -> float:
        now = time.perf_counter()
        rate = tokens_per_second(tokens, max(now - self._t, 1e-9))
        self._t = now
        return rate
