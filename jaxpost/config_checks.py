"""The checks behind `jaxpost.config.validate`: keys against the schema (typos name the nearest
key), types, choices and ranges, the built-in model's fields, a task's options, and combinations
such as a batch the mesh does not divide. Each appends its problems to a list, so one run of
`validate` reports them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from typing import Any

import ml_collections

from jaxpost import optim, sharding
from jaxpost.config_builders import model_config
from jaxpost.models.config import ModelConfig

CHOICES: dict[str, tuple] = {
    "optimizer.name": optim.OPTIMIZERS,
    "optimizer.schedule": optim.SCHEDULES,
    "data.format": ("messages", "prompt_completion", "text", "preference", "prompt_answer"),
    "model.dtype": ("float32", "bfloat16"),
    "model.compute_dtype": (None, "float32", "bfloat16"),
    "data.truncation": ("error", "truncate_left", "truncate_right", "drop"),
}
POSITIVE = (
    "lora.rank",
    "train.steps",
    "train.batch_size",
    "train.grad_accum",
    "train.log_every",
    "train.eval_batches",
    "pretrain.batch_size",
    "data.max_length",
    "data.num_packing_bins",
    "data.num_train_examples",
    "checkpoint.every",
    "checkpoint.keep_last",
    "mesh.data",
    "mesh.tensor",
    "pretrain.learning_rate",
    "lora.alpha",
)
NON_NEGATIVE = (
    "train.eval_every",
    "pretrain.steps",
    "optimizer.warmup_steps",
    "seed",
    "data.task_seed",
    "data.num_eval_examples",
)


# Keys with a non-None default that also take None (`--config.K=None`); every key whose default
# is None takes it too.
NONE_ALLOWED = ("optimizer.grad_clip_norm",)


def _flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{"a.b": field} with FieldReferences left in place (their declared types matter)."""
    out = {}
    for key in cfg.keys():
        if isinstance(cfg[key], ml_collections.ConfigDict):
            out[prefix + key] = cfg[key]
            out.update(_flatten(cfg[key], prefix + key + "."))
        else:
            try:
                out[prefix + key] = cfg.get_ref(key)
            except ValueError:  # a bare None (a section rebuilt from a plain dict) has none
                out[prefix + key] = ml_collections.FieldReference(None, field_type=object)
    return out


def _expected_type(ref: ml_collections.FieldReference) -> type:
    return ref.get_type()


def _type_name(t: type) -> str:
    return "float" if t is float else t.__name__


def check_keys(cfg, schema, problems: list[str]) -> None:
    flat, flat_schema = _flatten(cfg), _flatten(schema)
    for path, ref in flat.items():
        if path.startswith(("model.arch.", "data.task_options.")):
            continue
        if path not in flat_schema:
            parent = path.rpartition(".")[0]
            siblings = [p for p in flat_schema if p.rpartition(".")[0] == parent]
            near = difflib.get_close_matches(path, siblings or list(flat_schema), n=1, cutoff=0.5)
            if not near:
                near = difflib.get_close_matches(path, list(flat_schema), n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            problems.append(f"unknown config key {path!r}{hint}")
            continue
        expected = flat_schema[path]
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(ref, ml_collections.ConfigDict):
                problems.append(f"{path} must be a section (ConfigDict), got {ref.get()!r}")
            continue
        if isinstance(ref, ml_collections.ConfigDict):
            problems.append(f"{path} must be a value, got a section")
            continue
        want, value = _expected_type(expected), ref.get()
        if value is None:
            if expected.get() is not None and path not in NONE_ALLOWED:
                problems.append(f"{path} is None; expected a {_type_name(want)}")
            continue
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if want is tuple and isinstance(value, list):
            ok = True
        if not ok:
            problems.append(
                f"{path}={value!r} has type {type(value).__name__}; expected {_type_name(want)}"
            )


def check_arch(cfg, problems: list[str]) -> None:
    arch = cfg.model.arch.to_dict()
    if cfg.model.hf_path is not None:
        return
    if not arch:
        problems.append("model.hf_path is None and model.arch is empty; set one of them")
        return
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in sorted(set(arch) - fields):
        near = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.5)
        hint = f"; did you mean 'model.arch.{near[0]}'?" if near else ""
        problems.append(f"unknown config key 'model.arch.{key}' (not a ModelConfig field){hint}")
    if set(arch) - fields:
        return
    try:
        model_config(cfg)
    except (TypeError, ValueError) as e:
        problems.append(f"model.arch: {e}")


