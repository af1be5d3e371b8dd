"""Training through the kernels: a tiny Gemma-2-like model's final hidden states, token
log-prob loss and gradients with every kernel forced on (flash attention under the layer scan
with per-layer traced windows, fused log-probs with tied embeddings and a final soft-cap) equal
the XLA path (hidden states to 1e-4 absolute, loss to 1e-5 relative, gradients to 1e-5
absolute; ~1e-7 seen)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import models
from jaxpost.kernels import fused_logprobs

from tiny_models import tiny_config


def test_loss_and_grads_with_kernels_equal_xla():
    cfg = tiny_config(
        vocab_size=300,
        layer_types=("local", "global"),
        sliding_window=5,
        attn_logit_softcap=20.0,
        final_logit_softcap=15.0,
        tie_embeddings=True,
    )
    params = models.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, cfg.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)
    seg = jnp.array([[1] * 9 + [2] * 11, [1] * 20], jnp.int32)

    def loss(params, impl):
        c = cfg.replace(attention_impl=impl)
        hidden, _ = models.apply(c, params, tokens, segment_ids=seg, return_hidden=True)
        out = fused_logprobs.fused_logprobs(
            hidden.reshape(-1, cfg.hidden_size),
            models.lm_head_kernel(c, params),
            targets.reshape(-1),
            softcap=cfg.final_logit_softcap,
            with_entropy=True,
            impl=impl,
        )
        return -jnp.mean(out["logp"]) + 0.1 * jnp.mean(out["entropy"]), hidden

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (want_loss, want_hidden), want = grad(params, "xla")
    (got_loss, got_hidden), got = grad(params, "pallas")
    np.testing.assert_allclose(got_hidden, want_hidden, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, r, atol=1e-5, err_msg=jax.tree_util.keystr(path))
