"""The engine's data: decode state, prefilled prompt, step results, params splitting.

Shapes use B = slots, K = steps per generate call, L/KVH/D as in the model.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import lora as lora_lib
from jaxpost.models.config import ModelConfig
from jaxpost.rollout.paged_cache import PagedKVCache
from jaxpost.rollout.sampling import MAX_EOS
from jaxpost.sharding import agree_across_processes, logical_to_sharding, replicated


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything a generate step transforms; one row per slot. B = max_concurrent_decodes."""

    cache: PagedKVCache
    hidden: jax.Array  # [B, D] final-normed hidden of the last cached token
    generated: jax.Array  # [B] int32 tokens emitted so far
    done: jax.Array  # [B] bool: idle or finished on device (eos / max_new_tokens)
    max_new: jax.Array  # [B] int32
    key_data: jax.Array  # [B, 2] uint32 raw PRNG key of the slot's sample
    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32
    eos: jax.Array  # [B, MAX_EOS] int32, -1 padded
    processed: jax.Array  # [B] bool: report log-probs of the sampled (processed) distribution


def empty_decode_state(
    cfg: ModelConfig,
    slots: int,
    num_pages: int,
    page_size: int,
    slot_regions: bool = False,
    as_bits: bool = False,
) -> DecodeState:
    """Every slot idle (done), zero page pools. Meant to run inside jit (out_shardings place it).
    The cache holds no page table: the engine's host table is the only one, passed to each call.
    slot_regions: the pool's layout; as_bits: a 16-bit pool stored as bits (`paged_cache`)."""
    b = slots
    return DecodeState(
        cache=PagedKVCache.create(
            cfg, num_pages, page_size, b, slot_regions=slot_regions, as_bits=as_bits
        ),
        hidden=jnp.zeros((b, cfg.hidden_size), jnp.dtype(cfg.dtype)),
        generated=jnp.zeros((b,), jnp.int32),
        done=jnp.ones((b,), bool),
        max_new=jnp.zeros((b,), jnp.int32),
        key_data=jnp.zeros((b, 2), jnp.uint32),
        temperature=jnp.zeros((b,), jnp.float32),
        top_k=jnp.zeros((b,), jnp.int32),
        top_p=jnp.ones((b,), jnp.float32),
        min_p=jnp.zeros((b,), jnp.float32),
        eos=jnp.full((b, MAX_EOS), -1, jnp.int32),
        processed=jnp.zeros((b,), bool),
    )


def decode_state_shardings(mesh: jax.sharding.Mesh, rules, state_shape: DecodeState) -> DecodeState:
    """Shardings for a DecodeState shaped like `state_shape`: page pools split over KV heads
    (the tensor axis, as the attention weights are), everything else replicated."""
    pools = state_shape.cache.k_pages  # [L, KVH, P, S, D], or L arrays [KVH, P, S, D]
    per_layer = isinstance(pools, tuple)
    pool = pools[0] if per_layer else pools
    names = ("layers", "kv_heads", None, None, "head_dim")[-pool.ndim :]
    pages = logical_to_sharding(pool.shape, names, mesh, rules)
    if per_layer:
        pages = (pages,) * len(pools)
    out = jax.tree.map(lambda _: replicated(mesh), state_shape)
    out.cache = dataclasses.replace(out.cache, k_pages=pages, v_pages=pages)
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefix:
    """A prefilled prompt: row `row` of a prefill batch, k/v [N, L, T, KVH, D], hidden [N, D].

    Prompts prefilled together share the batch's arrays; `insert` picks the row on device, so
    handing out N prefixes costs no per-row slicing (an eager dispatch each) on the host.
    length (the true length) and row are int32 scalars.
    """

    k: jax.Array
    v: jax.Array
    hidden: jax.Array
    length: jax.Array
    row: jax.Array
    true_length: int = dataclasses.field(metadata=dict(static=True))


@dataclasses.dataclass
class StepResult:
    """Output of one `generate` call, K = steps_per_call, as one int32 array [B, 3K + 2].

    Columns: tokens [0, K), valid [K, 2K), generated count [2K] (JetStream's ResultTokens
    layout), log-probs bit-cast to int32 [2K+1, 3K+1), done [3K+1]. One array, one host copy.
    """

    data: jax.Array | np.ndarray
    steps: int

    def to_numpy(self) -> dict[str, np.ndarray]:
        d = np.asarray(self.data)
        k = self.steps
        return {
            "tokens": d[:, :k],
            "valid": d[:, k : 2 * k].astype(bool),
            "lengths": d[:, 2 * k],
            "logprobs": d[:, 2 * k + 1 : 3 * k + 1].view(np.float32),
            "done": d[:, 3 * k + 1].astype(bool),
        }


class LoRAView:
    """The (tree, scale) pair handed to models.apply inside jit; the scale is static."""

    def __init__(self, params, scale: float):
        self.params, self.scale = params, scale


def split_params(cfg: ModelConfig, params, lora=None) -> tuple[Any, Any, float]:
    """(base, lora tree or None, lora scale) from params or {"base", "lora"} plus `lora` (a
    `lora.LoraParams`, checked against cfg's model, or a plain factor tree of scale 1)."""
    if isinstance(params, dict) and "base" in params:
        if lora is None:
            lora = params.get("lora")
        params = params["base"]
    if lora is None:
        return params, None, 1.0
    lora_lib.check(cfg, lora, plain_tree_ok=True)
    if isinstance(lora, dict):
        return params, lora, 1.0
    return params, lora.params, float(lora.scale)


