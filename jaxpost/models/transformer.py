"""The decoder-only transformer as pure functions over a parameter pytree.

Parameters:
  {"embedder": {"embedding": [V, D]},
   "layers": <Block params, every leaf stacked with a leading [L] axis>,
   "final_norm": {"scale": [D]},
   "lm_head": {"kernel": [D, V]}}            # absent with tied embeddings
A LoRA tree mirrors the targeted kernels: {"layers": {..."q": {"a": [L, D, r], "b": [L, r, N]}}}.

Modes, all through `apply`:
  training:   tokens [B, T] with optional segment_ids / positions (packed rows), no cache;
  prefill:    the same with a cache, whose slots get the prompt's keys/values;
  decode:     tokens [B, 1], positions [B, 1] and the cache.
Layers are scanned (one compiled block) or, with cfg.scan_layers=False, unrolled in a Python loop.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models import bits, matmul
from jaxpost.models.config import ModelConfig
from jaxpost.models.kv_cache import join_cache, split_cache
from jaxpost.models.layers import Block, RMSNorm
from jaxpost.sharding import active_mesh, constrain, logical_to_spec

Params = dict


def _lora_parts(lora):
    """Accept a plain LoRA tree or an object with .params/.scale/.dropout (jaxpost.lora)."""
    if lora is None:
        return None, 1.0, 0.0
    if isinstance(lora, dict):  # checked by the callers that take user input (`lora.check`)
        return lora, 1.0, 0.0
    return lora.params, float(lora.scale), float(getattr(lora, "dropout", 0.0))


def _block(cfg: ModelConfig, lora_scale=1.0, lora_dropout=0.0, deterministic=True) -> Block:
    return Block(cfg, lora_scale=lora_scale, lora_dropout=lora_dropout, deterministic=deterministic)


def _block_init(cfg: ModelConfig, key):
    x = jnp.zeros((1, 1, cfg.hidden_size), jnp.dtype(cfg.dtype))
    pos = jnp.zeros((1, 1), jnp.int32)
    inv = jnp.zeros((cfg.head_dim // 2,), jnp.float32)
    return _block(cfg).init(key, x, pos, None, inv, 0)["params"]


def _top_level_boxes(cfg: ModelConfig, key):
    k_emb, k_head = jax.random.split(key)
    pdt = jnp.dtype(cfg.param_dtype)
    box = nn.LogicallyPartitioned
    top = {
        "embedder": {
            "embedding": box(
                jax.random.normal(k_emb, (cfg.vocab_size, cfg.hidden_size), pdt) * 0.02,
                ("vocab", "embed"),
            )
        },
        "final_norm": {
            "scale": box(
                (jnp.zeros if cfg.norm_offset else jnp.ones)((cfg.hidden_size,), pdt), ("embed",)
            )
        },
    }
    if not cfg.tie_embeddings:
        top["lm_head"] = {
            "kernel": box(
                jax.random.normal(k_head, (cfg.hidden_size, cfg.vocab_size), pdt) * 0.02,
                ("embed", "vocab"),
            )
        }
    return top


def init(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random parameters (normal(0.02) kernels, unit norms). Use under jax.jit with out_shardings
    (see `init_sharded`) for large models, or jax.eval_shape for shapes only."""
    k_top, k_layers = jax.random.split(key)
    params = nn.meta.unbox(_top_level_boxes(cfg, k_top))
    keys = jax.random.split(k_layers, cfg.num_layers)
    params["layers"] = nn.meta.unbox(jax.vmap(functools.partial(_block_init, cfg))(keys))
    return params


def logical_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every parameter, a tree of tuples shaped like `init`'s output."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    top = jax.eval_shape(lambda: _top_level_boxes(cfg, jax.random.key(0)))
    axes = jax.tree.map(lambda b: tuple(b.names), top, is_leaf=is_box)
    block = jax.eval_shape(lambda: _block_init(cfg, jax.random.key(0)))
    axes["layers"] = jax.tree.map(lambda b: ("layers", *b.names), block, is_leaf=is_box)
    return axes


