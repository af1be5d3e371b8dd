"""The training-config schema, its validation and the resolved-config dump.

A config is an `ml_collections.ConfigDict` that starts from `defaults()` (every key, its type and
its default) and is overridden by `configs/NAME.py` and by `--config.key=value` flags. `validate`
runs before anything is compiled and reports every problem at once (the checks are in
`jaxpost.config_checks`):

  * a key that is not in the schema (a typo) names the nearest valid key (difflib);
  * a value of the wrong type names the key, the type found and the type expected;
  * a value outside its choices or range, and impossible combinations such as a global batch that
    the mesh's data axes do not divide, name the values involved.

`model.arch` holds `jaxpost.models.ModelConfig` fields for a built-in model (random init); its
keys are checked against that dataclass and its values by the dataclass's own validation.
"""

from __future__ import annotations

import difflib
import json

import ml_collections

from jaxpost.config_builders import (  # re-exported: configs/*.py use them as jconfig.*
    ARCH_PRESETS,
    ConfigError,
    arch,
    builtin_task,
    model_config,
    parse_arg,
)
from jaxpost.config_checks import (
    NONE_ALLOWED,
    check_arch,
    check_keys,
    check_task_options,
    check_values,
)

__all__ = [
    "ARCH_PRESETS",
    "ConfigError",
    "NONE_ALLOWED",
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
    c.lora.use_rslora = False  # rsLoRA: scale alpha / sqrt(rank) instead of alpha / rank
    c.lora.targets = _fieldref(None, tuple)  # regexes over parameter paths; None = all linears
    c.lora.quantize_base = False  # QLoRA: the frozen base is stored as NF4 blocks

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 0
    c.optimizer.min_lr_ratio = 0.0  # cosine / linear decay end at learning_rate * this
    c.optimizer.weight_decay = 0.0
    # None: the optimizer's own default (jaxpost.optim.DEFAULTS: AdamW 0.9 / 0.999 / 1e-8, Lion
    # 0.9 / 0.99, Adafactor eps 1e-30, SGD momentum b1 = 0); a key the optimizer does not use
    # (e.g. b2 for sgd) is refused.
    c.optimizer.b1 = _fieldref(None, float)
    c.optimizer.b2 = _fieldref(None, float)
    c.optimizer.eps = _fieldref(None, float)
    c.optimizer.grad_clip_norm = 1.0  # <= 0 or None: no clipping

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
    # Keyword arguments of the task's generate_split (e.g. max_digits for arithmetic; on the
    # command line --config.data.task_options.max_digits=2).
    c.data.task_options = ml_collections.ConfigDict()
    c.data.train_path = _fieldref(None, str)
    c.data.eval_path = _fieldref(None, str)
    c.data.format = "messages"
    c.data.max_length = 256
    c.data.packing = True
    # Rows the best-fit packer keeps open, per process; None: the batch's rows, at least 64
    # (more open rows waste less: jaxpost.data.pipeline.MIN_PACKING_BINS).
    c.data.num_packing_bins = _fieldref(None, int)
    # Plain-string prompt / completion rows: True wraps them as user / assistant turns of the
    # tokenizer's chat template; False is raw BOS + prompt + completion + EOS (base models; what
    # TRL does with such rows). Rows of messages always use the template.
    c.data.chat_template = True
    # The loss covers completions and assistant turns only (TRL's completion_only_loss); False
    # trains every token of a row, prompt and template included (TRL's default for messages).
    c.data.completion_only_loss = True
    c.data.shuffle_seed = 0
    c.data.num_epochs = _fieldref(None, int)  # None: repeat forever
    c.data.skip_malformed = False
    c.data.truncation = "error"
    c.data.num_train_examples = 20000  # rows generated for a built-in task's train split
    c.data.num_eval_examples = 200  # a built-in task's held-out examples; 0: no evaluation
    # Draws a built-in task's problems (train and held-out splits). Apart from `seed`, so that
    # runs over several seeds evaluate on the same held-out problems.
    c.data.task_seed = 0

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


def _unset_none_strings(cfg: ml_collections.ConfigDict, schema: ml_collections.ConfigDict) -> None:
    """A command line cannot pass None: `--config.data.task=None` arrives as the string 'None'.
    For the optional string keys (default None) 'None' and '' mean None."""
    for key, default in schema.items():
        if isinstance(default, ml_collections.ConfigDict):
            if isinstance(cfg[key], ml_collections.ConfigDict):
                _unset_none_strings(cfg[key], default)
        elif default is None and isinstance(cfg[key], str) and cfg[key].strip() in ("None", ""):
            cfg[key] = None


def validate(
    cfg: ml_collections.ConfigDict, num_devices: int | None = None, num_processes: int = 1
) -> ml_collections.ConfigDict:
    """Check `cfg` against the schema; raise ConfigError listing every problem, else return it.

    num_devices (default: unchecked) resolves a -1 mesh axis and checks batch divisibility;
    num_processes checks that the batch axes give each process rows of its own.
    """
    from jaxpost import loops  # the recipe registry; imported here to keep config.py light

    problems: list[str] = []
    check_keys(cfg, defaults(), problems)
    if not problems:
        _unset_none_strings(cfg, defaults())
        check_arch(cfg, problems)
        check_task_options(cfg, problems)
        check_values(cfg, problems, num_devices, num_processes)
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


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (what the checkpoint and the work directory keep)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))
