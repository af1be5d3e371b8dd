"""The rollout engine's own copy of the weights, laid out for decoding.

`rollout.Engine` never decodes from the trainer's buffers: `decode_weights` places them on the
mesh, gives every layer its own buffer (the unrolled decode reads weights in place,
`models.kv_cache`) and, on CPU, picks the layout XLA:CPU multiplies fastest at a decode step's
few rows. LoRA factors and NF4 kernels keep their values and layout, so a trainer's weight
sync stays cheap; on a mesh LoRA factors are split by the trainer's rules
(`lora.logical_axes`).

decode_layout: keep every linear kernel transposed, [out, in] (`models.to_decode_layout`), and
multiply by the tied embedding as it is, [V, D], with `matmul.dot_t`. Which layout XLA:CPU
multiplies faster at a decode step's few rows depends on the CPU and the shapes (figures in
`layout_choice`), so by default on CPU the engine measures it, once per machine and shape.
Costs no memory: the copy is converted once per load.

head_copy: without the decode layout, keep a materialized [D, V] transpose of a tied embedding
for the decode logits. Default: on CPU without the decode layout. XLA:CPU multiplies by a
[V, D] matrix's plain transpose 20-25% slower than by a [D, V] one (the LM head is the largest
matmul of a decode step); costs V x D memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpost import lora as lora_lib
from jaxpost import models, nf4
from jaxpost.models.config import ModelConfig
from jaxpost.rollout import layout_choice
from jaxpost.rollout.state import split_params
from jaxpost.sharding import logical_to_sharding, tree_shardings


def default_layouts(
    cfg: ModelConfig, slots: int, on_cpu: bool, decode_layout: bool | None, head_copy: bool | None
) -> tuple[bool, bool]:
    """(decode_layout, head_copy) with each None replaced by its default (module docstring),
    for an engine decoding on CPUs (`on_cpu`, `matmul.on_cpu` of its devices) or not: on CPU
    the measured decode layout, within one process (`jax.process_count() == 1`; every
    process of a multi-process run must compile the same program, and a measurement may differ
    between processes, so there the static rule, `layout_choice.static`, decides)."""
    if decode_layout is None:
        if on_cpu and jax.process_count() == 1:
            decode_layout = layout_choice.measured(cfg, slots)
        else:
            decode_layout = on_cpu and layout_choice.static(slots, cfg.dtype)
    if head_copy is None:
        head_copy = on_cpu and not decode_layout
    return bool(decode_layout), bool(head_copy and cfg.tie_embeddings)


def decode_weights(
    cfg: ModelConfig,
    params,
    lora=None,
    *,
    mesh: jax.sharding.Mesh | None,
    rules,
    decode_layout: bool,
    head_copy: bool,
) -> dict:
    """Params ({"base", "lora"} or plain, plus optional `lora`) as the engine decodes from them:
    {"base": ..., "lora": tree or None, "lora_scale": float, "head": [D, V] or None}."""
    base, tree, scale = split_params(cfg, params, lora)
    if mesh is not None:
        # An NF4 base (QLoRA) has quantized trees where the float kernels' axes are named.
        axes = nf4.quantized_logical_axes(models.logical_axes(cfg), base)
        base = jax.device_put(base, tree_shardings(base, axes, mesh, rules))
        if tree is not None:  # split as the trainer splits them (`lora.logical_axes`)
            axes = lora_lib.factor_logical_axes(cfg, tree)
            tree = jax.device_put(tree, tree_shardings(tree, axes, mesh, rules))
    if not cfg.scan_layers:
        unstack = jax.jit(models.unstack_layers, static_argnums=1)
        base = unstack(base, cfg.num_layers)
        tree = unstack(tree, cfg.num_layers)
    if decode_layout:
        base = models.to_decode_layout(cfg, base)
    head = None
    if head_copy:
        shape = (cfg.hidden_size, cfg.vocab_size)
        out = None if mesh is None else logical_to_sharding(shape, ("embed", "vocab"), mesh, rules)
        head = _transpose(out)(base["embedder"]["embedding"])
    return {"base": base, "lora": tree, "lora_scale": scale, "head": head}


@functools.cache
def _transpose(out_sharding):
    # One jitted transpose per output sharding, so a weight sync (`Engine.update_params`) reuses
    # its compilation; a jit of a fresh lambda per call compiled again on every sync.
    return jax.jit(jnp.transpose, out_shardings=out_sharding)