def prefill_bucket(length: int, max_prefill_length: int, min_bucket: int = 16) -> int:
    """Smallest power of two >= length (and >= min_bucket), capped at max_prefill_length."""
    return min(max(min_bucket, 1 << max(0, length - 1).bit_length()), max_prefill_length)


def prefill_rows(count: int, slots: int) -> int:
    """The rows a prefill call of `count` prompts is padded to: the next power of two, at most
    `slots` (a bounded number of batch shapes, each one compilation)."""
    return prefill_bucket(count, slots, min_bucket=1)


def prefill_batch_pieces(count: int, slots: int) -> list[int]:
    """How many of `count` prompts go in each prefill call, a call's rows being padded to a
    power of two (at most `slots`) so compilations stay bounded. Padding that would waste more
    than a quarter of a call's rows is avoided by sending the largest power of two first and
    the rest after: 9 prompts go as 8 + 1 (9 rows) instead of 16 rows, while 3 go as one call
    of 4. (50M rollout benchmark model, 64-token prompts: 8 + 2 rows 242 ms against 16 rows
    379 ms; 5M: 29 against 44 ms. Splitting 3 into 2 + 1 is slower on the 5M model, 15 ms
    against 12, where a call's fixed cost is larger than a row's.)"""
    pieces = []
    while count > 0:
        rows = prefill_rows(count, slots)
        take = min(count, rows)
        if rows - take > rows // 4:
            take = 1 << (take.bit_length() - 1)  # the largest power of two <= take
        pieces.append(take)
        count -= take
    return pieces


def pad_prompts(prompts: list[list[int]], rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A prefill batch: tokens [rows, width] (zeros past each prompt and in the padding rows)
    and true lengths [rows] (1 for padding rows, so their last position is in range)."""
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.ones((rows,), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, : len(p)] = p
        lengths[r] = len(p)
    return tokens, lengths


def check_padded_prompt(padded: np.ndarray, true_length: int, max_prefill_length: int) -> None:
    """The checks of `Engine.prefill`'s JetStream arguments: padded_tokens [T], T at most
    max_prefill_length, true_length in [1, T]."""
    if padded.ndim != 1:
        raise ValueError(f"padded_tokens must be 1-D [T], got shape {padded.shape}")
    if not 1 <= true_length <= padded.shape[0]:
        raise ValueError(
            f"true_length={true_length} must be in [1, len(padded_tokens)={padded.shape[0]}]"
        )
    if padded.shape[0] > max_prefill_length:
        raise ValueError(
            f"prompt of {padded.shape[0]} tokens exceeds max_prefill_length={max_prefill_length}"
        )


def check_prompt_batch(prompts: list[list[int]], slots: int, max_prefill_length: int) -> None:
    """The checks of `Engine.prefill_many`'s prompts: at most `slots`, each of 1 to
    max_prefill_length tokens."""
    if len(prompts) > slots:
        raise ValueError(f"{len(prompts)} prompts in one prefill; at most slots={slots}")
    lengths = sorted({len(p) for p in prompts})
    if lengths[0] < 1 or lengths[-1] > max_prefill_length:
        raise ValueError(
            f"prompt lengths must be in [1, max_prefill_length={max_prefill_length}], got {lengths}"
        )


def slot_sampling_arrays(sp, sample_index: int, request_key: int = 0) -> tuple[np.ndarray, ...]:
    """A slot's sampling parameters as `device_steps.insert_step` takes them: ints [top_k,
    seed, sample_index, request_key, processed], floats [temperature, top_p, min_p], eos
    [MAX_EOS] (-1 padded). sp: a `sampling.SamplingParams`; a seed of None draws a fresh one
    when sampling (the driver resolves it per request beforehand, so all n samples share it).
    request_key: folded into the slot's key (the driver passes `request_key(prompt)`)."""
    if len(sp.eos_token_ids) > MAX_EOS:
        raise ValueError(f"{len(sp.eos_token_ids)} eos_token_ids; at most {MAX_EOS}")
    # A greedy slot never reads its seed: no fresh draw (a collective under several processes).
    seed = sp.seed if sp.seed is not None else fresh_seeds(1)[0] if sp.temperature > 0 else 0
    eos = np.full((MAX_EOS,), -1, np.int32)
    eos[: len(sp.eos_token_ids)] = sp.eos_token_ids
    # Processed log-probs differ from raw ones only when sampling (greedy reports raw).
    processed = int(sp.logprobs == "processed" and sp.temperature > 0)
    return (
        np.array([sp.top_k, seed, sample_index, request_key, processed], np.int32),
        np.array([sp.temperature, sp.top_p, sp.min_p], np.float32),
        eos,
    )


def request_key(prompt) -> int:
    """A 31-bit key of a prompt's token ids (CRC-32), folded into its samples' PRNG keys so that
    requests with the same seed but different prompts draw independent streams."""
    return zlib.crc32(np.asarray(prompt, "<i4").tobytes()) & 0x7FFFFFFF


def fresh_seeds(count: int) -> list[int]:
    """`count` seeds from the OS's entropy, the same on every process of a multi-process run
    (process 0's, broadcast: the processes feed one replicated decode)."""
    seeds = np.random.default_rng().integers(0, 2**31, count, dtype=np.int64)
    return [int(x) for x in agree_across_processes(seeds, "first")]


def table_width_bucket(pages: int, max_pages: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x them) >= pages,
    capped at max_pages: the page-table columns a decode call attends over. At most
    2 log2(max_pages) + 1 widths, each one compilation; attention work follows the live
    length within 1.5x instead of always covering max_len."""
    width = 1
    while width < pages:
        power_of_two = width & (width - 1) == 0
        width = width + width // 2 if power_of_two and width >= 2 else 1 << width.bit_length()
    return min(width, max_pages)
