"""Continuous batching: many mixed requests through few slots, finish reasons, n samples per
prompt and repeated prompts sharing one prefill, seeded reproducibility."""

import contextlib
import dataclasses
import weakref

import jax
import numpy as np
import pytest

from jaxpost import models, rollout
from jaxpost.rollout.state import table_width_bucket

from tiny_models import tiny_config

CFG = tiny_config(qk_norm=True)


@pytest.fixture(scope="module")
def params():
    # jit: one compiled program instead of many eager ops
    return jax.jit(models.init, static_argnums=0)(
        CFG, jax.random.key(np.random.SeedSequence().entropy % 2**31)
    )


@pytest.fixture(scope="module")
def engine(params):
    return rollout.Engine(
        CFG, params, slots=8, max_len=112, max_prefill_length=64, page_size=8, steps_per_call=4
    )


@contextlib.contextmanager
def prefilled_lengths(engine, prefixes: list | None = None):
    """Records the length of every prompt the engine prefills inside the block, and a weak
    reference to each prefix made into `prefixes` if given."""
    lengths, original = [], engine.prefill_many

    def counting(**kwargs):
        lengths.extend(len(p) for p in kwargs["prompts"])
        made = original(**kwargs)
        if prefixes is not None:
            prefixes.extend(weakref.ref(p) for p in made)
        return made

    engine.prefill_many = counting
    try:
        yield lengths
    finally:
        del engine.prefill_many


def run(engine, prompts, sps, **driver_kwargs):
    requests = [rollout.Request(p, s) for p, s in zip(prompts, sps)]
    outs = rollout.Driver(engine, **driver_kwargs).run(requests)
    return [o for per_prompt in outs for o in per_prompt]


def test_64_mixed_requests_through_8_slots_equal_each_alone(engine):
    rng = np.random.default_rng()
    prompts = [list(rng.integers(0, CFG.vocab_size, rng.integers(1, 48))) for _ in range(64)]
    sps = [
        rollout.SamplingParams(max_new_tokens=int(rng.integers(1, 48)), temperature=0.0)
        for _ in range(64)
    ]
    outs = run(engine, prompts, sps)
    assert [len(o.tokens) for o in outs] == [s.max_new_tokens for s in sps]
    assert all(o.finish_reason == "length" and o.finished >= o.first_token for o in outs)
    # Prompt lengths 1..47 fall in the buckets 16, 32, 64 and the driver prefills 1, 2, 4 or 8
    # queued prompts per call: at most 3 x 4 prefill compiles, and as many insert compiles (a
    # prefix is a row of its prefill batch); for the greedy sampler, one generate compile per
    # page-table width (state.table_width_bucket: 1, 2, 3, 4, 6, 8, 12, 14 of 14 pages).
    pages = engine.max_pages_per_slot
    widths = {table_width_bucket(p, pages) for p in range(1, pages + 1)}
    assert len(widths) == 8 and pages == 14
    counts = dict(engine.compilations)
    assert 3 <= counts.pop("prefill") <= 12
    assert 3 <= counts.pop("insert") <= 12
    assert counts.pop("init") == 1
    assert 1 <= counts.pop("generate") <= len(widths) and not counts
    # Pages all came back.
    assert engine.allocator.num_used == 0
    for i in rng.choice(64, size=16, replace=False):
        alone = run(engine, [prompts[i]], [sps[i]])[0]
        assert alone.tokens == outs[i].tokens
        np.testing.assert_allclose(alone.logprobs, outs[i].logprobs, atol=1e-6)
    # Nothing else recompiled: the shapes are bounded, whatever the traffic.
    assert engine.compilations["prefill"] <= 12 and engine.compilations["insert"] <= 12
    assert engine.compilations["init"] == 1 and engine.compilations["generate"] <= len(widths)


