"""A 16-bit page pool stored as its bits (uint16, the engine's CPU default; `paged_cache`):
lossless against a pool holding bfloat16, the same greedy tokens as a dense bfloat16 cache,
and a compiled decode loop that copies neither a pool nor the embedding table."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_engine  # a sibling test module (pytest puts this directory on the path)

from jaxpost import models, rollout
from jaxpost.models.kv_cache import DenseKVCache
from jaxpost.rollout.paged_cache import PagedKVCache
from jaxpost.sharding import make_mesh

# test_engine's model in bfloat16, its layers unrolled (one pool per layer, as the benchmarks).
CFG = dataclasses.replace(
    test_engine.CFG, dtype="bfloat16", param_dtype="bfloat16", scan_layers=False
)


@pytest.fixture(scope="module")
def params():
    return jax.jit(models.init, static_argnums=0)(CFG, jax.random.key(5))


@pytest.mark.parametrize("slot_regions", [False, True])
def test_pool_as_bits_writes_and_attends_exactly_as_a_bfloat16_pool(slot_regions):
    slots, pages, size = 2, 6, 4
    table = jnp.arange(slots * 3, dtype=jnp.int32).reshape(slots, 3)  # slot b: region b
    caches = {
        as_bits: PagedKVCache.create(
            CFG, pages, size, slots, per_layer=True, slot_regions=slot_regions, as_bits=as_bits
        )
        for as_bits in (False, True)
    }
    assert caches[True].k_pages[0].dtype == jnp.uint16 and caches[True].bits_dtype == "bfloat16"
    assert caches[False].k_pages[0].dtype == jnp.bfloat16 and caches[False].bits_dtype is None
    keys = iter(jax.random.split(jax.random.key(0), 64))

    def normal(*shape):
        return jax.random.normal(next(keys), shape, jnp.float32).astype(jnp.bfloat16)

    layers = {b: {"k_pages": c.k_pages[0], "v_pages": c.v_pages[0]} for b, c in caches.items()}
    for step in range(7):  # decode steps at positions 0..6 of both slots
        q = normal(slots, 1, CFG.num_heads, CFG.head_dim)
        k, v = (normal(slots, 1, CFG.num_kv_heads, CFG.head_dim) for _ in range(2))
        positions = jnp.full((slots, 1), step, jnp.int32)
        outs = {}
        for as_bits, cache in caches.items():
            cache = dataclasses.replace(
                cache, page_table=table, lengths=jnp.full((slots,), step + 1, jnp.int32)
            )
            outs[as_bits], layers[as_bits] = cache.update_and_attend(
                layers[as_bits], None, q, k, v, positions,
                sliding_window=None, softcap=None, scale=0.3,
            )  # fmt: skip
        np.testing.assert_array_equal(outs[True], outs[False])
    for name in ("k_pages", "v_pages"):
        stored = jax.lax.bitcast_convert_type(layers[True][name], jnp.bfloat16)
        np.testing.assert_array_equal(stored, layers[False][name])


def _dense_greedy(cfg, params, prompt, n):
    """Greedy decode over a dense bfloat16 cache (the benchmark's while_loop sampler's math)."""
    cache = DenseKVCache.create(cfg, 1, len(prompt) + n)
    apply = jax.jit(lambda p, t, pos, c: models.apply(cfg, p, t, positions=pos, cache=c))
    tokens = jnp.asarray([prompt], jnp.int32)
    logits, cache = apply(params, tokens, jnp.arange(len(prompt))[None], cache)
    out, logps = [], []
    for i in range(n):
        last = logits[0, -1]
        tok = int(jnp.argmax(last))
        out.append(tok)
        logps.append(float(jax.nn.log_softmax(last)[tok]))
        pos = jnp.asarray([[len(prompt) + i]], jnp.int32)
        logits, cache = apply(params, jnp.asarray([[tok]], jnp.int32), pos, cache)
    return out, logps


@pytest.mark.parametrize("num_pages", [None, 40], ids=["slot-regions", "free-list"])
def test_bfloat16_engine_matches_a_dense_bfloat16_decode(params, num_pages):
    engine = rollout.Engine(
        CFG, params, slots=2, max_len=48, max_prefill_length=16, page_size=4, steps_per_call=4,
        num_pages=num_pages,
    )  # fmt: skip
    assert engine.init_decode_state().cache.k_pages[0].dtype == jnp.uint16  # CPU: bits
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (5, 11, 3)]
    outs = rollout.generate(
        CFG, params, prompts, rollout.SamplingParams(max_new_tokens=12, temperature=0.0),
        engine=engine,
    )  # fmt: skip
    for prompt, out in zip(prompts, outs):
        tokens, logps = _dense_greedy(CFG, engine.params["base"], prompt, 12)
        assert out.tokens == tokens
        # bfloat16 keys and values in both; the attention's sums differ in order only.
        np.testing.assert_allclose(out.logprobs, logps, atol=2e-2, rtol=0)


def test_tensor_parallel_bfloat16_pools_hold_bits_split_over_kv_heads(params):
    mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])

    def engine(mesh):
        return rollout.Engine(CFG, params, slots=2, max_len=48, max_prefill_length=16,
                              page_size=4, steps_per_call=4, mesh=mesh)  # fmt: skip

    sharded = engine(mesh)
    pool = sharded.init_decode_state().cache.k_pages[0]  # per layer: [KVH, P, S, D]
    assert pool.dtype == jnp.uint16 and pool.sharding.spec[0] == "tensor"
    assert len({s.device for s in pool.addressable_shards}) == 2
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (7, 2, 12)]
    sp = rollout.SamplingParams(max_new_tokens=8, temperature=0.0)
    split = rollout.generate(CFG, params, prompts, sp, engine=sharded)
    alone = rollout.generate(CFG, params, prompts, sp, engine=engine(None))
    assert [o.tokens for o in split] == [o.tokens for o in alone]


def _materialised(hlo: str, shape: tuple) -> list[str]:
    """Ops of `shape` that write a buffer of their own in a compiled module: those outside any
    fusion's computation, other than parameters and tuple plumbing, by the root of the fusion
    when they are one (a scatter updates its target in place)."""
    comps, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if head:
            current = comps.setdefault(head.group(1), [])
        elif line.strip() == "}":
            current = None
        elif current is not None:
            current.append(line)
    fused = {c for body in comps.values() for line in body if " fusion(" in line
             for c in re.findall(r"calls=%([\w.\-]+)", line)}  # fmt: skip
    dims = ",".join(map(str, shape))
    found = []
    for name, body in comps.items():
        if name in fused:
            continue
        for line in body:
            m = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* ([\w\-]+)\(", line)
            if not m or m.group(1) != dims:
                continue
            op = m.group(2)
            if op == "fusion":
                callee = re.search(r"calls=%([\w.\-]+)", line).group(1)
                root = next(x for x in comps[callee] if "ROOT" in x)
                op = re.search(r"= \S+ ([\w\-]+)\(", root).group(1)
            if op not in ("parameter", "get-tuple-element", "tuple", "scatter"):
                found.append(f"{name}: {op}: {line.strip()[:120]}")
    return found


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_bfloat16_decode_loop_copies_no_pool_and_no_embedding_table(tie):
    """XLA:CPU copied each pool to uint16 and back around every write, and hoisted the
    embedding's uint16 view out of the loop as a full copy per call (`models.bits`)."""
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    params = jax.jit(models.init, static_argnums=0)(cfg, jax.random.key(1))
    engine = rollout.Engine(cfg, params, slots=2, max_len=48, max_prefill_length=16,
                            page_size=4, steps_per_call=4)  # fmt: skip
    rollout.generate(
        cfg, params, [[1, 2, 3], [4, 5, 6, 7]],
        rollout.SamplingParams(max_new_tokens=6, temperature=0.0), engine=engine,
    )  # fmt: skip
    state, p = engine.init_decode_state(), engine.params
    pool = state.cache.k_pages[0].shape
    table = (cfg.vocab_size, cfg.hidden_size)
    compiled = [f for k, f in engine._jit_cache.items() if k.startswith("generate")]
    assert compiled
    for generate in compiled:  # one per table width and sampling variant the run needed
        args = (p["base"], p["lora"], p.get("head"), state, engine.book.table, engine.book.active)
        hlo = generate.lower(*args).compile().as_text()
        assert _materialised(hlo, pool) == []
        assert _materialised(hlo, table) == []


