"""Attention over one sequence (training and prefill): the plain-XLA reference, the Pallas
flash-attention kernel (forward and backward) and the dispatch between them.

Shapes:
  q: [B, T, H, D]; k, v: [B, T, KVH, D] with H a multiple of KVH (GQA / MQA);
  segment_ids: [B, T] int32 or None. A query attends to a key only inside its own segment, so
  several examples packed into one row never see each other.
Returns [B, T, H, D] in q's dtype; scores, softmax and the weighted sum accumulate in float32.

The kernel (`pallas`, with its custom VJP) lives in `flash_attention_kernel` and is re-exported
here; `flash_attention` is the dispatch between it and `reference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.kernels import dispatch as _dispatch
from jaxpost.kernels.flash_attention_kernel import pallas


def window_mask(q_pos: jax.Array, k_pos: jax.Array, causal: bool, sliding_window) -> jax.Array:
    """Boolean visibility of key position k from query position q (broadcasting shapes).

    sliding_window: None, a Python int or a traced int32 scalar; <= 0 means no window. With a
    window w, query i sees key j iff i - w < j (HF's convention: w keys including itself).
    """
    visible = jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), bool)
    if causal:
        visible = k_pos <= q_pos
    if sliding_window is not None and not (isinstance(sliding_window, int) and sliding_window <= 0):
        w = jnp.asarray(sliding_window, jnp.int32)
        visible = visible & ((w <= 0) | (q_pos - k_pos < w))
    return visible


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    softcap: float | None,
    scale: float,
    kv_heads_first: bool = False,
) -> jax.Array:
    """Masked GQA attention. q [B, T, H, D], k/v [B, S, KVH, D], mask [B, T, S] -> [B, T, H, D].

    kv_heads_first: k/v are [B, KVH, S, D] (the KV cache's layout): (B, KVH) are then already
    the leading batch dims of both matmuls, so XLA does not transpose the whole cache per layer.
    """
    b, t, h, d = q.shape
    kvh = k.shape[1] if kv_heads_first else k.shape[2]
    kv = "bksd" if kv_heads_first else "bskd"
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum(f"btkgd,{kv}->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if kv_heads_first:  # a plain batched matmul over (B, KVH), then the small output moves
        out = jnp.einsum(
            "bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        out = jnp.moveaxis(out, 3, 1)
    else:
        out = jnp.einsum(
            "bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
    return out.reshape(b, t, h, d).astype(q.dtype)


def reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    causal: bool = True,
    sliding_window=None,
    softcap: float | None = None,
    scale: float = 1.0,
) -> jax.Array:
    """XLA reference for flash attention; see the module docstring for shapes."""
    t = q.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    mask = window_mask(idx[:, None], idx[None, :], causal, sliding_window)[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    else:
        mask = jnp.broadcast_to(mask, (q.shape[0], t, t))
    return attend(q, k, v, mask, softcap=softcap, scale=scale)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    causal: bool = True,
    sliding_window=None,
    softcap: float | None = None,
    scale: float = 1.0,
    impl: str = "auto",
) -> jax.Array:
    """Dispatch between `pallas` and `reference` (see `dispatch`); shapes as in `reference`.

    "auto" takes the kernel on TPU for T >= 128 (shorter sequences fit one XLA fusion anyway).
    """
    kwargs = dict(causal=causal, sliding_window=sliding_window, softcap=softcap, scale=scale)
    if _dispatch.use_kernel(impl, "flash_attention", tpu_profitable=q.shape[1] >= 128):
        return pallas(q, k, v, segment_ids, **kwargs)
    return reference(q, k, v, segment_ids, **kwargs)