def test_finish_reasons_eos_stop_and_length(engine):
    rng = np.random.default_rng()
    prompt = list(rng.integers(0, CFG.vocab_size, 9))
    free = run(engine, [prompt], [rollout.SamplingParams(max_new_tokens=20, temperature=0.0)])[0]
    toks = free.tokens
    eos = toks[5]
    first = toks.index(eos)
    stop = tuple(toks[6:8])
    first_stop = next(i + 2 for i in range(len(toks) - 1) if tuple(toks[i : i + 2]) == stop)
    outs = run(
        engine,
        [prompt] * 3,
        [
            rollout.SamplingParams(max_new_tokens=20, temperature=0.0, eos_token_ids=[eos]),
            rollout.SamplingParams(max_new_tokens=20, temperature=0.0, stop=[stop, (999,)]),
            rollout.SamplingParams(max_new_tokens=4, temperature=0.0),
        ],
    )
    assert (outs[0].tokens, outs[0].finish_reason) == (toks[: first + 1], "eos")
    assert (outs[1].tokens, outs[1].finish_reason) == (toks[:first_stop], "stop")
    assert (outs[2].tokens, outs[2].finish_reason) == (toks[:4], "length")
    # Batched and lone prefills may round differently (matmuls of another batch size).
    np.testing.assert_allclose(outs[0].logprobs, free.logprobs[: first + 1], atol=1e-5, rtol=0)


def test_n_samples_share_one_prefill_and_seeds_reproduce(engine):
    rng = np.random.default_rng()
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (5, 11)]
    sp = rollout.SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, n=4, seed=3)
    with prefilled_lengths(engine) as calls:
        first = run(engine, prompts, [sp, sp])
    assert sorted(calls) == [5, 11]  # one prefill per prompt for its 4 samples
    assert len(first) == 8
    # The 4 samples of a prompt differ from one another (distinct seeds per sample).
    assert len({tuple(o.tokens) for o in first[:4]}) > 1
    # Same seed -> same completions and log-probs, whatever else is in the batch.
    noise = [list(rng.integers(0, CFG.vocab_size, 7)) for _ in range(5)]
    noise_sp = rollout.SamplingParams(max_new_tokens=9, temperature=0.8, seed=99)
    again = run(engine, noise + prompts, [noise_sp] * 5 + [sp, sp])[-8:]
    assert [o.tokens for o in again] == [o.tokens for o in first]
    np.testing.assert_allclose(
        np.concatenate([o.logprobs for o in again]),
        np.concatenate([o.logprobs for o in first]),
        atol=1e-6,
    )
    other = run(engine, prompts, [rollout.SamplingParams(**{**sp.__dict__, "seed": 4})] * 2)
    assert [o.tokens for o in other] != [o.tokens for o in first]


def test_repeated_prompts_share_one_prefill_and_each_gets_its_own_result(engine):
    """A prompt repeated as separate requests (as TRL's GRPO batches are) is prefilled once;
    every request, with its own seed, budget and n, returns what it returns alone."""
    rng = np.random.default_rng()
    a, b = (list(rng.integers(0, CFG.vocab_size, n)) for n in (11, 6))
    sp = lambda seed, **kw: rollout.SamplingParams(  # noqa: E731
        **{"max_new_tokens": 10, "temperature": 1.0, "seed": seed, **kw}
    )
    prompts = [a, b, a, a, b, list(a)]
    sps = [sp(1), sp(1), sp(2), sp(0, temperature=0.0), sp(5, n=2), sp(3, max_new_tokens=4)]
    with prefilled_lengths(engine) as calls:
        together = run(engine, prompts, sps)
    assert sorted(calls) == [6, 11]  # one prefill per distinct prompt
    alone = [o for p, s in zip(prompts, sps) for o in run(engine, [p], [s])]
    assert [o.tokens for o in together] == [o.tokens for o in alone]
    assert [len(o.tokens) for o in together] == [10, 10, 10, 10, 10, 10, 4]
    assert len({tuple(o.tokens) for o in together[:4]}) > 1  # seeds differ: a real test
    for t, s in zip(together, alone):
        np.testing.assert_allclose(t.logprobs, s.logprobs, atol=1e-6)
    # The same prompt with the same sampling parameters gets the same completion: warned.
    with pytest.warns(UserWarning, match="requests 0 and 2 have the same prompt and sampling"):
        twins = run(engine, [a, b, a], [sp(4), sp(4), sp(4)])
    assert twins[0].tokens == twins[2].tokens


