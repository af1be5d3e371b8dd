"""Decode attention over a paged KV pool: how the keys reach the dots decides the cost on XLA:CPU.

  python benchmarks/decode_attention_layouts.py [--slots 16] [--pages 12] [--repeats 5]

One decode step's attention for every layer of the 50M rollout model (8 layers, 8 query heads
over 4 KV heads of 64, pages of 16 tokens), with each slot holding `--pages` pages, timed for
several ways of handing the keys and values to the two attention matmuls:

  gather (engine)   `kernels.paged_attention.reference`: index the pool with the page table
  row gather        the same pages as rows of a 2-D [KVH*P, S*D] view of the pool
  static slice      no table: the slots' pages are pages 1.. of the pool, sliced out
  bitcast view      no table, no scratch page: the pool *is* [KVH, B, M*S, D] after a reshape
  view + live slice the bitcast view cut to the first `--pages - 2` pages (a live width)
  dense inputs      the [KVH, B, M*S, D] arrays passed in directly (the floor)

All variants compute the same attention (checked against the engine's reference). This is a
probe for the next layout of the engine's cache, not a benchmark of the engine itself.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.kernels.paged_attention import reference

LAYERS, KVH, GROUP, HEAD_DIM, PAGE = 8, 4, 2, 64, 16


def _attend(qg, k, v, t):
    """qg [KVH, B, G, D]; k, v [KVH, B, T', D] with T' >= t: softmax attention over the first t."""
    scores = jnp.einsum("kbgd,kbsd->kbgs", qg, k[:, :, :t]) / np.sqrt(HEAD_DIM)
    return jnp.einsum("kbgs,kbsd->kbgd", jax.nn.softmax(scores, axis=-1), v[:, :, :t])


def variants(b: int, m: int):
    p = b * m + 1  # the engine's pool: the slots' pages and a scratch page 0
    t = m * PAGE
    lengths = jnp.full((b,), t, jnp.int32)

    def engine(pools, table, q):
        for k, v in pools:
            out = reference(q, k, v, lengths, table, scale=1 / np.sqrt(HEAD_DIM))
            q = out  # chain the layers so nothing is hoisted or skipped
        return q

    def as_groups(fn):
        def run(pools, table, q):
            qg = jnp.moveaxis(q.reshape(b, KVH, GROUP, HEAD_DIM), 1, 0)
            for k, v in pools:
                qg = fn(k, v, table, qg)
            return jnp.moveaxis(qg, 0, 1).reshape(b, KVH * GROUP, HEAD_DIM)

        return run

    def row_gather(k, v, table, qg):
        idx = (jnp.arange(KVH)[:, None] * p + table.reshape(-1)[None, :]).reshape(-1)

        def rows(x):
            return jnp.take(x.reshape(KVH * p, PAGE * HEAD_DIM), idx, axis=0, mode="clip")

        return _attend(
            qg, rows(k).reshape(KVH, b, t, HEAD_DIM), rows(v).reshape(KVH, b, t, HEAD_DIM), t
        )

    def static_slice(k, v, table, qg):
        return _attend(
            qg, k[:, 1:].reshape(KVH, b, t, HEAD_DIM), v[:, 1:].reshape(KVH, b, t, HEAD_DIM), t
        )

    def view(k, v, table, qg):  # pools without a scratch page: [KVH, B*M, S, D]
        return _attend(qg, k.reshape(KVH, b, t, HEAD_DIM), v.reshape(KVH, b, t, HEAD_DIM), t)

    def view_live(k, v, table, qg):
        live = (m - 2) * PAGE
        return _attend(qg, k.reshape(KVH, b, t, HEAD_DIM), v.reshape(KVH, b, t, HEAD_DIM), live)

    def dense(k, v, table, qg):  # k, v already [KVH, B, T, D]
        return _attend(qg, k, v, t)

    return {
        "gather (engine)": ("pool", engine),
        "row gather": ("pool", as_groups(row_gather)),
        "static slice": ("pool", as_groups(static_slice)),
        "bitcast view": ("no_scratch", as_groups(view)),
        "view + live slice": ("no_scratch", as_groups(view_live)),
        "dense inputs": ("dense", as_groups(dense)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--pages", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    b, m = args.slots, args.pages
    rng = np.random.default_rng(0)
    p = b * m + 1
    pool = [
        tuple(rng.standard_normal((KVH, p, PAGE, HEAD_DIM), dtype=np.float32) for _ in range(2))
        for _ in range(LAYERS)
    ]
    table = np.arange(1, p, dtype=np.int32).reshape(b, m)  # slot s: pages 1 + s*m ...
    inputs = {
        "pool": [tuple(map(jnp.asarray, kv)) for kv in pool],
        "no_scratch": [tuple(jnp.asarray(x[:, 1:]) for x in kv) for kv in pool],
        "dense": [
            tuple(jnp.asarray(x[:, 1:].reshape(KVH, b, m * PAGE, HEAD_DIM)) for x in kv)
            for kv in pool
        ],
    }
    q = jnp.asarray(rng.standard_normal((b, KVH * GROUP, HEAD_DIM), dtype=np.float32))
    table = jnp.asarray(table)
    mb = 2 * LAYERS * KVH * b * m * PAGE * HEAD_DIM * 4 / 1e6
    print(f"{LAYERS} layers, {b} slots x {m} pages of {PAGE}: {mb:.1f} MB of keys and values")
    print("| variant | ms per decode step | GB/s of keys and values |\n|---|---|---|")
    expected = None
    for name, (kind, fn) in variants(b, m).items():
        f = jax.jit(fn)
        out = f(inputs[kind], table, q).block_until_ready()
        if name == "gather (engine)":
            expected = out
        elif name != "view + live slice":
            np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(20):
                out = f(inputs[kind], table, q)
            out.block_until_ready()
            best = min(best, (time.perf_counter() - start) / 20)
        print(f"| {name} | {best * 1e3:.2f} | {mb / best / 1e3:.1f} |")


if __name__ == "__main__":
    main()
