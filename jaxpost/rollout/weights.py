"""The weights as the rollout engine decodes from them.

`decode_weights` places them on the mesh (LoRA factors whole on every device), gives every
layer its own buffer (the unrolled decode reads weights in place, `models.kv_cache`) and, on
CPU, picks the layout XLA:CPU multiplies fastest at a decode step's few rows. LoRA factors and
NF4 kernels keep their values and layout, so a trainer's weight sync stays cheap.
No second copy of the base is made where none is needed: an array already where and as the
engine wants it (a stacked base without the decode layout, on the trainer's mesh) is the
trainer's own. A LoRA train step keeps the frozen base as it is (`steps._Jitted`),
so an engine may go on decoding with the adapter it was last given; a full fine-tuning step
donates the base, after which the engine must be given the new state's params
(`Engine.update_params`) before it decodes again, and says so. LoRA factors are always copied.

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

from jaxpost import models, nf4
from jaxpost.models.config import ModelConfig
from jaxpost.rollout import layout_choice
from jaxpost.rollout.state import split_params
from jaxpost.sharding import logical_to_sharding, replicated, tree_shardings


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
    {"base": ..., "lora": tree or None, "lora_scale": float, "head": [D, V] or None,
    "arrays": the base and head arrays, for `call`}."""
    base, tree, scale = split_params(cfg, params, lora)
    # Without a mesh, the engine's one device: weights laid out over a trainer's mesh would
    # otherwise make every decode program compile again for their layout, and run over it.
    device = jax.local_devices()[0]
    if mesh is None:
        base = jax.device_put(base, device)
    else:
        # An NF4 base (QLoRA) has quantized trees where the float kernels' axes are named.
        base_axes = nf4.quantized_logical_axes(models.logical_axes(cfg), base)
        base = jax.device_put(base, tree_shardings(base, base_axes, mesh, rules))
    if tree is not None:
        # The engine's own copy (a LoRA train step donates its factors; a few MB to copy), whole
        # on every device of a mesh: an adapter is a fraction of a percent of the weights, and
        # split it costs collectives at every decode step (on a (1, 2, 2) mesh of CPU devices
        # decoding took 1.8x as long split as the base kernels, 2.1x split as the trainer
        # splits it: `benchmarks/lora_decode_placement.py`).
        where = device if mesh is None else replicated(mesh)
        tree = jax.device_put(tree, where, may_alias=False)
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
    # Every base array, for `call`'s check: one the caller's own may also be a new jax.Array
    # object on the caller's buffer (`jax.device_put` onto the device it is on), so all are read.
    arrays = tuple(x for x in jax.tree.leaves((base, head)) if isinstance(x, jax.Array))
    return {"base": base, "lora": tree, "lora_scale": scale, "head": head, "arrays": arrays}


def call(weights: dict, fn, *args):
    """fn(*args) for a step that reads `weights` (`decode_weights`' output), after checking that
    none of its arrays was deleted (those it shares with the trainer, module docstring): a step
    on a deleted array fails inside XLA, and the process may not survive it. 5 us per 100
    arrays."""
    if any(x.is_deleted() for x in weights["arrays"]):
        raise RuntimeError(
            "the engine's weights were deleted: a train step donated them (the engine decodes "
            "from the trainer's own arrays where it needs no copy, `rollout.weights`); call "
            "engine.update_params(state.params) after each train step, before decoding"
        )
    return fn(*args)


@functools.cache
def _transpose(out_sharding):
    # One jitted transpose per output sharding, so a weight sync (`Engine.update_params`) reuses
    # its compilation; a jit of a fresh lambda per call compiled again on every sync.
    return jax.jit(jnp.transpose, out_shardings=out_sharding)
