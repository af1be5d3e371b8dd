"""What a training config points at, checked before a run writes anything: the model directory,
the data files, the LoRA targets against the model's layers, and (with checkpoint.resume=False)
that the work directory holds no checkpoints.

`config.validate` checks a config on its own (keys, types, values), so configs with placeholder
paths validate in tests; this module looks at the disk. `python -m jaxpost.train` runs both
before it creates its work directory, so a mistyped path is one `error:` line naming the key,
not a traceback after the run has started.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

from jaxpost.config_builders import ConfigError
from jaxpost.data.sources import DataError, open_source


def check(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raise ConfigError listing every input of `cfg` that cannot be read, else return cfg."""
    problems: list[str] = []
    model_cfg = _model_config(cfg, problems)
    for key in ("train_path", "eval_path"):
        path = cfg.data[key]
        if path is None:
            continue
        try:
            open_source(path)
        except DataError as e:
            problems.append(f"data.{key}: {e}")
    if not cfg.checkpoint.resume:
        found = sorted(
            (p.parent.parent.name, int(p.name))
            for p in Path(cfg.workdir).glob("*/checkpoints/*")
            if p.name.isdigit()
        )
        steps = [f"{stage}/{step}" for stage, step in found]
        if steps:
            problems.append(
                f"checkpoint.resume=False, but workdir {cfg.workdir!r} holds checkpoints "
                f"({', '.join(steps[-3:])}); pass a fresh --config.workdir (nothing is deleted), "
                "or resume from them with checkpoint.resume=True"
            )
    if model_cfg is not None and cfg.lora.enabled:
        from jaxpost import lora  # the model's kernel names

        try:
            lora.select_targets(model_cfg, cfg.lora.targets)
        except ValueError as e:
            problems.append(f"lora.targets: {e}")
    if problems:
        raise ConfigError("invalid inputs:\n  " + "\n  ".join(problems))
    return cfg


def _model_config(cfg, problems: list[str]):
    """The ModelConfig the run will build (None, with the problem listed, when unreadable)."""
    from jaxpost import config as jconfig
    from jaxpost import models

    path = cfg.model.hf_path
    if path is None:
        return jconfig.model_config(cfg)
    if not os.path.isdir(path):
        problems.append(f"model.hf_path={path!r} is not a directory")
        return None
    found = sorted(os.listdir(path))
    missing = []
    if "config.json" not in found:
        missing.append("config.json")
    if not any(n.endswith(".safetensors") for n in found):
        missing.append("*.safetensors weights")
    if not {"tokenizer.json", "tokenizer.model"} & set(found):
        missing.append("tokenizer.json or tokenizer.model")
    if missing:
        problems.append(
            f"model.hf_path={path!r} is not an HF model directory: it has no "
            f"{', no '.join(missing)} (it holds {found[:12]})"
        )
        return None
    try:
        return models.config_from_hf(models.read_config(path), dtype=cfg.model.dtype)
    except (ValueError, KeyError) as e:
        problems.append(f"model.hf_path={path!r}: {e}")
        return None
