"""The Pallas flash-attention kernel (TPU / Mosaic; interpreted elsewhere): FlashAttention-2
forward and a Pallas backward under one custom VJP. `jaxpost.kernels.flash_attention` holds the
XLA reference (same signature as `pallas` here) and the dispatch.

Supports causal and non-causal attention, packed segments (segment_ids), GQA / MQA, logit
soft-cap, a sliding window given as a Python int or a traced int32 scalar, and any scale.
Online softmax over key blocks in VMEM scratch; blocks that the causal / window mask kills
entirely are skipped (and, under causal masking, not fetched). The backward recomputes the
probabilities from the saved log-sum-exp in two kernels: dq accumulated over key blocks, and
dk, dv accumulated over the query blocks of every query head in a KV head's group.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxpost.kernels import dispatch as _dispatch

# Layout inside the kernels: q, o, do [B, H, T, D]; k, v [B, KVH, T, D]; lse, delta [B, H, T, 1];
# q_seg [B, T, 1], kv_seg [B, 1, T]; the sliding window is a scalar-prefetch (SMEM) int32 [1].
# Grid (B, H, query blocks, key blocks) for the forward and dq passes, (B, KVH, key blocks,
# group x query blocks) for dk/dv: the innermost axis is the reduction, its accumulators live in
# VMEM scratch.

_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so exp(mask - mask) cannot be NaN
_NT = (((1,), (1,)), ((), ()))  # a [m, d] . b [n, d] -> [m, n]
_TN = (((0,), (0,)), ((), ()))  # a [m, n] . b [m, d] -> [n, d]


@dataclasses.dataclass(frozen=True)
class _Cfg:
    causal: bool
    softcap: float | None
    scale: float
    block_q: int
    block_k: int
    interpret: bool


def _visible(cfg: _Cfg, i, j, win_ref, qs_ref, ks_ref):
    """[bq, bk] mask of query block i against key block j: causal, window and segments."""
    shape = (cfg.block_q, cfg.block_k)
    q_pos = i * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = j * cfg.block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    w = win_ref[0]
    mask = qs_ref[...] == ks_ref[...]
    if cfg.causal:
        mask = mask & (k_pos <= q_pos)
    return mask & ((w <= 0) | (q_pos - k_pos < w))


def _block_live(cfg: _Cfg, i, j, win_ref):
    """Whether any (query, key) pair of blocks (i, j) can be visible; dead blocks are skipped."""
    q_first, q_last = i * cfg.block_q, i * cfg.block_q + cfg.block_q - 1
    k_first, k_last = j * cfg.block_k, j * cfg.block_k + cfg.block_k - 1
    w = win_ref[0]
    live = (w <= 0) | (q_first - k_last < w)
    if cfg.causal:
        live = live & (k_first <= q_last)
    return live


def _scores(cfg: _Cfg, q, k):
    """Scaled (and soft-capped) scores [bq, bk] in float32, plus tanh for the soft-cap's slope."""
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
    if cfg.softcap is None:
        return s, None
    t = jnp.tanh(s / cfg.softcap)
    return t * cfg.softcap, t


def _fwd_kernel(
    win_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, cfg
):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _MASK, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(_block_live(cfg, i, j, win_ref))
    def _step():
        v = v_ref[...]
        s, _ = _scores(cfg, q_ref[...], k_ref[...])
        mask = _visible(cfg, i, j, win_ref, qs_ref, ks_ref)
        s = jnp.where(mask, s, _MASK)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        denom = l_sc[...]
        o_ref[...] = (acc_sc[...] / denom).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(denom)


def _probs_and_dscores(cfg, i, j, win_ref, qs_ref, ks_ref, q, k, v, do, lse, delta):
    """Recomputed probabilities p and d loss / d raw scores (before scale), both [bq, bk]."""
    s, t = _scores(cfg, q, k)
    mask = _visible(cfg, i, j, win_ref, qs_ref, ks_ref)
    p = jnp.where(mask, jnp.exp(s - lse), 0.0)
    dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)  # d(cap * tanh(x / cap)) / dx
    return p, ds


