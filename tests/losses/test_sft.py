"""SFT loss (chunked CE, z-loss, label smoothing) against float64 NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import models
from jaxpost.losses import make_sft_loss, sft_loss

from tiny_models import tiny_config

CFG = tiny_config(vocab_size=173)


def _setup(rng, b=3, t=200):
    params = models.init(CFG, jax.random.key(int(rng.integers(1 << 30))))
    tokens = rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
    mask = (rng.random((b, t)) < 0.6).astype(np.float32)
    batch = {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(np.roll(tokens, -1, 1)),
        "loss_mask": jnp.asarray(mask),
    }
    return {"base": params, "lora": None}, batch


@jax.jit
def _hidden(params, tokens):
    return models.apply(CFG, params, tokens, return_hidden=True)[0]


def _np_reference(params, batch, z, eps):
    """float64: loss_sum, weight_sum, nll_sum, z_sum and d loss_sum / d logits [N, V]."""
    hidden = _hidden(params["base"], batch["tokens"])
    h = np.asarray(hidden, np.float64).reshape(-1, CFG.hidden_size)
    w = np.asarray(params["base"]["lm_head"]["kernel"], np.float64)
    x = h @ w
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    logp_all = x - lse[:, None]
    t = np.asarray(batch["targets"]).ravel()
    mask = np.asarray(batch["loss_mask"], np.float64).ravel()
    n, v = x.shape
    nll = -logp_all[np.arange(n), t]
    smooth = -logp_all.mean(-1)  # cross-entropy against the uniform distribution
    per = (1 - eps) * nll + eps * smooth + z * lse**2
    p = np.exp(logp_all)
    onehot = np.zeros_like(p)
    onehot[np.arange(n), t] = 1
    d = mask[:, None] * ((1 - eps) * (p - onehot) + eps * (p - 1.0 / v) + 2 * z * lse[:, None] * p)
    return (per * mask).sum(), mask.sum(), (nll * mask).sum(), (lse**2 * mask).sum(), h, d


@pytest.mark.parametrize("z,eps", [(0.0, 0.0), (2e-3, 0.2)])
def test_loss_and_head_gradient_match_float64_formula(z, eps):
    rng = np.random.default_rng()
    params, batch = _setup(rng)
    loss_fn = make_sft_loss(z_loss=z, label_smoothing=eps)

    def f(params):
        loss_sum, weight, aux = loss_fn(CFG, params, batch, None)
        return loss_sum, (weight, aux)

    (loss_sum, (weight, aux)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    ref_loss, ref_w, ref_nll, ref_z, h, d_logits = _np_reference(params, batch, z, eps)
    np.testing.assert_allclose(loss_sum, ref_loss, rtol=1e-5)
    assert float(weight) == ref_w
    np.testing.assert_allclose(aux["nll"], ref_nll, rtol=1e-5)
    if z:
        np.testing.assert_allclose(aux["z_loss"], ref_z, rtol=1e-5)
    else:
        assert "z_loss" not in aux
    # The LM head's gradient is h^T d_logits (hidden does not depend on the untied head).
    np.testing.assert_allclose(
        grads["base"]["lm_head"]["kernel"], h.T @ d_logits, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("fill", ["other token", -100, -1, CFG.vocab_size])
def test_masked_positions_do_not_matter(fill):
    """Whatever a masked target holds, an HF-style -100 label or any id outside the vocabulary
    included, the loss and its gradient are those of the masked batch (no NaN, no wrap-around)."""
    rng = np.random.default_rng()
    params, batch = _setup(rng, b=2, t=40)
    other = dict(batch)
    flip = np.asarray(batch["loss_mask"]) == 0
    targets = np.asarray(batch["targets"]).copy()
    targets[flip] = (targets[flip] + 1) % CFG.vocab_size if fill == "other token" else fill
    other["targets"] = jnp.asarray(targets)
    loss = jax.jit(lambda p, b: sft_loss(CFG, p, b))
    a, b = loss(params, batch), loss(params, other)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert float(a[1]) == float(np.asarray(batch["loss_mask"]).sum())
    grad = jax.jit(jax.grad(lambda p, b: sft_loss(CFG, p, b)[0]))
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
        grad(params, batch)["base"],
        grad(params, other)["base"],
    )


def test_bad_options_and_batch():
    rng = np.random.default_rng()
    params, batch = _setup(rng, b=1, t=8)
    with pytest.raises(ValueError, match="label_smoothing"):
        sft_loss(CFG, params, batch, label_smoothing=1.0)
    with pytest.raises(ValueError, match="z_loss"):
        sft_loss(CFG, params, batch, z_loss=-1.0)
    with pytest.raises(KeyError, match="loss_mask"):
        sft_loss(CFG, params, {k: v for k, v in batch.items() if k != "loss_mask"})
