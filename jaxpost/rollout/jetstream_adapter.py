"""The jaxpost engine as a `jetstream.engine.engine_api.Engine` (extra `jetstream`).

  engine = JetStreamEngine(rollout.Engine(cfg, params, ..., steps_per_call=1), bos_id=1)
  driver = orchestrator.Driver(prefill_engines=[engine], generate_engines=[engine],
                               prefill_params=[engine.load_params()],
                               generate_params=[engine.load_params()], interleaved_mode=True)
  client = orchestrator.LLMOrchestrator(driver=driver)   # then `async for r in client.Decode(req)`

JetStream's orchestrator decides completion itself (max_tokens, stop tokens) and never releases
slots, so the engine reuses a slot's pages when the orchestrator inserts into it again; the
adapter's default SamplingParams (greedy unless given) apply to every request.
`steps_per_call` must be 1: the orchestrator compares the `lengths` column against max_tokens
once per call, so several tokens per call would cut completions short.

google-jetstream 0.2.2 (the last PyPI release) predates current JAX; `_install_jax_compat`
is the one place where it is patched, and only when a JetStreamEngine is built.
"""

from __future__ import annotations

import jax
import numpy as np
from jetstream.engine import engine_api, tokenizer_api, tokenizer_pb2

from jaxpost.rollout.engine import Engine
from jaxpost.rollout.sampling import SamplingParams
from jaxpost.rollout.state import Prefix

# The prefill lengths JetStream's `token_utils.pad_tokens` pads to; max_prefill_length must be
# one of them (pad_tokens looks it up with list.index).
JETSTREAM_PREFILL_BUCKETS = tuple(16 << i for i in range(12))


def _install_jax_compat() -> None:
    """Restore the JAX names jetstream 0.2.2 calls that JAX has since removed.

    `jax.tree_map` (removed in JAX 0.6; the orchestrator's `delete_pytree` calls it). Idempotent
    and additive: existing names are never replaced.
    """
    if not hasattr(jax, "tree_map"):
        jax.tree_map = jax.tree.map


class IdTokenizer(tokenizer_api.Tokenizer):
    """Token ids in, token ids out; for clients that tokenize themselves (token_content).

    Wraps an optional text tokenizer (`.encode(str) -> list[int]`, `.decode(list[int]) -> str`,
    e.g. `jaxpost.tokenizer.load(path)`) for text requests. Only the eos ids stop a completion
    (JetStream's default would also stop on the pad id).
    """

    def __init__(self, bos_id: int, eos_ids: tuple[int, ...] = (), pad_id: int = 0, text=None):
        self._bos, self._eos, self._pad, self._text = bos_id, tuple(eos_ids), pad_id, text

    def encode(self, s: str, **kwargs):
        if self._text is None:
            raise ValueError(
                "this JetStreamEngine has no text tokenizer; send token_content requests or "
                "pass text_tokenizer="
            )
        from jetstream.engine import token_utils

        return token_utils.pad_tokens(
            np.asarray(self._text.encode(s), np.int32),
            self.bos_id,
            self.pad_id,
            is_bos=kwargs.get("is_bos", True),
            max_prefill_length=kwargs.get("max_prefill_length"),
            jax_padding=kwargs.get("jax_padding", True),
        )

    def decode(self, token_ids: list[int], **kwargs) -> str:
        if self._text is None:
            return " ".join(str(t) for t in token_ids)
        return self._text.decode(list(token_ids))

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def eos_id(self) -> int:
        return self._eos[0] if self._eos else -1

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def stop_tokens(self) -> set[int]:
        return set(self._eos)


class JetStreamEngine(engine_api.Engine):
    """Presents a `jaxpost.rollout.Engine` through JetStream's abstract Engine class."""

    def __init__(
        self,
        engine: Engine,
        *,
        bos_id: int,
        sampling: SamplingParams | None = None,
        pad_id: int = 0,
        text_tokenizer=None,
    ):
        _install_jax_compat()
        if engine.steps_per_call != 1:
            raise ValueError(
                f"steps_per_call={engine.steps_per_call}; JetStream's orchestrator needs 1"
            )
        if engine.max_prefill_length not in JETSTREAM_PREFILL_BUCKETS:
            raise ValueError(
                f"max_prefill_length={engine.max_prefill_length}; JetStream pads prompts to "
                f"{JETSTREAM_PREFILL_BUCKETS[:6]}..., so it must be one of those"
            )
        full = engine.slots * engine.max_pages_per_slot
        if engine.num_pages < full:
            # JetStream's orchestrator inserts whenever a slot is free; it has no way to ask
            # whether the pool can hold the request (`Engine.can_admit`), so a short pool would
            # fail inside its generate thread.
            raise ValueError(
                f"the engine's page pool has {engine.num_pages} pages; JetStream's orchestrator "
                f"needs room for every slot at max_len ({engine.slots} x "
                f"{engine.max_pages_per_slot} = {full}): build it without num_pages, or with "
                f"num_pages >= {full}"
            )
        self.engine = engine
        self._inserts = 0  # sample index of the next insert: each request draws its own sample
        self.sampling = sampling or SamplingParams(
            max_new_tokens=engine.max_len - engine.max_prefill_length, temperature=0.0
        )
        self.tokenizer = IdTokenizer(bos_id, self.sampling.eos_token_ids, pad_id, text_tokenizer)
        self._mesh = engine.mesh or jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))

    def load_params(self, *args, **kwargs):
        """The engine's current params; `load_params(params, lora=...)` swaps them first."""
        if args or kwargs:
            return self.engine.update_params(*args, **kwargs)
        return self.engine.params

    def prefill(
        self,
        *,
        params,
        existing_prefix: Prefix | None = None,
        padded_tokens: jax.Array,
        true_length: int,
    ) -> Prefix:
        return self.engine.prefill(
            params=params,
            existing_prefix=existing_prefix,
            padded_tokens=np.asarray(padded_tokens),
            true_length=int(true_length),
        )

    def insert(self, prefix: Prefix, decode_state, slot: int):
        # JetStream requests carry no seed: with one seed for all, sampled requests would all
        # draw the same sample. The k-th insert draws sample k of that seed instead
        # (reproducible for the same arrival order).
        self._inserts += 1
        return self.engine.insert(
            prefix, decode_state, int(slot), sampling=self.sampling, sample_index=self._inserts - 1
        )

    def generate(self, params, decode_state):
        state, result = self.engine.generate(params, decode_state)
        k = result.steps
        return state, engine_api.ResultTokens(
            data=result.data,
            tokens_idx=(0, k),
            valid_idx=(k, 2 * k),
            length_idx=(2 * k, 2 * k + 1),
            samples_per_slot=1,
        )

    def init_decode_state(self, *args, **kwargs):
        return self.engine.init_decode_state()

    def get_prefix_destination_sharding(self):
        return jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec())

    def get_tokenizer(self) -> tokenizer_pb2.TokenizerParameters:
        return tokenizer_pb2.TokenizerParameters(path="jaxpost", extra_ids=0)

    def build_tokenizer(self, metadata) -> IdTokenizer:
        return self.tokenizer

    @property
    def max_concurrent_decodes(self) -> int:
        return self.engine.max_concurrent_decodes

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self.engine.max_prefill_length

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self._mesh

    @property
    def colocated_cpus(self) -> None:
        return None
