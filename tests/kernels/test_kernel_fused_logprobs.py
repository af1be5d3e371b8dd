"""Pallas fused log-probs (interpret mode) against the dense reference, the chunked XLA path and
a float64 NumPy oracle, forward and backward, and the memory claim for a 128k vocabulary.

Tolerances (float32): outputs 2e-5 absolute + relative, gradients to hidden and W 5e-5
(~1e-6 seen). Cotangents are random on every output, so each term of the custom VJP is checked.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.kernels import dispatch, fused_logprobs

TOL = 2e-5
GRAD_TOL = 5e-5
OUTPUTS = ("logp", "lse", "entropy", "logit_mean")


def _inputs(seed, n, d, v):
    ks = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(ks[0], (n, d), jnp.float32)
    w = jax.random.normal(ks[1], (d, v), jnp.float32) * 0.5
    targets = jax.random.randint(ks[2], (n,), 0, v)
    cots = dict(zip(OUTPUTS, jax.random.normal(ks[3], (len(OUTPUTS), n), jnp.float32)))
    return hidden, w, targets, cots


def _out_and_grads(fn, hidden, w, targets, cots, softcap):
    def f(hidden, w):
        return fn(hidden, w, targets, softcap=softcap, with_entropy=True, with_logit_mean=True)

    out, vjp = jax.vjp(f, hidden, w)
    return out, vjp(cots)


def _numpy_stats(hidden, w, targets, softcap):
    x = np.asarray(hidden, np.float64) @ np.asarray(w, np.float64)
    if softcap is not None:
        x = np.tanh(x / softcap) * softcap
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    logp = x - lse[:, None]
    return {
        "logp": logp[np.arange(len(x)), np.asarray(targets)],
        "lse": lse,
        "entropy": -(np.exp(logp) * logp).sum(-1),
        "logit_mean": x.mean(-1),
    }


@pytest.mark.parametrize(
    "n,v,softcap,block_n,block_v,tpu",
    [
        (40, 300, None, 16, 128, False),  # ragged: N and V not multiples of their blocks
        (33, 256, 5.0, 16, 64, False),  # soft-capped (Gemma 2 final logits)
        (24, 200, 3.0, 8, 128, True),
    ],
    ids=["ragged", "softcap", "tpu_interpret_ragged_softcap"],
)
def test_fused_matches_reference(n, v, softcap, block_n, block_v, tpu):
    hidden, w, targets, cots = _inputs(n + v, n, 32, v)
    kernel = functools.partial(fused_logprobs.pallas, block_n=block_n, block_v=block_v)
    run = jax.jit(functools.partial(_out_and_grads, kernel, softcap=softcap))
    if tpu:
        with dispatch.tpu_interpret_mode():
            out, grads = run(hidden, w, targets, cots)
    else:
        out, grads = run(hidden, w, targets, cots)
    ref, ref_grads = _out_and_grads(fused_logprobs.reference, hidden, w, targets, cots, softcap)
    oracle = _numpy_stats(hidden, w, targets, softcap)
    for name in OUTPUTS:
        np.testing.assert_allclose(out[name], ref[name], atol=TOL, rtol=TOL, err_msg=name)
        np.testing.assert_allclose(out[name], oracle[name], atol=TOL, rtol=TOL, err_msg=name)
    for got, want, name in zip(grads, ref_grads, ("d hidden", "d w")):
        np.testing.assert_allclose(got, want, atol=GRAD_TOL, rtol=GRAD_TOL, err_msg=name)


def test_dispatch_and_chunked_agree():
    hidden, w, targets, _ = _inputs(3, 20, 16, 100)
    kw = dict(with_entropy=True)
    forced = fused_logprobs.fused_logprobs(hidden, w, targets, impl="pallas", **kw)
    auto = fused_logprobs.fused_logprobs(hidden, w, targets, impl="auto", **kw)
    chunked = fused_logprobs.xla_chunked(hidden, w, targets, chunk=8, **kw)
    assert set(forced) == {"logp", "lse", "entropy"}
    for name in forced:
        np.testing.assert_allclose(forced[name], chunked[name], atol=TOL, rtol=TOL)
        np.testing.assert_allclose(auto[name], chunked[name], atol=TOL, rtol=TOL)
    with pytest.raises(ValueError, match="expected hidden"):
        fused_logprobs.pallas(hidden, w.T, targets)


def test_targets_outside_the_vocabulary_read_logit_zero_on_every_path():
    """An HF-style -100 label (or any id outside [0, V)) gives logp = -lse and no gradient
    through its one-hot term, in the kernel, the chunked XLA path and the dense reference."""
    hidden, w, targets, cots = _inputs(4, 12, 16, 100)
    bad = targets.at[jnp.array([1, 5, 7, 11])].set(jnp.array([-100, -1, 100, 10**6]))
    ref = _numpy_stats(hidden, w, targets, None)
    paths = {
        "pallas": functools.partial(fused_logprobs.pallas, interpret=True),
        "chunked": functools.partial(fused_logprobs.xla_chunked, chunk=8),
        "reference": fused_logprobs.reference,
    }
    grads = {}
    for name, fn in paths.items():
        out, grads[name] = _out_and_grads(fn, hidden, w, bad, cots, None)
        logp = np.asarray(out["logp"])
        np.testing.assert_allclose(logp[[1, 5, 7, 11]], -ref["lse"][[1, 5, 7, 11]], rtol=TOL)
        keep = np.ones(12, bool)
        keep[[1, 5, 7, 11]] = False
        np.testing.assert_allclose(logp[keep], ref["logp"][keep], atol=TOL, rtol=TOL)
    for name in ("chunked", "reference"):
        for a, b in zip(grads[name], grads["pallas"]):
            np.testing.assert_allclose(a, b, atol=GRAD_TOL, rtol=GRAD_TOL)


def test_bfloat16_compute_matches_reference_in_the_same_precision():
    """compute_dtype=bfloat16 rounds h and W before the float32-accumulated matmul, in both."""
    hidden, w, targets, _ = _inputs(4, 24, 32, 150)
    kw = dict(with_entropy=True, compute_dtype=jnp.bfloat16)
    got = fused_logprobs.pallas(hidden, w, targets, block_n=8, block_v=64, **kw)
    want = fused_logprobs.reference(hidden, w, targets, **kw)
    for name in got:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=1e-4, err_msg=name)


def _temp_bytes(fn, n, d, v) -> int:
    """XLA's temporary allocation for value-and-grad of sum(logp) + sum(entropy); no run."""

    def loss(hidden, w, targets):
        out = fn(hidden, w, targets, with_entropy=True)
        return jnp.sum(out["logp"]) + jnp.sum(out["entropy"])

    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_is_not_tokens_times_vocab():
    """128k vocabulary: the dense reference's temporaries grow with N x V; the chunked XLA path
    and the kernel grow only with N x D (the [N, V] logits never exist).

    The kernel is compiled in interpret mode (CPU); the interpreter keeps working copies of its
    operands, so its constant includes a few copies of W [D, V] (on TPU W is read in place and
    the live tile is [block_n, block_v]). The claim tested is the scaling in N.
    """
    d, v = 128, 131072
    fns = {
        "reference": fused_logprobs.reference,
        "xla_chunked": fused_logprobs.xla_chunked,
        "pallas": functools.partial(fused_logprobs.pallas, interpret=True),
    }
    small, large = 2048, 16384
    mib = {k: [_temp_bytes(f, n, d, v) / 2**20 for n in (small, large)] for k, f in fns.items()}
    for name, (a, b) in mib.items():
        print(f"fused log-probs fwd+bwd temp, V={v} D={d} {name}: N={small} {a:.1f} MiB, ", end="")
        print(f"N={large} {b:.1f} MiB")
    logits_mib = lambda n: n * v * 4 / 2**20
    assert mib["reference"][1] >= logits_mib(large)  # the dense [N, V] logits exist
    per_token_budget = 16 * d * 4 / 2**20  # a handful of [N, D] float32 arrays, nothing with V
    for name in ("xla_chunked", "pallas"):
        growth = mib[name][1] - mib[name][0]
        assert growth <= (large - small) * per_token_budget, (name, mib[name])
        assert mib[name][1] < logits_mib(large) / 4, (name, mib[name])
