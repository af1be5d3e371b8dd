"""Paged KV cache: the allocator's pages follow live tokens, are reused after completion, and an
exhausted pool queues requests instead of failing (with the same tokens as running alone)."""

import copy

import jax
import numpy as np
import pytest

from jaxpost import models, rollout
from jaxpost.rollout.page_allocator import (
    PageAllocator,
    PagesExhausted,
    SlotBook,
    SlotRegionAllocator,
)
from jaxpost.rollout.paged_cache import SCRATCH_PAGE
from jaxpost.rollout.state import table_width_bucket

CFG = models.ModelConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
)


@pytest.fixture(scope="module")
def params():
    key = jax.random.key(np.random.SeedSequence().entropy % 2**31)
    return jax.jit(models.init, static_argnums=0)(CFG, key)


def test_allocator_grows_releases_and_reuses_pages():
    alloc = PageAllocator(num_pages=9, page_size=4, slots=3, max_pages_per_slot=4)
    assert alloc.num_free == 8  # page 0 is scratch
    assert alloc.grow(0, 5) and alloc.slot_pages[0] == [1, 2]
    assert not alloc.grow(0, 8)  # still two pages
    assert alloc.grow(1, 1) and alloc.slot_pages[1] == [3]
    assert alloc.grow(0, 9) and alloc.slot_pages[0] == [1, 2, 4]
    assert alloc.num_used == 4 and alloc.num_free == 4
    assert alloc.table_row(1) == [3, SCRATCH_PAGE, SCRATCH_PAGE, SCRATCH_PAGE]
    assert alloc.release(0) == 3 and alloc.num_free == 7
    assert alloc.grow(2, 12) and sorted(alloc.slot_pages[2]) == [1, 2, 4]  # reused
    with pytest.raises(PagesExhausted, match="slot 1 needs 5 pages for 17 tokens; a slot holds"):
        alloc.grow(1, 17)
    alloc.grow(1, 16)
    alloc.grow(2, 13)
    assert alloc.num_free == 0
    with pytest.raises(PagesExhausted, match="slot 0 needs 1 more pages, 0 are free"):
        alloc.grow(0, 1)


def test_slot_regions_hand_each_slot_its_own_pages_in_order():
    alloc = SlotRegionAllocator(page_size=4, slots=3, max_pages_per_slot=4)
    assert alloc.num_pages == alloc.capacity == alloc.num_free == 12  # no scratch page
    assert alloc.table_row(1) == [4, 5, 6, 7]  # the whole region, held or not
    assert alloc.grow(1, 5) and alloc.slot_pages[1] == [4, 5]
    assert not alloc.grow(1, 8) and alloc.grow(1, 9) and alloc.slot_pages[1] == [4, 5, 6]
    assert alloc.grow(2, 1) and alloc.slot_pages[2] == [8]
    assert alloc.num_used == 4 and alloc.num_free == 8
    assert alloc.can_grow(0, 16) and not alloc.can_grow(0, 17)
    with pytest.raises(PagesExhausted, match="slot 0 needs 5 pages for 17 tokens; a slot holds"):
        alloc.grow(0, 17)
    with pytest.raises(ValueError, match="slot regions share no pages"):
        alloc.share(0, [4])
    assert alloc.release(1) == 3 and alloc.num_used == 1 and alloc.table_row(1) == [4, 5, 6, 7]


def test_allocator_shares_pages_until_the_last_holder_releases():
    alloc = PageAllocator(num_pages=9, page_size=4, slots=3, max_pages_per_slot=4)
    alloc.grow(0, 10)  # pages 1, 2 full, 3 partial
    alloc.share(1, alloc.slot_pages[0][:2])
    assert alloc.grow(1, 10) and alloc.slot_pages[1] == [1, 2, 4]  # a private partial page
    assert alloc.num_used == 4 and alloc.num_free == 4  # a shared page counts once
    assert alloc.release(0) == 1 and alloc.num_free == 5  # pages 1, 2 stay: slot 1 holds them
    alloc.share(2, [1, 2])  # from the remaining holder
    assert alloc.release(1) == 1 and alloc.num_used == 2
    assert alloc.release(2) == 2 and alloc.num_free == 8
    with pytest.raises(ValueError, match="page 1 is not held by any slot"):
        alloc.share(0, [1])
    alloc.grow(0, 4)
    with pytest.raises(ValueError, match="slot 0 already holds pages"):
        alloc.share(0, [1])


