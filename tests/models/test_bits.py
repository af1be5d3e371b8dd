"""`jaxpost.models.bits`: 16-bit float indexing on the bits equals plain indexing exactly, and
the compiled bfloat16 cache write and embedding read hold no float32 copy of the whole array
(what XLA:CPU made of the plain ops)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.models import bits


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32])
def test_take_set_and_bits_storage_equal_plain_indexing(dtype):
    x = (jax.random.normal(jax.random.key(0), (3, 10, 4, 5)) * 100).astype(dtype)
    pages = jnp.array([[7, 2], [0, 9]], jnp.int32)
    offsets = jnp.array([[1, 3], [0, 2]], jnp.int32)
    index = (slice(None), pages, offsets)
    np.testing.assert_array_equal(bits.take(x, pages, axis=1), jnp.take(x, pages, axis=1))
    values = jax.random.normal(jax.random.key(1), (3, 2, 2, 5), jnp.float32) * 100
    out = bits.set(x, index, values)
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out, x.at[index].set(values.astype(dtype)))
    # Out-of-range rows are dropped, as with .at[].set(mode="drop").
    far = (jnp.array([0, 99]), slice(None))
    rows = jnp.ones((2, 10, 4, 5), dtype)
    np.testing.assert_array_equal(
        bits.set(x, far, rows, mode="drop"), x.at[far].set(rows, mode="drop")
    )
    # Stored as bits: uint16 for a 16-bit float, and back exactly.
    stored = bits.to_bits(values, dtype)
    assert stored.dtype == bits.storage_dtype(dtype)
    assert (stored.dtype == jnp.uint16) == (jnp.dtype(dtype).itemsize == 2)
    np.testing.assert_array_equal(bits.from_bits(stored, dtype), values.astype(dtype))


def _f32_buffers(fn, *args) -> list[str]:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return [line for line in text.splitlines() if "f32[4,64,16,32]" in line]


def test_bfloat16_cache_write_and_embedding_read_stay_16_bit():
    pool = jnp.zeros((4, 64, 16, 32), jnp.bfloat16)  # [KVH, pages, page size, head dim]
    pages, offsets = jnp.arange(8, dtype=jnp.int32), jnp.zeros((8,), jnp.int32)
    values = jnp.ones((4, 8, 32), jnp.float32)

    def write(pool, pages, offsets, values):
        return bits.set(pool, (slice(None), pages, offsets), values)

    assert not _f32_buffers(write, pool, pages, offsets, values)

    table = jnp.zeros((4 * 64 * 16, 32), jnp.bfloat16).reshape(4, 64, 16, 32)

    def read_then_upcast(table, pages):
        return bits.take(table, pages, axis=1).astype(jnp.float32) * 2.0

    assert not _f32_buffers(read_then_upcast, table, pages)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bfloat16_prompt_insert_stays_16_bit(scan_layers):
    """The engine's insert writes a prompt into a bfloat16 page pool without a float32 copy of
    the pool (it goes through bits.set, as the decode-time cache writes do)."""
    from jaxpost import models
    from jaxpost.rollout import device_steps
    from jaxpost.rollout.state import empty_decode_state

    cfg = models.ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=4, head_dim=32, dtype="bfloat16", scan_layers=scan_layers,
    )  # fmt: skip
    state = empty_decode_state(cfg, slots=2, num_pages=64, page_size=16)  # pools [4,64,16,32]
    n, t = 1, 16
    k = jnp.ones((n, cfg.num_layers, t, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
    prefix = (k, k, jnp.zeros((n, cfg.hidden_size)), jnp.int32(t), jnp.int32(0))
    table_row = jnp.arange(1, 5, dtype=jnp.int32)

    def insert(state, prefix, table_row):
        ints = jnp.array([0, 0, 0], jnp.int32)
        floats = jnp.zeros((3,), jnp.float32)
        eos = jnp.full((8,), -1, jnp.int32)
        return device_steps.insert_step(
            16, state, prefix, 0, table_row, jnp.int32(4), ints, floats, eos
        )

    pool = "f32[2,4,64,16,32]" if scan_layers else "f32[4,64,16,32]"  # stacked: [L, ...]
    text = jax.jit(insert).lower(state, prefix, table_row).compile().as_text()
    assert not [line for line in text.splitlines() if pool in line]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_take_has_the_gradient_of_jnp_take(dtype):
    """A uint16 view has no gradient: `take` carries jnp.take's, or a 16-bit embedding table
    (full fine-tuning with param_dtype bfloat16) would get none from its lookups."""
    table = jax.random.normal(jax.random.key(2), (10, 4)).astype(dtype)
    tokens = jnp.array([[1, 3], [3, 7]], jnp.int32)

    def loss(take):
        return lambda t: jnp.sum(take(t, tokens, axis=0).astype(jnp.float32) ** 2)

    want = jax.grad(loss(jnp.take))(table)
    np.testing.assert_array_equal(jax.grad(loss(bits.take))(table), want)
    np.testing.assert_array_equal(jax.jit(jax.grad(loss(bits.take)))(table), want)
    assert np.count_nonzero(np.asarray(want, np.float32)) == 3 * 4  # rows 1, 3 and 7


def test_bfloat16_model_embedding_gets_its_lookup_gradient():
    from jaxpost import models

    cfg = models.ModelConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
        num_kv_heads=2, head_dim=8, param_dtype="bfloat16", dtype="bfloat16",
    )  # fmt: skip
    params = models.init(cfg, jax.random.key(0))
    tokens = jnp.array([[2, 5, 9]], jnp.int32)
    grads = jax.grad(lambda p: jnp.sum(models.forward(cfg, p, tokens)[0, -1] ** 2))(params)
    rows = np.abs(np.asarray(grads["embedder"]["embedding"], np.float32)).sum(axis=1)
    assert np.flatnonzero(rows).tolist() == [2, 5, 9]  # exactly the looked-up rows


@pytest.mark.parametrize("scan_layers", [False, True])
def test_dense_cache_stored_as_bits_decodes_exactly_as_a_bfloat16_cache(scan_layers):
    from jaxpost import models

    cfg = models.ModelConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=8, dtype="bfloat16", scan_layers=scan_layers,
    )  # fmt: skip
    params = models.init(cfg, jax.random.key(1))

    @functools.partial(jax.jit, static_argnums=0)
    def decode(as_bits):
        cache = models.DenseKVCache.create(cfg, 2, 8, as_bits=as_bits)
        tokens = jnp.array([[3, 1, 4], [1, 5, 9]], jnp.int32)
        logits, cache = models.apply(cfg, params, tokens, cache=cache)
        out = [logits]
        for pos in range(3, 6):
            token = jnp.argmax(out[-1][:, -1:], axis=-1).astype(jnp.int32)
            positions = jnp.full((2, 1), pos, jnp.int32)
            logits, cache = models.apply(cfg, params, token, positions=positions, cache=cache)
            out.append(logits)
        return jnp.concatenate(out, axis=1), cache

    (want, plain), (got, stored) = decode(False), decode(True)
    assert stored.bits_dtype == "bfloat16" and plain.bits_dtype is None
    assert jax.tree.leaves(stored)[0].dtype == jnp.uint16
    np.testing.assert_array_equal(got, want)
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(jax.lax.bitcast_convert_type(a, jnp.bfloat16), b)
