"""Decode attention over a paged KV cache: one query token per slot, the plain-XLA reference.

Layout (one layer; the rollout engine stacks a leading [L] axis):
  q:          [B, H, D]            the current token's queries, one row per decode slot
  k_pages:    [KVH, P, S, D]       P pages of S tokens each, shared by all slots
  v_pages:    [KVH, P, S, D]
  lengths:    [B] int32            valid tokens in the slot, the current one included
  page_table: [B, M] int32         the slot's pages in order; entries past the length are ignored
The current token sits at position lengths-1; key j is visible iff j < lengths and, with a
sliding window w, (lengths-1) - j < w. A slot with length 0 (idle) returns zeros.
Returns [B, H, D] in q's dtype; softmax in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.kernels.flash_attention import window_mask


def reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    page_table: jax.Array,
    *,
    sliding_window=None,
    softcap: float | None = None,
    scale: float = 1.0,
) -> jax.Array:
    """Gathers each slot's pages into a contiguous [B, M*S] sequence, then masked attention."""
    b, h, d = q.shape
    kvh, _, page_size, _ = k_pages.shape
    m = page_table.shape[1]
    # [KVH, B, M, S, D] -> [B, M*S, KVH, D]
    k = jnp.moveaxis(k_pages[:, page_table], 0, 3).reshape(b, m * page_size, kvh, d)
    v = jnp.moveaxis(v_pages[:, page_table], 0, 3).reshape(b, m * page_size, kvh, d)
    qg = q.reshape(b, kvh, h // kvh, d)
    scores = (
        jnp.einsum("bkgd,bskd->bkgs", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
        * scale
    )
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    j = jnp.arange(m * page_size, dtype=jnp.int32)[None, :]
    q_pos = (lengths - 1)[:, None]
    mask = window_mask(q_pos, j, True, sliding_window) & (j < lengths[:, None])
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(
        "bkgs,bskd->bkgd",
        probs.astype(q.dtype),
        v.astype(q.dtype),
        preferred_element_type=jnp.float32,
    )
    out = jnp.where((lengths > 0)[:, None, None, None], out, 0.0)
    return out.reshape(b, h, d).astype(q.dtype)


def paged_attention(
    q,
    k_pages,
    v_pages,
    lengths,
    page_table,
    *,
    sliding_window=None,
    softcap=None,
    scale=1.0,
    impl: str = "auto",
) -> jax.Array:
    """Dispatch (the Pallas kernel plugs in here); see the module docstring for shapes."""
    if impl not in ("auto", "xla", "pallas"):
        raise ValueError(f"paged_attention impl={impl!r}; expected auto, xla or pallas")
    return reference(
        q,
        k_pages,
        v_pages,
        lengths,
        page_table,
        sliding_window=sliding_window,
        softcap=softcap,
        scale=scale,
    )