def test_fifo_repeats_far_apart_hold_a_bounded_number_of_prefixes(params):
    """Under fifo admission, prompts repeated far apart ([p0 .. p9, p0 .. p9]) keep at most
    max_held_prefixes prefixes alive (each holds its prompt's KV on the device, outside the page
    pool); a dropped prompt is prefilled again, and every request returns what it returns
    alone."""
    eng = rollout.Engine(
        CFG, params, slots=2, max_len=32, max_prefill_length=16, page_size=8, steps_per_call=2
    )
    rng = np.random.default_rng(5)
    distinct = [list(rng.integers(0, CFG.vocab_size, 4 + k % 5)) for k in range(10)]
    prompts = distinct + distinct
    sps = [rollout.SamplingParams(max_new_tokens=3, temperature=1.0, seed=s) for s in range(20)]
    made, alive_at_insert = [], []
    insert = eng.insert

    def recording_insert(prefix, *args, **kwargs):
        alive_at_insert.append(sum(r() is not None for r in made))
        return insert(prefix, *args, **kwargs)

    eng.insert = recording_insert
    try:
        with prefilled_lengths(eng, made) as calls:
            outs = run(eng, prompts, sps, admission="fifo", max_held_prefixes=2)
    finally:
        del eng.insert
    # At most 2 held, the one being inserted among them; holding every prompt until its repeat
    # would keep all 10 alive when the second pass starts.
    assert max(alive_at_insert) <= 2
    assert len(calls) > len(distinct)  # dropped prompts were prefilled again
    alone = [o for p, s in zip(prompts, sps) for o in run(eng, [p], [s])]
    assert [o.tokens for o in outs] == [o.tokens for o in alone]
    for a, b in zip(outs, alone):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    # The default admission gathers the repeats: one prefill per distinct prompt.
    with prefilled_lengths(eng) as calls:
        again = run(eng, prompts, sps)
    assert len(calls) == len(distinct)
    assert [o.tokens for o in again] == [o.tokens for o in alone]
    with pytest.raises(ValueError, match="max_held_prefixes=1 is below the engine's 2 slots"):
        rollout.Driver(eng, max_held_prefixes=1)


def test_longest_first_admission_orders_by_budget_and_returns_request_order(params):
    # One slot, so admission order is completion order. Budgets 2, 6, 4, 6: longest first
    # admits 1 and 3 (equal budgets keep their order), then 2, then 0; fifo keeps 0, 1, 2, 3.
    one = rollout.Engine(
        CFG, params, slots=1, max_len=32, max_prefill_length=16, page_size=8, steps_per_call=2
    )
    rng = np.random.default_rng(1)
    reqs = [
        rollout.Request(
            list(rng.integers(0, CFG.vocab_size, 5)),
            rollout.SamplingParams(max_new_tokens=n, temperature=0.0),
        )
        for n in (2, 6, 4, 6)
    ]
    by_policy = {}
    for admission in ("longest_first", "fifo"):
        outs = [o for (o,) in rollout.Driver(one, admission=admission).run(reqs)]
        assert [len(o.tokens) for o in outs] == [2, 6, 4, 6]  # results in request order
        by_policy[admission] = outs
    finish_order = lambda outs: sorted(range(len(outs)), key=lambda i: outs[i].finished)
    assert finish_order(by_policy["longest_first"]) == [1, 3, 2, 0]
    assert finish_order(by_policy["fifo"]) == [0, 1, 2, 3]
    for a, b in zip(by_policy["longest_first"], by_policy["fifo"]):
        assert a.tokens == b.tokens
    with pytest.raises(ValueError, match="admission must be one of"):
        rollout.Driver(one, admission="shortest_first")


