"""HF checkpoints out: params written as a directory `transformers.from_pretrained` loads
(config.json, safetensors shards, index), built beside the target and renamed into place, with
the source model's tokenizer and generation config carried along (`source=`).

The tensor names and layouts are `models.hf`'s (HF Linear weights are [out, in]; ours [in, out]).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxpost.models import safetensors_io
from jaxpost.models.config import ModelConfig
from jaxpost.models.hf import INDEX_FILE, SINGLE_FILE, HFLeaf, hf_leaves, leaf_path
from jaxpost.models.hf_configs import config_from_hf, config_to_hf, math_view


def _check_params(cfg: ModelConfig, params: dict, leaves: list[HFLeaf]) -> list[jax.Array]:
    """The leaves of `params` in `init` order, after checking paths and shapes against cfg."""
    if isinstance(params, dict) and set(params) == {"base", "lora"}:
        raise ValueError(
            "params are partitioned {'base', 'lora'}: save lora.merge(cfg, base, lora) as an "
            "HF checkpoint, or the adapter alone with lora.save_peft"
        )
    given = {leaf_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {leaf.path: leaf.shape for leaf in leaves}
    for path in want:
        if path not in given:
            raise ValueError(
                f"params has no leaf {'/'.join(path)} (shape {want[path]}) required by the config"
            )
    for path, x in given.items():
        if path not in want:
            raise ValueError(
                f"params leaf {'/'.join(path)} of shape {tuple(np.shape(x))} is not a parameter "
                f"of this config (merge LoRA or dequantize before saving)"
            )
        if tuple(np.shape(x)) != want[path]:
            raise ValueError(
                f"params leaf {'/'.join(path)} has shape {tuple(np.shape(x))}, "
                f"expected {want[path]} from the config"
            )
    return [given[leaf.path] for leaf in leaves]


def save_hf(
    cfg: ModelConfig,
    params: dict,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
    source: str | os.PathLike | None = None,
) -> None:
    """Write params as an HF checkpoint directory that `transformers.from_pretrained` loads.

    Writes config.json and model.safetensors, or model-0000i-of-0000n.safetensors shards plus
    model.safetensors.index.json when the weights exceed max_shard_bytes. Tensors are fetched
    to host one at a time. The directory is built next to `path` and renamed into place, so a
    failed save never replaces a good checkpoint; files of an existing directory that a save
    does not produce (e.g. the tokenizer) are carried over. Under several processes
    (`jax.distributed`) every process must call it; process 0 writes to `path`.

    source: the HF checkpoint directory the model came from. Its other files (tokenizer,
    generation_config.json, chat template) are copied alongside, and its config.json's special
    token ids (bos / eos / pad_token_id) kept, so `generate` on the saved model stops where the
    original's does. The source config.json's other entries that `ModelConfig` does not model
    (`use_cache`, `initializer_range`, dropout rates, `pretraining_tp`, ...) are kept too, as
    `save_pretrained` keeps them, unless one would change the model cfg describes (a
    `rope_scaling` the fine-tuned config dropped): those are left out with a warning naming them.
    """
    # A symlink to a directory is saved through: its target gets the new checkpoint.
    path = Path(path).resolve() if Path(path).is_symlink() else Path(path).absolute()
    hf_config = config_to_hf(cfg)
    if source is not None:
        source = Path(source)
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"source={str(source)!r} is not an HF checkpoint directory")
        hf_config = _with_source_entries(
            cfg, hf_config, json.loads((source / "config.json").read_text()), source
        )
    _, leaves = hf_leaves(cfg)
    arrays = _check_params(cfg, params, leaves)
    tensors = []
    for leaf, array in zip(leaves, arrays):
        shape = leaf.hf_shape
        spec = jax.ShapeDtypeStruct(shape, np.dtype(array.dtype))
        for name, thunk in leaf.hf_tensors(array):
            tensors.append((name, thunk, spec))
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t[2].shape) * t[2].dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes

    if jax.process_index() != 0:
        # Only process 0 writes; the others join the gathers of sharded tensors, in order.
        for _, thunk, _ in tensors:
            thunk()
        multihost_utils.sync_global_devices("jaxpost.models.save_hf")
        return
    try:
        _write_checkpoint(path, shards, hf_config, source)
    finally:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxpost.models.save_hf")


# config.json entries that describe the tokenizer, not the model: kept from a `source`.
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Source config.json entries not carried over: the weights' dtype (a save writes `dtype`, the
# saved params'), the transformers release that wrote the source, and transformers' own
# loading-time entries.
_NOT_CARRIED = ("transformers_version", "torch_dtype", "dtype", "_name_or_path")


def _with_source_entries(cfg: ModelConfig, hf_config: dict, original: dict, source: Path) -> dict:
    """hf_config (cfg's) plus the source config's entries it lacks, each kept only if the config
    still describes cfg's model with it (config_from_hf's view of the math is cfg's)."""
    out = dict(hf_config)
    out.update({k: original[k] for k in SPECIAL_TOKEN_KEYS if k in original})
    if original.get("model_type") == "gemma3" and isinstance(original.get("text_config"), dict):
        original = {"model_type": "gemma3_text", **original["text_config"]}  # its language model
    if original.get("model_type") != hf_config["model_type"]:
        warnings.warn(
            f"save_hf: source={str(source)!r} is a {original.get('model_type')!r} config and the "
            f"saved model a {hf_config['model_type']!r}: only its special token ids are kept",
            stacklevel=3,
        )
        return out  # another family's entries would not mean the same thing here
    math = math_view(cfg)  # = hf_config's: config_to_hf checked that
    left_out = []
    for key, value in original.items():
        if key in out or key in _NOT_CARRIED or key.startswith("_"):
            continue
        try:
            same = math_view(config_from_hf({**out, key: value})) == math
        except (ValueError, TypeError, KeyError):
            same = False
        if same:
            out[key] = value
        else:
            left_out.append(key)
    if left_out:
        warnings.warn(
            f"save_hf: config.json entries of source={str(source)!r} left out because the saved "
            f"model differs there: {', '.join(sorted(left_out))}",
            stacklevel=3,
        )
    return out


def _write_checkpoint(path: Path, shards: list[list], hf_config: dict, source) -> None:
    """Build the checkpoint in a temporary sibling directory, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Made as any directory is (the umask's mode; mkdtemp's 0700 kept other users, a serving
    # container among them, out of the renamed checkpoint).
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if len(shards) == 1:
            safetensors_io.write(tmp / SINGLE_FILE, shards[0])
        else:
            weight_map = {}
            total = 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                safetensors_io.write(tmp / fname, shard)
                for name, _, spec in shard:
                    weight_map[name] = fname
                    total += math.prod(spec.shape) * spec.dtype.itemsize
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if path.exists():
            _carry_over(path, tmp)
        if source is not None and source.absolute() != path:
            _copy_companions(source, tmp)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# The model's weight files as transformers names them (single file or shards); a save replaces
# these, and other .safetensors files (an adapter, optimizer state) are left alone.
_MODEL_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def _is_weights_or_config(name: str) -> bool:
    return bool(_MODEL_WEIGHTS.fullmatch(name)) or name in ("config.json", INDEX_FILE)


def _old_shards(old: Path) -> set[str]:
    """The weight files an existing directory's index names (its shards, whatever their names)."""
    try:
        return set(json.loads((old / INDEX_FILE).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _carry_over(old: Path, new: Path) -> None:
    """Copy the files of an existing checkpoint dir that a save does not rewrite."""
    if not old.is_dir():
        raise ValueError(f"{old} exists and is not a directory; cannot save a checkpoint there")
    replaced = _old_shards(old)
    for entry in old.iterdir():
        if _is_weights_or_config(entry.name) or entry.name in replaced:
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


# Weight files (any safetensors, other formats) a source directory may hold: never copied
# beside new weights.
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".h5",
    ".msgpack",
    ".ckpt",
    ".gguf",
    ".onnx",
)


def _copy_companions(source: Path, new: Path) -> None:
    """Copy the plain files of `source` that are neither weights nor config.json (tokenizer,
    generation config, chat template, README), replacing carried-over ones."""
    for entry in source.iterdir():
        name = entry.name
        if (
            not entry.is_file()
            or name.startswith(".")
            or _is_weights_or_config(name)
            or name.endswith(_WEIGHT_SUFFIXES)
            or name.endswith(".index.json")
        ):
            continue
        shutil.copy2(entry, new / name)


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename tmp to path; an existing path is moved aside first and removed only afterwards."""
    if not path.exists():
        os.rename(tmp, path)
        return
    backup = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)
