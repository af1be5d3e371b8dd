"""token_logprobs (chunked, fused) against a dense float64 NumPy log-softmax, values and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import models
from jaxpost.losses import token_logprobs

from tiny_models import tiny_config


def _cfg(**kw):
    return tiny_config(**{"vocab_size": 211, **kw})


def _batch(rng, cfg, b=4, t=160):
    # b * t = 640 tokens: more than one 512-token chunk of the XLA path, with a ragged tail.
    tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    targets = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(targets)}


def _np_stats(h, w, targets, softcap):
    """float64 dense reference: logp, entropy and d(sum c*logp)/d logits."""
    h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
    x = h @ w
    if softcap is not None:
        x = np.tanh(x / softcap) * softcap
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    logp_all = x - lse[:, None]
    p = np.exp(logp_all)
    logp = logp_all[np.arange(len(targets)), targets]
    entropy = -(p * logp_all).sum(-1)
    return logp, entropy, p, x


def _hidden_and_head(cfg, params, batch):
    hidden = jax.jit(lambda p, t: models.apply(cfg, p, t, return_hidden=True)[0])(
        params, batch["tokens"]
    )
    n = hidden.shape[0] * hidden.shape[1]
    return hidden.reshape(n, -1), models.lm_head_kernel(cfg, params)


@pytest.mark.parametrize(
    "kw", [{}, {"tie_embeddings": True, "final_logit_softcap": 5.0}], ids=["untied", "tied_softcap"]
)
def test_values_match_float64_numpy(kw):
    rng = np.random.default_rng()
    cfg = _cfg(**kw)
    params = models.init(cfg, jax.random.key(int(rng.integers(1 << 30))))
    batch = _batch(rng, cfg)
    out = jax.jit(lambda p, b: token_logprobs(cfg, {"base": p, "lora": None}, b, True))(
        params, batch
    )
    h, w = _hidden_and_head(cfg, params, batch)
    logp, entropy, _, _ = _np_stats(
        h, w, np.asarray(batch["targets"]).ravel(), cfg.final_logit_softcap
    )
    assert out["logp"].shape == out["entropy"].shape == batch["tokens"].shape
    np.testing.assert_allclose(np.asarray(out["logp"]).ravel(), logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["entropy"]).ravel(), entropy, rtol=1e-5, atol=1e-5)


def test_gradients_wrt_hidden_and_head_match_float64_numpy():
    """d/dh and d/dW of sum(c * logp) through the chunked path vs the analytic float64 form:
    d logits = c (onehot - p) (times the soft-cap slope), dh = d logits W^T, dW = h^T d logits."""
    from jaxpost.kernels.fused_logprobs import fused_logprobs

    rng = np.random.default_rng()
    n, d, v, cap = 700, 24, 157, 7.0
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
    t = rng.integers(0, v, n)
    c = rng.normal(size=n)

    def f(h, w):
        out = fused_logprobs(h, w, jnp.asarray(t, jnp.int32), softcap=cap, impl="xla")
        return jnp.sum(jnp.asarray(c, jnp.float32) * out["logp"])

    gh, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(h, w)
    _, _, p, x = _np_stats(h, w, t, cap)
    onehot = np.zeros_like(p)
    onehot[np.arange(n), t] = 1.0
    d_capped = c[:, None] * (onehot - p)
    d_logits = d_capped * (1.0 - (x / cap) ** 2)  # tanh'(z / cap) with x = cap tanh(z / cap)
    h64, w64 = np.asarray(h, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(gh), d_logits @ w64.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), h64.T @ d_logits, rtol=1e-4, atol=1e-4)


def test_param_gradients_match_dense_log_softmax_with_lora_and_packing():
    """Every parameter's and LoRA factor's gradient equals the one through dense
    [B, T, V] logits (models.forward + log_softmax), on packed rows with positions."""
    rng = np.random.default_rng()
    cfg = _cfg(qk_norm=True)
    base = models.init(cfg, jax.random.key(int(rng.integers(1 << 30))))
    r = 4
    lora = {
        "layers": {
            "attn": {
                "q": {
                    "a": jnp.asarray(rng.normal(size=(2, 32, r)) * 0.1, jnp.float32),
                    "b": jnp.asarray(rng.normal(size=(2, r, 32)) * 0.1, jnp.float32),
                }
            }
        }
    }
    batch = _batch(rng, cfg, b=2, t=48)
    seg = np.ones((2, 48), np.int32)
    seg[0, 20:] = 2
    seg[1, 40:] = 0
    pos = np.concatenate([np.arange(20), np.arange(28)])[None].repeat(2, 0).astype(np.int32)
    pos[1] = np.arange(48)
    batch.update(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
    c = jnp.asarray(rng.normal(size=(2, 48)), jnp.float32)

    def fused(params):
        logp = token_logprobs(cfg, params, batch)["logp"]
        return jnp.sum(c * logp), logp

    def dense(params):
        logits = models.forward(
            cfg, params["base"], batch["tokens"], lora=params["lora"],
            segment_ids=batch["segment_ids"], positions=batch["positions"],
        )  # fmt: skip
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.sum(c * jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0])

    params = {"base": base, "lora": lora}
    (v1, logp), g1 = jax.jit(jax.value_and_grad(fused, has_aux=True))(params)
    v2, g2 = jax.jit(jax.value_and_grad(dense))(params)
    # The value sums 96 signed terms of size ~|c| * |logp| ~ 3 that largely cancel, so its
    # float32 error scales with the terms, not with the (possibly tiny) sum.
    terms = float(jnp.sum(jnp.abs(c * logp)))
    np.testing.assert_allclose(v1, v2, rtol=0, atol=1e-6 * terms)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2)):
        scale = float(np.abs(np.asarray(b)).max()) + 1e-12
        err = float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale
        assert err < 1e-4, f"{jax.tree_util.keystr(path)}: max rel diff {err:.2e}"


def test_rejects_mismatched_targets():
    cfg = _cfg()
    params = {"base": models.init(cfg, jax.random.key(0)), "lora": None}
    tokens = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(ValueError, match="expected both"):
        token_logprobs(cfg, params, {"tokens": tokens, "targets": tokens[:, :4]})
    with pytest.raises(KeyError, match="targets"):
        token_logprobs(cfg, params, {"tokens": tokens})
