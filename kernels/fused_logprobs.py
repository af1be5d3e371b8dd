"""Per-token log-probs of given targets from final hidden states and the LM head, without ever
materialising [N, V] logits: the plain-XLA path, chunked over tokens.

Shapes: hidden [N, D] (flatten [B, T, D] first), w [D, V], targets [N] int32.
Returns a dict of float32 [N] arrays:
  "logp": log softmax(logits)[target]; "lse": logsumexp(logits) (for z-loss);
  "entropy" (with_entropy): -sum p log p; "logit_mean" (with_logit_mean): mean_v logits
  (for label smoothing: mean_v log p = logit_mean - lse).
Logits are computed as float32 and soft-capped (Gemma 2) before the softmax.

Each chunk's logits are recomputed in the backward pass (jax.checkpoint), so the peak temporary
is O(chunk x V) in both directions instead of O(N x V).

The Pallas kernel (`pallas`) tiles tokens and vocabulary: grid (token block, vocab block), one
[block_n, block_v] logit tile in VMEM at a time, an online log-sum-exp (plus the running sums the
entropy and the logit mean need) in scratch across vocab blocks. Its custom VJP recomputes each
tile from the saved log-sum-exp: d logits = p (g_lse - g_logp - g_ent (x - E_p[x]))
+ g_logp onehot(target) + g_mean / V, times the soft-cap's slope 1 - (x / cap)^2; one kernel
accumulates d hidden = d logits . W^T over vocab blocks, another d W = hidden^T . d logits over
token blocks. Nothing of size N x V is ever written to memory.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxpost.kernels import dispatch as _dispatch
from jaxpost.models import matmul


def target_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits[n, targets[n]] for logits [N, V]. A target outside [0, V) (an HF-style -100 label
    under a zero loss mask) reads 0, as in the Pallas kernel: never NaN, which a zero mask
    weight would not remove (0 * NaN), and never wrapped around like a negative index."""
    valid = (targets >= 0) & (targets < logits.shape[-1])
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(valid, picked, 0.0)


def _chunk_stats(h, w, t, softcap, with_entropy, with_logit_mean, compute_dtype):
    logits = matmul.dot(h, w, compute_dtype)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    lse = jax.nn.logsumexp(logits, axis=-1)
    out = {"logp": target_logits(logits, t) - lse, "lse": lse}
    if with_entropy:
        p = jnp.exp(logits - lse[:, None])
        out["entropy"] = lse - jnp.sum(p * logits, axis=-1)
    if with_logit_mean:
        out["logit_mean"] = jnp.mean(logits, axis=-1)
    return out


def xla_chunked(
    hidden: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    *,
    softcap: float | None = None,
    with_entropy: bool = False,
    with_logit_mean: bool = False,
    chunk: int = 512,
    compute_dtype=None,
) -> dict[str, jax.Array]:
    """Chunked XLA implementation; see the module docstring."""
    n, d = hidden.shape
    compute_dtype = compute_dtype or hidden.dtype
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    t = jnp.pad(targets, (0, pad)).reshape(-1, chunk)
    fn = jax.checkpoint(
        functools.partial(
            _chunk_stats,
            softcap=softcap,
            with_entropy=with_entropy,
            with_logit_mean=with_logit_mean,
            compute_dtype=compute_dtype,
        )
    )
    if h.shape[0] == 1:
        out = jax.tree.map(lambda a: a[None], fn(h[0], w, t[0]))
    else:
        _, out = jax.lax.scan(lambda c, xs: (c, fn(xs[0], w, xs[1])), None, (h, t))
    return jax.tree.map(lambda a: a.reshape(-1)[:n], out)


def reference(
    hidden: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    *,
    softcap: float | None = None,
    with_entropy: bool = False,
    with_logit_mean: bool = False,
    compute_dtype=None,
) -> dict[str, jax.Array]:
    """Dense reference (materialises [N, V]); the oracle for tests."""
    return _chunk_stats(
        hidden, w, targets, softcap, with_entropy, with_logit_mean, compute_dtype or hidden.dtype
    )


# Pallas kernel ------------------------------------------------------------------------------------

_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))  # a [m, k] . b [n, k] -> [m, n]
_TN = (((0,), (0,)), ((), ()))  # a [k, m] . b [k, n] -> [m, n]


@dataclasses.dataclass(frozen=True)
class _Cfg:
    vocab: int
    block_n: int
    block_v: int
    softcap: float | None
    compute_dtype: str
    interpret: bool
    vmem_limit: int

    @property
    def ragged(self) -> bool:  # the last vocab block reads past V: mask it
        return self.vocab % self.block_v != 0


def _tile(cfg: _Cfg, h_ref, w_ref, j):
    """(soft-capped float32 logits [bn, bv], column ids, valid columns, W tile zeroed past V)."""
    cdt = jnp.dtype(cfg.compute_dtype)
    h = h_ref[...].astype(cdt)
    w = w_ref[...].astype(cdt)
    col = j * cfg.block_v + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_v), 1)
    valid = col < cfg.vocab
    if cfg.ragged:
        w = jnp.where(valid, w, 0)  # out-of-bounds reads are garbage, possibly NaN
    x = jnp.dot(h, w, preferred_element_type=jnp.float32)
    if cfg.softcap is not None:
        x = jnp.tanh(x / cfg.softcap) * cfg.softcap
    return x, col, valid, h, w


def _fwd_kernel(
    h_ref, w_ref, t_ref, lse_ref, logp_ref, ex_ref, mean_ref, m_sc, l_sc, sx_sc, tg_sc, sum_sc,
    *, cfg,
):  # fmt: skip
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _MASK, jnp.float32)
        for ref in (l_sc, sx_sc, tg_sc, sum_sc):
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    x, col, valid, _, _ = _tile(cfg, h_ref, w_ref, j)
    x_or_0 = jnp.where(valid, x, 0.0)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(jnp.where(valid, x, _MASK), axis=1, keepdims=True))
    e = jnp.where(valid, jnp.exp(x - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(e, axis=1, keepdims=True)
    sx_sc[...] = alpha * sx_sc[...] + jnp.sum(e * x_or_0, axis=1, keepdims=True)
    tg_sc[...] += jnp.sum(jnp.where(col == t_ref[...], x_or_0, 0.0), axis=1, keepdims=True)
    sum_sc[...] += jnp.sum(x_or_0, axis=1, keepdims=True)
    m_sc[...] = m_new

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        lse = m_sc[...] + jnp.log(l_sc[...])
        lse_ref[...] = lse
        logp_ref[...] = tg_sc[...] - lse
        ex_ref[...] = sx_sc[...] / l_sc[...]  # E_p[logits]; entropy = lse - E_p[logits]
        mean_ref[...] = sum_sc[...] / cfg.vocab


def _dlogits(cfg: _Cfg, x, col, valid, t_ref, row_refs):
    """d loss / d (pre-cap) logits of one tile, float32 [bn, bv]."""
    lse, ex, g_lse, g_logp, g_ent, g_mean = (r[...] for r in row_refs)
    p = jnp.exp(x - lse)
    dl = p * (g_lse - g_logp - g_ent * (x - ex)) + g_mean / cfg.vocab
    dl = dl + jnp.where(col == t_ref[...], g_logp, 0.0)
    if cfg.softcap is not None:
        dl = dl * (1.0 - jnp.square(x / cfg.softcap))
    return jnp.where(valid, dl, 0.0)


def _dh_kernel(h_ref, w_ref, t_ref, *rest, cfg):
    row_refs, (dh_ref, acc_sc) = rest[:6], rest[6:]
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    x, col, valid, _, w = _tile(cfg, h_ref, w_ref, j)
    dl = _dlogits(cfg, x, col, valid, t_ref, row_refs)
    acc_sc[...] += jax.lax.dot_general(
        dl.astype(w.dtype), w, _NT, preferred_element_type=jnp.float32
    )

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        dh_ref[...] = acc_sc[...].astype(dh_ref.dtype)


def _dw_kernel(h_ref, w_ref, t_ref, *rest, cfg):
    row_refs, (dw_ref, acc_sc) = rest[:6], rest[6:]
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    x, col, valid, h, _ = _tile(cfg, h_ref, w_ref, j)
    dl = _dlogits(cfg, x, col, valid, t_ref, row_refs)
    acc_sc[...] += jax.lax.dot_general(
        h, dl.astype(h.dtype), _TN, preferred_element_type=jnp.float32
    )

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        dw_ref[...] = acc_sc[...].astype(dw_ref.dtype)


def _call(
    cfg: _Cfg, kernel, grid, d: int, token_major: bool, n_rows: int, outs, out_shape, scratch
):
    """pallas_call over (token block, vocab block) grids; token_major=False swaps the axes.

    Inputs: hidden [N, D], W [D, V], then n_rows per-token [N, 1] arrays (targets first)."""
    bn, bv = cfg.block_n, cfg.block_v

    def ij(x, y):
        return (x, y) if token_major else (y, x)

    d_h = lambda x, y: (ij(x, y)[0], 0)
    d_w = lambda x, y: (0, ij(x, y)[1])
    row = pl.BlockSpec((bn, 1), d_h)
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=grid,
        in_specs=[pl.BlockSpec((bn, d), d_h), pl.BlockSpec((d, bv), d_w)] + [row] * n_rows,
        out_specs=outs(d_h, d_w),
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=cfg.vmem_limit
        ),
        interpret=cfg.interpret,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg: _Cfg, hidden, w, targets):
    return _fused_fwd(cfg, hidden, w, targets)[0]


