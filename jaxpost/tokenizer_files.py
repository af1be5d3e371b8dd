"""A tokenizer directory's files: which travel with an export, the JSON configs, and the chat
templates found where `transformers`' tokenizer finds them."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The files of a tokenizer directory, as `transformers`' tokenizer save_pretrained writes them
# (vocab.json / merges.txt: slow BPE tokenizers'), and generation_config.json, whose end-of-turn
# ids `load` adds to eos_ids: what travels with an exported adapter.
FILES = (
    "tokenizer.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)


# transformers' named chat templates besides the default one: <name>.jinja files.
TEMPLATES_DIR = "additional_chat_templates"


def copy_files(source: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy the tokenizer `FILES` (and `TEMPLATES_DIR`) that `source` holds into `dest`;
    returns their names."""
    copied = []
    for name in FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(dest) / name)
            copied.append(name)
    if (Path(source) / TEMPLATES_DIR).is_dir():
        shutil.copytree(
            Path(source) / TEMPLATES_DIR, Path(dest) / TEMPLATES_DIR, dirs_exist_ok=True
        )
        copied.append(TEMPLATES_DIR)
    return copied


def read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def token_str(value: Any) -> str | None:
    """A special token from a config: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def find_files(path: Path) -> tuple[Path, Path]:
    """(directory holding the configs, tokenizer file) for a directory or a tokenizer file."""
    if path.is_file():
        return path.parent, path
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    for name in ("tokenizer.json", "tokenizer.model"):
        if (path / name).is_file():
            return path, path / name
    found = sorted(p.name for p in path.iterdir())[:20]
    raise FileNotFoundError(
        f"{path} holds neither tokenizer.json (HF tokenizers) nor tokenizer.model "
        f"(SentencePiece); it contains {found}"
    )


def chat_templates_from_files(directory: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """{name: jinja source}, as `transformers`' tokenizer finds them: chat_template.jinja (the
    default) and additional_chat_templates/*.jinja when present, else tokenizer_config.json's
    template (a string, or a list of named ones). chat_template.json, the multimodal processor's
    file, which the tokenizer does not read, is used only when there is nothing else."""
    templates = {}
    if (directory / "chat_template.jinja").is_file():
        templates["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    extra = directory / TEMPLATES_DIR
    for file in sorted(extra.glob("*.jinja")) if extra.is_dir() else ():
        templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    template = config.get("chat_template")
    if template is None:
        template = read_json(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        # Several named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        return {
            str(t.get("name")): _template_source(directory, t.get("template"))
            for t in template
            if isinstance(t, dict)
        }
    return {} if template is None else {"default": _template_source(directory, template)}


def _template_source(directory: Path, template: Any) -> str:
    if not isinstance(template, str):
        raise ValueError(
            f"{directory}: chat_template is a {type(template).__name__}; expected a jinja string"
        )
    return template