def lm_head_kernel(cfg: ModelConfig, params: Params) -> jax.Array:
    """The output projection [D, V] (the transposed embedding when tied)."""
    if cfg.tie_embeddings:
        return params["embedder"]["embedding"].T
    return params["lm_head"]["kernel"]


def logits_from_hidden(
    cfg: ModelConfig, params: Params, hidden: jax.Array, kernel: jax.Array | None = None
) -> jax.Array:
    """hidden [..., D] (after the final norm) -> float32 logits [..., V], soft-capped if set.

    kernel: a [D, V] head to use instead of the model's (the rollout engine may pass a
    materialized transpose of a tied embedding; see `rollout.Engine`). Params in decode layout
    (`to_decode_layout`) have a [V, D] head, multiplied by `matmul.dot_t`.
    """
    lead = hidden.shape[:-1]
    x = hidden.reshape(-1, hidden.shape[-1])
    head_t = params.get("lm_head", {}).get("kernel_t")
    if kernel is None and head_t is not None:
        logits = matmul.dot_t(x, head_t, cfg.dtype)
    else:
        logits = matmul.dot(x, lm_head_kernel(cfg, params) if kernel is None else kernel, cfg.dtype)
    logits = logits.reshape(*lead, logits.shape[-1])
    if cfg.final_logit_softcap is not None:
        logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return logits


def _gather_table_first(table: jax.Array, tokens: jax.Array) -> bool:
    """Whether to take the embedding table whole over the weight-only (fsdp) axes before the
    lookup (under a mesh of more than one device): when the lookup takes at least as many rows
    as one vocab shard holds.

    Rows looked up from a table split over the embedding dimension come out split that way, and
    the partitioner reaches the activations' batch split from there only by replicating
    [B, T, D] ("involuntary full rematerialization", with fsdp and tensor > 1, forward and
    gradient). Gathering the table first, as FSDP gathers any weight before use, costs less when
    B x T >= its rows per vocab shard (a train step, a prefill); a decode step's few rows cost
    less than the table (a whole-table gather kept on every device), so for them the rows are
    gathered whole after the lookup instead, and the batch split is then a slice."""
    mesh, rules = active_mesh()
    vocab_axes = logical_to_spec(table.shape, ("vocab", None), mesh, rules)[0]
    axes = (vocab_axes,) if isinstance(vocab_axes, str) else tuple(vocab_axes or ())
    rows_per_shard = table.shape[0] // math.prod(mesh.shape[a] for a in axes)
    return tokens.size >= rows_per_shard


