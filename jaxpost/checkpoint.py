"""Orbax checkpoints of a training run: train state, data-iterator state, step and config.

One `Checkpointer` wraps an `orbax.checkpoint.CheckpointManager` over `<directory>/<step>/` with
two items: "state" (any pytree of arrays: params, optimizer state, RNG keys, step) and "meta"
(JSON: step, data-iterator state, resolved config, the state's tree description, extras).

* Atomic: Orbax writes each step into a temporary directory and renames it when complete, and
  only finished steps are listed, so a half-written checkpoint is never restored; leftover
  temporary directories are removed when the manager starts.
* Async: arrays are copied off-device and written in the background; `wait()` blocks.
* Retention: the latest `keep_last` steps plus every multiple of `keep_every`.
* Verified: "meta" holds two 32-bit checksums of every array's bits, computed on device at save;
  restore recomputes them, so a flipped bit in the files (which Orbax restores without complaint)
  is an error naming the damaged arrays rather than a silently wrong model.
* Restore takes an abstract target (ShapeDtypeStructs with shardings), so a checkpoint saved on one
  mesh restores onto another. The saved tree description is compared with the target first: a
  checkpoint of another model or another LoRA shape is an error naming the differing leaves.

The tree description and the checksums come from `jaxpost.checksums`; `jaxpost.preemption` turns
SIGTERM / SIGINT into a flag the loop polls to save a checkpoint and exit.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from jaxpost import sharding
from jaxpost.checksums import abstract_key_data, checksums, describe, is_prng_key, keys_to_data
from jaxpost.orbax_loops import draining_orbax_loops


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored into this run (mismatch or corruption)."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: Any
    config: dict | None
    extra: dict


def _mismatches(saved: dict[str, list], target: dict[str, list]) -> list[str]:
    lines = []
    # Parameters first: they name the model / LoRA difference; optimizer leaves follow.
    for path in sorted(set(saved) | set(target), key=lambda p: (not p.startswith("params/"), p)):
        if path not in target:
            lines.append(f"{path}: in the checkpoint, not in this run")
        elif path not in saved:
            lines.append(f"{path}: expected by this run, absent from the checkpoint")
        elif saved[path] != target[path]:
            lines.append(
                f"{path}: checkpoint has shape {saved[path][0]} {saved[path][1]}, "
                f"this run expects {target[path][0]} {target[path][1]}"
            )
    return lines


def _first(lines: list[str], limit: int = 8) -> list[str]:
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def _encode(value):
    """Data-iterator states may be bytes (Grain); JSON keeps them base64-encoded."""
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode()}
    return value


def _decode(value):
    if isinstance(value, dict) and set(value) == {"__bytes__"}:
        return base64.b64decode(value["__bytes__"])
    return value


def _own_data_state(meta: dict, where) -> Any:
    """This process's data-iterator state from a checkpoint's meta (one per process)."""
    states = meta.get("data_states")
    if states is None:  # written before per-process states: one state, process 0's
        return _decode(meta.get("data_state"))
    n = jax.process_count()
    if len(states) != n and any(x is not None for x in states):
        raise CheckpointError(
            f"checkpoint {where} was written by {len(states)} process(es) and this run has {n}: "
            "each process's position in its shard of the data cannot carry over to another "
            f"sharding. Resume with {len(states)} process(es), or start a new run (another "
            "workdir) from this run's exported weights"
        )
    return _decode(states[jax.process_index()]) if len(states) == n else None


# Model config keys that change how the model computes, not its weights: a resume may change
# them (mixed precision switched on or off), and the change is listed, not refused.
COMPUTE_ONLY_MODEL_KEYS = ("model.compute_dtype",)


def _likely_cause(problems: list[str]) -> str:
    if all(p.startswith("opt_state") for p in problems):
        return "another optimizer?"
    return "another model or another LoRA shape?"


_OS_ERRORS = re.compile(
    r"No space left on device|Permission denied|Read-only file system|Disk quota exceeded"
)


def _first_line(e: Exception) -> str:
    """An exception's message without TensorStore's trailing details (a bound-method repr),
    cut short, with the operating system's reason first when it names one."""
    text = (str(e).splitlines() or [""])[0]
    text = re.sub(r"\s*\[?See full TensorStore details.*$", "", text)
    reason, limit = _OS_ERRORS.search(text), 300
    short = text if len(text) <= limit else text[:limit] + "..."
    return f"{reason.group(0)}: {short}" if reason and reason.end() > limit else short