def _dq_kernel(
    win_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref, dq_sc, *, cfg
):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(_block_live(cfg, i, j, win_ref))
    def _step():
        k = k_ref[...]
        _, ds = _probs_and_dscores(
            cfg, i, j, win_ref, qs_ref, ks_ref, q_ref[...], k, v_ref[...], do_ref[...],
            lse_ref[...], dl_ref[...],
        )  # fmt: skip
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    win_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref,
    dk_ref, dv_ref, dk_sc, dv_sc, *, cfg,
    num_q_blocks,
):  # fmt: skip
    # The innermost axis walks (group member, query block) pairs: every query head sharing
    # this KV head adds into the same dk/dv accumulators.
    j, y = pl.program_id(2), pl.program_id(3)
    i = jax.lax.rem(y, num_q_blocks)

    @pl.when(y == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(_block_live(cfg, i, j, win_ref))
    def _step():
        q, do = q_ref[...], do_ref[...]
        p, ds = _probs_and_dscores(
            cfg, i, j, win_ref, qs_ref, ks_ref, q, k_ref[...], v_ref[...], do,
            lse_ref[...], dl_ref[...],
        )  # fmt: skip
        dv_sc[...] += jax.lax.dot_general(
            p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32
        )
        dk_sc[...] += jax.lax.dot_general(
            ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32
        )

    @pl.when(y == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _specs(cfg: _Cfg, d: int, index):
    """BlockSpecs of (q-like, kv, q-row stats, q segments, kv segments).

    index(b, x, y, z) maps a grid point to (batch, query head, KV head, query block, key block).
    """

    def q_map(*g):
        b, qh, _, i, _ = index(*g[:4])
        return b, qh, i, 0

    def kv_map(*g):
        b, _, kh, _, j = index(*g[:4])
        return b, kh, j, 0

    def qs_map(*g):
        b, _, _, i, _ = index(*g[:4])
        return b, i, 0

    def ks_map(*g):
        b, _, _, _, j = index(*g[:4])
        return b, 0, j

    bq, bk = cfg.block_q, cfg.block_k
    return (
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bq, 1), q_map),
        pl.BlockSpec((None, bq, 1), qs_map),
        pl.BlockSpec((None, 1, bk), ks_map),
    )


def _query_major(cfg: _Cfg, groups: int):
    """Grid (batch, query head, query block, key block). Under causal masking key blocks past the
    diagonal are dead; their index is clamped to the last live one, which is not fetched again."""

    def index(b, h, i, j):
        if cfg.causal:
            j = jnp.minimum(j, jax.lax.div(i * cfg.block_q + cfg.block_q - 1, cfg.block_k))
        return b, h, jax.lax.div(h, groups), i, j

    return index


def _kv_major(cfg: _Cfg, groups: int, num_q_blocks: int):
    """Grid (batch, KV head, key block, group member x query block); query blocks before the
    causal diagonal are dead and clamped to the first live one."""

    def index(b, kh, j, y):
        g, i = jax.lax.div(y, num_q_blocks), jax.lax.rem(y, num_q_blocks)
        if cfg.causal:
            i = jnp.maximum(i, jax.lax.div(j * cfg.block_k, cfg.block_q))
        return b, kh * groups + g, kh, i, j

    return index


def _params():
    # The innermost grid axis carries the scratch accumulators, so it must run in order.
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )


def _fwd(cfg: _Cfg, q, k, v, q_seg, kv_seg, win):
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    q_spec, kv_spec, row_spec, qs_spec, ks_spec = _specs(cfg, d, _query_major(cfg, groups))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h, t // cfg.block_q, t // cfg.block_k),
        in_specs=[q_spec, kv_spec, kv_spec, qs_spec, ks_spec],
        out_specs=[q_spec, row_spec],
        scratch_shapes=[
            pltpu.VMEM((cfg.block_q, 1), jnp.float32),
            pltpu.VMEM((cfg.block_q, 1), jnp.float32),
            pltpu.VMEM((cfg.block_q, d), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32),
        ],
        compiler_params=_params(),
        interpret=cfg.interpret,
    )(win, q, k, v, q_seg, kv_seg)


def _bwd(cfg: _Cfg, q, k, v, q_seg, kv_seg, win, o, lse, do):
    b, h, t, d = q.shape
    kvh = k.shape[1]
    groups = h // kvh
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    args = (win, q, k, v, do, lse, delta, q_seg, kv_seg)

    q_spec, kv_spec, row_spec, qs_spec, ks_spec = _specs(cfg, d, _query_major(cfg, groups))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, h, t // cfg.block_q, t // cfg.block_k),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, qs_spec, ks_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((cfg.block_q, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(),
        interpret=cfg.interpret,
    )(*args)

    nq = t // cfg.block_q
    q_spec, kv_spec, row_spec, qs_spec, ks_spec = _specs(cfg, d, _kv_major(cfg, groups, nq))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, num_q_blocks=nq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kvh, t // cfg.block_k, groups * nq),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, qs_spec, ks_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[
                pltpu.VMEM((cfg.block_k, d), jnp.float32),
                pltpu.VMEM((cfg.block_k, d), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        compiler_params=_params(),
        interpret=cfg.interpret,
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_seg, kv_seg, win):
    return _fwd(cfg, q, k, v, q_seg, kv_seg, win)[0]