class _Prefix:  # what SlotBook reads of a prefix: its prompt length (and its identity)
    def __init__(self, true_length):
        self.true_length = true_length


def test_slot_book_reserves_growth_takes_pages_as_tokens_arrive_and_shares_prompts():
    book = SlotBook(slots=3, max_len=16, page_size=4, num_pages=8)  # 7 usable pages
    assert not book.slot_regions and book.share_prompt_pages
    a = _Prefix(9)
    assert book.admit(0, a, max_new_tokens=3) == 12  # the limit: 9 + 3 tokens, 3 pages
    assert book.allocator.slot_pages[0] == [1, 2, 3]  # the prompt's pages only
    assert book.admit(1, a, max_new_tokens=20) == 16  # capped at max_len
    # Slot 1 maps a's two full pages and takes its own partial one; it reserves 4 pages.
    assert book.allocator.slot_pages[1] == [1, 2, 4] and book.allocator.num_used == 4
    assert book.unreserved_pages() == 7 - 4 - 1  # slot 1 may still grow by a page
    assert book.can_admit(8) and not book.can_admit(9)
    assert book.can_admit(16, a)  # 4 pages, 2 of them a's shared ones
    with pytest.raises(RuntimeError, match="slot 2 needs 3 pages, 2 unreserved"):
        book.admit(2, _Prefix(1), max_new_tokens=11)
    assert not book.active[2] and book.allocator.slot_pages[2] == []
    # Pages follow the tokens a decode call may write: len bounds grow by the steps, capped.
    assert book.advance(2) == 11 and book.allocator.num_used == 4
    assert book.advance(2) == 13 and book.allocator.slot_pages[1] == [1, 2, 4, 5]
    assert list(book.len_bound) == [12, 13, 0] and list(book.table[1]) == [1, 2, 4, 5]
    book.release(1)
    assert list(book.table[1]) == [SCRATCH_PAGE] * 4 and book.allocator.num_used == 3
    assert book.unreserved_pages() == 4 and book.advance(8) == 12


def test_slot_book_regions_reserve_nothing_beyond_each_slots_region():
    book = SlotBook(slots=2, max_len=10, page_size=4)
    assert book.slot_regions and not book.share_prompt_pages
    assert list(book.table[1]) == [3, 4, 5]  # the region, before any admission
    assert book.admit(1, _Prefix(5), max_new_tokens=100) == 10
    assert book.allocator.slot_pages[1] == [3, 4] and book.unreserved_pages() == 3
    assert book.advance(8) == 10 and book.allocator.slot_pages[1] == [3, 4, 5]


def test_refused_admission_leaves_the_book_as_it_was():
    book = SlotBook(slots=2, max_len=16, page_size=4, num_pages=6)  # 5 usable pages
    a = _Prefix(6)
    book.admit(0, a, max_new_tokens=2)  # 2 pages held, none pending
    book.admit(1, a, max_new_tokens=6)  # shares a's full page, takes 1, may grow by 1 more

    def record():
        alloc = book.allocator
        return copy.deepcopy(
            (alloc.slot_pages, alloc.num_free, book.table.tolist(), book.len_bound.tolist(),
             book.limit.tolist(), book.unreserved_pages())
        )  # fmt: skip

    before = record()
    # Slot 1's own page would come back, but 4 pages are needed and only 3 can be had.
    with pytest.raises(RuntimeError, match="slot 1 needs 4 pages, 3 unreserved"):
        book.admit(1, _Prefix(13), max_new_tokens=3)
    assert book.active[1] and book.prompt_pages.pages(a) == [1]
    assert record() == before
    book.release(0)
    book.release(1)
    assert book.allocator.num_free == 5 and len(book.prompt_pages) == 0
    # A slot admitted again from the prefix only it holds (JetStream's orchestrator reinserts
    # into slots it never releases): the prefix's pages come back first, none are shared.
    single = SlotBook(slots=1, max_len=16, page_size=4, num_pages=5)  # 4 usable pages
    assert single.admit(0, a, max_new_tokens=10) == 16 and single.allocator.num_used == 2
    assert single.admit(0, a, max_new_tokens=10) == 16 and single.allocator.slot_pages[0] == [1, 2]