@pytest.mark.parametrize("decode_layout", [False, True])
def test_bfloat16_lora_decodes_in_either_layout(params, decode_layout):
    """A bfloat16 model with a LoRA adapter, in the transposed decode layout too (whose LoRA
    products once reached XLA:CPU's unimplemented bfloat16 x bfloat16 -> float32 dot): greedy
    tokens are the dense forward's argmax, log-probs the trainer's."""
    from jaxpost import lora
    from jaxpost.losses import token_logprobs

    targets = ("layers/attn/(q|v)/kernel", "layers/mlp/down/kernel")
    adapter = lora.init(CFG, params, rank=4, alpha=8.0, targets=targets)
    adapter = test_engine.randomized(adapter, jax.random.key(7), 0.3)
    engine = rollout.Engine(
        CFG, params, lora=adapter, slots=2, max_len=48, max_prefill_length=16, page_size=4,
        steps_per_call=4, decode_layout=decode_layout,
    )  # fmt: skip
    prompts = [[1, 2, 3, 4, 5], [7, 9, 11]]
    sp = rollout.SamplingParams(max_new_tokens=8, temperature=0.0)
    outs = rollout.generate(CFG, engine.params, prompts, sp, engine=engine)
    both = {"base": params, "lora": adapter}
    for prompt, out in zip(prompts, outs):
        seq = jnp.asarray([prompt + out.tokens], jnp.int32)
        logits = models.forward(CFG, params, seq, lora=adapter)[0]
        greedy = np.asarray(jnp.argmax(logits[len(prompt) - 1 : -1], -1)).tolist()
        assert out.tokens == greedy
        batch = {"tokens": seq[:, :-1], "targets": seq[:, 1:]}
        trainer = np.asarray(token_logprobs(CFG, both, batch)["logp"][0, len(prompt) - 1 :])
        np.testing.assert_allclose(out.logprobs, trainer, atol=2e-2, rtol=0)