def _flash_fwd(cfg, q, k, v, q_seg, kv_seg, win):
    o, lse = _fwd(cfg, q, k, v, q_seg, kv_seg, win)
    return o, (q, k, v, q_seg, kv_seg, win, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_seg, kv_seg, win, o, lse = res
    dq, dk, dv = _bwd(cfg, q, k, v, q_seg, kv_seg, win, o, lse, do)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def check_inputs(q, k, v, segment_ids, causal: bool, sliding_window) -> None:
    """ValueError naming the problem for inputs that neither attention path takes."""
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"flash attention: q {q.shape}, k {k.shape}; expected 4-D [B, T, H, D]")
    b, t, h, d = q.shape
    kvh = k.shape[2]
    if k.shape != (b, t, kvh, d) or v.shape != k.shape or h % kvh:
        raise ValueError(
            f"flash attention: q {q.shape}, k {k.shape}, v {v.shape}; expected q [B, T, H, D] "
            "and k, v [B, T, KVH, D] with H a multiple of KVH"
        )
    if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
        raise ValueError(
            f"flash attention: segment_ids {tuple(segment_ids.shape)}; expected [B, T] = [{b}, {t}]"
        )
    windowed = sliding_window is not None and not (
        isinstance(sliding_window, int) and sliding_window <= 0
    )
    if windowed and not causal:
        # The window is one-sided (query i sees keys i - w < j <= i), as causal decoders use it.
        raise ValueError("flash attention: a sliding window needs causal=True")


def pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    causal: bool = True,
    sliding_window=None,
    softcap: float | None = None,
    scale: float = 1.0,
    block_q: int = 512,
    block_k: int = 512,
    interpret: bool | None = None,
) -> jax.Array:
    """The Pallas flash attention (forward and a Pallas backward via custom_vjp).

    Same signature and result as `reference`, plus block sizes (512 x 512 by default: each grid
    step costs ~0.35 us of fixed overhead on TPU, which 128-blocks of a long sequence spend more
    time on than on the MXU; a 512 x 512 float32 score tile is 1 MiB of VMEM, and the backward's
    four such tiles plus double-buffered q/k/v/do tiles stay well under 16 MiB for D <= 256).
    T is padded to a multiple of
    both blocks (padding keys get a segment of their own, so no real query sees them); sequences
    shorter than a block use one block of the whole length.
    """
    check_inputs(q, k, v, segment_ids, causal, sliding_window)
    b, t, h, d = q.shape
    kvh = k.shape[2]
    try:
        scale = float(scale)  # compiled into the kernel
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            "flash attention (pallas): scale must be a Python number, not a traced value"
        ) from None
    if t <= min(block_q, block_k):
        block_q = block_k = t
    tp = -(-t // math.lcm(block_q, block_k)) * math.lcm(block_q, block_k)
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if tp != t:
        # int32 min: a segment id no caller uses, so padding keys stay invisible to real rows.
        seg = jnp.pad(seg, ((0, 0), (0, tp - t)), constant_values=jnp.iinfo(jnp.int32).min)
    win = 0 if sliding_window is None else sliding_window
    win = jnp.reshape(jnp.asarray(win, jnp.int32), (1,))
    cfg = _Cfg(
        causal=causal,
        softcap=None if softcap is None else float(softcap),
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        interpret=_dispatch.interpret() if interpret is None else interpret,
    )

    def run(q, k, v, seg, win):
        def to_kernel(x):
            return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, tp - t), (0, 0)))

        out = _flash(
            cfg, to_kernel(q), to_kernel(k), to_kernel(v), seg[:, :, None], seg[:, None], win
        )
        return jnp.swapaxes(out[:, :, :t], 1, 2)

    # Heads are split only when the KV heads split the same way (each shard keeps its groups).
    heads = "act_heads" if _dispatch.sharded_over("act_heads", kvh) else None
    qkv = ("batch", None, heads, None)
    return _dispatch.per_shard(
        run, (q, k, v, seg, win), (qkv, qkv, qkv, ("batch", None), None), out_rank=4
    )
