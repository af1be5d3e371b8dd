"""Kernels under a multi-device mesh (8 simulated CPU devices): they run per shard inside
shard_map and must give what they give on one device, forward and backward (1e-5 / 5e-5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import models
from jaxpost.kernels import flash_attention, fused_logprobs, paged_attention
from jaxpost.sharding import make_mesh, use_mesh

from tiny_models import tiny_config


def test_model_forward_pallas_under_mesh_equals_xla():
    # 4 heads, 2 KV heads over tensor=2: heads split; batch 4 over data x fsdp = 4.
    cfg = tiny_config(layer_types=("local", "global"), sliding_window=6)
    params = models.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, cfg.vocab_size)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with use_mesh(mesh):
        got = jax.jit(lambda p, t: models.forward(cfg.replace(attention_impl="pallas"), p, t))(
            params, tokens
        )
    want = models.forward(cfg.replace(attention_impl="xla"), params, tokens)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_sharded_kernels_match_single_device_fwd_and_bwd():
    ks = jax.random.split(jax.random.key(2), 8)
    q = jax.random.normal(ks[0], (4, 16, 4, 8))
    k = jax.random.normal(ks[1], (4, 16, 1, 8))  # MQA: one KV head cannot split; heads stay whole
    v = jax.random.normal(ks[2], (4, 16, 1, 8))
    hidden = jax.random.normal(ks[3], (36, 16))  # 9 tokens per shard: padded per shard
    w = jax.random.normal(ks[4], (16, 70))
    targets = jax.random.randint(ks[5], (36,), 0, 70)

    def loss(q, k, v, hidden, w):
        att = flash_attention.pallas(q, k, v, block_q=8, block_k=8)
        out = fused_logprobs.pallas(hidden, w, targets, with_entropy=True, block_n=8)
        return jnp.sum(att**2) + jnp.sum(out["logp"]) + jnp.sum(out["entropy"] ** 2)

    args = (q, k, v, hidden, w)
    grad = functools.partial(jax.value_and_grad(loss, argnums=range(5)))
    with use_mesh(make_mesh(data=2, fsdp=2, tensor=2)):
        assert str(jax.make_jaxpr(grad)(*args)).count("shard_map") >= 2  # both kernels
        got_loss, got = jax.jit(grad)(*args)
    want_loss, want = jax.jit(grad)(*args)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for g, r, name in zip(got, want, ("dq", "dk", "dv", "d hidden", "d w")):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5, err_msg=name)


def test_paged_attention_under_mesh_splits_kv_heads():
    """The engine shards the page pool over KV heads (tensor) and replicates slots."""
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (3, 4, 8))
    k_pages = jax.random.normal(ks[1], (2, 10, 4, 8))
    v_pages = jax.random.normal(ks[2], (2, 10, 4, 8))
    lengths = jnp.array([5, 1, 12], jnp.int32)
    table = jax.random.permutation(ks[3], 10)[:9].reshape(3, 3).astype(jnp.int32)

    def attend(*args):
        return paged_attention.pallas(*args, sliding_window=6, softcap=10.0, pages_per_block=2)

    args = (q, k_pages, v_pages, lengths, table)
    with use_mesh(make_mesh(data=2, fsdp=2, tensor=2)):
        assert "shard_map" in str(jax.make_jaxpr(attend)(*args))
        got = jax.jit(attend)(*args)
    want = paged_attention.reference(*args, sliding_window=6, softcap=10.0)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
