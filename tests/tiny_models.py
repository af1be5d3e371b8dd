"""The tiny model most tests build, and LoRA adapters that change it.

Tests import this module by name (`from tiny_models import tiny_config`): pytest puts `tests/`,
the directory of the root conftest, on sys.path. A test whose model must differ in a way that
matters to it (a vocabulary no other dimension shares, so a transposed axis cannot pass; a
Gemma-2-style layer pattern) says so through the overrides."""

from __future__ import annotations

import jax

from jaxpost import models

TINY_SHAPE = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


def tiny_config(**overrides) -> models.ModelConfig:
    """Two layers, width 32, 4 query heads over 2 KV heads (GQA), vocabulary 128 unless
    overridden; every other field `models.ModelConfig`'s default."""
    return models.ModelConfig(**{**TINY_SHAPE, **overrides})


def randomized(adapter, key: jax.Array, std: float):
    """`adapter` (a `lora.init` tree) with every factor redrawn from N(0, std^2), B included
    (init leaves it at zero), so the adapter changes the model's logits."""
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )
