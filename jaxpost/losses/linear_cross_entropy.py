"""Cross-entropy from hidden states and the LM head with its gradient formed in the forward pass.

The SFT loss of a chunk of tokens is a scalar whose per-token weights (loss mask, label
smoothing, z-loss coefficients) are known before the backward pass, so, as in Liger's fused
linear cross-entropy, each chunk's gradient w.r.t. the hidden states and the LM head can be
computed while its [chunk, V] logits are live: three matmuls per chunk in total (logits,
d hidden, d W) instead of four when the backward recomputes the logits, and no [N, V] array.

Per token n with logits x (soft-capped: x = c tanh(x_raw / c)), p = softmax(x), Z = logsumexp(x),
target y and per-token coefficients a_n (cross-entropy), b_n (uniform-target term) and
c_n (z-loss):
  loss = sum_n a_n (Z - x_y) + b_n (Z - mean_v x) + c_n Z^2
  d loss / d x_n = (a_n + b_n + 2 c_n Z) p - a_n onehot(y) - b_n / V
then times the soft-cap's slope 1 - (x / c)^2.
Outside differentiation only the loss is computed (one matmul per chunk). Under `jax.grad`,
the LM-head gradient is only formed when the head is being differentiated (full fine-tuning),
not for a frozen head (LoRA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxpost.kernels.fused_logprobs import target_logits
from jaxpost.models import matmul


def _logits(h, w, softcap, compute_dtype):
    x = matmul.dot(h, w, compute_dtype)
    if softcap is not None:
        x = jnp.tanh(x / softcap) * softcap
    return x


def _chunk_loss(h, w, t, coef, softcap, compute_dtype, uniform):
    """(loss, logits [c, V], lse [c], nll [c]) of one chunk; coef [3, c] = (a, b, c) per token."""
    x = _logits(h, w, softcap, compute_dtype)
    lse = jax.nn.logsumexp(x, axis=-1)
    nll = lse - target_logits(x, t)
    loss = coef[0] * nll + coef[2] * lse * lse
    if uniform:  # label smoothing's term costs another pass over the logits: only when used
        loss = loss + coef[1] * (lse - jnp.mean(x, axis=-1))
    return jnp.sum(loss), x, lse, nll


def _chunks(hidden, targets, coef, chunk):
    n, d = hidden.shape
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    t = jnp.pad(targets, (0, pad)).reshape(-1, chunk)
    c = jnp.pad(coef, ((0, 0), (0, pad))).reshape(3, -1, chunk).transpose(1, 0, 2)
    return h, t, c, pad


def _forward(hidden, w, targets, coef, softcap, compute_dtype, chunk, uniform):
    h, t, c, pad = _chunks(hidden, targets, coef, chunk)

    def body(total, xs):
        hc, tc, cc = xs
        loss, _, lse, nll = _chunk_loss(hc, w, tc, cc, softcap, compute_dtype, uniform)
        return total + loss, (nll, lse)

    total, (nll, lse) = jax.lax.scan(body, jnp.float32(0.0), (h, t, c))
    n = hidden.shape[0]
    return total, (nll.reshape(-1)[:n], lse.reshape(-1)[:n])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _loss(hidden, w, targets, coef, softcap, compute_dtype, chunk, uniform):
    return _forward(hidden, w, targets, coef, softcap, compute_dtype, chunk, uniform)


def _loss_fwd(hidden, w, targets, coef, softcap, compute_dtype, chunk, uniform):
    # symbolic_zeros: each primal arrives as CustomVJPPrimal(value, perturbed).
    want_w = w.perturbed
    hidden, w, targets, coef = hidden.value, w.value, targets.value, coef.value
    h, t, c, pad = _chunks(hidden, targets, coef, chunk)
    vocab = w.shape[1]

    def body(carry, xs):
        total, dw = carry
        hc, tc, cc = xs
        loss, x, lse, nll = _chunk_loss(hc, w, tc, cc, softcap, compute_dtype, uniform)
        p = jnp.exp(x - lse[:, None])
        scale = cc[0] + cc[1] + 2.0 * cc[2] * lse
        dx = scale[:, None] * p - cc[1][:, None] / vocab  # the last term is 0 without smoothing
        # A target outside [0, V) reads logit 0 (`target_logits`): its one-hot term is dropped
        # (index V; a negative index would wrap around).
        col = jnp.where((tc >= 0) & (tc < vocab), tc, vocab)
        dx = dx.at[jnp.arange(tc.shape[0]), col].add(-cc[0], mode="drop")
        if softcap is not None:
            dx = dx * (1.0 - (x / softcap) ** 2)
        dx = dx.astype(compute_dtype)
        dh = jax.lax.dot_general(
            dx, w.astype(compute_dtype), (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        if want_w:
            dw = dw + matmul.weight_grad(hc.astype(compute_dtype), dx)
        return (total + loss, dw), (nll, lse, dh.astype(hidden.dtype))

    dw0 = jnp.zeros(w.shape, jnp.float32) if want_w else None
    (total, dw), (nll, lse, dh) = jax.lax.scan(body, (jnp.float32(0.0), dw0), (h, t, c))
    n = hidden.shape[0]
    dh = dh.reshape(-1, hidden.shape[1])[:n]
    out = (total, (nll.reshape(-1)[:n], lse.reshape(-1)[:n]))
    return out, (dh, None if dw is None else dw.astype(w.dtype), targets, coef)


def _loss_bwd(softcap, compute_dtype, chunk, uniform, res, g):
    dh, dw, targets, coef = res
    g_total = g[0]  # the per-token statistics are metrics: their cotangents are not used
    if isinstance(g_total, SymbolicZero):
        g_total = jnp.float32(0.0)
    d_w = None if dw is None else (g_total * dw).astype(dw.dtype)
    return (
        (g_total * dh).astype(dh.dtype),
        d_w,
        None,
        jnp.zeros_like(coef),
    )


_loss.defvjp(_loss_fwd, _loss_bwd, symbolic_zeros=True)


def linear_cross_entropy(
    hidden: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    *,
    nll_weight: jax.Array,
    uniform_weight: jax.Array | None = None,
    z_weight: jax.Array | None = None,
    softcap: float | None = None,
    compute_dtype=None,
    chunk: int = 512,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """sum_n a_n (-log p(y_n)) + b_n (-mean_v log p(v)) + c_n Z_n^2 and per-token statistics.

    hidden [N, D], w [D, V], targets [N] int32; nll_weight (a), uniform_weight (b) and z_weight
    (c) are [N] float per-token coefficients, treated as constants (no gradient flows to them).
    Returns (loss: float32 scalar, {"nll": [N] -log p(y_n), "lse": [N] Z_n}); the statistics are
    for metrics and carry no gradient.
    """
    n = hidden.shape[0]
    zeros = jnp.zeros((n,), jnp.float32)
    coef = jnp.stack(
        [
            nll_weight.astype(jnp.float32),
            zeros if uniform_weight is None else uniform_weight.astype(jnp.float32),
            zeros if z_weight is None else z_weight.astype(jnp.float32),
        ]
    )
    coef = jax.lax.stop_gradient(coef)
    compute_dtype = jnp.dtype(compute_dtype or hidden.dtype)
    total, (nll, lse) = _loss(
        hidden, w, targets.astype(jnp.int32), coef, softcap, compute_dtype, chunk,
        uniform_weight is not None,
    )  # fmt: skip
    stats = jax.lax.stop_gradient({"nll": nll, "lse": lse})
    return total, stats
