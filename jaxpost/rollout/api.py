"""`rollout.generate`, the one-call rollout API: an engine sized from the prompts and
sampling parameters (power-of-two sizes), cached across calls (a larger engine serves smaller
calls) so an RL loop's repeated rollouts neither rebuild nor recompile it, and a
`driver.Driver` run over it."""

from __future__ import annotations

import collections
from collections.abc import Sequence

from jaxpost.models.config import ModelConfig
from jaxpost.rollout.driver import Driver
from jaxpost.rollout.engine import Engine
from jaxpost.rollout.requests import Completion, Request, validate_prompt
from jaxpost.rollout.sampling import SamplingParams
from jaxpost.rollout.state import prefill_bucket

# Engines built by `generate`, most recently used last. Each holds its compiled functions and
# the params of its last call (replaced, not accumulated, by the next call).
_ENGINES: collections.OrderedDict = collections.OrderedDict()
_MAX_CACHED_ENGINES = 4


def generate(
    cfg: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    lora=None,
    *,
    slots: int = 16,
    page_size: int = 16,
    steps_per_call: int = 8,
    mesh=None,
    progress: bool | None = None,
    engine: Engine | None = None,
) -> list[Completion]:
    """Sample completions for `prompts` (list of token-id lists).

    sampling_params: one for all prompts or one per prompt. params may be plain or
    {"base", "lora"}; `lora` (a `lora.LoraParams`, or its plain factor tree) overrides. Pass a
    prebuilt `engine` to control its sizes (params may then be its own loaded weights,
    `engine.params`); otherwise an engine cached from an earlier call at least as large (prompt
    and completion lengths rounded up to powers of two) is reused with its params swapped in,
    so repeated calls compile only when they need a larger engine than any so far.
    Returns a flat list, prompt-major: prompt 0's n samples, then prompt 1's, ...
    Each result has .tokens, .logprobs (raw model log-probs unless SamplingParams.logprobs is
    "processed"), .finish_reason and .seed. Prompt and completion stay within the model's
    max_position_embeddings: a prompt that fills them is refused, a completion that would pass
    them ends there ("length").
    """
    if sampling_params is None:
        sampling_params = SamplingParams()
    sps = (
        [sampling_params] * len(prompts)
        if isinstance(sampling_params, SamplingParams)
        else list(sampling_params)
    )
    if len(sps) != len(prompts):
        raise ValueError(f"{len(sps)} sampling_params for {len(prompts)} prompts")
    # Checked before sizing an engine from them (the driver checks lengths against the engine).
    limit = cfg.max_position_embeddings
    prompts = [
        # vLLM's max_model_len: prompt + completion within the positions, one at least generated.
        validate_prompt(
            p,
            i,
            limit - 1,
            cfg.vocab_size,
            f"the longest that leaves a position to generate (max_position_embeddings={limit})",
        )
        for i, p in enumerate(prompts)
    ]
    loaded = False  # whether `params` are already the engine's weights
    if engine is None:
        # Power-of-two sizes, so repeated calls (an RL loop) hit a cached, compiled engine.
        longest = max((len(p) for p in prompts), default=1)
        max_new = max((s.max_new_tokens for s in sps), default=1)
        max_prefill = min(prefill_bucket(max(longest, 1), 1 << 30), limit)
        # Positions past the model's range are not generated (vLLM's max_model_len).
        max_len = min(max_prefill + prefill_bucket(max_new, 1 << 30, min_bucket=1), limit)
        same = (repr(cfg), slots, page_size, steps_per_call, mesh)
        # Any cached engine at least this large serves these prompts (its prefill compiles per
        # prompt-length bucket and a decode step attends only the columns live slots use), so a
        # loop whose lengths vary reuses one engine instead of cycling through several.
        fits = [k for k in _ENGINES if k[0] == same and k[1] >= max_len and k[2] >= max_prefill]
        key = min(fits, key=lambda k: (k[1], k[2])) if fits else (same, max_len, max_prefill)
        engine = _ENGINES.pop(key, None)
        if engine is None:
            engine = Engine(
                cfg,
                params,
                lora=lora,
                slots=slots,
                max_len=max_len,
                max_prefill_length=max_prefill,
                page_size=page_size,
                steps_per_call=steps_per_call,
                mesh=mesh,
            )
            loaded = True
        _ENGINES[key] = engine
        while len(_ENGINES) > _MAX_CACHED_ENGINES:
            del _ENGINES[next(iter(_ENGINES))]  # least recently used
    if not loaded and not (params is engine.params and lora is None):  # not its own weights
        engine.update_params(params, lora=lora)
    outs = Driver(engine).run([Request(p, s) for p, s in zip(prompts, sps)], progress=progress)
    return [c for per_prompt in outs for c in per_prompt]


def clear_cache() -> None:
    """Drop the engines `generate` keeps (their compiled steps, their copy of the weights and
    their KV pages): e.g. before training a model just sampled from, whose engine would
    otherwise hold a second copy of it until the next `generate`."""
    _ENGINES.clear()
