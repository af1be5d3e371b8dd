"""HF checkpoints in and out: a local directory with config.json and safetensors weights.

Loading streams tensor by tensor: every parameter is built with `jax.make_array_from_callback`,
so each device shard reads only its own slice of the file (stacked [L, ...] leaves one layer at a
time) and the host never holds the whole model. The safetensors files are memory-mapped and decoded
here rather than through `safetensors.safe_open(framework="numpy")`, which cannot return bfloat16
(ml_dtypes supplies it); the format is a little-endian u64 header length, a JSON header with
dtype / shape / data_offsets per tensor, then the raw bytes.

HF Linear weights are [out, in]; ours are [in, out] (see `jaxpost.models.transformer`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxpost.models.config import ModelConfig
from jaxpost.models.hf_configs import config_from_hf, config_to_hf
from jaxpost.models.transformer import init, logical_axes
from jaxpost.sharding import DEFAULT_RULES, Rules, tree_shardings

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some checkpoints carry that transformers ignores: RoPE buffers of old exports.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. `read` copies out one (slice of a) tensor."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(
                    f"{path}: corrupt or truncated safetensors file: header of {n} bytes "
                    f"but the file has {size} bytes"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        end_of_data = 0
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: corrupt header entry for tensor {name!r}: {info}") from e
            if end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(
                    f"{path}: corrupt header: tensor {name!r} of shape {shape} {info['dtype']} "
                    f"spans {end - start} bytes"
                )
            self.entries[name] = (dtype, shape, start)
            end_of_data = max(end_of_data, end)
        if self.data_start + end_of_data > size:
            raise ValueError(
                f"{path}: truncated safetensors file: the header declares "
                f"{self.data_start + end_of_data} bytes, the file has {size}"
            )
        self._map = np.memmap(path, np.uint8, mode="r") if size else None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """tensor[index] as an in-memory array in the file's dtype (only those bytes are read)."""
        dtype, shape, start = self.entries[name]
        nbytes = math.prod(shape) * dtype.itemsize
        offset = self.data_start + start
        flat = self._map[offset : offset + nbytes].view(dtype)
        return np.array(flat.reshape(shape)[index])


def _open_weights(path: Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file holding it, for a single file or a sharded checkpoint."""
    index_path = path / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: not a safetensors index (needs 'weight_map')") from e
        files = {f: SafetensorsFile(path / f) for f in sorted(set(weight_map.values()))}
        out = {}
        for name, fname in weight_map.items():
            if name not in files[fname].entries:
                raise ValueError(f"{index_path} maps tensor {name!r} to {fname}, which lacks it")
            out[name] = files[fname]
        return out
    single = path / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    f = SafetensorsFile(single)
    return dict.fromkeys(f.entries, f)


def _layer_names(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Block param path -> (HF name inside model.layers.{i}., transposed?)."""
    names: dict[tuple[str, ...], tuple[str, bool]] = {}
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
        names[("attn", ours, "kernel")] = (f"self_attn.{theirs}.weight", True)
        names[("attn", ours, "bias")] = (f"self_attn.{theirs}.bias", False)
    for ours in ("gate", "up", "down"):
        names[("mlp", ours, "kernel")] = (f"mlp.{ours}_proj.weight", True)
    names[("attn", "q_norm", "scale")] = ("self_attn.q_norm.weight", False)
    names[("attn", "k_norm", "scale")] = ("self_attn.k_norm.weight", False)
    names[("attn_norm", "scale")] = ("input_layernorm.weight", False)
    # Gemma 2/3 put a norm after attention under the name Llama uses for the pre-MLP norm.
    if cfg.post_attn_norm:
        names[("post_attn_norm", "scale")] = ("post_attention_layernorm.weight", False)
        names[("mlp_norm", "scale")] = ("pre_feedforward_layernorm.weight", False)
    else:
        names[("mlp_norm", "scale")] = ("post_attention_layernorm.weight", False)
    names[("post_mlp_norm", "scale")] = ("post_feedforward_layernorm.weight", False)
    return names


_TOP_NAMES = {
    ("embedder", "embedding"): ("model.embed_tokens.weight", False),
    ("final_norm", "scale"): ("model.norm.weight", False),
    ("lm_head", "kernel"): ("lm_head.weight", True),
}


class _Leaf:
    """Where one parameter leaf lives in HF format: a name per layer (or one name) and layout."""

    def __init__(self, path: tuple[str, ...], shape: tuple[int, ...], cfg: ModelConfig):
        self.path, self.shape = path, shape
        self.stacked = path[0] == "layers"
        if self.stacked:
            template, self.transposed = _layer_names(cfg)[path[1:]]
            self.names = [f"model.layers.{i}.{template}" for i in range(cfg.num_layers)]
            one = shape[1:]
        else:
            name, self.transposed = _TOP_NAMES[path]
            self.names = [name]
            one = shape
        self.hf_shape = one[::-1] if self.transposed else one

    def read(
        self, files: dict[str, SafetensorsFile], index: tuple[slice, ...], dtype
    ) -> np.ndarray:
        """Our leaf[index], assembled from the HF tensors, in `dtype`."""

        def one(name: str, sub: tuple[slice, ...]) -> np.ndarray:
            a = files[name].read(name, sub[::-1] if self.transposed else sub)
            return (a.T if self.transposed else a).astype(dtype)

        if not self.stacked:
            return one(self.names[0], index)
        layers = range(*index[0].indices(len(self.names)))
        return np.stack([one(self.names[i], index[1:]) for i in layers])

    def hf_tensors(self, leaf: jax.Array) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
        """(HF name, a thunk fetching that tensor to host in HF layout), one layer at a time."""

        def fetch(i: int | None) -> np.ndarray:
            a = np.asarray(leaf if i is None else leaf[i])
            return np.ascontiguousarray(a.T if self.transposed else a)

        if not self.stacked:
            yield self.names[0], lambda: fetch(None)
            return
        for i, name in enumerate(self.names):
            yield name, lambda i=i: fetch(i)


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def _leaves(cfg: ModelConfig) -> tuple[Any, list[_Leaf]]:
    abstract = jax.eval_shape(lambda: init(cfg, jax.random.key(0)))
    flat = jax.tree_util.tree_leaves_with_path(abstract)
    return abstract, [_Leaf(_path_key(p), tuple(x.shape), cfg) for p, x in flat]


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of an HF model directory."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: {path} is not an HF model directory "
            f"(expected config.json and {SINGLE_FILE} or {INDEX_FILE})"
        )
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e


