"""Sampler: frequencies of temperature / top-k / top-p / min-p draws against the exact filtered
distribution (computed independently in float64 NumPy), greedy, and the reported log-prob."""

import jax
import jax.numpy as jnp
import jax.scipy.stats  # noqa: F401  (chi2.sf; scipy is not a dependency)
import numpy as np
import pytest

from jaxpost.rollout import sampling
from jaxpost.rollout.sampling import SamplingParams

DRAWS = 40_000
# Reject when the chi-square p-value is below this. With a fixed seed the test is deterministic;
# a correct sampler fails it with probability 1e-4 per case for a random seed.
P_THRESHOLD = 1e-4


def exact_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """The distribution the filters define (vLLM / HF order), float64, from the definitions:
    top-k keeps the k largest; top-p keeps the smallest prefix of the sorted (top-k
    renormalised) distribution whose mass reaches p; min-p keeps p_i >= min_p * max p."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.ones(len(p), bool)
    order = np.argsort(-p, kind="stable")
    if top_k:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0.0) / p[keep].sum()
    mass = 0.0
    for i in order:
        if keep[i] and mass >= top_p:
            keep[i] = False
        mass += q[i]
    keep &= p >= min_p * p.max()
    out = np.where(keep, p, 0.0)
    return out / out.sum()


CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_p=0.7),
    dict(temperature=1.5, min_p=0.1),
    dict(temperature=1.2, top_k=8, top_p=0.8, min_p=0.05),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sample_frequencies_match_filtered_distribution(case):
    rng = np.random.default_rng(1234)
    vocab = 16
    logits = rng.normal(size=vocab).astype(np.float32)
    sp = SamplingParams(**case)
    rows = lambda x, dt: jnp.full((DRAWS,), x, dt)
    keys = jax.random.split(jax.random.key(7), DRAWS)
    tokens, logp = jax.jit(sampling.sample, static_argnames="variant")(
        jnp.broadcast_to(logits, (DRAWS, vocab)),
        keys,
        rows(sp.temperature, jnp.float32),
        rows(sp.top_k, jnp.int32),
        rows(sp.top_p, jnp.float32),
        rows(sp.min_p, jnp.float32),
        variant=sp.variant,
    )
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    expected = exact_probs(logits, **case)
    # Filtered-out tokens must never be drawn.
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    assert support.sum() >= 3, "the case should keep several tokens"
    want = DRAWS * expected[support]
    chi2 = float(((counts[support] - want) ** 2 / want).sum())
    p_value = float(jax.scipy.stats.chi2.sf(chi2, df=int(support.sum()) - 1))
    assert p_value > P_THRESHOLD, (case, chi2, p_value, counts, DRAWS * expected)
    # The reported log-prob is the raw model's, whatever the filters.
    raw = jax.nn.log_softmax(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(logp), np.asarray(raw)[np.asarray(tokens)], atol=1e-6)


def test_greedy_is_argmax_and_variants():
    logits = jnp.asarray(np.random.default_rng().normal(size=(6, 50)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 6)
    zeros, ones = jnp.zeros(6), jnp.ones(6)
    for variant in (sampling.GREEDY, sampling.TEMPERATURE, sampling.FILTERED):
        tok, _ = sampling.sample(logits, keys, zeros, jnp.zeros(6, jnp.int32), ones, zeros, variant)
        np.testing.assert_array_equal(tok, jnp.argmax(logits, -1))
    assert SamplingParams(temperature=0.0, top_k=3).variant == sampling.GREEDY
    assert SamplingParams(temperature=0.5).variant == sampling.TEMPERATURE
    assert SamplingParams(min_p=0.1).variant == sampling.FILTERED
    assert sampling.widest_variant([sampling.GREEDY, sampling.FILTERED]) == sampling.FILTERED
    assert sampling.widest_variant([]) == sampling.GREEDY


@pytest.mark.parametrize("rows", [5, 2, 1])
@pytest.mark.parametrize("variant", [sampling.GREEDY, sampling.TEMPERATURE, sampling.FILTERED])
def test_vocab_first_logits_give_the_same_tokens_and_logprobs(variant, rows):
    """Logits passed as [V, B] (the decode layout's head product) sample the same tokens with
    the same log-probs as [B, V] (ties and a -inf entry included); log-probs against float64.
    One row takes the [B, V] path (a [V, 1] array is [1, V] in memory)."""
    rng = np.random.default_rng()
    x = rng.normal(size=(5, 300)).astype(np.float32)
    x[1, [7, 90]] = 6.0
    x[2, 3] = -np.inf
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 5)
    temp = jnp.asarray([0.0, 0.7, 1.0, 0.0, 1.3], jnp.float32)
    top_k = jnp.asarray([0, 5, 0, 0, 20], jnp.int32)
    top_p, min_p = jnp.asarray([1, 0.9, 1, 1, 0.8], jnp.float32), jnp.full((5,), 0.01)
    pick = [1, 0, 2, 3, 4][:rows]  # with 1 row: the tied one; with 2: the tied and a greedy
    x = x[pick]
    args = tuple(a[np.asarray(pick)] for a in (keys, temp, top_k, top_p, min_p)) + (variant,)
    tok, logp = sampling.sample(jnp.asarray(x), *args)
    tok_t, logp_t = jax.jit(sampling.sample, static_argnums=(6, 7))(jnp.asarray(x.T), *args, True)
    np.testing.assert_array_equal(tok_t, tok)
    exact = np.asarray(x, np.float64)
    top = exact.max(-1, keepdims=True)
    exact = exact - top - np.log(np.exp(exact - top).sum(-1, keepdims=True))  # log-softmax
    want = exact[np.arange(rows), np.asarray(tok)]
    np.testing.assert_allclose(logp_t, want, atol=1e-5)
    np.testing.assert_allclose(logp_t, logp, atol=1e-6)


def test_sampling_params_validation_messages():
    assert SamplingParams(top_k=-1).top_k == 0  # vLLM's "off"
    assert SamplingParams(min_p=1.0).min_p == 1.0  # [0, 1] as in transformers and vLLM
    assert SamplingParams().seed is None and SamplingParams().logprobs == "raw"
    with pytest.raises(ValueError, match="top_k=-2 must be >= 0"):
        SamplingParams(top_k=-2)
    with pytest.raises(ValueError, match=r"min_p=1.5 must be in \[0, 1\]"):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValueError, match="logprobs='tempered' must be one of"):
        SamplingParams(logprobs="tempered")
    with pytest.raises(ValueError, match="n=0 must be >= 1"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="stop contains an empty token sequence"):
        SamplingParams(stop=[[]])
    assert SamplingParams(stop=[[1, 2]], eos_token_ids=[3]).stop == ((1, 2),)


def test_argmax_and_draws_equal_jax_reference():
    """sampling.argmax is jnp.argmax (first index on ties, -inf entries, one-token rows), and
    the temperature draw is exactly jax.random.categorical's for the same key."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 300)).astype(np.float32)
    x[1, [5, 17, 200]] = 9.0  # ties: the first index wins
    x[2, :] = -np.inf
    x[2, 40] = 0.0
    x[3, :] = 1.0  # all equal
    np.testing.assert_array_equal(sampling.argmax(jnp.asarray(x)), np.argmax(x, -1))
    np.testing.assert_array_equal(sampling.argmax(jnp.asarray(x.T), axis=0), np.argmax(x, -1))
    assert sampling.argmax(jnp.ones((2, 1))).tolist() == [0, 0]

    logits = jnp.asarray(x[4:])
    keys = jax.random.split(jax.random.key(11), logits.shape[0])
    temp = jnp.full((logits.shape[0],), 0.7, jnp.float32)
    ones = jnp.ones_like(temp)
    tok, logp = sampling.sample(
        logits, keys, temp, jnp.zeros_like(temp, jnp.int32), ones, 0 * ones, sampling.TEMPERATURE
    )
    want = jax.vmap(jax.random.categorical)(keys, logits / 0.7)
    np.testing.assert_array_equal(tok, want)
    exact = np.asarray(x[4:], np.float64)
    exact = exact - exact.max(-1, keepdims=True)
    exact -= np.log(np.exp(exact).sum(-1, keepdims=True))
    np.testing.assert_allclose(logp, exact[np.arange(len(tok)), np.asarray(tok)], atol=2e-6)


def _hf_filtered_log_probs(logits, temperature, top_k, top_p, min_p):
    """transformers' own warpers, in `generate`'s order, in float64: log-probs of the
    distribution sampled from (-inf where filtered out)."""
    import torch
    import transformers

    x = torch.tensor(np.asarray(logits, np.float64))[None]
    warpers = [transformers.TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(transformers.TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(transformers.MinPLogitsWarper(min_p))
    for w in warpers:
        x = w(None, x)
    return torch.log_softmax(x, -1)[0].numpy()


FILTER_CASES = [
    dict(temperature=0.7, top_k=10, top_p=0.9, min_p=0.0),
    dict(temperature=1.3, top_k=0, top_p=0.6, min_p=0.0),
    dict(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0),
    dict(temperature=0.5, top_k=0, top_p=1.0, min_p=0.1),
    dict(temperature=1.2, top_k=8, top_p=0.8, min_p=0.05),
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_filtered_distribution_equals_transformers_warpers(case):
    """The exact distribution `filter_logits` leaves (not sampled: softmax of its output), on
    random rows and on rows with ties at the top-k boundary, against transformers' warpers
    (float64); the "processed" log-prob of a drawn token is that distribution's."""
    rng = np.random.default_rng(5)
    rows = [rng.normal(size=64) * 2 for _ in range(40)]
    rows += [np.array([3, 2, 2, 2, 1, 0] + [-5] * 58, float)] * 2  # ties at the k-th value
    for row in rows:
        args = [jnp.float32(case[k]) for k in ("temperature",)] + [
            jnp.int32(case["top_k"]),
            jnp.float32(case["top_p"]),
            jnp.float32(case["min_p"]),
        ]
        got = np.asarray(
            jax.nn.log_softmax(sampling.filter_logits(jnp.asarray(row, jnp.float32), *args))
        )
        want = _hf_filtered_log_probs(row, **case)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
        kept = np.isfinite(want)
        np.testing.assert_allclose(got[kept], want[kept], atol=2e-5)
    # processed log-probs of drawn tokens: the same distribution's; raw ones: the model's.
    x = jnp.asarray(np.stack(rows[:8]), jnp.float32)
    b = x.shape[0]
    full = lambda v, dt: jnp.full((b,), v, dt)
    keys = jax.random.split(jax.random.key(3), b)
    params = (full(case["temperature"], jnp.float32), full(case["top_k"], jnp.int32),
              full(case["top_p"], jnp.float32), full(case["min_p"], jnp.float32))  # fmt: skip
    tok, processed = sampling.sample(x, keys, *params, processed=jnp.ones((b,), bool))
    tok_raw, raw = sampling.sample(x, keys, *params, processed=jnp.zeros((b,), bool))
    np.testing.assert_array_equal(tok, tok_raw)
    for i in range(b):
        want = _hf_filtered_log_probs(np.asarray(rows[i]), **case)[int(tok[i])]
        np.testing.assert_allclose(float(processed[i]), want, atol=2e-5)
        exact = np.asarray(rows[i], np.float64)
        exact = exact - exact.max() - np.log(np.exp(exact - exact.max()).sum())
        np.testing.assert_allclose(float(raw[i]), exact[int(tok[i])], atol=2e-5)


def test_top_p_one_keeps_the_whole_tail():
    """top_p = 1 is off exactly, also on the filtered path (which a temperature-only request
    takes when another slot uses a filter): no tail token of a 32000-token row is dropped."""
    rng = np.random.default_rng(0)
    row = jnp.asarray(rng.normal(size=32000) * 4, jnp.float32)
    out = sampling.filter_logits(row, jnp.float32(0.7), jnp.int32(0), jnp.float32(1.0), 0.0)
    assert bool(jnp.isfinite(out).all())


def test_a_slot_without_a_seed_draws_one_only_when_sampling(monkeypatch):
    from jaxpost.rollout import state

    drawn = []
    monkeypatch.setattr(state, "fresh_seeds", lambda n: drawn.append(n) or [1234] * n)
    ints, _, _ = state.slot_sampling_arrays(SamplingParams(temperature=0.0, seed=None), 0)
    assert drawn == [] and ints[1] == 0  # greedy never reads the seed: no draw, no collective
    ints, _, _ = state.slot_sampling_arrays(SamplingParams(temperature=1.0, seed=None), 0)
    assert drawn == [1] and ints[1] == 1234
    ints, _, _ = state.slot_sampling_arrays(SamplingParams(temperature=1.0, seed=7), 0)
    assert drawn == [1] and ints[1] == 7
