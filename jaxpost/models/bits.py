"""Indexing of 16-bit float arrays done on their bits, so XLA:CPU keeps it a plain copy.

XLA:CPU (jax 0.10) computes a bfloat16 scatter in float32: the whole target is converted to
float32, updated and converted back on every call (the rollout engine's KV page pool: every
layer, every decode step). It also moves a float32 conversion that follows a bfloat16 gather in
front of the gather, so reading two token embeddings converted the whole [V, D] table (64 MB per
decode call at the 50M shapes). Reinterpreting 16-bit values as uint16 around the indexing op
leaves XLA nothing to convert; other dtypes pass through unchanged, and on other backends the
bitcasts are free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


def _is_16bit_float(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2


def get(x: jax.Array, index) -> jax.Array:
    """x[index] (any NumPy-style index)."""
    if not _is_16bit_float(x):
        return x[index]
    return jax.lax.bitcast_convert_type(_bits(x)[index], x.dtype)


def take(x: jax.Array, indices: jax.Array, axis: int = 0) -> jax.Array:
    """jnp.take(x, indices, axis)."""
    if not _is_16bit_float(x):
        return jnp.take(x, indices, axis=axis)
    return jax.lax.bitcast_convert_type(jnp.take(_bits(x), indices, axis=axis), x.dtype)


def set(x: jax.Array, index, values: jax.Array, **kwargs) -> jax.Array:  # noqa: A001
    """x.at[index].set(values cast to x's dtype, **kwargs)."""
    values = values.astype(x.dtype)
    if not _is_16bit_float(x):
        return x.at[index].set(values, **kwargs)
    out = _bits(x).at[index].set(_bits(values), **kwargs)
    return jax.lax.bitcast_convert_type(out, x.dtype)
