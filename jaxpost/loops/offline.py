"""The offline loop: batches from a fixed dataset -> train_step -> eval -> metrics -> checkpoint.

Shared by every algorithm that trains on a dataset (SFT, pretraining, DPO family, reward models);
the algorithm enters only through the jitted `train_step` / `eval_step` built from its loss.

Resume is exact: the checkpoint holds the train state (params, optimizer state, RNG, step) and the
data iterator's state, so a restarted run sees the same batches in the same order and reproduces
the uninterrupted run's losses; nothing is replayed. SIGTERM / SIGINT (via `PreemptionGuard`) save
a checkpoint at the current step and raise `Preempted`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import jax
import numpy as np

from jaxpost.checkpoint import Checkpointer, CheckpointError, config_diffs
from jaxpost.metrics import MetricsWriter, Progress
from jaxpost.preemption import PreemptionGuard


class Preempted(Exception):  # noqa: N818 - a control-flow signal, not a failure
    """Raised after the loop saved a checkpoint because SIGTERM / SIGINT arrived."""

    def __init__(self, signal_name: str, step: int, directory):
        super().__init__(
            f"{signal_name} received: saved checkpoint at step {step} in {directory}; "
            "run the same command again to resume"
        )
        self.signal_name, self.step = signal_name, step


class NonFiniteLoss(RuntimeError):
    """Raised, without saving, when a step's loss or gradient norm is NaN or infinite: a saved
    NaN state would rotate good checkpoints out (checkpoint.keep_last) and resume as NaN."""

    def __init__(self, step: int, metrics: dict, last_saved: int, directory):
        values = ", ".join(f"{k}={metrics[k]}" for k in ("loss", "grad_norm") if k in metrics)
        if last_saved:
            where = (
                f"The last checkpoint is step {last_saved} in {directory}. Lower the learning "
                "rate or check the data, then run again to resume from it; if the run had just "
                "resumed, that checkpoint may be damaged: move its step directory away to "
                "resume from the one before."
            )
        else:
            where = (
                "No checkpoint of this stage was saved yet. Lower the learning rate or check "
                "the data, then run again: it starts this stage from the beginning."
            )
        super().__init__(f"step {step}: {values}; stopped without saving this state. {where}")
        self.step = step


def _finite(host: dict) -> bool:
    return all(np.isfinite(host[k]) for k in ("loss", "grad_norm") if k in host)


class CheckpointableIterator(Protocol):
    """A batch iterator whose position can be saved and restored (Grain's DataLoader iterator)."""

    def __next__(self) -> dict: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


@dataclasses.dataclass
class LoopSettings:
    steps: int
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate once, at the end
    checkpoint_every: int = 100
    progress_bar: bool = True
    name: str = "train"


def _host(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in jax.device_get(metrics).items():
        arr = np.asarray(v)
        if arr.size == 1 and np.issubdtype(arr.dtype, np.number):
            out[k] = float(arr)
    return out


# Metrics that count or sum over a step's tokens; every other one is a mean over its trained
# tokens (loss, accuracy, ...) or its gradient (grad_norm), which a step without any has none of.
_COUNTS = frozenset({"tokens", "input_tokens", "loss_sum", "weight_sum"})


# Logged as the logged step's own value, as transformers' Trainer logs them; every other metric
# is the mean over the steps since the previous log.
LAST_STEP_METRICS = ("learning_rate", "grad_norm")


def _window_host(window: list[dict], last_only: tuple[str, ...]) -> dict[str, float]:
    """The last step's metrics with each one not in `last_only` replaced by its mean over the
    steps of `window` (one host transfer for all of them). Per-token means leave out the steps
    that trained no token (their loss of 0 is not a loss), unless no step trained one."""
    steps = [_host(m) for m in jax.device_get(window)]
    trained = [m for m in steps if m.get("weight_sum", 1.0) > 0] or steps
    out = dict(steps[-1])
    for k in out:
        over = steps if k in _COUNTS else trained
        if k not in last_only and all(k in m for m in over):
            out[k] = float(np.mean([m[k] for m in over]))
    return out


def _tokens(batch: dict) -> int:
    """This process's input tokens, padding left out (`steps` counts the global batch's as the
    `input_tokens` metric, which the logged throughput uses): the progress bar's rate."""
    segments = batch.get("segment_ids")
    if segments is not None:
        return int(np.count_nonzero(np.asarray(segments)))
    return int(np.size(batch["tokens"]))


def evaluate(eval_step: Callable, state, batches: Iterable[dict]) -> dict[str, float]:
    """Global means over `batches`.

    With a step that reports loss_sum and weight_sum (`steps.eval_step`), every mean is over
    the tokens of all batches, exact under padding and packing: loss = sum(loss_sum) /
    sum(weight_sum), and each aux metric (reported per batch as its sum / weight_sum) is
    re-weighted by its batch's weight_sum the same way; tokens is the total. A batch with
    fewer loss tokens counts for less, as it does in training. Other steps: the mean of the
    per-batch values."""
    totals: dict[str, float] = {}
    n = 0
    for batch in batches:
        metrics = _host(eval_step(state, batch))
        weight = metrics.get("weight_sum")
        for k, v in metrics.items():
            if weight is not None and k not in _COUNTS:
                v = v * weight  # back to this batch's sum
            totals[k] = totals.get(k, 0.0) + v
        n += 1
    if n == 0:
        raise ValueError("evaluation got no batches; the eval split is empty")
    if "weight_sum" not in totals:
        return {k: v / n for k, v in totals.items()}
    weight = totals["weight_sum"]
    # No loss token in the whole split (every mask 0): the means are undefined, not 0.
    out = {k: (v / weight if weight > 0 else float("nan")) for k, v in totals.items()}
    if "loss_sum" in totals:
        out["loss"] = out["loss_sum"]
    if "tokens" in totals:
        out["tokens"] = totals["tokens"]
    return {k: v for k, v in out.items() if k not in ("loss_sum", "weight_sum")}


def _check_origin(name: str, directory, extra: dict, origin, writer) -> None:
    """CheckpointError if the checkpoint (`extra`) was trained from other starting weights."""
    if origin is None:
        return
    saved = extra.get("origin")
    if saved is None:
        writer.echo(
            f"[{name}] the latest checkpoint in {directory} predates the record of "
            "a stage's starting weights: that they are this run's cannot be checked"
        )
    elif saved != origin:
        then, now = (", ".join(f"{k} {v}" for k, v in o.items()) for o in (saved, origin))
        raise CheckpointError(
            f"[{name}] the checkpoints in {directory} were trained from other "
            f"starting weights than this run's ({then} then, {now} now: an earlier stage ran "
            "longer or with other settings, or the model path holds other weights); resuming "
            "would continue the old run. Move that directory away (or use another workdir) to "
            "train this stage from the new weights"
        )


def run_offline(
    settings: LoopSettings,
    *,
    train_step: Callable,
    state,
    batches: CheckpointableIterator,
    checkpointer: Checkpointer,
    writer: MetricsWriter,
    guard: PreemptionGuard,
    abstract_state=None,
    eval_step: Callable | None = None,
    eval_batches: Callable[[], Iterator[dict]] | None = None,
    config_dict: dict | None = None,
    on_eval: Callable[[Any, int], dict[str, float]] | None = None,
    origin: dict | None = None,
):
    """Train for `settings.steps` steps, resuming from `checkpointer`'s latest step if present.

    state: the initial train state (used when there is no checkpoint); abstract_state: its
    ShapeDtypeStructs with shardings (defaults to state's), the restore target.
    eval_batches: a fresh iterator of eval batches per evaluation. on_eval(state, step) adds
    metrics computed outside the loss (e.g. task accuracy from generation).
    origin: what the run starts from that its state does not hold (the fingerprint of frozen
    base weights, of the weights a stage starts from); saved with each checkpoint, and a
    checkpoint saved from another origin is refused rather than continued on the wrong base.
    Returns the final train state.
    """
    start, carried = 0, []
    if checkpointer.latest_step() is not None:
        target = abstract_state if abstract_state is not None else jax.eval_shape(lambda: state)
        # (another model or LoRA shape is named by restore first: it changes the weights too)
        restored = checkpointer.restore(target, model_config=(config_dict or {}).get("model"))
        _check_origin(settings.name, checkpointer.directory, restored.extra, origin, writer)
        state, start = restored.state, restored.step
        # The steps between the last log and the checkpoint: the first log after the resume is
        # their mean with the steps after, as the run that did not stop logged it.
        carried = list(restored.extra.get("log_window", []))
        if restored.data_state is not None:
            try:
                batches.set_state(restored.data_state)
            except Exception as e:  # noqa: BLE001 - grain raises KeyError etc. on a foreign state
                raise CheckpointError(
                    f"[{settings.name}] the data-iterator state of checkpoint step {start} in "
                    f"{checkpointer.directory} does not fit this run's data pipeline "
                    f"({type(e).__name__}: {e}): data.packing or data.max_length changed since, "
                    "or another jaxpost version wrote it. Resume with the settings that wrote "
                    "it, or use another workdir"
                ) from e
        writer.echo(f"[{settings.name}] resumed from step {start} ({checkpointer.directory})")
        changed = [
            d
            # (a changed model is an error raised by restore, but for how it computes)
            for section in sorted(set(restored.config or {}) | set(config_dict or {}))
            # The checkpoint was found in this run's work directory: another spelling of it
            # (relative, a symlink, the directory moved) is the same run.
            if section != "workdir"
            for d in config_diffs(
                (restored.config or {}).get(section), (config_dict or {}).get(section), section
            )
        ]
        if restored.config is not None and config_dict is not None and changed:
            # Allowed (a longer run, a lower learning rate), but the curves before and after
            # are not one run's: say so in the log.
            writer.echo(
                f"[{settings.name}] the config changed since that checkpoint:\n  "
                + "\n  ".join(changed)
            )
    # Records an earlier attempt logged past the step resumed from are logged again below.
    writer.forget_after(start, (settings.name, f"{settings.name}_eval"))
    if start >= settings.steps:
        return state

    saved = [start]

    def save(step: int, wait: bool = False) -> None:
        if saved[-1] != step:
            extra = {"origin": origin} if origin is not None else {}
            if window:  # steps not logged yet (checkpoint.every is not a multiple of log_every)
                extra["log_window"] = [_host(m) for m in window]
            checkpointer.save(
                step,
                state,
                data_state=batches.get_state(),
                config=config_dict,
                extra=extra,
                wait=wait,
            )
            saved.append(step)
        elif wait:
            checkpointer.wait()

    def run_eval(step: int) -> None:
        metrics = {}
        if eval_step is not None and eval_batches is not None:
            metrics.update(evaluate(eval_step, state, eval_batches()))
        if on_eval is not None:
            metrics.update(on_eval(state, step))
        if metrics:
            writer.write(step, metrics, split=f"{settings.name}_eval")

    progress = Progress(settings.steps, start, settings.name, settings.progress_bar)
    t_last, tokens_since = time.perf_counter(), 0
    # The metrics of the steps since the last log, still on device (no host sync per step):
    # a logged metric is their mean (the loss as transformers' Trainer logs it, not the logged
    # step's alone), except LAST_STEP_METRICS. A resumed run starts with the carried steps'.
    window: list[dict] = list(carried)

    def check_and_log(step: int, metrics: dict, to_log: bool) -> float | None:
        """A host sync before a log or a save: the window's means (to_log) or the step's own
        metrics, checked finite (a NaN loss anywhere in a window makes its mean NaN; a NaN
        gradient makes the weights, and so every later loss, NaN) so no state after a NaN is
        saved, then logged with the window's throughput. Returns the loss."""
        nonlocal window, carried, t_last, tokens_since
        if to_log:
            host = _window_host(window, last_only=LAST_STEP_METRICS)
            # The steps' own token counts are the global batch's (all processes');
            # `_tokens` counts this process's rows only.
            if "input_tokens" in host:  # over the steps this process timed
                tokens_since = host["input_tokens"] * (len(window) - len(carried))
            window, carried = [], []
        else:
            host = _host(metrics)
        if not _finite(host):
            writer.write(step, host, split=settings.name)
            checkpointer.wait()
            raise NonFiniteLoss(step, host, saved[-1], checkpointer.directory)
        if not to_log:
            return None
        now = time.perf_counter()
        host["tokens_per_sec"] = tokens_since / max(now - t_last, 1e-9)
        t_last, tokens_since = now, 0
        writer.write(step, host, split=settings.name)
        return host.get("loss")

    last = settings.steps  # the last step run: earlier when the data runs out
    try:
        for step in range(start + 1, settings.steps + 1):
            try:
                batch = next(batches)
            except StopIteration:  # a finite data.num_epochs ended before train.steps
                last = step - 1
                if jax.process_count() > 1:
                    # The others may still have a batch: stopping alone would leave them
                    # waiting in the next step's collectives.
                    raise RuntimeError(
                        f"the data of process {jax.process_index()} ran out after step {last} "
                        f"of {settings.steps}; under several processes use data.num_epochs=None "
                        "(repeat the data) or fewer train.steps"
                    ) from None
                writer.echo(
                    f"[{settings.name}] the data ran out after step {last} of {settings.steps} "
                    "(data.num_epochs); stopping here"
                )
                if window:  # the steps since the last log: checked before the save, logged
                    check_and_log(last, window[-1], to_log=True)
                save(last, wait=True)
                break
            tokens = _tokens(batch)
            state, metrics = train_step(state, batch)
            window.append(metrics)
            tokens_since += tokens
            loss = None
            stop = guard.should_stop()  # once per step: a collective under several processes
            # A stop logs the steps since the last log too: the resumed run starts a new window.
            to_log = step % settings.log_every == 0 or step == settings.steps or stop
            to_save = step % settings.checkpoint_every == 0 or step == settings.steps
            if jax.process_count() == 1 or to_log or to_save:
                # A failed background save stops the run here. Under several processes this is
                # a collective too: at log and save steps only.
                checkpointer.check_for_errors()
            if to_log or to_save:
                loss = check_and_log(step, metrics, to_log)
            progress.update(tokens, loss)
            # Evaluation and saving are kept out of the throughput: their time is added to
            # the window's start (not a restart of the window, whose tokens stay counted).
            paused = time.perf_counter()
            if settings.eval_every and step % settings.eval_every == 0:
                run_eval(step)
            if to_save:
                save(step, wait=step == settings.steps)
            t_last += time.perf_counter() - paused
            if stop:
                save(step, wait=True)
                raise Preempted(guard.requested or "signal", step, checkpointer.directory)
    finally:
        progress.close()
    if last > start and (not settings.eval_every or last % settings.eval_every):
        run_eval(last)
    checkpointer.wait()
    return state