def embed(cfg: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    table = params["embedder"]["embedding"]
    active = active_mesh()
    if active is None or active[0].size == 1:
        x = bits.take(table, tokens, axis=0)
    elif _gather_table_first(table, tokens):
        x = bits.take(constrain(table, ("vocab", None)), tokens, axis=0)
    else:
        x = constrain(bits.take(table, tokens, axis=0), (None,) * (tokens.ndim + 1))
    x = x.astype(cfg.dtype)
    if cfg.embed_scale:
        # Gemma rounds the normalizer to the compute dtype before multiplying.
        x = x * jnp.asarray(cfg.hidden_size**0.5, dtype=cfg.dtype)
    return x


def _is_per_layer(tree) -> bool:
    """Whether layer params / cache fields are a sequence of per-layer items, not stacked."""
    if tree is None:
        return False
    if isinstance(tree, dict):
        return any(_is_per_layer(v) for v in tree.values())
    return isinstance(tree, (tuple, list))


def to_decode_layout(cfg: ModelConfig, params: Params) -> Params:
    """Params for inference with every linear kernel [..., in, out] stored as "kernel_t" [...,
    out, in], and a tied embedding also referenced as the head {"lm_head": {"kernel_t": [V, D]}}
    (the same array, no copy). NF4 kernels and norms are left as they are.

    `layers.Linear` and `logits_from_hidden` multiply a "kernel_t" with `matmul.dot_t`, whose
    transposed product XLA:CPU runs faster for the few rows of a decode step (see `matmul`).
    Each transpose keeps its input's sharding, transposed. Not a checkpoint format: save the
    params it was made from.
    """
    out = _transpose_kernels(params)
    if cfg.tie_embeddings:
        out["lm_head"] = {"kernel_t": out["embedder"]["embedding"]}
    return out


_swap_last = jax.jit(lambda a: jnp.swapaxes(a, -1, -2))


def _transpose_kernels(tree):
    if isinstance(tree, dict):
        return {
            ("kernel_t" if k == "kernel" else k): (
                _swap_last(v) if k == "kernel" else _transpose_kernels(v)
            )
            for k, v in tree.items()
        }
    if isinstance(tree, (tuple, list)):
        return type(tree)(_transpose_kernels(t) for t in tree)
    return tree


def unstack_layers(tree, num_layers: int):
    """A tree whose "layers" entry is stacked [L, ...] -> the same with a tuple of L layer trees.

    For inference on XLA:CPU: the unrolled layer loop then reads each layer's weights in place
    instead of copying a slice out of the stack before every matmul (see `kv_cache`).
    """
    if tree is None or _is_per_layer(tree["layers"]):
        return tree
    return {**tree, "layers": tuple(_unstack(tree["layers"], num_layers))}


def _unstack(tree, n: int) -> list:
    """The n per-layer trees of a tree stacked on axis 0 (None -> n Nones; a tuple as is).

    One split per leaf rather than n index slices: the gradient of a split is one concatenate,
    while n slices transpose to n zero-padded full-size arrays summed together (O(n^2) traffic).
    """
    if tree is None:
        return [None] * n
    if isinstance(tree, (tuple, list)):
        return list(tree)
    leaves, treedef = jax.tree.flatten(tree)
    parts = [[p.squeeze(0) for p in jax.lax.split(leaf, [1] * n, axis=0)] for leaf in leaves]
    return [jax.tree.unflatten(treedef, [part[i] for part in parts]) for i in range(n)]


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "block":
        return jax.checkpoint(fn)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def apply(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    lora=None,
    cache=None,
    return_hidden: bool = False,
    dropout_rng: jax.Array | None = None,
):
    """Run the model. tokens [B, T] int32.

    positions [B, T] default to 0..T-1; segment_ids [B, T] keep packed examples apart (no cache).
    dropout_rng enables LoRA dropout (training). Returns (logits [B, T, V] float32, or the final
    normed hidden states [B, T, D] when return_hidden, and the updated cache or None).
    """
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is not None and segment_ids is not None:
        raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
    lora_tree, lora_scale, lora_dropout = _lora_parts(lora)
    deterministic = dropout_rng is None
    block = _block(cfg, lora_scale, lora_dropout, deterministic)

    x = constrain(embed(cfg, params, tokens), ("batch", "length", "act_embed"))
    cache_layers, cache_meta = split_cache(cache) if cache is not None else (None, None)
    inv_freqs = np.stack([cfg.inv_freq(w > 0) for w in cfg.layer_windows]).astype(np.float32)
    layer_lora = lora_tree["layers"] if lora_tree is not None else None
    layer_keys = jax.random.split(dropout_rng, cfg.num_layers) if dropout_rng is not None else None

    def layer_fn(x, p, lp, cl, layer, inv, window, key):
        variables = {"params": p}
        if lp is not None:
            variables["lora"] = lp
        rngs = {"dropout": key} if key is not None else None
        x, cl = block.apply(
            variables, x, positions, segment_ids, inv, window, cache_meta, cl, layer, rngs=rngs
        )
        return constrain(x, ("batch", "length", "act_embed")), cl

    layer_fn = _remat(layer_fn, cfg.remat)
    per_layer = _is_per_layer(params["layers"]) or _is_per_layer(cache_layers)
    if cfg.scan_layers and not per_layer:
        uniform = cfg.uniform_window
        windows = None if uniform is not None else jnp.asarray(cfg.layer_windows, jnp.int32)

        # The cache rides in the carry: each layer writes its new tokens in place at [layer].
        def body(carry, xs):
            x, cl = carry
            p, lp, inv, window, key, layer = xs
            return layer_fn(
                x, p, lp, cl, layer, inv, uniform if window is None else window, key
            ), None

        (x, cache_layers), _ = jax.lax.scan(
            body,
            (x, cache_layers),
            (
                params["layers"],
                layer_lora,
                jnp.asarray(inv_freqs),
                windows,
                layer_keys,
                jnp.arange(cfg.num_layers, dtype=jnp.int32),
            ),
        )
    else:
        layer_params, layer_lora_list = (
            _unstack(tree, cfg.num_layers) for tree in (params["layers"], layer_lora)
        )
        # A stacked cache is written at [i] (static); a per-layer one is a buffer per layer.
        cache_per_layer = _is_per_layer(cache_layers)
        for i in range(cfg.num_layers):
            cl = cache_layers
            if cache_per_layer:
                cl = {f: a[i] for f, a in cache_layers.items()}
            x, cl = layer_fn(
                x,
                layer_params[i],
                layer_lora_list[i],
                cl,
                None if cache_per_layer else i,
                jnp.asarray(inv_freqs[i]),
                cfg.layer_windows[i],
                None if layer_keys is None else layer_keys[i],
            )
            if cache_per_layer:
                cache_layers = {f: (*a[:i], cl[f], *a[i + 1 :]) for f, a in cache_layers.items()}
            elif cl is not None:
                cache_layers = cl

    final_norm = RMSNorm(cfg.rms_norm_eps, cfg.norm_offset)
    x = final_norm.apply({"params": params["final_norm"]}, x)
    new_cache = join_cache(cache_meta, cache_layers) if cache is not None else None
    if return_hidden:
        return x, new_cache
    return logits_from_hidden(cfg, params, x), new_cache


def _check_token_ids(cfg: ModelConfig, tokens) -> None:
    """Concrete tokens only: a traced forward (inside the caller's jit) cannot look at values,
    and a multi-host array's other shards are not this process's to read."""
    if isinstance(tokens, jax.core.Tracer) or not getattr(tokens, "is_fully_addressable", True):
        return
    ids = np.asarray(tokens)
    if ids.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"tokens must be integer token ids, got {ids.dtype}")
    if ids.size and not (0 <= ids.min() and ids.max() < cfg.vocab_size):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise ValueError(f"token id {bad} in tokens; expected ids in [0, {cfg.vocab_size})")


