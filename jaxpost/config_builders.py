"""What `configs/*.py` call to build a config: variant parsing, built-in model sizes and the
built-in task block, plus `ConfigError` and `model_config` (the built-in model a config names).
All are re-exported by `jaxpost.config`.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from jaxpost.models.config import ModelConfig


class ConfigError(ValueError):
    """A training config that cannot run; the message lists every problem found."""


# Built-in architectures for random-init runs (Qwen3-style: GQA, q/k norm, tied embeddings).
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2),
    "mini": dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2),
    "small": dict(
        hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4
    ),
    "100m": dict(
        hidden_size=768, intermediate_size=2304, num_layers=12, num_heads=12, num_kv_heads=4
    ),
    "1b": dict(
        hidden_size=2048, intermediate_size=6144, num_layers=16, num_heads=16, num_kv_heads=8
    ),
}


def arch(size: str, vocab_size: int, **overrides) -> ml_collections.ConfigDict:
    """A `model.arch` section for a built-in size ("tiny", "mini", "small", "100m", "1b")."""
    if size not in ARCH_PRESETS:
        near = difflib.get_close_matches(size, sorted(ARCH_PRESETS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(
            f"unknown model size {size!r}; expected one of {sorted(ARCH_PRESETS)}{hint}"
        )
    fields = dict(ARCH_PRESETS[size])
    fields.update(
        vocab_size=vocab_size,
        head_dim=fields["hidden_size"] // fields["num_heads"],
        model_type="qwen3",
        qk_norm=True,
        tie_embeddings=True,
        rope_theta=1e6,
        max_position_embeddings=4096,
    )
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def builtin_task(c: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
    """Switch `c` to a built-in `size` model (random init) trained on the built-in arithmetic
    task: no checkpoint, no dataset files, short sequences and a short run (the `:cpu` variants).
    Each config then sets what differs (learning rate, batch size, ...)."""
    c.model.hf_path = None
    c.model.arch = arch(size, vocab_size=32)
    c.data.train_path = None
    c.data.task = "arithmetic"
    c.data.max_length = 96
    c.optimizer.warmup_steps = 10
    c.train.steps = 200
    return c


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """big_vision-style variant parsing: "cpu,size=small" -> {cpu: True, size: "small"}.

    `spec` gives every accepted name with its default; its type converts the value. An unknown
    name is an error naming the nearest accepted one.
    """
    out = ml_collections.ConfigDict(spec)
    for part in filter(None, (arg or "").split(",")):
        name, eq, value = part.partition("=")
        if name not in spec:
            near = difflib.get_close_matches(name, sorted(spec), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown config variant {name!r}; accepted {sorted(spec)}{hint}")
        default = spec[name]
        if not eq:
            out[name] = True
        elif isinstance(default, bool):
            out[name] = value.lower() in ("1", "true", "yes")
        elif default is None:
            out[name] = value
        else:
            try:
                out[name] = type(default)(value)
            except ValueError:
                raise ConfigError(
                    f"config variant {name}={value!r}: expected {type(default).__name__} "
                    f"(default {default!r})"
                ) from None
    return out


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The built-in ModelConfig described by `cfg.model.arch`."""
    arch = cfg.model.arch.to_dict()
    if arch.get("layer_types") is not None:
        arch["layer_types"] = tuple(arch["layer_types"])
    return ModelConfig(**arch)