def test_refused_insert_into_a_live_slot_keeps_its_sequence(params):
    """JetStream's insert replaces a slot's sequence; when the pool cannot take the new one,
    the live sequence must go on as if nothing happened (same sampled tokens, same pages)."""
    rng = np.random.default_rng()
    prompt = rng.integers(0, CFG.vocab_size, 6).astype(np.int32)
    sp = rollout.SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, seed=7)

    def run(refuse: bool):
        engine = rollout.Engine(
            CFG, params, slots=2, max_len=32, max_prefill_length=16, page_size=4, num_pages=6,
            steps_per_call=4,
        )  # fmt: skip
        state = engine.init_decode_state()
        prefix = engine.prefill(params=engine.params, padded_tokens=prompt, true_length=6)
        state = engine.insert(prefix, state, 0, sampling=sp)
        tokens = []
        for call in range(4):
            if refuse and call == 1:
                big = engine.prefill(
                    params=engine.params, padded_tokens=np.ones(16, np.int32), true_length=16
                )
                with pytest.raises(RuntimeError, match="page pool exhausted: slot 0 needs 8"):
                    engine.insert(big, state, 0, sampling=rollout.SamplingParams(max_new_tokens=16))
                assert engine.book.active[0]
            state, result = engine.generate(engine.params, state)
            r = result.to_numpy()
            tokens += list(r["tokens"][0][r["valid"][0]])
        return tokens, engine.allocator.num_used

    assert run(refuse=True) == run(refuse=False)
    assert len(run(refuse=False)[0]) == sp.max_new_tokens


class RecordingEngine(rollout.Engine):
    """Records, at every generate call, the live slots, pages in use and tokens in flight."""

    def generate(self, params, decode_state):
        state, result = super().generate(params, decode_state)
        live = np.flatnonzero(self.book.active)
        self.log.append((len(live), self.allocator.num_used, int(self.book.len_bound[live].sum())))
        return state, result


def test_pages_follow_live_tokens_and_exhaustion_queues(params):
    rng = np.random.default_rng()
    page_size, pool = 4, 16  # 15 usable pages = 60 tokens, while 6 slots x 64 would need 96
    engine = RecordingEngine(
        CFG,
        params,
        slots=6,
        max_len=64,
        max_prefill_length=16,
        page_size=page_size,
        num_pages=pool,
        steps_per_call=2,
    )
    engine.log = []
    # 10 + 12 tokens = 6 pages reserved per request: only 2 fit the 15-page pool at once.
    prompts = [list(rng.integers(0, CFG.vocab_size, 10)) for _ in range(8)]
    sps = [rollout.SamplingParams(max_new_tokens=12, temperature=0.0)] * 8
    outs = rollout.generate(CFG, params, prompts, sps, engine=engine)
    assert all(o.finish_reason == "length" for o in outs)
    assert [len(o.tokens) for o in outs] == [s.max_new_tokens for s in sps]
    live, used, tokens = map(np.array, zip(*engine.log))
    # Memory in use is the pages covering the live tokens (bound: ceil per slot), never the pool.
    assert (used <= tokens / page_size + live).all() and (used >= tokens / page_size).all()
    assert used.max() <= pool - 1
    # Reservations keep 2 requests in flight although 6 slots are free; the rest queued.
    assert live.max() == 2
    # Pages follow the tokens as they grow: fewer pages early in a request than at its end.
    assert used.min() < used.max()
    assert engine.allocator.num_free == pool - 1  # every page returned
    for prompt, sp, out in zip(prompts, sps, outs):
        alone = rollout.generate(CFG, params, [prompt], sp, slots=2, page_size=page_size)[0]
        assert alone.tokens == out.tokens


def test_request_that_can_never_fit_is_an_error(params):
    engine = rollout.Engine(
        CFG, params, slots=2, max_len=64, max_prefill_length=16, page_size=4, num_pages=4
    )
    with pytest.raises(RuntimeError, match="can never fit the page pool of 3 pages x 4 tokens"):
        rollout.generate(
            CFG, params, [[1, 2, 3]], rollout.SamplingParams(max_new_tokens=20), engine=engine
        )


def test_decode_table_width_covers_the_live_pages_in_few_buckets():
    """A decode call attends over table_width_bucket(pages) columns: never fewer than the
    longest live slot's pages, less than 1.5x them, and few distinct widths (compilations)."""
    widths = [table_width_bucket(p, 100) for p in range(1, 101)]
    assert all(p <= w and (p == 1 or w < 1.5 * p) for p, w in enumerate(widths, start=1))
    assert sorted(set(widths)) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 100]
    assert table_width_bucket(13, 12) == 12  # capped at the table


