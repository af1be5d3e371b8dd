"""Held-out task accuracy by greedy decoding, for the loops' periodic evaluation.

`greedy_generate` is a small batched decoder over `models.apply` and `models.DenseKVCache`
(prefill the right-padded prompts, then one token per step in a `lax.scan`), compiled once per
(batch, prompt length, new tokens) shape. Right padding is safe: a row's decode step at position p
writes slot p before attending, and slots past p are masked, so pad keys are never read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import models
from jaxpost.models import matmul
from jaxpost.models.config import ModelConfig


def _generate(cfg: ModelConfig, params, lora, prompts, lengths, max_new: int):
    b, p = prompts.shape
    # A 16-bit cache is cheaper to write on CPU stored as its bits (`kv_cache.store`).
    cache = models.DenseKVCache.create(cfg, b, p + max_new, as_bits=matmul.on_cpu())
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    hidden, cache = models.apply(
        cfg, params, prompts, positions=positions, lora=lora, cache=cache, return_hidden=True
    )
    # The head on each prompt's last token alone, not on every prompt position.
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    first = jnp.argmax(models.logits_from_hidden(cfg, params, last), axis=-1).astype(jnp.int32)

    def step(carry, _):
        token, pos, cache = carry
        logits, cache = models.apply(
            cfg, params, token[:, None], positions=pos[:, None], lora=lora, cache=cache
        )
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return (nxt, pos + 1, cache), token

    _, tokens = jax.lax.scan(step, (first, lengths, cache), None, length=max_new)
    return tokens.T  # [B, max_new]


@functools.cache
def _compiled_generate():
    """`_generate` jitted with the decode compile options of the default backend (on CPU,
    single-threaded Eigen; `matmul.decode_compiler_options`), as the rollout engine's decode.
    Built on first use: reading the backend at import would initialize it before a
    multi-process run's `jax.distributed.initialize`."""
    return jax.jit(
        _generate, static_argnums=(0, 5), compiler_options=matmul.decode_compiler_options()
    )


def greedy_generate(
    cfg: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    lora=None,
    eos_id: int | None = None,
    pad_id: int = 0,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy completions of `prompts` (lists of token ids), each cut after the first eos_id.

    Prompts are grouped into batches of `batch_size` rows padded to the longest prompt overall,
    so every batch has the same shape and the decoder compiles once.
    """
    if not prompts:
        return []
    width = max(len(p) for p in prompts)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        rows = len(chunk)
        chunk += [chunk[0]] * (batch_size - rows)  # fill the last batch to the compiled shape
        tokens = np.full((batch_size, width), pad_id, np.int32)
        for i, p in enumerate(chunk):
            tokens[i, : len(p)] = p
        lengths = np.asarray([len(p) for p in chunk], np.int32)
        gen = np.asarray(_compiled_generate()(cfg, params, lora, tokens, lengths, max_new_tokens))
        for row in gen[:rows].tolist():
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id) + 1]
            out.append(row)
    return out


def task_accuracy(
    cfg: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[str],
    decode: Callable[[list[int]], str],
    score: Callable[[str, str], float],
    max_new_tokens: int,
    *,
    lora=None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> float:
    """Mean of score(decoded completion, reference answer) over the held-out prompts."""
    completions = greedy_generate(
        cfg, params, prompts, max_new_tokens, lora=lora, eos_id=eos_id, pad_id=pad_id
    )
    scores = [score(decode(c), a) for c, a in zip(completions, answers)]
    return float(np.mean(scores))