def check_task_options(cfg, problems: list[str]) -> None:
    """data.task names a built-in task, which accepts data.task_options."""
    options = cfg.data.task_options.to_dict()
    if cfg.data.task is None:
        if options:
            problems.append(f"data.task_options {sorted(options)} are set but data.task is None")
        return
    from jaxpost.data import tasks

    if cfg.data.task not in tasks.TASKS:
        near = difflib.get_close_matches(cfg.data.task, sorted(tasks.TASKS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        problems.append(
            f"data.task={cfg.data.task!r}; built-in tasks are {sorted(tasks.TASKS)}{hint} "
            "(None for data files: --config.data.task=None)"
        )
        return
    if not options:
        return
    params = inspect.signature(tasks.get(cfg.data.task).generate_split).parameters
    accepted = sorted(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY)
    for key in sorted(set(options) - set(accepted)):
        near = difflib.get_close_matches(key, accepted, n=1, cutoff=0.5)
        hint = f"; did you mean 'data.task_options.{near[0]}'?" if near else ""
        problems.append(
            f"unknown config key 'data.task_options.{key}' (task {cfg.data.task!r} accepts "
            f"{accepted}){hint}"
        )


def check_values(cfg, problems: list[str], num_devices: int | None, num_processes: int = 1) -> None:
    def get(path):
        node = cfg
        for part in path.split("."):
            node = node[part]
        return node

    for path, choices in CHOICES.items():
        if get(path) not in choices:
            problems.append(f"{path}={get(path)!r}; expected one of {choices}")
    for path in POSITIVE:
        value = get(path)
        if isinstance(value, (int, float)) and value <= 0:
            problems.append(f"{path}={value} must be > 0")
    for path in NON_NEGATIVE:
        value = get(path)
        if isinstance(value, (int, float)) and value < 0:
            problems.append(f"{path}={value} must be >= 0")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        problems.append(f"lora.dropout={cfg.lora.dropout} must be in [0, 1)")
    if cfg.checkpoint.keep_every is not None and cfg.checkpoint.keep_every <= 0:
        problems.append(f"checkpoint.keep_every={cfg.checkpoint.keep_every} must be > 0 or None")
    if cfg.lora.quantize_base and not cfg.lora.enabled:
        problems.append("lora.quantize_base=True (QLoRA) needs lora.enabled=True")
    if cfg.data.task is None and cfg.data.train_path is None:
        problems.append("no training data: set data.task (built-in) or data.train_path")
    elif cfg.data.task is not None and cfg.data.train_path:
        problems.append(
            f"data.task={cfg.data.task!r} and data.train_path are both set, and the built-in "
            "task would be trained on: to use the file, set --config.data.task=None"
        )
    elif cfg.data.task is not None and cfg.data.eval_path:
        problems.append(
            f"data.eval_path is set with data.task={cfg.data.task!r}, whose own held-out split "
            "would be evaluated: to train and evaluate on files, set --config.data.task=None "
            "and --config.data.train_path"
        )
    elif cfg.data.task is None and cfg.model.hf_path is None:
        problems.append(
            "data.train_path needs a tokenizer: a built-in model (model.arch) only has the "
            "built-in task's (data.task); set model.hf_path to train an HF model with its own"
        )
    if cfg.optimizer.name in optim.OPTIMIZERS:  # an unknown name is reported with the choices
        optimizer = optim.config_from(cfg.optimizer)
        problems.extend(f"optimizer.{p}" for p in optim.hyperparameter_problems(optimizer))
    if cfg.optimizer.warmup_steps > cfg.train.steps:
        problems.append(
            f"optimizer.warmup_steps={cfg.optimizer.warmup_steps} exceeds "
            f"train.steps={cfg.train.steps}"
        )

    sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    if any(s == 0 or s < -1 for s in sizes.values()) or list(sizes.values()).count(-1) > 1:
        problems.append(f"mesh sizes {sizes}: each must be >= 1, with at most one -1 (the rest)")
        return
    if num_devices is not None:
        known = math.prod(s for s in sizes.values() if s != -1)
        if -1 in sizes.values() and num_devices % known:
            problems.append(f"mesh {sizes} does not divide the {num_devices} available devices")
            return
        sizes = {k: (num_devices // known if s == -1 else s) for k, s in sizes.items()}
        if math.prod(sizes.values()) != num_devices:
            need = math.prod(sizes.values())
            problems.append(f"mesh {sizes} needs {need} devices; have {num_devices}")
            return
    if -1 not in sizes.values():
        for name in ("train.batch_size", "pretrain.batch_size"):
            batch = get(name)
            per_micro, rem = divmod(batch, cfg.train.grad_accum)
            if rem:
                problems.append(
                    f"{name}={batch} is not divisible by train.grad_accum={cfg.train.grad_accum}"
                )
            elif problem := sharding.batch_rows_problem(
                per_micro, sizes, what="micro-batch" if cfg.train.grad_accum > 1 else "batch"
            ):
                problems.append(f"{name}={batch}: {problem}")
        blocks = math.prod(sizes.get(a, 1) for a in sharding.batch_mesh_axes())
        if num_processes > 1 and blocks % num_processes:
            problems.append(
                f"mesh {sizes}: the batch axes split each batch into {blocks} block(s), not a "
                f"multiple of the {num_processes} processes; each process feeds rows of its "
                "own, so a block that processes share would drop one process's rows"
            )
