"""What a checkpoint records about a pytree of arrays, to check a restore against: its
description (leaf path -> shape and dtype), two 32-bit checksums of each leaf's bits computed on
device, and a short fingerprint of the values. All three are the same on any mesh, so a
checkpoint written on one restores checked onto another.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def is_prng_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def describe(tree) -> dict[str, list]:
    """{leaf path: [shape, dtype]} of a pytree of arrays or ShapeDtypeStructs."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = "prng_key" if is_prng_key(leaf) else str(np.dtype(leaf.dtype))
        out[path_str(path)] = [list(leaf.shape), dtype]
    return out


def keys_to_data(tree):
    """Typed PRNG keys -> their uint32 key data (what Orbax stores)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, tree)


def abstract_key_data(x):
    if not is_prng_key(x):
        return x
    data = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))


def _words(x: jax.Array) -> jax.Array:
    """x's bits as uint32 words: 32-bit values as they are, 8- and 16-bit ones widened, 64-bit
    ones as two words (a trailing axis of 2)."""
    if x.dtype == jnp.bool_ or jnp.dtype(x.dtype).itemsize not in (1, 2, 4, 8):
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}
    return jax.lax.bitcast_convert_type(x, unsigned[jnp.dtype(x.dtype).itemsize]).astype(jnp.uint32)


@jax.jit
def _checksums(tree):
    """Per leaf [sum of its words, sum of word * (flat index + 1)], both mod 2^32: any one
    flipped bit changes the first, a moved or swapped value the second. Flat indices come from
    iotas, not a reshape, so a sharded leaf is never gathered; the sums are collectives."""

    def one(x):
        w = _words(x)
        index, stride = jnp.zeros(w.shape, jnp.uint32), 1
        for axis in reversed(range(w.ndim)):
            iota = jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
            index, stride = index + iota * jnp.uint32(stride), stride * w.shape[axis] % 2**32
        return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * (index + 1), dtype=jnp.uint32)])

    return jax.tree.map(one, tree)


def checksums(tree) -> dict[str, list[int]]:
    """{leaf path: [two uint32 checksums]} of a pytree of arrays (typed keys as their data)."""
    sums = jax.device_get(_checksums(keys_to_data(tree)))
    return {
        path_str(path): [int(v) for v in leaf]
        for path, leaf in jax.tree_util.tree_flatten_with_path(sums)[0]
    }


def fingerprint(tree) -> str:
    """A short digest of a pytree's values (its `checksums`), the same on any mesh."""
    text = json.dumps(checksums(tree), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
