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
from jaxpost.kernels.flash_attention_kernel import check_inputs, pallas


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


# Causal attention in query blocks: block i reads only the keys up to its own end, so the
# masked upper triangle is mostly never computed (T=256 in 4 blocks: 10/16 of the scores).
# Blocks of at least _MIN_QUERY_BLOCK rows keep the batched matmuls efficient; at most
# _MAX_QUERY_BLOCKS of them bound the unrolled graph for long sequences.
_MIN_QUERY_BLOCK = 64
_MAX_QUERY_BLOCKS = 8


def _query_blocks(t: int, causal: bool) -> list[tuple[int, int]]:
    if not causal or t < 2 * _MIN_QUERY_BLOCK:
        return [(0, t)]
    size = max(_MIN_QUERY_BLOCK, -(-t // _MAX_QUERY_BLOCKS))
    return [(start, min(start + size, t)) for start in range(0, t, size)]


def _attend_heads_major(qh, kh, vh, visible, softcap, scale):
    """qh [B, KVH, G, Tq, D], kh/vh [B, KVH, S, D], visible [B|1, Tq, S] -> [B, KVH, G, Tq, D]."""
    scores = jnp.einsum("bkgqd,bksd->bkgqs", qh, kh, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum(
        "bkgqs,bksd->bkgqd", probs.astype(vh.dtype), vh, preferred_element_type=jnp.float32
    )


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
    """XLA reference for flash attention; see the module docstring for shapes.

    Heads-major inside: with (B, KVH) leading q, k and v, both batched matmuls (and their
    gradients) run without XLA:CPU transposing the [.., T, S] operands; only q, k, v and the
    output ([.., T, D], S/D times smaller) move. Causal attention skips whole key ranges
    per query block (`_query_blocks`), and a static sliding window skips keys before it too.
    """
    check_inputs(q, k, v, segment_ids, causal, sliding_window)
    b, t, h, d = q.shape
    kvh = k.shape[2]
    idx = jnp.arange(t, dtype=jnp.int32)
    visible = window_mask(idx[:, None], idx[None, :], causal, sliding_window)[None]
    if segment_ids is not None:
        visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
    qh = q.reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    static_window = sliding_window if isinstance(sliding_window, int) else 0
    outs = []
    for start, end in _query_blocks(t, causal):
        key_end = end if causal else t
        # The block's first query sees keys from start - window + 1 on (all under no window).
        key_start = max(0, start - static_window + 1) if causal and static_window > 0 else 0
        outs.append(
            _attend_heads_major(
                qh[:, :, :, start:end],
                kh[:, :, key_start:key_end],
                vh[:, :, key_start:key_end],
                visible[:, start:end, key_start:key_end],
                softcap,
                scale,
            )
        )
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


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