def _as_array(x):
    """Lists and NumPy arrays as jax arrays (int32 ids); arrays and tracers as they are."""
    if x is None or isinstance(x, (jax.Array, jax.core.Tracer)):
        return x
    return jnp.asarray(np.asarray(x), jnp.int32)


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    lora=None,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
) -> jax.Array:
    """tokens [B, T] int32 -> logits [B, T, V] float32 (training mode, no cache).

    params may be the partitioned {"base", "lora"} (`lora.combine`), then without `lora=`.
    Token ids outside [0, vocab) are an error (inside a jit a gather would give NaN logits).
    tokens, segment_ids and positions may be nested lists or NumPy arrays; the last two must
    have the shape of tokens."""
    _check_token_ids(cfg, tokens)
    tokens = _as_array(tokens)
    segment_ids, positions = _as_array(segment_ids), _as_array(positions)
    for name, x in (("segment_ids", segment_ids), ("positions", positions)):
        if x is not None and x.shape != tokens.shape:
            raise ValueError(
                f"{name} must have the shape of tokens [batch, length] {tuple(tokens.shape)}, "
                f"got {tuple(x.shape)}"
            )
    if isinstance(params, dict) and set(params) == {"base", "lora"}:
        if lora is not None:
            raise ValueError("params are partitioned {'base', 'lora'}: pass lora= in one place")
        params, lora = params["base"], params["lora"]
    if lora is not None:
        from jaxpost import lora as lora_lib  # it imports this module

        lora_lib.check(cfg, lora, plain_tree_ok=True)
    logits, _ = apply(cfg, params, tokens, positions=positions, segment_ids=segment_ids, lora=lora)
    return logits
