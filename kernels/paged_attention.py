"""Decode attention over a paged KV cache: one query token per slot, the plain-XLA reference.

Layout (one layer; the rollout engine stacks a leading [L] axis):
  q:          [B, H, D]            the current token's queries, one row per decode slot
  k_pages:    [KVH, P, S, D]       P pages of S tokens each, shared by all slots
  v_pages:    [KVH, P, S, D]
  lengths:    [B] int32            valid tokens in the slot, the current one included
  page_table: [B, M] int32         the slot's pages in order; entries past the length are ignored
                                   (they may hold any value, e.g. -1); pages hold finite values
The current token sits at position lengths-1; key j is visible iff j < lengths and, with a
sliding window w, (lengths-1) - j < w. A slot with length 0 (idle) returns zeros.
Returns [B, H, D] in q's dtype; softmax in float32.

The Pallas kernel (`pallas`) walks each slot's page table with the table, the lengths and the
window in SMEM (scalar prefetch): grid (slot, KV head, block of pages), the block's pages of
keys/values fetched straight from the shared pool by BlockSpec index maps that read the table,
an online softmax over pages in VMEM scratch, all H/KVH query heads of a KV head served by one
fetch (GQA). Pages past the slot's length or wholly outside the window are not computed, and
their index is clamped to a live page, which the pipeline does not copy again.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxpost.kernels import dispatch as _dispatch
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
    slot_regions: bool = False,
) -> jax.Array:
    """Gathers each slot's pages into a contiguous [KVH, B, M*S, D] sequence, then attends.

    KV heads stay the leading axis (as in the pool), so the gathered keys/values are used as
    they are: (KVH, B) are the batch dims of both matmuls and nothing of size M*S is transposed.
    slot_regions: the pool is B regions of M = P / B pages and slot b's table row is region b
    in order (page_table[b, j] == b * M + j, as `rollout.Engine` lays out its default pool).
    The pool is then already that sequence: it is read in place, as a [KVH, B, M*S, D] view,
    and the gather's copy of every live key and value (per layer and step) is skipped.
    """
    b, h, d = q.shape
    kvh, num_pages, page_size, _ = k_pages.shape
    if slot_regions:
        if num_pages % b or page_table.shape[1] != num_pages // b:
            raise ValueError(
                f"slot_regions: a pool of {num_pages} pages is not {b} slots x "
                f"{page_table.shape[1]} table columns"
            )
        m = num_pages // b
        k = k_pages.reshape(kvh, b, m * page_size, d)
        v = v_pages.reshape(kvh, b, m * page_size, d)
    else:
        m = page_table.shape[1]
        # A plain gather: XLA:CPU fuses it with its operand (a 16-bit pool's view of its bits,
        # see `rollout.paged_cache`) into one copy; `models.bits.get` would copy twice.
        k = k_pages[:, page_table].reshape(kvh, b, m * page_size, d)
        v = v_pages[:, page_table].reshape(kvh, b, m * page_size, d)
    # A query axis of size 1, as in `flash_attention.attend`'s decode: with it XLA:CPU computes
    # each score block as keys [S, D] x queries [D, G], the large operand first, 1.3-1.8x faster
    # than the [G, S] product it picks without it (rollout benchmark shapes, batch 1 and 16).
    qg = jnp.moveaxis(q.reshape(b, kvh, h // kvh, d), 1, 0)[:, :, None]  # [KVH, B, 1, G, D]
    scores = (
        jnp.einsum("kbtgd,kbsd->kbgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
        * scale
    )
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    j = jnp.arange(m * page_size, dtype=jnp.int32)[None, :]
    q_pos = (lengths - 1)[:, None]
    mask = window_mask(q_pos, j, True, sliding_window) & (j < lengths[:, None])
    scores = jnp.where(mask[None, :, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(
        "kbgts,kbsd->kbgtd",
        probs.astype(q.dtype),
        v.astype(q.dtype),
        preferred_element_type=jnp.float32,
    )[:, :, :, 0]
    out = jnp.where((lengths > 0)[None, :, None, None], out, 0.0)
    return jnp.moveaxis(out, 0, 1).reshape(b, h, d).astype(q.dtype)


# Pallas kernel ------------------------------------------------------------------------------------

_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)


def _live_pages(length, window, page_size: int):
    """First and last page index holding a visible key (last >= first even for idle slots).

    Operands are non-negative, so lax.div (truncating; Mosaic lowers it directly) is floor."""
    last = jnp.maximum(jax.lax.div(length + page_size - 1, page_size) - 1, 0)
    first_key = jnp.where(window > 0, jnp.maximum(length - window, 0), 0)
    return jnp.minimum(jax.lax.div(first_key, page_size), last), last


def _kernel(len_ref, table_ref, win_ref, q_ref, *refs, page_size, pages_per_block, softcap, scale):
    # refs: pages_per_block K page refs, as many V page refs, the output, three scratch refs.
    k_refs, v_refs = refs[:pages_per_block], refs[pages_per_block : 2 * pages_per_block]
    o_ref, m_sc, l_sc, acc_sc = refs[2 * pages_per_block :]
    b, step = pl.program_id(0), pl.program_id(2)
    length, w = len_ref[b], win_ref[0]

    @pl.when(step == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _MASK, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    first, last = _live_pages(length, w, page_size)
    for c in range(pages_per_block):
        j = step * pages_per_block + c  # the page's index in the slot's table

        @pl.when((j >= first) & (j <= last) & (length > 0))
        def _page(j=j, k_ref=k_refs[c], v_ref=v_refs[c]):
            q = q_ref[...]
            k = k_ref[...].astype(q.dtype)
            v = v_ref[...].astype(q.dtype)
            s = jax.lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
            s = s * scale
            if softcap is not None:
                s = jnp.tanh(s / softcap) * softcap
            pos = j * page_size + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
            mask = (pos < length) & ((w <= 0) | (length - 1 - pos < w))
            s = jnp.where(mask, s, _MASK)
            m_prev = m_sc[...]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_sc[...] = alpha * acc_sc[...] + pv
            m_sc[...] = m_new

    @pl.when(step == pl.num_programs(2) - 1)
    def _finish():
        denom = l_sc[...]
        safe = jnp.where(denom > 0, denom, 1.0)
        o_ref[...] = jnp.where(denom > 0, acc_sc[...] / safe, 0.0).astype(o_ref.dtype)


def pallas(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    page_table: jax.Array,
    *,
    sliding_window=None,
    softcap: float | None = None,
    scale: float = 1.0,
    pages_per_block: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The Pallas paged decode attention; same signature and result as `reference`.

    pages_per_block: pages fetched and processed per grid step (default: enough pages for 128
    tokens, at most M). Small pages make one page per step overhead-bound; several BlockSpecs
    over the same pool let the pipeline fetch a block of pages at once.
    """
    b, h, d = q.shape
    kvh, _, page_size, _ = k_pages.shape
    m = page_table.shape[1]
    if k_pages.shape[-1] != d or v_pages.shape != k_pages.shape or h % kvh:
        raise ValueError(
            f"paged attention: q {q.shape}, k_pages {k_pages.shape}, v_pages {v_pages.shape}; "
            "expected q [B, H, D], k/v pages [KVH, P, S, D] with H a multiple of KVH"
        )
    if lengths.shape != (b,) or page_table.shape[0] != b:
        raise ValueError(
            f"paged attention: lengths {lengths.shape}, page_table {page_table.shape}; "
            f"expected [{b}] and [{b}, M]"
        )
    groups = h // kvh
    win = 0 if sliding_window is None else sliding_window
    win = jnp.reshape(jnp.asarray(win, jnp.int32), (1,))

    if pages_per_block is None:
        pages_per_block = max(1, min(m, 128 // page_size))

    num_pages = k_pages.shape[1]

    def page_map(c):
        def index(bi, hi, step, len_ref, table_ref, win_ref):
            first, last = _live_pages(len_ref[bi], win_ref[0], page_size)
            j = jnp.clip(step * pages_per_block + c, first, last)
            # An idle slot still fetches (and ignores) the page of its first entry, which may
            # hold any value (-1, P, ...): clamped, so the fetch stays inside the pool.
            return hi, jnp.clip(table_ref[bi * m + j], 0, num_pages - 1), 0, 0

        return index

    q_spec = pl.BlockSpec((None, None, groups, d), lambda bi, hi, j, *_: (bi, hi, 0, 0))
    kv_specs = [
        pl.BlockSpec((None, None, page_size, d), page_map(c)) for c in range(pages_per_block)
    ]

    def run(q, k_pages, v_pages, lengths, page_table, win):
        kvh_local = k_pages.shape[0]  # per shard under a mesh that splits the KV heads
        out = pl.pallas_call(
            functools.partial(
                _kernel,
                page_size=page_size,
                pages_per_block=pages_per_block,
                softcap=None if softcap is None else float(softcap),
                scale=float(scale),
            ),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3,
                grid=(b, kvh_local, pl.cdiv(m, pages_per_block)),
                in_specs=[q_spec, *kv_specs, *kv_specs],
                out_specs=q_spec,
                scratch_shapes=[
                    pltpu.VMEM((groups, 1), jnp.float32),
                    pltpu.VMEM((groups, 1), jnp.float32),
                    pltpu.VMEM((groups, d), jnp.float32),
                ],
            ),
            out_shape=jax.ShapeDtypeStruct((b, kvh_local, groups, d), q.dtype),
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")
            ),
            interpret=_dispatch.interpret() if interpret is None else interpret,
        )(
            lengths.astype(jnp.int32),
            page_table.astype(jnp.int32).reshape(-1),  # 1-D: SMEM pads 2-D arrays heavily
            win,
            q.reshape(b, kvh_local, groups, d),
            *[k_pages] * pages_per_block,
            *[v_pages] * pages_per_block,
        )
        return out.reshape(b, kvh_local * groups, d)

    # The pool is shared by all slots: split only the (KV) heads, as the engine lays pages out.
    heads = "kv_heads" if _dispatch.sharded_over("kv_heads", kvh) else None
    pages = (heads, None, None, None)
    return _dispatch.per_shard(
        run,
        (q, k_pages, v_pages, lengths, page_table, win),
        ((None, heads, None), pages, pages, None, None, None),
        out_rank=3,
    )


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    page_table: jax.Array,
    *,
    sliding_window=None,
    softcap: float | None = None,
    scale: float = 1.0,
    impl: str = "auto",
    slot_regions: bool = False,
) -> jax.Array:
    """Dispatch between `pallas` and `reference` (see `dispatch`); shapes in the module docstring.

    "auto" takes the kernel on TPU: the reference gathers every slot's M*S keys into a dense
    copy per layer and step, the kernel reads only the live pages in place. slot_regions (see
    `reference`) lets the reference read in place too; the kernel follows the table either way.
    """
    kwargs = dict(sliding_window=sliding_window, softcap=softcap, scale=scale)
    if _dispatch.use_kernel(impl, "paged_attention", tpu_profitable=True):
        return pallas(q, k_pages, v_pages, lengths, page_table, **kwargs)
    return reference(q, k_pages, v_pages, lengths, page_table, slot_regions=slot_regions, **kwargs)