def load_hf(
    path: str | os.PathLike,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> tuple[ModelConfig, dict]:
    """Load a local HF checkpoint directory into (ModelConfig, params).

    Params are created directly in their target shardings (`tree_shardings` of
    `logical_axes(cfg)` over `mesh` with `rules`); mesh None puts everything on the default
    device. dtype is the parameter and compute dtype ("float32" or "bfloat16").
    """
    path = Path(path)
    cfg = config_from_hf(read_config(path), dtype=dtype)
    files = _open_weights(path)
    abstract, leaves = _leaves(cfg)

    expected = {}
    for leaf in leaves:
        for name in leaf.names:
            expected[name] = leaf.hf_shape
    missing = [n for n in expected if n not in files]
    if missing:
        raise ValueError(
            f"{path}: missing tensor {missing[0]!r} (expected shape {expected[missing[0]]})"
            + (f" and {len(missing) - 1} more: {missing[1:6]}" if len(missing) > 1 else "")
        )
    ignorable = lambda n: (
        n.endswith(_IGNORED_SUFFIXES)
        or (
            n == "lm_head.weight"
            and cfg.tie_embeddings  # transformers re-ties it over the embedding
        )
    )
    unexpected = [n for n in files if n not in expected and not ignorable(n)]
    if unexpected:
        n = unexpected[0]
        raise ValueError(
            f"{files[n].path}: unexpected tensor {n!r} of shape {files[n].shape(n)}; the config "
            f"({cfg.model_type}, {cfg.num_layers} layers) has no such parameter"
            + (f" ({len(unexpected) - 1} more: {unexpected[1:6]})" if len(unexpected) > 1 else "")
        )
    for name, shape in expected.items():
        if files[name].shape(name) != shape:
            raise ValueError(
                f"{files[name].path}: tensor {name!r} has shape {files[name].shape(name)}, "
                f"expected {shape} from config.json"
            )

    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    else:
        shardings = tree_shardings(abstract, logical_axes(cfg), mesh, rules)
    target = jnp.dtype(dtype)
    arrays = [
        jax.make_array_from_callback(
            leaf.shape, sharding, lambda index, leaf=leaf: leaf.read(files, index, target)
        )
        for leaf, sharding in zip(leaves, jax.tree.leaves(shardings))
    ]
    return cfg, jax.tree.unflatten(jax.tree.structure(abstract), arrays)


def _check_params(cfg: ModelConfig, params: dict, leaves: list[_Leaf]) -> list[jax.Array]:
    """The leaves of `params` in `init` order, after checking paths and shapes against cfg."""
    given = {_path_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
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


def _write_safetensors(path: Path, tensors: list[tuple[str, Callable[[], np.ndarray], Any]]):
    """Write (name, thunk, abstract) tensors one at a time; the header is computed up front."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _, spec in tensors:
        nbytes = math.prod(spec.shape) * spec.dtype.itemsize
        code = _CODES[np.dtype(spec.dtype)]
        header[name] = {
            "dtype": code,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, thunk, spec in tensors:
            a = thunk()
            if a.shape != tuple(spec.shape) or a.dtype != spec.dtype:
                raise AssertionError(f"{name}: produced {a.shape} {a.dtype}, declared {spec}")
            f.write(a.tobytes())


def save_hf(
    cfg: ModelConfig,
    params: dict,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write params as an HF checkpoint directory that `transformers.from_pretrained` loads.

    Writes config.json and model.safetensors, or model-0000i-of-0000n.safetensors shards plus
    model.safetensors.index.json when the weights exceed max_shard_bytes. Tensors are fetched
    to host one at a time. The directory is built next to `path` and renamed into place, so a
    failed save never replaces a good checkpoint; files of an existing directory that a save
    does not produce (e.g. the tokenizer) are carried over.
    """
    path = Path(path).absolute()
    hf_config = config_to_hf(cfg)
    _, leaves = _leaves(cfg)
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

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        if len(shards) == 1:
            _write_safetensors(tmp / SINGLE_FILE, shards[0])
        else:
            weight_map = {}
            total = 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / fname, shard)
                for name, _, spec in shard:
                    weight_map[name] = fname
                    total += math.prod(spec.shape) * spec.dtype.itemsize
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if path.exists():
            _carry_over(path, tmp)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_weights_or_config(name: str) -> bool:
    return name.endswith(".safetensors") or name in ("config.json", INDEX_FILE)


def _carry_over(old: Path, new: Path) -> None:
    """Copy the files of an existing checkpoint dir that a save does not rewrite."""
    if not old.is_dir():
        raise ValueError(f"{old} exists and is not a directory; cannot save a checkpoint there")
    for entry in old.iterdir():
        if _is_weights_or_config(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


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
