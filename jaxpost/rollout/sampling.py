"""Sampling parameters and the on-device sampler used by every decode step.

The filters apply in the order of `transformers`' `generate`: temperature, then top-k (ties at
the k-th value kept), then top-p on the distribution renormalised after top-k, then min-p
(relative to the most likely token, so renormalisation does not change it). vLLM applies min-p
before top-k and top-p, so the two differ when min-p is combined with either. Temperature 0 is
greedy (argmax of the raw logits).

The log-prob reported for a sampled token is by default the raw model's, log_softmax(logits)
[token] at temperature 1 and without filters (vLLM's default, `raw_logprobs`): the policy's
log-prob of the action, which the trainer's `token_logprobs` recomputes. logprobs="processed"
reports the log-prob under the distribution the token was drawn from, after temperature and
filters (vLLM's `processed_logprobs`, which TRL asks vLLM for). For greedy decoding and for
temperature-1 sampling without filters the two coincide.

Randomness: sample i of a request draws from a key made of (seed, the prompt's tokens, i), so a
seeded request gives the same completion however it is batched, and requests sharing a seed
but not a prompt draw independent streams. seed=None (the default) takes a fresh seed per
request, as vLLM does; the completion reports it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp

# Static sampler variants: the engine compiles at most one step per variant and picks the
# cheapest one that covers every live slot (sorting the vocabulary only when a filter is on).
GREEDY, TEMPERATURE, FILTERED = "greedy", "temperature", "filtered"
MAX_EOS = 8  # eos ids per request, held per slot on device
LOGPROBS = ("raw", "processed")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request.

    temperature: 0 is greedy; > 0 (finite) divides the logits.
    top_k: keep the k most likely tokens, and any tied with the k-th (0 or -1 = off).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 = off).
    min_p: drop tokens whose probability is below min_p x the top token's (0 = off).
    seed: None (default) draws a fresh seed per request; an int makes the request reproducible:
      the same seed and prompt give the same completion regardless of batching.
    n: samples per prompt; they share one prefill and sample i draws from (seed, prompt, i).
    max_new_tokens: generation stops after this many tokens (finish_reason "length").
    eos_token_ids: tokens that end a completion (kept in the output, finish_reason "eos").
    stop: token sequences that end a completion (kept in the output, finish_reason "stop").
    logprobs: "raw" (the model's log-prob at temperature 1, unfiltered) or "processed" (under
      the tempered, filtered distribution sampled from); see the module docstring.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    n: int = 1
    eos_token_ids: tuple[int, ...] = ()
    stop: tuple[tuple[int, ...], ...] = ()
    logprobs: str = "raw"

    def __post_init__(self):
        # Normalise to tuples so the object stays hashable and comparable; one id is accepted
        # where a list of ids is expected (transformers' eos_token_id takes either).
        object.__setattr__(self, "eos_token_ids", _token_ids(self.eos_token_ids, "eos_token_ids"))
        object.__setattr__(self, "stop", _stop_sequences(self.stop))
        kinds = {"max_new_tokens": int, "top_k": int, "seed": int, "n": int,
                 "temperature": float, "top_p": float, "min_p": float}  # fmt: skip
        wrong = [
            f"{name}={getattr(self, name)!r} must be {'an integer' if kind is int else 'a number'}"
            for name, kind in kinds.items()
            if not (name == "seed" and self.seed is None)
            and not _is_number(getattr(self, name), integer=kind is int)
        ]
        if self.logprobs not in LOGPROBS:
            wrong.append(f"logprobs={self.logprobs!r} must be one of {LOGPROBS}")
        if wrong:
            raise ValueError("invalid SamplingParams: " + "; ".join(wrong))
        if self.top_k == -1:  # vLLM's spelling of "off"
            object.__setattr__(self, "top_k", 0)
        problems = []
        if not self.max_new_tokens >= 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature={self.temperature} must be finite and >= 0 (0 is greedy)")
        if not self.top_k >= 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 or -1 disables it)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1] (1 disables it)")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p={self.min_p} must be in [0, 1] (0 disables it)")
        if self.seed is not None and not -(2**31) <= self.seed < 2**31:
            problems.append(f"seed={self.seed} must fit in int32")
        if not self.n >= 1:
            problems.append(f"n={self.n} must be >= 1")
        if len(self.eos_token_ids) > MAX_EOS:
            problems.append(f"{len(self.eos_token_ids)} eos_token_ids; at most {MAX_EOS}")
        if any(len(s) == 0 for s in self.stop):
            problems.append("stop contains an empty token sequence")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    @property
    def variant(self) -> str:
        """The cheapest sampler variant that implements these parameters."""
        if self.temperature == 0:
            return GREEDY
        if self.top_k == 0 and self.top_p == 1 and self.min_p == 0:
            return TEMPERATURE
        return FILTERED


def _is_number(x, integer: bool) -> bool:
    """An integer (Python, NumPy or a 0-d integer array) or, unless `integer`, a real number."""
    if isinstance(x, bool):
        return False
    if not integer and isinstance(x, numbers.Real):
        return True
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def _token_ids(ids, name: str) -> tuple[int, ...]:
    if _is_number(ids, integer=True):
        return (int(ids),)
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(
            f"invalid SamplingParams: {name}={ids!r} must be a token id or a sequence of ids"
        )
    ids = tuple(ids)
    if not all(_is_number(t, integer=True) for t in ids):
        raise ValueError(f"invalid SamplingParams: {name}={ids!r} must hold integer token ids")
    return tuple(int(t) for t in ids)


def _stop_sequences(stop) -> tuple[tuple[int, ...], ...]:
    """stop as a tuple of token-id tuples; a flat list of ids is ambiguous (one sequence, or
    several single-token stops?) and is refused with both spellings."""
    hint = "stop takes a list of token-id sequences, e.g. [[5, 6]] or [[5], [6]]"
    if isinstance(stop, (str, bytes)) or not isinstance(stop, Iterable):
        raise ValueError(f"invalid SamplingParams: stop={stop!r}; {hint} (tokenize strings)")
    stop = tuple(stop)
    if any(_is_number(s, integer=True) for s in stop):
        raise ValueError(f"invalid SamplingParams: stop={stop!r} is a flat list of ids; {hint}")
    if any(isinstance(s, (str, bytes)) for s in stop):
        raise ValueError(f"invalid SamplingParams: stop={stop!r} holds strings; {hint}")
    return tuple(_token_ids(s, "stop sequence") for s in stop)


def widest_variant(variants: Sequence[str]) -> str:
    """The variant covering all of `variants` (filtered > temperature > greedy)."""
    order = (GREEDY, TEMPERATURE, FILTERED)
    return order[max((order.index(v) for v in variants), default=0)]


def filter_logits(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p
) -> jax.Array:
    """Temperature, top-k, top-p, min-p on one row. logits [V] float32 -> masked scaled [V].

    Scalars per row (traced). Removed tokens get -inf; at least the top token always survives.
    """
    v = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    sorted_logits = scaled[order]
    # Top-k keeps every token tied with the k-th, as transformers and vLLM do.
    kth = sorted_logits[jnp.clip(top_k, 1, v) - 1]
    keep = (top_k <= 0) | (sorted_logits >= kth)
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(masked)
    # Keep a token while the mass strictly before it is below top_p: the smallest set reaching
    # p. top_p = 1 is off exactly (a float32 running sum can reach 1 before the tail ends).
    before = jnp.cumsum(probs) - probs
    keep = keep & ((before < top_p) | (top_p >= 1))
    keep = keep & (probs >= min_p * probs[0])
    keep = keep.at[0].set(True)
    filtered_sorted = jnp.where(keep, sorted_logits, -jnp.inf)
    return jnp.full_like(scaled, -jnp.inf).at[order].set(filtered_sorted)


def argmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """jnp.argmax over `axis` (the first index of the maximum), int32.

    A max, then the smallest index holding it: two plain reductions, which XLA:CPU vectorises.
    jnp.argmax lowers to one variadic (value, index) reduction that it does not (3-4x slower
    over a vocabulary, the largest part of a greedy decode step's sampling).
    """
    v = x.shape[axis]
    top = jnp.max(x, axis=axis, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
    idx = jnp.min(jnp.where(x == top, index, v), axis=axis)
    return jnp.minimum(idx, v - 1)  # an all-NaN row has no maximum: report the last token


def sample(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    variant: str = FILTERED,
    vocab_first: bool = False,
    processed: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sample one token per row.

    logits [B, V] float32 (raw model logits); keys [B] typed PRNG keys; temperature, top_p,
    min_p [B] float32; top_k [B] int32. `variant` (static) skips work no row needs.
    vocab_first: logits come as [V, B] instead. The greedy choice and the log-prob then reduce
    over axis 0, which reads a [V, B] array contiguously: pass them so when they are the
    product `matmul.dot_t` transposes (the decode layout's head), and XLA:CPU reduces over V
    without reading [B, V] with a stride of B (rollout benchmark, float32 batch-16 greedy
    decode: 50M 1.06x tokens/s, 5M 1.03x).
    processed: [B] bool, rows whose log-prob is the sampled distribution's (None: none; only
    sampled rows, temperature > 0, may be set: `state.slot_sampling_arrays`).
    Returns (tokens [B] int32, log-probs [B] float32 of those tokens, see module docstring).
    """
    logits = logits.astype(jnp.float32)
    if vocab_first and logits.shape[1] == 1:
        # One row: [V, 1] is [1, V] in memory, and XLA:CPU reduces a minor axis of V many
        # times faster than a major one (a float32 log-sum-exp over 32000: 0.09 vs 1.0 ms).
        logits, vocab_first = logits.reshape(1, -1), False
    axis = 0 if vocab_first else -1
    greedy_tokens = argmax(logits, axis)
    if variant == GREEDY:
        tokens = greedy_tokens
    else:
        if vocab_first:
            logits = logits.T  # the filters work on rows
            axis = -1
        if variant == TEMPERATURE:
            scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        else:
            scaled = jax.vmap(filter_logits)(logits, temperature, top_k, top_p, min_p)
        # jax.random.categorical's Gumbel-max draw (the same numbers), with the argmax above.
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[-1:], jnp.float32))(keys)
        drawn = argmax(scaled + gumbel)
        tokens = jnp.where(temperature > 0, drawn, greedy_tokens)
    # log_softmax(logits)[token] without the [B, V] log-softmax array, in jax.nn.log_softmax's
    # order of operations, so it rounds the same whatever the batch. The token's shifted logit
    # is taken from the logits, so XLA fuses the shift into the sum instead of storing a
    # shifted [B, V] copy for the gather (greedy batch-16 sampling over 8192 / 32000 tokens:
    # 0.36 -> 0.25 / 0.97 -> 0.72 ms per step).
    top = jnp.max(logits, axis=axis, keepdims=True)
    lse = jnp.log(jnp.sum(jnp.exp(logits - top), axis=axis))
    picked = jnp.take_along_axis(logits, jnp.expand_dims(tokens, axis), axis=axis) - top
    logp = jnp.squeeze(picked, axis) - lse
    if variant != GREEDY and processed is not None:
        # log_softmax(scaled)[token]; filtered-out entries are -inf and add nothing.
        top_s = jnp.max(scaled, axis=-1, keepdims=True)
        lse_s = jnp.log(jnp.sum(jnp.exp(scaled - top_s), axis=-1))
        picked_s = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0] - top_s[:, 0]
        logp = jnp.where(processed, picked_s - lse_s, logp)
    return tokens, logp