def test_prefill_padding_rows_take_prompts_queued_further_on(params):
    """A prefill batch is padded to a power of two rows; when 3 slots free up, the driver fills
    the fourth row with the next queued prompt instead of padding, and holds its prefix until
    it is admitted: each prompt is prefilled once, every call but the last has a power-of-two
    count, and each request gets what it gets alone."""
    eng = rollout.Engine(
        CFG, params, slots=4, max_len=32, max_prefill_length=16, page_size=8, steps_per_call=2
    )
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, CFG.vocab_size, 5)) for _ in range(13)]
    # Three short budgets and a long one per round of 4: the short ones free 3 slots at once.
    sps = [
        rollout.SamplingParams(max_new_tokens=n, temperature=0.0) for n in [2, 2, 2, 8] * 3 + [2]
    ]
    calls, original = [], eng.prefill_many

    def recording(**kwargs):
        calls.append(len(kwargs["prompts"]))
        return original(**kwargs)

    eng.prefill_many = recording
    try:
        outs = run(eng, prompts, sps, admission="fifo")
    finally:
        del eng.prefill_many
    assert sum(calls) == len(prompts)  # none prefilled twice, no held prefix dropped
    assert all(n & (n - 1) == 0 for n in calls[:-1]), calls
    assert calls[:2] == [4, 4]  # the second call: 3 freed slots + 1 topped up
    for i in (0, 3, 7, 12):
        alone = run(eng, [prompts[i]], [sps[i]])[0]
        assert alone.tokens == outs[i].tokens
        np.testing.assert_allclose(alone.logprobs, outs[i].logprobs, atol=1e-6)


def test_seeds_default_fresh_reported_and_independent_across_prompts(engine, params):
    """seed=None (the default) draws a fresh seed per request and reports it, so two rollouts
    differ and a completion replays from its seed; requests sharing an explicit seed but not
    a prompt draw independent streams (before, the key ignored the prompt: prompts coincided
    on half their first tokens)."""
    rng = np.random.default_rng()
    prompts = [list(rng.integers(0, CFG.vocab_size, 6)) for _ in range(24)]
    sp = rollout.SamplingParams(max_new_tokens=6, temperature=1.0)
    first, second = run(engine, prompts, [sp] * 24), run(engine, prompts, [sp] * 24)
    assert all(o.seed is not None for o in first)
    assert sum(a.tokens != b.tokens for a, b in zip(first, second)) > 20
    replay = run(engine, prompts[:3], [dataclasses.replace(sp, seed=o.seed) for o in first[:3]])
    assert [o.tokens for o in replay] == [o.tokens for o in first[:3]]

    # One explicit seed for 24 different prompts: first tokens coincide between prompts about
    # as often as independent draws from each prompt's own distribution would.
    shared = run(engine, prompts, [dataclasses.replace(sp, seed=7, max_new_tokens=1)] * 24)
    logits = models.forward(CFG, params, np.asarray(prompts, np.int32))[:, -1]
    probs = np.asarray(jax.nn.softmax(logits.astype(np.float32), -1), np.float64)
    pairs = [(a, b) for a in range(24) for b in range(a + 1, 24)]
    same = np.mean([shared[a].tokens[0] == shared[b].tokens[0] for a, b in pairs])
    expected = np.mean([probs[a] @ probs[b] for a, b in pairs])
    assert same < expected + 0.1, (same, expected)


def test_processed_logprobs_are_the_sampled_distributions_beside_raw_and_greedy(engine, params):
    """logprobs="processed": each token's log-prob under the tempered, top-k / top-p filtered
    distribution it was drawn from (transformers' warpers on the full-forward logits, float64),
    in one batch with a raw-log-prob request and a greedy one, which keep theirs."""
    from test_sampling import _hf_filtered_log_probs

    rng = np.random.default_rng()
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (5, 9, 7)]
    case = dict(temperature=0.7, top_k=10, top_p=0.9, min_p=0.0)
    processed = rollout.SamplingParams(max_new_tokens=8, seed=1, logprobs="processed", **case)
    raw = dataclasses.replace(processed, logprobs="raw")
    greedy = rollout.SamplingParams(max_new_tokens=8, temperature=0.0, logprobs="processed")
    outs = run(engine, prompts, [processed, raw, greedy])
    for out, sp in zip(outs, (processed, raw, greedy)):
        seq = np.asarray([out.prompt + out.tokens], np.int32)
        logits = np.asarray(models.forward(CFG, params, seq)[0], np.float64)
        n = len(out.prompt)
        for k, (tok, lp) in enumerate(zip(out.tokens, out.logprobs)):
            row = logits[n - 1 + k]
            if sp.logprobs == "processed" and sp.temperature > 0:
                want = _hf_filtered_log_probs(row, **case)[tok]
            else:  # raw, and greedy's (a point mass: its log-probs stay the model's)
                want = (row - row.max() - np.log(np.exp(row - row.max()).sum()))[tok]
            np.testing.assert_allclose(lp, want, atol=2e-5)
