"""HF checkpoints in: a local directory with config.json and safetensors weights, and the name
mapping between HF tensors and our parameter leaves that saving (`models.hf_save`) shares.

Loading streams tensor by tensor: every parameter is built with `jax.make_array_from_callback`,
so each device shard reads only its own slice of the file (stacked [L, ...] leaves one layer at a
time) and the host never holds the whole model. The safetensors files are memory-mapped and decoded
by `jaxpost.models.safetensors_io` (bfloat16 included).

HF Linear weights are [out, in]; ours are [in, out] (see `jaxpost.models.transformer`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxpost.models import safetensors_io
from jaxpost.models.config import ModelConfig
from jaxpost.models.hf_configs import config_from_hf
from jaxpost.models.transformer import init, logical_axes
from jaxpost.sharding import DEFAULT_RULES, Rules, tree_shardings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some checkpoints carry that transformers ignores: RoPE buffers of old exports.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _open_weights(path: Path) -> dict[str, safetensors_io.SafetensorsFile]:
    """Tensor name -> the file holding it, for a single file or a sharded checkpoint. A
    directory holding both reads model.safetensors, as transformers does."""
    single = path / SINGLE_FILE
    if single.exists():
        f = safetensors_io.SafetensorsFile(single)
        return dict.fromkeys(f.entries, f)
    index_path = path / INDEX_FILE
    if not index_path.exists():
        raise FileNotFoundError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path}: not a safetensors index (needs 'weight_map')") from e
    files = {f: safetensors_io.SafetensorsFile(path / f) for f in sorted(set(weight_map.values()))}
    out = {}
    for name, fname in weight_map.items():
        if name not in files[fname].entries:
            raise ValueError(f"{index_path} maps tensor {name!r} to {fname}, which lacks it")
        out[name] = files[fname]
    return out


class _Source:
    """One tensor in one file (its name there may carry a multimodal prefix)."""

    def __init__(self, file: safetensors_io.SafetensorsFile, name: str):
        self.file, self.name = file, name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.file.shape(self.name)

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        return self.file.read(self.name, index)

    def __repr__(self) -> str:
        return repr(self.name)


# Where multimodal Gemma 3 checkpoints keep the language model (older and newer layouts).
_TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)


def _text_model_name(name: str) -> str | None:
    """A multimodal checkpoint's tensor name as the text-only model names it; None for the
    vision tower and projector, which the text model does not use."""
    for prefix, replacement in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix) :]
    return None


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


class HFLeaf:
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

    def read(self, sources: dict[str, _Source], index: tuple[slice, ...], dtype) -> np.ndarray:
        """Our leaf[index], assembled from the HF tensors, in `dtype`."""

        def one(name: str, sub: tuple[slice, ...]) -> np.ndarray:
            a = sources[name].read(sub[::-1] if self.transposed else sub)
            return (a.T if self.transposed else a).astype(dtype)

        if not self.stacked:
            return one(self.names[0], index)
        layers = range(*index[0].indices(len(self.names)))
        return np.stack([one(self.names[i], index[1:]) for i in layers])

    def hf_tensors(self, leaf: jax.Array) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
        """(HF name, a thunk fetching that tensor to host in HF layout), one layer at a time."""

        def fetch(i: int | None) -> np.ndarray:
            x = leaf if i is None else leaf[i]
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                # Spread over several processes: a collective every process takes part in.
                x = multihost_utils.process_allgather(x, tiled=True)
            a = np.asarray(x)
            return np.ascontiguousarray(a.T if self.transposed else a)

        if not self.stacked:
            yield self.names[0], lambda: fetch(None)
            return
        for i, name in enumerate(self.names):
            yield name, lambda i=i: fetch(i)


def leaf_path(path) -> tuple[str, ...]:
    """A pytree key path as a tuple of strings, e.g. ("layers", "attn", "q", "kernel")."""
    return tuple(str(getattr(k, "key", k)) for k in path)


def hf_leaves(cfg: ModelConfig) -> tuple[Any, list[HFLeaf]]:
    """(abstract params of cfg's model, one HFLeaf per leaf in `init` order)."""
    abstract = jax.eval_shape(lambda: init(cfg, jax.random.key(0)))
    flat = jax.tree_util.tree_leaves_with_path(abstract)
    return abstract, [HFLeaf(leaf_path(p), tuple(x.shape), cfg) for p, x in flat]


def _stores_its_own_head(sources: dict[str, _Source], rows: int = 4096) -> bool:
    """Whether a checkpoint holds an lm_head.weight that is not a copy of its embedding
    (compared exactly, a block of rows at a time, as transformers' torch.equal)."""
    head, embedding = sources.get("lm_head.weight"), sources.get("model.embed_tokens.weight")
    if head is None or embedding is None or head.shape != embedding.shape:
        return head is not None
    for start in range(0, head.shape[0], rows):
        block = (slice(start, start + rows),)
        a, b = head.read(block), embedding.read(block)
        if a.dtype != b.dtype:
            a, b = a.astype(np.float32), b.astype(np.float32)
        if not np.array_equal(a, b):
            return True
    return False


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of an HF model directory."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path} is not a directory (an HF model directory was expected)")
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
    device. dtype is the parameter and compute dtype ("float32", "bfloat16" or "float16").
    """
    path = Path(path)
    hf_config = read_config(path)
    cfg = config_from_hf(hf_config, dtype=dtype)
    multimodal = hf_config.get("model_type") == "gemma3"
    sources = {}  # the name a text-only checkpoint would use -> the tensor in the files
    for name, file in _open_weights(path).items():
        canonical = _text_model_name(name) if multimodal else name
        if canonical is not None:
            sources[canonical] = _Source(file, name)
    if cfg.tie_embeddings and _stores_its_own_head(sources):
        warnings.warn(
            f"{path}: config.json ties the LM head to the embedding, but the checkpoint stores "
            "an lm_head.weight that differs from it; loading the stored head untied, as "
            "transformers does (set tie_word_embeddings=false in config.json to silence this)",
            stacklevel=2,
        )
        cfg = dataclasses.replace(cfg, tie_embeddings=False)
    abstract, leaves = hf_leaves(cfg)

    expected = {}
    for leaf in leaves:
        for name in leaf.names:
            expected[name] = leaf.hf_shape
    missing = [n for n in expected if n not in sources]
    if missing:
        raise ValueError(
            f"{path}: missing tensor {missing[0]!r} (expected shape {expected[missing[0]]})"
            + (f" and {len(missing) - 1} more: {missing[1:6]}" if len(missing) > 1 else "")
        )
    ignorable = lambda n: (
        n.endswith(_IGNORED_SUFFIXES)
        # a stored copy of the tied head (checked equal above), as torch exports write it
        or (n == "lm_head.weight" and cfg.tie_embeddings)
    )
    unexpected = [sources[n] for n in sources if n not in expected and not ignorable(n)]
    if unexpected:
        raise ValueError(
            f"{unexpected[0].file.path}: unexpected tensor {unexpected[0].name!r} of shape "
            f"{unexpected[0].shape}; the config ({cfg.model_type}, {cfg.num_layers} layers) has "
            "no such parameter"
            + (f" ({len(unexpected) - 1} more: {unexpected[1:6]})" if len(unexpected) > 1 else "")
        )
    for name, shape in expected.items():
        src = sources[name]
        if src.shape != shape:
            raise ValueError(
                f"{src.file.path}: tensor {src.name!r} has shape {src.shape}, "
                f"expected {shape} from config.json"
            )

    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    else:
        shardings = tree_shardings(abstract, logical_axes(cfg), mesh, rules)
    target = jnp.dtype(dtype)
    arrays = [
        jax.make_array_from_callback(
            leaf.shape, sharding, lambda index, leaf=leaf: leaf.read(sources, index, target)
        )
        for leaf, sharding in zip(leaves, jax.tree.leaves(shardings))
    ]
    return cfg, jax.tree.unflatten(jax.tree.structure(abstract), arrays)
