"""The training entry point.

  python -m jaxpost.train --config=configs/quickstart.py [--config.train.steps=100 ...]

Validates the config before anything is compiled, builds the mesh (multi-process when
`config.mesh.multi_process`), loads the model (a local HF directory or a built-in architecture at
random init), runs the recipe named by `config.algorithm` (optionally after a full-training
"pretrain" stage), logs metrics (stdout, JSONL, TensorBoard, progress bar), evaluates
periodically, and writes checkpoints, the LoRA adapter (PEFT format), optionally merged HF
weights and a PNG of the training curves to the work directory it prints. Re-running the same
command resumes from the latest checkpoint.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import sys
import time
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxpost import config as jconfig
from jaxpost import config_inputs, host_memory, loops, sharding
from jaxpost.chat_templates import ChatTemplateError
from jaxpost.checkpoint import CheckpointError, config_diffs
from jaxpost.data.sources import DataError, MalformedRow
from jaxpost.loops import runner
from jaxpost.loops.offline import NonFiniteLoss, Preempted
from jaxpost.preemption import PreemptionGuard

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/NAME.py[:variant], e.g. configs/quickstart.py:test", lock_config=True
)
flags.mark_flags_as_required(["config"])

# Exit codes of a run stopped by a signal after saving (the shell's 128 + signal number).
_SIGNAL_EXIT = {"SIGTERM": 143, "SIGINT": 130}

# Bad input found once the run has started (a malformed row, an example over max_length, a
# chat template that fails on a row, an unreadable file): one `error:` line and exit code 2,
# as a bad config gets. Any other exception is a bug and keeps its traceback.
_INPUT_ERRORS = (DataError, MalformedRow, ChatTemplateError, FileNotFoundError)


def _init_distributed(cfg) -> None:
    """jax.distributed when config.mesh.multi_process: settings from config.mesh, else the
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment, else JAX's
    detection of the cluster. Then every process must hold the same config."""
    env_keys = (sharding.ENV_COORDINATOR, sharding.ENV_NUM_PROCESSES, sharding.ENV_PROCESS_ID)
    env = [f"{k}={os.environ[k]}" for k in env_keys if os.environ.get(k)]
    if not cfg.mesh.multi_process:
        if env and os.environ.get(sharding.ENV_NUM_PROCESSES) != "1":
            raise jconfig.ConfigError(
                f"{', '.join(env)} set, but mesh.multi_process=False: this process would train "
                "alone, in the same workdir as the others; set --config.mesh.multi_process=True "
                "(or unset them)"
            )
        return
    try:
        sharding.initialize_distributed(
            config=cfg.mesh, detect_cluster=True, announce=lambda line: print(line, flush=True)
        )
    except ValueError as e:
        raise jconfig.ConfigError(str(e)) from e
    if jax.process_count() > 1:
        _check_same_config(cfg)


def _check_same_config(cfg) -> None:
    """ConfigError unless every process runs the same config (mesh.process_id aside): a host
    with another seed or learning rate would silently train another model, or hang later in a
    collective the others do not make."""
    mine = cfg.to_dict()
    mine["mesh"].pop("process_id", None)
    texts = sharding.gather_across_processes(json.dumps(mine, sort_keys=True, default=list))
    first = json.loads(texts[0])
    diffs = [
        line
        for i, text in enumerate(texts[1:], 1)
        for line in config_diffs(first, json.loads(text), "config", ("on process 0", f"on {i}"))
    ]
    if diffs:
        more = f"\n  ... and {len(diffs) - 8} more" if len(diffs) > 8 else ""
        raise jconfig.ConfigError(
            "the processes of this run have different configs:\n  " + "\n  ".join(diffs[:8]) + more
        )


def _exit(code: int) -> None:
    """Exit with `code`. A failed multi-process run exits at once: the normal exit waits (up to
    5 minutes) at jax.distributed's shutdown barrier for processes that are themselves stuck in
    a collective this one will never join; gone, it lets them fail fast too."""
    if code and jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _cli(argv: list[str]) -> None:
    try:
        code = main(argv, may_relaunch=True)
    except Exception:
        if not jax.distributed.is_initialized():
            raise
        traceback.print_exc()
        code = 1
    _exit(code)


def _host_memory(cfg, may_relaunch: bool) -> str:
    """The host-memory settings of config.host (`jaxpost.host_memory`), applied before anything
    starts JAX's backend; returns the log line. Huge pages need glibc's tunable set when the
    process starts, so the command re-executes itself with it (same PID and arguments)."""
    if not cfg.host.huge_pages:
        pages = "malloc defaults (host.huge_pages=False)"
    elif may_relaunch:
        pages = host_memory.restart_with_huge_pages()
    else:  # called as a function: the caller's process is not ours to restart
        env, pages = host_memory.relaunch_env()
        if env is not None:
            pages = "malloc defaults: not started as python -m jaxpost.train"
    kept = "off"
    if cfg.host.keep_freed_memory:  # malloc arenas are bound to threads when they start
        kept = host_memory.keep_freed_memory()
    return f"{pages}; keep freed memory: {kept}"


def _orbax_error_without_traceback(record) -> bool:
    """Orbax logs a failed background save (a full disk) at each layer it passes, each with
    a traceback of the same error, about 300 lines; the run then reports that error as one
    `error:` line. Here an Orbax record's traceback becomes its exception's first line, added
    to the message (set --verbosity to see the tracebacks)."""
    if "/orbax/" in record.pathname.replace(os.sep, "/") and record.exc_info:
        error = record.exc_info[1]
        if error is not None:
            first = (str(error).splitlines() or [""])[0][:300]
            record.msg, record.args = f"{record.getMessage()} ({type(error).__name__}: {first})", ()
        record.exc_info = record.exc_text = None
    return True


def main(argv: list[str], may_relaunch: bool = False) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.key=value")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax / JAX info logs drown the metrics
        logging.get_absl_logger().addFilter(_orbax_error_without_traceback)
    cfg = _CONFIG.value
    host = _host_memory(cfg, may_relaunch)
    try:
        _init_distributed(cfg)
        jconfig.validate(cfg, num_devices=jax.device_count(), num_processes=jax.process_count())
        config_inputs.check(cfg)  # paths and LoRA targets, before anything is written
    except jconfig.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        run = runner.Run.create(cfg)
    except (
        *_INPUT_ERRORS,
        jconfig.ConfigError,
        runner.WorkdirInUse,
        runner.WorkdirUnusable,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run.log(f"host memory: {host}")
    recipe = loops.RECIPES[cfg.algorithm]
    try:
        with PreemptionGuard() as guard:
            run.guard = guard
            runner.run_recipe(run, recipe)
    except Preempted as e:
        run.log(str(e))
        run.close()
        return _SIGNAL_EXIT.get(e.signal_name, 1)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        run.close()
        return 3
    except _INPUT_ERRORS as e:  # found while reading: a malformed row, a too-long example
        print(f"error: {e}", file=sys.stderr)
        run.close()
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        run.close()
        return 4
    run.finish(time.perf_counter() - t0)
    return 0


_OVERRIDE = re.compile(r"--config\.([\w.]+)(?:=(.*))?", re.DOTALL)
_TASK_OPTIONS = "data.task_options."


def _take_overrides(argv: list[str]) -> tuple[list[str], dict[str, object]]:
    """The overrides absl's config flag cannot apply, taken out of argv: `--config.K=None` (a
    typed key's parser rejects the string, and None is what optional keys document) and
    `--config.data.task_options.NAME=VALUE` (the task's options have no schema entries to
    override; VALUE a Python literal, else the string). The last override of a key wins.
    (Overrides inside an absl --flagfile are expanded later, so these two cannot be there.)"""
    rest, taken = [], {}
    i = 0
    while i < len(argv):
        m = _OVERRIDE.fullmatch(argv[i]) if i else None
        key, value, width = (m.group(1), m.group(2), 1) if m else (None, None, 1)
        if m and value is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, width = argv[i + 1], 2  # the two-argument form: --config.K VALUE
        if m and (value == "None" or key.startswith(_TASK_OPTIONS)):
            taken[key] = value
        else:
            taken.pop(key, None)  # a later ordinary override of the same key wins
            rest += argv[i : i + width]
        i += width
    return rest, taken


def _literal_or_text(text: str):
    """A Python literal (2, 0.5, (1, 2)), else the text itself, as a string flag takes it."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError):
        return text


