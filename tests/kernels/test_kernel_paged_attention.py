"""Pallas paged decode attention (interpret mode) against the XLA reference and a float64 NumPy
oracle that walks the page table itself.

Tolerance: 2e-5 absolute for float32 (the kernel sums pages in a different order, ~1e-6 seen);
bfloat16 pages are compared with the reference at 2e-2 (bf16 resolution of outputs ~1).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.kernels import dispatch, paged_attention

TOL = 2e-5
PAGE, PAGES, MAX_PAGES = 8, 24, 4
# Idle slot, one token, exactly one full page, one past the page boundary, every page full.
LENGTHS = (0, 1, PAGE, PAGE + 1, MAX_PAGES * PAGE)


def _inputs(seed, h, kvh, d=16, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    b = len(LENGTHS)
    q = jax.random.normal(ks[0], (b, h, d), jnp.float32).astype(dtype)
    k_pages = jax.random.normal(ks[1], (kvh, PAGES, PAGE, d), jnp.float32).astype(dtype)
    v_pages = jax.random.normal(ks[2], (kvh, PAGES, PAGE, d), jnp.float32).astype(dtype)
    # Pages of a slot are scattered over the pool, in no particular order.
    page_table = jax.random.permutation(ks[3], PAGES)[: b * MAX_PAGES].reshape(b, MAX_PAGES)
    return q, k_pages, v_pages, jnp.asarray(LENGTHS, jnp.int32), page_table.astype(jnp.int32)


def _numpy_paged(q, k_pages, v_pages, lengths, page_table, window, softcap, scale):
    q, k_pages, v_pages = (np.asarray(a, np.float64) for a in (q, k_pages, v_pages))
    b, h, d = q.shape
    groups = h // k_pages.shape[0]
    out = np.zeros_like(q)
    for bi, n in enumerate(np.asarray(lengths)):
        pos = np.arange(n)
        pages, offsets = np.asarray(page_table)[bi, pos // PAGE], pos % PAGE
        keep = (n - 1 - pos < window) if window else np.ones(n, bool)
        for hi in range(h):
            k = k_pages[hi // groups, pages, offsets][keep]
            v = v_pages[hi // groups, pages, offsets][keep]
            if len(k) == 0:
                continue
            s = k @ q[bi, hi] * scale
            if softcap is not None:
                s = np.tanh(s / softcap) * softcap
            p = np.exp(s - s.max())
            out[bi, hi] = p @ v / p.sum()
    return out


@pytest.mark.parametrize(
    "h,kvh,window,softcap,pages_per_block,tpu",
    [
        (2, 2, None, None, 1, False),
        (4, 2, 5, 4.0, 3, False),  # 3 pages per step over M = 4: a ragged last block
        (4, 1, "traced", None, 2, False),
        (4, 2, 11, 4.0, 2, True),
    ],
    ids=["mha", "gqa2_window_softcap", "mqa4_traced_window", "tpu_interpret_gqa2"],
)
def test_paged_matches_reference(h, kvh, window, softcap, pages_per_block, tpu):
    q, k_pages, v_pages, lengths, table = _inputs(h * 10 + kvh, h, kvh)
    window_value = 9 if window == "traced" else window
    kw = dict(softcap=softcap, scale=0.3)
    kernel = functools.partial(paged_attention.pallas, pages_per_block=pages_per_block, **kw)
    if window == "traced":  # per-layer windows arrive as traced scalars under the layer scan
        run = jax.jit(lambda *a: kernel(*a[:-1], sliding_window=a[-1]))
        args = (q, k_pages, v_pages, lengths, table, jnp.int32(9))
    else:
        run = jax.jit(lambda *a: kernel(*a, sliding_window=window))
        args = (q, k_pages, v_pages, lengths, table)
    if tpu:
        with dispatch.tpu_interpret_mode():
            got = run(*args)
    else:
        got = run(*args)
    kw["sliding_window"] = window_value
    ref = paged_attention.reference(q, k_pages, v_pages, lengths, table, **kw)
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=TOL)
    oracle = _numpy_paged(q, k_pages, v_pages, lengths, table, window_value, softcap, 0.3)
    np.testing.assert_allclose(got, oracle, atol=TOL, rtol=TOL)
    assert not np.any(np.asarray(got[0])), "an idle slot (length 0) must return zeros"


def test_paged_bfloat16_pages():
    q, k_pages, v_pages, lengths, table = _inputs(7, 4, 2, dtype=jnp.bfloat16)
    got = paged_attention.paged_attention(q, k_pages, v_pages, lengths, table, impl="pallas")
    ref = paged_attention.paged_attention(q, k_pages, v_pages, lengths, table, impl="xla")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), ref.astype(jnp.float32), atol=2e-2)


def test_paged_dispatch():
    args = _inputs(8, 2, 1)
    jaxpr = str(jax.make_jaxpr(lambda *a: paged_attention.paged_attention(*a, impl="auto"))(*args))
    assert "pallas_call" not in jaxpr  # CPU: the reference
    with pytest.raises(ValueError, match="impl='triton'"):
        paged_attention.paged_attention(*args, impl="triton")
    with pytest.raises(ValueError, match="page_table"):
        paged_attention.pallas(*args[:4], args[4][:2])


@pytest.mark.parametrize("window", [None, 6])
def test_slot_regions_are_read_in_place_and_match_the_oracle(window):
    """A pool of B regions of M pages, slot b's row its region in order (the engine's default
    pool): the reference reads it as a [KVH, B, M*S, D] view (no gather in the jaxpr) and gives
    the float64 oracle's answer; the kernel, following the same table, agrees."""
    q, k_pages, v_pages, lengths, _ = _inputs(11, 4, 2)
    b = len(LENGTHS)
    k_pages, v_pages = k_pages[:, : b * MAX_PAGES], v_pages[:, : b * MAX_PAGES]
    table = jnp.arange(b * MAX_PAGES, dtype=jnp.int32).reshape(b, MAX_PAGES)
    kw = dict(sliding_window=window, softcap=4.0, scale=0.3)
    in_place = functools.partial(paged_attention.reference, slot_regions=True, **kw)
    assert "gather" not in str(jax.make_jaxpr(in_place)(q, k_pages, v_pages, lengths, table))
    got = jax.jit(in_place)(q, k_pages, v_pages, lengths, table)
    oracle = _numpy_paged(q, k_pages, v_pages, lengths, table, window, 4.0, 0.3)
    np.testing.assert_allclose(got, oracle, atol=TOL, rtol=TOL)
    kernel = paged_attention.paged_attention(
        q, k_pages, v_pages, lengths, table, impl="pallas", slot_regions=True, **kw
    )
    np.testing.assert_allclose(kernel, oracle, atol=TOL, rtol=TOL)
    with pytest.raises(ValueError, match="slot_regions: a pool of 20 pages is not 5 slots x 3"):
        paged_attention.reference(q, k_pages, v_pages, lengths, table[:, :3], slot_regions=True)


@pytest.mark.parametrize("sentinel", [-1, PAGES, 10**6])
def test_unused_table_entries_may_hold_any_value(sentinel):
    """Entries past a slot's length (all of an idle slot's) may hold a sentinel: the kernel
    never fetches outside the pool (TPU interpret mode checks every block index) and gives the
    oracle's answer, as does the reference."""
    q, k_pages, v_pages, lengths, table = _inputs(13, 4, 2)
    used = (np.arange(MAX_PAGES)[None] * PAGE) < np.asarray(lengths)[:, None]
    table = jnp.where(used, table, sentinel).astype(jnp.int32)
    oracle = _numpy_paged(q, k_pages, v_pages, lengths, table, None, None, 0.3)
    with dispatch.tpu_interpret_mode():
        got = jax.jit(functools.partial(paged_attention.pallas, scale=0.3))(
            q, k_pages, v_pages, lengths, table
        )
    np.testing.assert_allclose(got, oracle, atol=TOL, rtol=TOL)
    ref = paged_attention.reference(q, k_pages, v_pages, lengths, table, scale=0.3)
    np.testing.assert_allclose(ref, oracle, atol=TOL, rtol=TOL)
