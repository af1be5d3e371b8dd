"""The transformer's own invariants on random parameters: cached decoding equals the full
forward, scanned layers equal the Python loop, remat leaves values and gradients unchanged,
bfloat16 stays close to float32, and eval_shape counts match `ModelConfig.num_params`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import models

from tiny_models import tiny_config

# One compilation per config (op-by-op eager dispatch is far slower on CPU).
jit_forward = jax.jit(models.forward, static_argnums=0)

VOCAB = 96
CONFIGS = {
    "llama": tiny_config(
        vocab_size=VOCAB,
        rope_theta=500_000.0,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ),
    # Gemma-3-like: every switch on, a window shorter than the sequence, mixed layer types.
    "gemma": tiny_config(
        vocab_size=VOCAB,
        model_type="gemma3_text",
        norm_offset=1.0,
        activation="gelu_tanh",
        qkv_bias=True,
        qk_norm=True,
        embed_scale=True,
        tie_embeddings=True,
        post_attn_norm=True,
        post_mlp_norm=True,
        attn_logit_softcap=2.0,
        final_logit_softcap=3.0,
        query_pre_attn_scalar=12.0,
        rope_local_theta=100.0,
        sliding_window=4,
        layer_types=("local", "global"),
    ),
}


@functools.cache  # eager init of the Gemma-like config costs seconds; reuse it across tests
def _params(cfg):
    # Scaled up from init's 0.02 so that logits and attention patterns are far from uniform.
    p = models.init(cfg, jax.random.key(0))
    k = jax.random.split(jax.random.key(1), len(jax.tree.leaves(p)))
    leaves = [
        x * 4.0 + 0.1 * jax.random.normal(kk, x.shape, x.dtype)
        for x, kk in zip(jax.tree.leaves(p), k)
    ]
    return jax.tree.unflatten(jax.tree.structure(p), leaves)


def _tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, jnp.int32)


# Layer loop x cache layout x params layout: (scan_layers, per-layer cache, params layout).
# "unstacked": a tuple of per-layer trees; "decode": unstacked (loop) or stacked (scan) and
# every kernel transposed (models.to_decode_layout), as the rollout engine holds them on CPU.
LAYOUTS = {
    "scan, stacked cache (carried, written in place)": (True, False, "stacked"),
    "scan, stacked cache, decode-layout params": (True, False, "decode"),
    "loop, per-layer cache and params": (False, True, "unstacked"),
    "loop, per-layer cache, decode-layout params": (False, True, "decode"),
    "loop, stacked cache, stacked params": (False, False, "stacked"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decoding_equals_full_forward(name, layout):
    """Prefill 5 tokens, a chunk of 4 more, then 1 token at a time: the logits of the full pass."""
    scan, per_layer_cache, params_layout = LAYOUTS[layout]
    cfg = dataclasses.replace(CONFIGS[name], scan_layers=scan)
    params = _params(CONFIGS[name])
    b, t = 2, 14
    tokens = _tokens(1, (b, t))
    full = np.asarray(jax.jit(lambda p, x: models.forward(cfg, p, x))(params, tokens))
    if params_layout != "stacked" and not scan:
        params = models.unstack_layers(params, cfg.num_layers)
    if params_layout == "decode":
        params = models.to_decode_layout(cfg, params)
        kernels = [k for k in jax.tree_util.tree_flatten_with_path(params)[0] if "kernel" in str(k)]
        assert kernels and all("kernel_t" in jax.tree_util.keystr(k) for k, _ in kernels)
    step = jax.jit(lambda p, x, pos, c: models.apply(cfg, p, x, positions=pos, cache=c))
    cache = models.DenseKVCache.create(cfg, b, 16, per_layer=per_layer_cache)
    assert isinstance(cache.k, tuple) == per_layer_cache
    got = []
    bounds = [0, 5, 9] + list(range(10, t + 1))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pos = jnp.broadcast_to(jnp.arange(lo, hi, dtype=jnp.int32), (b, hi - lo))
        logits, cache = step(params, tokens[:, lo:hi], pos, cache)
        got.append(np.asarray(logits))
    assert np.abs(full).max() > 1.0
    # float32 rounding differs between one pass and the incremental one (logits of size ~5).
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-4, rtol=0)


def _loss(cfg, params, tokens):
    logits = models.forward(cfg, params, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scan_equals_loop(name):
    cfg = CONFIGS[name]
    params = _params(cfg)
    tokens = _tokens(3, (2, 12))
    scanned = jit_forward(cfg, params, tokens)
    looped = jit_forward(cfg.replace(scan_layers=False), params, tokens)
    np.testing.assert_allclose(np.asarray(looped), np.asarray(scanned), atol=1e-4, rtol=0)


def test_remat_keeps_loss_and_gradients():
    cfg = CONFIGS["gemma"]
    params = _params(cfg)
    tokens = _tokens(3, (2, 12))

    def run(remat):
        c = cfg.replace(remat=remat)
        return jax.jit(jax.value_and_grad(lambda p, x: _loss(c, p, x)))(params, tokens)

    ref_loss, ref_grad = run("none")
    for policy in ("block", "save_dots"):
        loss, grad = run(policy)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max(), rtol=0)


def test_bfloat16_close_to_float32():
    cfg = CONFIGS["gemma"]
    params = _params(cfg)
    tokens = _tokens(5, (2, 12))
    ref = np.asarray(jit_forward(cfg, params, tokens))
    bf = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
    out = jit_forward(bf, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), tokens)
    assert out.dtype == jnp.float32  # logits stay float32
    # bf16 has 8 mantissa bits; through 3 layers the error stays a few percent of the range.
    err = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
    assert err < 0.05, err


@pytest.mark.parametrize(
    "name, changes",
    [
        ("llama", {}),
        ("llama", dict(qkv_bias=True, o_bias=True)),
        ("llama", dict(qk_norm=True, tie_embeddings=True)),
        ("gemma", {}),
    ],
)
def test_eval_shape_counts_match_num_params(name, changes):
    cfg = CONFIGS[name].replace(**changes)
    shapes = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == cfg.num_params()


def test_forward_rejects_token_ids_outside_the_vocabulary():
    """Called with concrete tokens, forward says which id is out of range; a gather would give
    NaN logits (JAX fills out-of-bounds gathers) and nothing else would notice."""
    cfg = CONFIGS["llama"]
    params = _params(cfg)
    ok = models.forward(cfg, params, np.array([[0, cfg.vocab_size - 1]], np.int32))
    assert np.isfinite(np.asarray(ok)).all()
    for bad in (cfg.vocab_size, -1):
        message = rf"token id {bad} in tokens; expected ids in \[0, 96\)"
        with pytest.raises(ValueError, match=message):
            models.forward(cfg, params, np.array([[1, bad]], np.int32))
    with pytest.raises(TypeError, match="tokens must be integer token ids, got float32"):
        models.forward(cfg, params, np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\], got shape \(3,\)"):
        models.forward(cfg, params, np.array([1, 2, 3], np.int32))
    # Nested lists are token ids too; positions / segment ids must have the tokens' shape.
    np.testing.assert_array_equal(models.forward(cfg, params, [[0, cfg.vocab_size - 1]]), ok)
    for name in ("positions", "segment_ids"):
        message = rf"{name} must have the shape of tokens \[batch, length\] \(1, 2\), got \(2,\)"
        with pytest.raises(ValueError, match=message):
            models.forward(cfg, params, [[1, 2]], **{name: [0, 1]})
