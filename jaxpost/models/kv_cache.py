"""The dense KV cache: an explicit pytree the caller threads through prefill and decode.

A cache type names its per-layer arrays in `LAYER_FIELDS` and implements `update_and_attend`,
called by every attention layer. Each field holds the layers in one of two layouts:
  stacked    one array with a leading [L] axis: a layer scan carries it and every layer writes
             its new tokens in place at [layer, ...] (`layer` is the scan's index);
  per layer  a tuple of L arrays: the unrolled layer loop hands each layer its own buffer
             (`layer` is None), so nothing is sliced out of a stack. XLA:CPU copies every slice
             of a stacked array (weights or cache) before a matmul reads it, which doubled the
             memory traffic of a decode step; the rollout engine uses this layout.
The rollout engine's paged cache follows the same contract.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpost.kernels.flash_attention import attend, window_mask
from jaxpost.models import bits
from jaxpost.models.config import ModelConfig


def layer_array(arrays, layer) -> jax.Array:
    """The array of one layer: `arrays` itself (per-layer layout, layer None) or arrays[layer]."""
    return arrays if layer is None else arrays[layer]


def write_layer(arrays, layer, index: tuple, values, bits_dtype: str | None = None) -> jax.Array:
    """arrays[(layer,) + index] = values, in place under donation / a scan carry (`store`)."""
    index = index if layer is None else (layer, *index)
    return store(arrays, index, values, bits_dtype, mode="drop")


def store(array: jax.Array, index, values: jax.Array, bits_dtype: str | None, **kwargs):
    """array.at[index].set(values, **kwargs) for a cache field: values cast to the array's dtype,
    or, when the cache stores a 16-bit float as its bits (its `bits_dtype`), as those bits.

    XLA:CPU copies a 16-bit array to uint16 and back around each scatter into it (`bits.set`);
    a cache written every decode step is cheaper stored as bits, on CPU (`as_bits`)."""
    if bits_dtype is None:
        return bits.set(array, index, values, **kwargs)
    return array.at[index].set(bits.to_bits(values, bits_dtype), **kwargs)


def load(array: jax.Array, bits_dtype: str | None) -> jax.Array:
    """A cache field (or part of one) as its values: the inverse of `store`'s bits."""
    return array if bits_dtype is None else bits.from_bits(array, bits_dtype)


def stored_dtype(dtype, as_bits: bool) -> tuple[jnp.dtype, str | None]:
    """(the arrays' dtype, the cache's bits_dtype) for values of `dtype`."""
    stored = bits.storage_dtype(dtype) if as_bits else jnp.dtype(dtype)
    return stored, (jnp.dtype(dtype).name if stored != jnp.dtype(dtype) else None)


def make_layers(shape: tuple, dtype, num_layers: int, per_layer: bool):
    """Zeros for one cache field: a tuple of L arrays of `shape`, or one [L, *shape] array."""
    if per_layer:
        return tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return jnp.zeros((num_layers, *shape), dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DenseKVCache:
    """k, v: [L, B, KVH, S, D] (or L arrays [B, KVH, S, D]). Slot s of a row holds position s.

    Heads before positions, so attention reads the cache without transposing it."""

    k: jax.Array | tuple | None
    v: jax.Array | tuple | None
    # None: k and v hold their values. A 16-bit float dtype's name: they hold its bits (`store`).
    bits_dtype: str | None = dataclasses.field(default=None, metadata=dict(static=True))

    LAYER_FIELDS = ("k", "v")

    @classmethod
    def create(
        cls,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        dtype=None,
        per_layer: bool | None = None,
        as_bits: bool = False,
    ) -> DenseKVCache:
        """per_layer: the layout (module docstring); default: per layer iff not cfg.scan_layers.
        as_bits: store a 16-bit float cache as its bits (`store`; for decode loops on CPU)."""
        stored, bits_dtype = stored_dtype(dtype or cfg.dtype, as_bits)
        per_layer = (not cfg.scan_layers) if per_layer is None else per_layer
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(
            k=make_layers(shape, stored, cfg.num_layers, per_layer),
            v=make_layers(shape, stored, cfg.num_layers, per_layer),
            bits_dtype=bits_dtype,
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[-2]  # [B, KVH, S, D] in both layouts

    def stacked(self) -> DenseKVCache:
        """The same cache in the stacked layout ([L, ...] arrays)."""
        if not isinstance(self.k, tuple):
            return self
        return dataclasses.replace(self, k=jnp.stack(self.k), v=jnp.stack(self.v))

    def update_and_attend(
        self, layers: dict, layer, q, k, v, positions, *, sliding_window, softcap, scale
    ):
        """Write k/v [B, T, KVH, D] at `positions` [B, T], then attend over the row's cache.

        layers: this cache's fields in either layout, `layer` as in `layer_array`. Queries see
        cached positions <= their own (and inside the window), so stale slots past the current
        length are never read. Returns ([B, T, H, D], the updated fields, same layout).
        """
        rows = jnp.arange(q.shape[0])[:, None]
        # rows and positions are separated by the head slice: NumPy's rules put their broadcast
        # [B, T] dims first, so the written values are k/v as they are, [B, T, KVH, D].
        index = (rows, slice(None), positions)
        new_k = write_layer(layers["k"], layer, index, k, self.bits_dtype)
        new_v = write_layer(layers["v"], layer, index, v, self.bits_dtype)
        k_all, v_all = (load(layer_array(a, layer), self.bits_dtype) for a in (new_k, new_v))
        slots = jnp.arange(k_all.shape[2], dtype=jnp.int32)
        mask = window_mask(positions[:, :, None], slots[None, None, :], True, sliding_window)
        out = attend(
            q,
            k_all.astype(q.dtype),
            v_all.astype(q.dtype),
            mask,
            softcap=softcap,
            scale=scale,
            kv_heads_first=True,
        )
        return out, {"k": new_k, "v": new_v}


def split_cache(cache):
    """(the layer fields {name: stacked array or tuple}, the cache with those fields None)."""
    layers = {f: getattr(cache, f) for f in cache.LAYER_FIELDS}
    meta = dataclasses.replace(cache, **{f: None for f in cache.LAYER_FIELDS})
    return layers, meta


def join_cache(meta, layers: dict):
    return dataclasses.replace(meta, **layers)
