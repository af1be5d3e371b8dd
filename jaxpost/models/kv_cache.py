"""The dense KV cache: an explicit pytree the caller threads through prefill and decode.

A cache type names its per-layer arrays in `LAYER_FIELDS` (each stacked with a leading layer
axis) and implements `update_and_attend`, called by every attention layer with that layer's
slice. The rollout engine's paged cache follows the same contract.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpost.kernels.flash_attention import attend, window_mask
from jaxpost.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DenseKVCache:
    """k, v: [L, B, S, KVH, D]. Slot s of a row holds the key/value of position s."""

    k: jax.Array | None
    v: jax.Array | None

    LAYER_FIELDS = ("k", "v")

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> DenseKVCache:
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update_and_attend(self, layer: dict, q, k, v, positions, *, sliding_window, softcap, scale):
        """Write k/v [B, T, KVH, D] at `positions` [B, T], then attend over the row's cache.

        Queries see cached positions <= their own (and inside the window), so stale slots past
        the current length are never read. Returns ([B, T, H, D], new layer arrays).
        """
        rows = jnp.arange(q.shape[0])[:, None]
        new_k = layer["k"].at[rows, positions].set(k.astype(layer["k"].dtype), mode="drop")
        new_v = layer["v"].at[rows, positions].set(v.astype(layer["v"].dtype), mode="drop")
        slots = jnp.arange(new_k.shape[1], dtype=jnp.int32)
        mask = window_mask(positions[:, :, None], slots[None, None, :], True, sliding_window)
        out = attend(
            q, new_k.astype(q.dtype), new_v.astype(q.dtype), mask, softcap=softcap, scale=scale
        )
        return out, {"k": new_k, "v": new_v}


def split_cache(cache):
    """(per-layer arrays stacked on axis 0, the cache with those fields set to None)."""
    layers = {f: getattr(cache, f) for f in cache.LAYER_FIELDS}
    meta = dataclasses.replace(cache, **{f: None for f in cache.LAYER_FIELDS})
    return layers, meta


def join_cache(meta, layers: dict):
    return dataclasses.replace(meta, **layers)
