"""What a rollout request is and what it returns: `Request` (prompt + sampling parameters),
`Completion` (tokens, log-probs, finish reason, seed, timings), and the checks the driver and
`rollout.generate` make on requests before any compute.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence

import numpy as np

from jaxpost.rollout.sampling import SamplingParams


@dataclasses.dataclass
class Completion:
    """One sampled completion of one prompt.

    tokens / logprobs: the generated tokens (eos or stop sequence included) and the log-prob
    of each (the raw model's, or the sampled distribution's: `SamplingParams.logprobs`).
    finish_reason: "eos" | "stop" | "length". seed: the request's seed (drawn fresh when its
    SamplingParams had None): the same prompt with SamplingParams(seed=seed) gives this
    completion again. Times are time.perf_counter() seconds: queued (request submitted),
    first_token (first token read on the host), finished.
    """

    request_index: int
    sample_index: int
    prompt: list[int]
    seed: int | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    queued: float = 0.0
    first_token: float | None = None
    finished: float | None = None

    @property
    def latency(self) -> float:
        return (self.finished or time.perf_counter()) - self.queued


@dataclasses.dataclass
class Request:
    prompt: list[int]
    sampling: SamplingParams


def validate_prompt(
    prompt: Sequence[int],
    index: int,
    max_prefill: int,
    vocab: int | None,
    limit_name: str = "the engine's max_prefill_length",
) -> list[int]:
    """`prompt` as a list of ints, or an error naming prompt `index`: not a flat sequence of
    integer ids, empty, longer than max_prefill, or an id outside [0, vocab)."""
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
        raise TypeError(
            f"prompt {index} is {type(prompt).__name__} {prompt!r:.40}, not a sequence of token "
            "ids (prompts: list[list[int]]; tokenize text first)"
        )
    ids = np.asarray(prompt)
    if ids.size and (ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer)):
        raise TypeError(
            f"prompt {index} is not a flat sequence of integer token ids (got {ids.dtype} "
            f"values of shape {ids.shape})"
        )
    if not ids.size:
        raise ValueError(f"prompt {index} is empty; expected at least one token")
    if ids.size > max_prefill:
        raise ValueError(f"prompt {index} has {ids.size} tokens; {limit_name} is {max_prefill}")
    if vocab is not None:
        outside = (ids < 0) | (ids >= vocab)  # one pass in NumPy: RL batches are large
        if outside.any():
            bad = ids[np.argmax(outside)]
            raise ValueError(f"prompt {index} has token id {bad}; expected ids in [0, {vocab})")
    return ids.tolist()


def warn_identical_sampled_repeats(first, requests) -> None:
    """Sampling is seeded per request, so a prompt repeated with the same sampling parameters
    and the same explicit seed gets the same completion each time: a GRPO group of identical
    completions has zero advantages. Say so once, naming the requests and the two ways out."""
    seen: dict = {}  # (the prompt's first request, sampling) -> first request with both
    for i, (group, r) in enumerate(zip(first, requests)):
        if r.sampling.temperature == 0 or r.sampling.seed is None:
            continue  # greedy repeats are the same by definition; no seed: fresh seeds
        j = seen.setdefault((group, r.sampling), i)
        if j != i:
            warnings.warn(
                f"requests {j} and {i} have the same prompt and sampling parameters (seed "
                f"{r.sampling.seed}), so they get the same completion; for different samples "
                f"give them distinct seeds or send the prompt once with n > 1",
                stacklevel=3,
            )
            return


def stop_hit(tokens: list[int], stops) -> bool:
    return any(len(tokens) >= len(s) and tuple(tokens[-len(s) :]) == s for s in stops)
