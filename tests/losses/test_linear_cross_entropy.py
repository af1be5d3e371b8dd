"""linear_cross_entropy (gradient formed in the forward pass) against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses.linear_cross_entropy import linear_cross_entropy


def _np_loss_and_grads(h, w, t, a, b, c, softcap):
    """float64 loss, d loss / d h, d loss / d w of sum_n a(-log p_y) + b(-mean log p) + c Z^2."""
    h, w = h.astype(np.float64), w.astype(np.float64)
    raw = h @ w
    x = np.tanh(raw / softcap) * softcap if softcap else raw
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    logp = x - lse[:, None]
    n, v = x.shape
    loss = (a * -logp[np.arange(n), t] + b * -logp.mean(-1) + c * lse**2).sum()
    p = np.exp(logp)
    onehot = np.zeros_like(p)
    onehot[np.arange(n), t] = 1
    dx = a[:, None] * (p - onehot) + b[:, None] * (p - 1.0 / v) + 2 * (c * lse)[:, None] * p
    if softcap:
        dx = dx * (1 - (x / softcap) ** 2)
    return loss, dx @ w.T, h.T @ dx, -logp[np.arange(n), t], lse


@pytest.mark.parametrize("softcap,chunk", [(None, 16), (3.0, 7)])
def test_values_and_gradients_match_float64(softcap, chunk):
    rng = np.random.default_rng()
    n, d, v = 45, 12, 97  # chunk does not divide n: the padded tail must not count
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * 0.4).astype(np.float32)
    t = rng.integers(0, v, n).astype(np.int32)
    mask = (rng.random(n) < 0.7).astype(np.float32)
    a, b, c = 0.8 * mask, 0.2 * mask, 1e-2 * mask

    def f(h, w):
        loss, stats = linear_cross_entropy(
            h, w, jnp.asarray(t), nll_weight=a, uniform_weight=b, z_weight=c, softcap=softcap,
            chunk=chunk,
        )  # fmt: skip
        return loss, stats

    (loss, stats), (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)
    ref_loss, ref_dh, ref_dw, ref_nll, ref_lse = _np_loss_and_grads(h, w, t, a, b, c, softcap)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["nll"], ref_nll, rtol=1e-5)
    np.testing.assert_allclose(stats["lse"], ref_lse, rtol=1e-5)
    # Outside differentiation the same loss comes from the plain forward.
    np.testing.assert_allclose(jax.jit(lambda h, w: f(h, w)[0])(h, w), ref_loss, rtol=1e-5)
    # The incoming cotangent scales both gradients (the step divides by the token count).
    dh3 = jax.grad(lambda h: 3.0 * f(h, w)[0])(h)
    np.testing.assert_allclose(dh3, 3.0 * ref_dh, rtol=1e-4, atol=1e-6)


def _dots(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_frozen_head_forms_no_head_gradient():
    """Under LoRA the head is a constant: its gradient matmul must not be computed at all."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(32, 8)).astype(np.float32)
    w = rng.normal(size=(8, 50)).astype(np.float32)
    t = jnp.asarray(rng.integers(0, 50, 32), jnp.int32)
    ones = jnp.ones((32,), jnp.float32)

    def loss(h, w):
        return linear_cross_entropy(h, w, t, nll_weight=ones, chunk=8)[0]

    both = _dots(jax.grad(loss, argnums=(0, 1)), h, w)
    hidden_only = _dots(jax.grad(lambda h: loss(h, jax.lax.stop_gradient(w))), h)
    assert (both, hidden_only) == (3, 2)  # logits, d hidden (+ d head when it is trained)


def test_label_smoothing_off_matches_plain_cross_entropy():
    rng = np.random.default_rng()
    h = rng.normal(size=(20, 6)).astype(np.float32)
    w = rng.normal(size=(6, 30)).astype(np.float32)
    t = rng.integers(0, 30, 20).astype(np.int32)
    loss, stats = linear_cross_entropy(h, w, jnp.asarray(t), nll_weight=jnp.ones(20))
    ref = _np_loss_and_grads(h, w, t, np.ones(20), np.zeros(20), np.zeros(20), None)
    np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
    np.testing.assert_allclose(loss, stats["nll"].sum(), rtol=1e-6)