def _fused_fwd(cfg: _Cfg, hidden, w, targets):
    n, d = hidden.shape
    grid = (n // cfg.block_n, pl.cdiv(cfg.vocab, cfg.block_v))
    row_out = lambda d_h, d_w: [pl.BlockSpec((cfg.block_n, 1), d_h)] * 4
    stats = _call(
        cfg, _fwd_kernel, grid, d, True, 1, row_out,
        [jax.ShapeDtypeStruct((n, 1), jnp.float32)] * 4,
        [pltpu.VMEM((cfg.block_n, 1), jnp.float32)] * 5,
    )(hidden, w, targets)  # fmt: skip
    lse, logp, ex, mean = stats
    return (lse, logp, ex, mean), (hidden, w, targets, lse, ex)


def _fused_bwd(cfg: _Cfg, res, cotangents):
    hidden, w, targets, lse, ex = res
    g_lse, g_logp, g_ex, g_mean = cotangents
    # ex = E_p[x] has d ex / d x = p (1 + x - ex); written as _dlogits's entropy-style term
    # (entropy = lse - ex) with g_ent = -g_ex and the lse cotangent raised by g_ex.
    rows = (lse, ex, g_lse + g_ex, g_logp, -g_ex, g_mean)
    n, d = hidden.shape
    bn, bv = cfg.block_n, cfg.block_v
    nv = pl.cdiv(cfg.vocab, bv)
    dh = _call(
        cfg, _dh_kernel, (n // bn, nv), d, True, 7,
        lambda d_h, d_w: pl.BlockSpec((bn, d), d_h),
        jax.ShapeDtypeStruct(hidden.shape, hidden.dtype),
        [pltpu.VMEM((bn, d), jnp.float32)],
    )(hidden, w, targets, *rows)  # fmt: skip
    dw = _call(
        cfg, _dw_kernel, (nv, n // bn), d, False, 7,
        lambda d_h, d_w: pl.BlockSpec((d, bv), d_w),
        jax.ShapeDtypeStruct(w.shape, w.dtype),
        [pltpu.VMEM((d, bv), jnp.float32)],
    )(hidden, w, targets, *rows)  # fmt: skip
    return dh, dw, None


_fused.defvjp(_fused_fwd, _fused_bwd)


_VMEM_BUDGET = 48 << 20  # under v7x's 64 MiB VMEM with room for Mosaic's own scratch


def _vmem_bytes(block_n: int, block_v: int, d: int, item: int) -> int:
    """VMEM estimate: double-buffered h, W and output tiles, a few float32 [bn, bv]
    temporaries, the float32 accumulator of the backward kernels, and slack."""
    tiles = 2 * 2 * (block_n * d + d * block_v) * item
    return tiles + 8 * block_n * block_v * 4 + 4 * max(block_n, block_v) * d + (2 << 20)


def _default_blocks(d: int, item: int) -> tuple[int, int]:
    block_n, block_v = 256, 512
    while _vmem_bytes(block_n, block_v, d, item) > _VMEM_BUDGET and block_v > 128:
        block_v //= 2
    while _vmem_bytes(block_n, block_v, d, item) > _VMEM_BUDGET and block_n > 128:
        block_n //= 2
    return block_n, block_v


def pallas(
    hidden: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    *,
    softcap: float | None = None,
    with_entropy: bool = False,
    with_logit_mean: bool = False,
    compute_dtype=None,
    block_n: int | None = None,
    block_v: int | None = None,
    interpret: bool | None = None,
) -> dict[str, jax.Array]:
    """The Pallas fused log-probs; same signature and outputs as `reference`, plus blocks.

    Default blocks: 256 tokens x 512 vocabulary entries, halved (vocab first, down to 128) until
    the VMEM estimate fits 48 MiB, which large hidden sizes need (D = 4096 keeps 256 x 512 in
    bf16, D = 8192 gets 256 x 256). Explicit blocks are used as given.

    N is padded to a multiple of block_n (padding rows are dropped); V needs no padding: the
    last vocab block's columns past V are masked inside the kernel, so W is never copied.
    """
    n, d = hidden.shape
    vocab = w.shape[1]
    if w.shape[0] != d or targets.shape != (n,):
        raise ValueError(
            f"fused_logprobs: hidden {hidden.shape}, w {w.shape}, targets {targets.shape}; "
            "expected hidden [N, D], w [D, V], targets [N]"
        )
    compute_dtype = jnp.dtype(compute_dtype or hidden.dtype)
    item = max(hidden.dtype.itemsize, w.dtype.itemsize)
    if block_n is None and block_v is None:
        block_n, block_v = _default_blocks(d, item)
    block_n = min(block_n or 256, -(-n // 8) * 8)
    block_v = block_v or 512
    block_v = vocab if vocab <= block_v else block_v
    vmem = _vmem_bytes(block_n, block_v, d, item)
    cfg = _Cfg(
        vocab=vocab,
        block_n=block_n,
        block_v=block_v,
        softcap=None if softcap is None else float(softcap),
        compute_dtype=compute_dtype.name,
        interpret=_dispatch.interpret() if interpret is None else interpret,
        vmem_limit=int(max(vmem, 32 << 20)),  # above the 16 MiB scoped default of v4 / v5e
    )

    def run(hidden, w, targets):
        pad = (-hidden.shape[0]) % block_n  # per shard: the local token count
        h = jnp.pad(hidden, ((0, pad), (0, 0)))
        t = jnp.pad(targets.astype(jnp.int32), (0, pad))[:, None]
        return tuple(a[: hidden.shape[0], 0] for a in _fused(cfg, h, w, t))

    # Tokens split over the batch axes; every shard sees the whole W (gathered once per call).
    lse, logp, ex, mean = _dispatch.per_shard(
        run, (hidden, w, targets), (("batch", None), None, ("batch",)), out_rank=1
    )
    out = {"logp": logp, "lse": lse}
    if with_entropy:
        out["entropy"] = lse - ex
    if with_logit_mean:
        out["logit_mean"] = mean
    return out


def fused_logprobs(
    hidden: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    *,
    softcap: float | None = None,
    with_entropy: bool = False,
    with_logit_mean: bool = False,
    impl: str = "auto",
    compute_dtype=None,
) -> dict[str, jax.Array]:
    """Dispatch between `pallas` and `xla_chunked` (see `dispatch`); shapes in the module docstring.

    "auto" takes the kernel on TPU for vocabularies of 8192 and more; below that the chunked
    XLA path's [chunk, V] tile is small and XLA fuses it well.
    """
    kwargs = dict(
        softcap=softcap,
        with_entropy=with_entropy,
        with_logit_mean=with_logit_mean,
        compute_dtype=compute_dtype,
    )
    if _dispatch.use_kernel(impl, "fused_logprobs", tpu_profitable=w.shape[1] >= 8192):
        return pallas(hidden, w, targets, **kwargs)
    return xla_chunked(hidden, w, targets, **kwargs)
