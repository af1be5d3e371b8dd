"""The training-config schema, its validation and the resolved-config dump.

A config is an `ml_collections.ConfigDict` that starts from `defaults()` (every key, its type and
its default) and is overridden by `configs/NAME.py` and by `--config.key=value` flags. `validate`
runs before anything is compiled and reports every problem at once:

  * a key that is not in the schema (a typo) names the nearest valid key (difflib);
  * a value of the wrong type names the key, the type found and the type expected;
  * a value outside its choices or range, and impossible combinations such as a global batch that
    the mesh's data axes do not divide, name the values involved.

`model.arch` holds `jaxpost.models.ModelConfig` fields for a built-in model (random init); its
keys are checked against that dataclass and its values by the dataclass's own validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
from typing import Any

import ml_collections

from jaxpost.config_builders import (  # re-exported: configs/*.py use them as jconfig.*
    ARCH_PRESETS,
    ConfigError,
    arch,
    builtin_task,
    parse_arg,
)
from jaxpost.models.config import ModelConfig

__all__ = [
    "ARCH_PRESETS",
    "ConfigError",
    "arch",
    "builtin_task",
    "defaults",
    "from_json",
    "model_config",
    "parse_arg",
    "to_json",
    "validate",
]


def _fieldref(value, field_type):
    return ml_collections.FieldReference(value, field_type=field_type)


def defaults() -> ml_collections.ConfigDict:
    """Every valid key with its default. Config files start from this and override."""
    c = ml_collections.ConfigDict()
    c.algorithm = "sft"  # a recipe name from jaxpost.loops.RECIPES
    c.workdir = "/tmp/jaxpost/run"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    # A local Hugging Face directory; when None the built-in `arch` is initialized at random.
    c.model.hf_path = _fieldref(None, str)
    c.model.arch = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # parameter dtype when loading HF weights
    # dtype of the matmuls' operands; None: the parameters' dtype. "bfloat16" over float32
    # parameters is mixed precision: bfloat16 matmuls (and their gradients) with float32 results,
    # float32 master weights, optimizer state, norms, softmax and loss.
    c.model.compute_dtype = _fieldref(None, str)

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = True  # False: full fine-tuning of every parameter
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.targets = _fieldref(None, tuple)  # regexes over parameter paths; None = all linears
    c.lora.quantize_base = False  # QLoRA: the frozen base is stored as NF4 blocks

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip_norm = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 8  # global, in rows of max_length tokens
    c.train.grad_accum = 1
    c.train.log_every = 10
    c.train.eval_every = 200  # 0: evaluate only at the end of each stage
    # Batches per evaluation, from the start of the held-out split; None: the whole split. Each
    # row is evaluated once: a split smaller than this is not repeated.
    c.train.eval_batches = _fieldref(None, int)

    # Full fine-tuning from random init before the main recipe ("pretraining"); 0 steps = none.
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.steps = 0
    c.pretrain.learning_rate = 1e-3
    c.pretrain.batch_size = 16

    c.data = ml_collections.ConfigDict()
    c.data.task = _fieldref(None, str)  # a built-in task from jaxpost.data.tasks
    # Keyword arguments of the task's generate_split (e.g. max_digits for arithmetic).
    c.data.task_options = ml_collections.ConfigDict()
    c.data.train_path = _fieldref(None, str)
    c.data.eval_path = _fieldref(None, str)
    c.data.format = "messages"
    c.data.max_length = 256
    c.data.packing = True
    c.data.shuffle_seed = 0
    c.data.num_epochs = _fieldref(None, int)  # None: repeat forever
    c.data.skip_malformed = False
    c.data.truncation = "error"
    c.data.num_train_examples = 20000  # rows generated for a built-in task's train split
    c.data.num_eval_examples = 200  # a built-in task's held-out examples; 0: no evaluation

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.mesh.multi_process = False  # jax.distributed.initialize from the env / the fields below
    c.mesh.coordinator_address = _fieldref(None, str)
    c.mesh.num_processes = _fieldref(None, int)
    c.mesh.process_id = _fieldref(None, int)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100
    c.checkpoint.keep_last = 3
    c.checkpoint.keep_every = _fieldref(None, int)
    c.checkpoint.async_save = True
    # False: this must be a fresh run; a work directory that holds checkpoints is refused (it
    # is never cleared). True: resume from the latest checkpoint of the current stage.
    c.checkpoint.resume = True

    c.export = ml_collections.ConfigDict()
    c.export.peft_adapter = True
    c.export.merged_hf = False

    c.metrics = ml_collections.ConfigDict()
    c.metrics.jsonl = True
    c.metrics.tensorboard = True
    c.metrics.progress_bar = True
    c.metrics.plot = True

    # CPU runs (`jaxpost.host_memory`; no effect on TPU/GPU). huge_pages: the command restarts
    # itself with glibc's malloc.hugetlb tunable, so a step's temporaries fault in 2 MiB pages
    # instead of 4 KiB ones (faster steps, same memory). keep_freed_memory, opt in: malloc keeps
    # freed blocks in the heap (faster steps, a larger resident heap; works where the kernel's
    # huge pages are off).
    c.host = ml_collections.ConfigDict()
    c.host.huge_pages = True
    c.host.keep_freed_memory = False
    return c


CHOICES: dict[str, tuple] = {
    "optimizer.name": ("adamw", "adam", "adafactor", "lion", "sgd"),
    "optimizer.schedule": ("cosine", "linear", "constant"),
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
    "data.num_train_examples",
    "checkpoint.every",
    "checkpoint.keep_last",
    "mesh.data",
    "mesh.tensor",
    "optimizer.learning_rate",
    "lora.alpha",
)
NON_NEGATIVE = (
    "train.eval_every",
    "pretrain.steps",
    "optimizer.warmup_steps",
    "optimizer.weight_decay",
    "seed",
    "data.num_eval_examples",
)


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


def _check_keys(cfg, schema, problems: list[str]) -> None:
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
            if expected.get() is not None:
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


def _check_arch(cfg, problems: list[str]) -> None:
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


def _check_task_options(cfg, problems: list[str]) -> None:
    options = cfg.data.task_options.to_dict()
    if not options:
        return
    if cfg.data.task is None:
        problems.append(f"data.task_options {sorted(options)} are set but data.task is None")
        return
    from jaxpost.data import tasks

    if cfg.data.task not in tasks.TASKS:
        problems.append(f"data.task={cfg.data.task!r}; built-in tasks are {sorted(tasks.TASKS)}")
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


def _check_values(cfg, problems: list[str], num_devices: int | None) -> None:
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
    elif cfg.data.task is None and cfg.model.hf_path is None:
        problems.append(
            "data.train_path needs a tokenizer: a built-in model (model.arch) only has the "
            "built-in task's (data.task); set model.hf_path to train an HF model with its own"
        )
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
        # The batch is split over (data, fsdp) — see jaxpost.sharding.DEFAULT_RULES.
        shards = sizes["data"] * sizes["fsdp"]
        for name in ("train.batch_size", "pretrain.batch_size"):
            batch = get(name)
            per_micro, rem = divmod(batch, cfg.train.grad_accum)
            if rem:
                problems.append(
                    f"{name}={batch} is not divisible by train.grad_accum={cfg.train.grad_accum}"
                )
            elif per_micro % shards:
                problems.append(
                    f"{name}={batch} (micro-batch {per_micro}) is not divisible by the "
                    f"data x fsdp mesh axes ({sizes['data']} x {sizes['fsdp']} = {shards})"
                )


def validate(
    cfg: ml_collections.ConfigDict, num_devices: int | None = None
) -> ml_collections.ConfigDict:
    """Check `cfg` against the schema; raise ConfigError listing every problem, else return it.

    num_devices (default: unchecked) resolves a -1 mesh axis and checks batch divisibility.
    """
    from jaxpost import loops  # the recipe registry; imported here to keep config.py light

    problems: list[str] = []
    _check_keys(cfg, defaults(), problems)
    if not problems:
        _check_arch(cfg, problems)
        _check_task_options(cfg, problems)
        _check_values(cfg, problems, num_devices)
        if cfg.algorithm not in loops.RECIPES:
            near = difflib.get_close_matches(cfg.algorithm, sorted(loops.RECIPES), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            problems.append(
                f"algorithm={cfg.algorithm!r} is not a registered recipe "
                f"{sorted(loops.RECIPES)}{hint}"
            )
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The built-in ModelConfig described by `cfg.model.arch`."""
    arch = cfg.model.arch.to_dict()
    if arch.get("layer_types") is not None:
        arch["layer_types"] = tuple(arch["layer_types"])
    return ModelConfig(**arch)


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (what the checkpoint and the work directory keep)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))