class Checkpointer:
    """Save / restore training checkpoints under `directory` (one sub-directory per step)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_last: int = 3,
        keep_every: int | None = None,
        async_save: bool = True,
    ):
        self.directory = Path(directory).absolute()
        policies = [ocm.LatestN(keep_last)]
        if keep_every:
            policies.append(ocm.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        # Until close: Orbax's restore and background-save loops (the manager's own start-up
        # cleanup's too) finish what a failed array read or write abandons, instead of printing
        # a traceback for each leftover.
        self._in_flight = False  # a save started since the last wait
        self._loops = contextlib.ExitStack()
        self._loops.enter_context(draining_orbax_loops())
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "meta")
            )
        except BaseException:
            self._loops.close()
            raise

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state,
        *,
        data_state=None,
        config: dict | None = None,
        extra: dict | None = None,
        wait: bool = False,
    ) -> None:
        """Start saving `state` (a pytree of arrays) as step `step`; `wait` blocks until on disk.

        data_state: this process's data-iterator state. Every process's is kept (each reads its
        own shard of the data), so all processes call `save` at the same steps.
        """
        if step in self._manager.all_steps():
            return
        data_states = [
            json.loads(t) for t in sharding.gather_across_processes(json.dumps(_encode(data_state)))
        ]
        meta = {
            "step": int(step),
            "data_states": data_states,  # by process index
            "config": config,
            "extra": extra or {},
            "tree": describe(state),
            "checksums": checksums(state),
        }
        try:  # (this first finishes an earlier asynchronous save, whose failure shows here)
            self._manager.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(keys_to_data(state)), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 - disk full, permissions: one clear error
            raise self._save_failed(e) from e
        self._in_flight = True
        if wait:
            self.wait()

    def wait(self) -> None:
        self._in_flight = False
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e) from e

    def check_for_errors(self) -> None:
        """CheckpointError if a background save has failed since it started; does not wait for
        one in progress. The loop calls it after train steps, so a save that cannot write (a
        full disk) stops the run then, not at the next save, thousands of steps on.

        Under several processes it is a collective (every process calls it at the same step):
        a save counts as done once every process's is, and a failure on any process stops
        every process at that step, none left waiting in the next step's collectives."""
        # A failed write ends Orbax's finalize thread, which reports only when waited on (its
        # check_for_errors reads another thread's error); once that thread is done, waiting
        # costs nothing.
        done = self._in_flight and not self._manager.is_saving_in_progress()
        if not sharding.agree_across_processes(done, "min"):
            return
        error = None
        try:
            self.wait()
        except CheckpointError as e:
            error = e
        if sharding.agree_across_processes(error is not None, "any") and error is None:
            error = CheckpointError(
                f"saving a checkpoint in {self.directory} failed on another process (its log "
                "has the cause); the checkpoints saved before it are intact: run again to "
                "resume from the latest"
            )
        if error is not None:
            raise error

    def _save_failed(self, e: Exception) -> CheckpointError:
        cause = _first_line(e)
        fix = (
            "free space or fix the directory's permissions, then run again to resume from the "
            "latest"
            if isinstance(e, OSError) or _OS_ERRORS.search(str(e))
            else "run again to resume from the latest"
        )
        return CheckpointError(
            f"saving a checkpoint in {self.directory} failed ({type(e).__name__}: {cause}); "
            f"the checkpoints saved before it are intact: {fix}"
        )

    def close(self) -> None:
        try:
            self.wait()
        finally:
            # Orbax's close waits again; a failed save is the wait's error, raised above.
            with contextlib.suppress(Exception):
                self._manager.close()
            self._loops.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, *_) -> None:
        # Closed on an error too, so a failed save or restore leaves no Orbax manager (and its
        # background threads) open; a save failing as well does not replace that error.
        try:
            self.close()
        except CheckpointError:
            if exc_type is None:
                raise

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON side of a checkpoint (step, data state, config, tree description, extras)."""
        step = self._resolve_step(step)
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(meta["meta"])
            _ = meta["tree"], meta["step"]
        except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt checkpoint
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} is corrupt or incomplete: its metadata "
                f"cannot be read ({type(e).__name__}: {_first_line(e)}); move that step "
                "directory away to resume from the checkpoint before it"
            ) from e
        return meta

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if step not in self._manager.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        return step

    def restore(self, abstract_state, step: int | None = None, *, model_config=None) -> Restored:
        """Restore into the structure, shapes, dtypes and shardings of `abstract_state`.

        abstract_state: a pytree of jax.ShapeDtypeStruct (with .sharding) or arrays, shaped like
        the saved state. model_config (a dict), when given, is compared with the saved config's
        "model" section so a checkpoint of another model is reported by its differing fields.
        """
        step = self._resolve_step(step)
        meta = self.read_meta(step)
        where = self.directory / str(step)
        data_state = _own_data_state(meta, where)
        saved_model = (meta.get("config") or {}).get("model")
        if model_config is not None and saved_model is not None:
            diffs = [
                d
                for d in config_diffs(saved_model, model_config, "model")
                if not d.startswith(COMPUTE_ONLY_MODEL_KEYS)
            ]
            if diffs:
                raise CheckpointError(
                    f"checkpoint {where} was written for a different model:\n  "
                    + "\n  ".join(diffs)
                )
        problems = _mismatches(meta["tree"], describe(abstract_state))
        if problems:
            raise CheckpointError(
                f"checkpoint {where} does not match this run's state ({_likely_cause(problems)}):"
                "\n  " + "\n  ".join(_first(problems))
            )
        target = jax.tree.map(abstract_key_data, abstract_state)
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target,
        )
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
        except Exception as e:  # noqa: BLE001 - any failure to read the arrays is corruption
            raise CheckpointError(
                f"checkpoint {where} is corrupt or incomplete: its arrays cannot be read "
                f"({type(e).__name__}: {_first_line(e)}); move that step "
                "directory away to resume from the checkpoint before it"
            ) from e
        saved_sums = meta.get("checksums")  # absent from checkpoints written before checksums
        if saved_sums is not None:
            got = checksums(out["state"])
            damaged = sorted(p for p in saved_sums if got.get(p) != saved_sums[p])
            if damaged:
                raise CheckpointError(
                    f"checkpoint {where} is corrupt: {len(damaged)} array(s) read back differ "
                    f"from what was saved ({', '.join(_first(damaged))}); move that step "
                    "directory away to resume from the checkpoint before it"
                )
        state = jax.tree.map(
            lambda like, x: (
                jax.random.wrap_key_data(x, impl=like.dtype._impl) if is_prng_key(like) else x
            ),
            abstract_state,
            out["state"],
        )
        return Restored(
            step=int(meta["step"]),
            state=state,
            data_state=data_state,
            config=meta.get("config"),
            extra=meta.get("extra") or {},
        )


def config_diffs(
    saved: Any, current: Any, prefix: str, where=("in the checkpoint", "in this config")
) -> list[str]:
    """One line per leaf where two (nested dict) configs differ, named by its dotted path;
    `where` names the two sides."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += config_diffs(saved.get(key), current.get(key), f"{prefix}.{key}", where)
        return out
    norm = lambda v: json.loads(json.dumps(v, default=list))
    if norm(saved) != norm(current):
        return [f"{prefix}: {saved!r} {where[0]}, {current!r} {where[1]}"]
    return []