def _apply_overrides(cfg, taken: dict[str, object]) -> None:
    for key, value in taken.items():
        if key.startswith(_TASK_OPTIONS):
            name = key[len(_TASK_OPTIONS) :]
            if value is None:
                raise jconfig.ConfigError(f"--config.{key} needs a value: --config.{key}=VALUE")
            with cfg.data.task_options.unlocked():
                cfg.data.task_options[name] = _literal_or_text(value)
            continue
        parent, _, leaf = key.rpartition(".")
        try:
            section = functools.reduce(getattr, parent.split("."), cfg) if parent else cfg
            default = functools.reduce(getattr, key.split("."), jconfig.defaults())
            section[leaf]  # noqa: B018 - the key must exist
        except (AttributeError, KeyError):
            raise jconfig.ConfigError(f"--config.{key}=None: no such config key") from None
        if default is not None and key not in jconfig.NONE_ALLOWED:
            raise jconfig.ConfigError(
                f"--config.{key}=None: {key} takes a value of type {type(default).__name__} "
                f"(default {default!r}); None is not one of its values"
            )
        section[leaf] = None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that a bad override is a one-line `error:`, exit code 2, as
    every other config error: a value of the wrong type (`--config.train.steps=ten`; absl says
    "FATAL Flags parsing error" and exits 1), a key the config does not have
    (`--config.train.step=100`, with ml_collections' own suggestion of the nearest key, instead
    of a traceback out of the flag parser), or a config variant the file refuses.
    `_take_overrides`' overrides are applied after the config file's."""
    argv, taken = _take_overrides(argv)
    try:
        rest = flags.FLAGS(argv)
        if taken:
            _apply_overrides(_CONFIG.value, taken)
        return rest
    except flags.Error as e:
        text = str(e)
        if "Error whilst parsing config file" in text and "Traceback" in text:
            # The config file raised (a variant it refuses): its exception, not the traceback
            # ml_collections puts in the message.
            error = jconfig.ConfigError
            text = text.strip().splitlines()[-1]
            text = text.removeprefix(f"{error.__module__}.{error.__qualname__}: ")
        print(f"error: {text}", file=sys.stderr)
        sys.exit(2)
    except jconfig.ConfigError as e:  # an override `_take_overrides` took
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:
        inner = e  # ml_collections raises AttributeError(KeyError(message))
        while isinstance(inner, BaseException) and inner.args:
            inner = inner.args[0]
        lines = [line.strip("'\" ") for line in str(inner).splitlines()] or [repr(e)]
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        # The override that names the missing key (ml_collections' message names only the key).
        named = [a for a in overrides if lines[0] in a.split("=")[0].split(".")[1:]]
        where = " ".join(named or overrides)
        print(f"error: no such config key: {'; '.join(lines)} (in {where})", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(_cli, flags_parser=_parse_flags)
