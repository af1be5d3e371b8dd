"""Indexing of 16-bit float arrays done on their bits, so XLA:CPU keeps it a plain copy.

XLA:CPU (jax 0.10) computes a bfloat16 scatter in float32: the whole target is converted to
float32, updated and converted back on every call (the rollout engine's KV page pool: every
layer, every decode step). It also moves a float32 conversion that follows a bfloat16 gather in
front of the gather, so reading two token embeddings converted the whole [V, D] table (64 MB per
decode call at the 50M shapes). Reinterpreting 16-bit values as uint16 around the indexing op
leaves XLA nothing to convert; other dtypes pass through unchanged.

Two more XLA:CPU behaviours shape the helpers. A uint16 view of a loop-invariant array (the
embedding table in a decode loop) is hoisted out of the loop and materialised, a full copy per
call: `take` pins the view to the indices, so it stays fused into the gather. And the view of a
scatter's target cannot fuse into the scatter: `set` on a 16-bit array copies it to uint16 and
back. An array written every step (the rollout engine's page pools) is therefore stored as its
uint16 bits (`storage_dtype`, `to_bits`, `from_bits`) and written with a plain scatter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


def _is_16bit_dtype(dtype: jnp.dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2


def _is_16bit_float(x: jax.Array) -> bool:
    return _is_16bit_dtype(x.dtype)


def take(x: jax.Array, indices: jax.Array, axis: int = 0) -> jax.Array:
    """jnp.take(x, indices, axis), with jnp.take's gradient (a bit view alone has none)."""
    if not _is_16bit_float(x):
        return jnp.take(x, indices, axis=axis)
    return _take_bits(x, indices, axis)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _take_bits(x, indices, axis):
    # The barrier ties x to the indices, so XLA cannot hoist the view out of a loop (module doc).
    x, _ = jax.lax.optimization_barrier((x, indices))
    return jax.lax.bitcast_convert_type(jnp.take(_bits(x), indices, axis=axis), x.dtype)


@_take_bits.defjvp
def _take_bits_jvp(axis, primals, tangents):
    x, indices = primals
    return _take_bits(x, indices, axis), jnp.take(tangents[0], indices, axis=axis)


def set(x: jax.Array, index, values: jax.Array, **kwargs) -> jax.Array:  # noqa: A001
    """x.at[index].set(values cast to x's dtype, **kwargs)."""
    values = values.astype(x.dtype)
    if not _is_16bit_float(x):
        return x.at[index].set(values, **kwargs)
    out = _bits(x).at[index].set(_bits(values), **kwargs)
    return jax.lax.bitcast_convert_type(out, x.dtype)


def storage_dtype(dtype) -> jnp.dtype:
    """The dtype an array of `dtype` is stored in as bits: uint16 for a 16-bit float."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if _is_16bit_dtype(dtype) else dtype


def to_bits(values: jax.Array, dtype) -> jax.Array:
    """values cast to `dtype`, then as stored (`storage_dtype`)."""
    values = values.astype(dtype)
    return _bits(values) if _is_16bit_float(values) else values


def from_bits(stored: jax.Array, dtype) -> jax.Array:
    """The `dtype` values of an array stored as `storage_dtype(dtype)`."""
    if _is_16bit_dtype(jnp.dtype(dtype)):
        return jax.lax.bitcast_convert_type(stored, dtype)
    return stored