def _recording_engine(params, share, num_pages=None, slots=6):
    """A free-list pool either way (default: every slot at max_len 32, plus the scratch page),
    so the runs with and without sharing compute the same attention, to the bit."""
    engine = RecordingEngine(
        CFG,
        params,
        slots=slots,
        max_len=32,
        max_prefill_length=16,
        page_size=4,
        num_pages=num_pages or slots * 8 + 1,
        steps_per_call=2,
        share_prompt_pages=share,
    )
    engine.log = []
    return engine


@pytest.mark.parametrize("asked_as", ["n_samples", "repeated_requests"])
def test_samples_of_one_prompt_share_its_full_pages(params, asked_as):
    """6 samples of a 10-token prompt (page size 4), asked as one request with n=6 or as 6
    requests of the same prompt with their own seeds, hold its 2 full pages once; the sampled
    tokens and log-probs are those of the same engine without sharing."""
    prompt = list(np.random.default_rng().integers(0, CFG.vocab_size, 10))
    if asked_as == "n_samples":
        prompts = [prompt]
        sps = [rollout.SamplingParams(n=6, max_new_tokens=12, temperature=1.0, seed=7)]
    else:  # separate lists: the driver matches prompts by content
        prompts = [list(prompt) for _ in range(6)]
        sps = [rollout.SamplingParams(max_new_tokens=12, temperature=1.0, seed=s) for s in range(6)]
    runs = {}
    for share in (True, False):
        engine = _recording_engine(params, share)
        runs[share] = (rollout.generate(CFG, params, prompts, sps, engine=engine), engine)
    (shared, eng_s), (plain, eng_p) = runs[True], runs[False]
    assert [o.tokens for o in shared] == [o.tokens for o in plain]
    assert len({tuple(o.tokens) for o in shared}) > 1  # the samples differ: a real test
    np.testing.assert_array_equal(
        np.array([o.logprobs for o in shared]), np.array([o.logprobs for o in plain])
    )
    # First call: 6 slots of 10 + 2 tokens = 3 pages each. Shared: 2 pages once + 6 x 1.
    assert eng_p.log[0][1] == 6 * 3 and eng_s.log[0][1] == 2 + 6 * 1
    assert all(s < p for (_, s, _), (_, p, _) in zip(eng_s.log, eng_p.log))
    assert eng_s.allocator.num_used == 0 and len(eng_s.book.prompt_pages) == 0


def test_shared_pages_outlive_the_slot_that_allocated_them(params):
    """Release the first holder, insert another sample from the remaining one: the pages are
    still the prompt's (same tokens as without sharing) and all return to the pool at the end."""
    prompt = list(np.random.default_rng().integers(0, CFG.vocab_size, 9))
    sp = rollout.SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    tokens = {}
    for share in (True, False):
        engine = _recording_engine(params, share, slots=3)
        p = engine.params
        (prefix,) = engine.prefill_many(params=p, prompts=[prompt])
        state = engine.init_decode_state()
        state = engine.insert(prefix, state, 0, sampling=sp, sample_index=0)
        state = engine.insert(prefix, state, 1, sampling=sp, sample_index=1)
        state, _ = engine.generate(p, state)
        engine.release(0)
        state = engine.insert(prefix, state, 2, sampling=sp, sample_index=2)
        if share:
            assert engine.allocator.slot_pages[2][:2] == engine.allocator.slot_pages[1][:2]
        out = []
        for _ in range(4):
            state, result = engine.generate(p, state)
            out.append(result.to_numpy()["tokens"])
        tokens[share] = np.concatenate(out, axis=1)[1:]  # slots 1 and 2
        for slot in (1, 2):
            engine.release(slot)
        assert engine.allocator.num_used == 0
    np.testing.assert_array_equal(tokens[True], tokens[False])


def test_sharing_admits_more_samples_into_the_same_pool(params):
    """Admission counts shared pages once: a 15-page pool takes 3 samples of a 12-token prompt
    + 8 new tokens (5 pages each) without sharing and 6 with it (5 + 5 x 2 pages)."""
    prompt = list(np.random.default_rng().integers(0, CFG.vocab_size, 12))
    sp = rollout.SamplingParams(n=6, max_new_tokens=8, temperature=0.0)
    live = {}
    for share in (True, False):
        engine = _recording_engine(params, share, num_pages=16)
        outs = rollout.generate(CFG, params, [prompt], sp, engine=engine)
        assert all(len(o.tokens) == 8 for o in outs)
        live[share] = max(n for n, _, _ in engine.log)
    assert live == {True: 6, False: 3}
