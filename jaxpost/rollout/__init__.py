"""Rollout: the JetStream-style engine over a paged KV cache, sampling, continuous batching.

`rollout.generate(cfg, params, prompts, rollout.SamplingParams(...), lora=None)` is the one-call
API; `Engine` + `Driver` are the pieces underneath. `jaxpost.rollout.jetstream_adapter` (extra
`jetstream`) presents the engine to JetStream's own orchestrator.
"""

from jaxpost.rollout.api import clear_cache, generate
from jaxpost.rollout.driver import Driver
from jaxpost.rollout.engine import Engine
from jaxpost.rollout.page_allocator import PageAllocator, PagesExhausted, SlotRegionAllocator
from jaxpost.rollout.paged_cache import PagedKVCache
from jaxpost.rollout.requests import Completion, Request
from jaxpost.rollout.sampling import SamplingParams
from jaxpost.rollout.state import DecodeState, Prefix, StepResult, prefill_bucket

__all__ = [
    "Completion",
    "DecodeState",
    "Driver",
    "Engine",
    "PageAllocator",
    "SlotRegionAllocator",
    "PagedKVCache",
    "PagesExhausted",
    "Prefix",
    "Request",
    "SamplingParams",
    "StepResult",
    "clear_cache",
    "generate",
    "prefill_bucket",
]
