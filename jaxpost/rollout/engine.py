"""The rollout engine: JetStream's Engine API over a paged KV cache, with per-token log-probs.

  prefix = engine.prefill(params=p, padded_tokens=tokens[T], true_length=n)  # a compile per bucket
  state = engine.insert(prefix, state, slot, sampling=SamplingParams(...), sample_index=i)
  state, result = engine.generate(p, state)  # steps_per_call tokens for every slot, one jit

Order inside a step: sample the next token from the slot's last hidden state, report it with its
raw log-prob, then feed it through the model (writing its k/v) to get the next hidden state. The
prompt's last hidden state comes from prefill, so n samples of one prompt share that prefill and
still draw different first tokens.

Host-side bookkeeping is the engine's `page_allocator.SlotBook`: each slot's pages and
page-table row, an upper bound of its cache length and its token limit. A slot is admitted
only if the free pages cover every live slot's remaining growth up to prompt + max_new_tokens
(so generation never runs out of pages midway), but pages are only allocated as tokens arrive,
so memory in use follows the live tokens.
The default pool gives every slot a region of max_len tokens (`paged_cache`'s slot regions),
which decode attention reads in place; a pool sized with `num_pages` is a free list, in which
the samples of one prompt share its full pages (`page_allocator.PromptPageIndex`): n samples
of a P-token prompt hold floor(P / page_size) prompt pages once instead of n times.
The device never waits on the host: `generate` grows page lists from the host's length bound
(at most steps_per_call tokens ahead of the truth) and passes the page table as an argument.

The engine decodes from the weights as `rollout.weights` lays them out (`load_params`): the
trainer's own base arrays where no copy is needed, so after a full fine-tuning step, which
donates them, the engine takes the new state's params (`update_params`) before it decodes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from jaxpost.models import matmul
from jaxpost.models.config import ModelConfig
from jaxpost.rollout import device_steps, sampling, weights
from jaxpost.rollout.page_allocator import SlotBook
from jaxpost.rollout.paged_cache import reads_in_place
from jaxpost.rollout.sampling import SamplingParams
from jaxpost.rollout.state import (
    DecodeState,
    Prefix,
    StepResult,
    check_padded_prompt,
    check_prompt_batch,
    decode_state_shardings,
    empty_decode_state,
    pad_prompts,
    prefill_batch_pieces,
    prefill_bucket,
    prefill_rows,
    slot_sampling_arrays,
    table_width_bucket,
)
from jaxpost.sharding import (
    DEFAULT_RULES,
    replicated,
    use_mesh,
)


class Engine:
    """JetStream-style engine for a `jaxpost.models` transformer. See the module docstring.

    slots: concurrent decodes B. max_len: prompt + completion tokens one slot can hold.
    num_pages: None (default): slot regions, slots x ceil(max_len / page_size) pages, each slot
    its own region, which decode attention reads in place instead of gathering the slot's
    pages (float32, more than one slot: `paged_cache.reads_in_place`);
    no page sharing, none being needed when every slot can hold max_len. An int: a free-list
    pool of that many pages, the scratch page included, any page to any slot, so a pool
    smaller than slots x max_len serves more slots (`paged_cache`). page_size: tokens per
    page. steps_per_call: tokens each `generate` call produces per slot (one jitted loop, one
    host round trip).
    decode_layout, head_copy: the weight layouts of the engine's copy (`rollout.weights`);
    None: on CPU the layout XLA:CPU decodes fastest, measured once per machine and shape
    (`rollout.layout_choice`).
    share_prompt_pages: slots inserted from the same prefix share its full pages (module doc);
    default: with a free-list pool. True with num_pages=None gives a full-size free-list pool.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params,
        *,
        lora=None,
        slots: int = 8,
        max_len: int = 512,
        max_prefill_length: int = 256,
        page_size: int = 16,
        num_pages: int | None = None,
        steps_per_call: int = 8,
        mesh: jax.sharding.Mesh | None = None,
        rules=DEFAULT_RULES,
        default_sampling: SamplingParams | None = None,
        decode_layout: bool | None = None,
        head_copy: bool | None = None,
        share_prompt_pages: bool | None = None,
    ):
        if max_prefill_length > max_len:
            raise ValueError(f"max_prefill_length={max_prefill_length} exceeds max_len={max_len}")
        self.cfg = cfg
        self.slots = slots
        self.max_len = max_len
        self._max_prefill_length = max_prefill_length
        self.page_size = page_size
        self.book = SlotBook(slots, max_len, page_size, num_pages, share_prompt_pages)
        self.steps_per_call = steps_per_call
        self._mesh = mesh
        self.rules = rules
        # One rule for "on CPU": the devices the engine decodes on (the mesh's, else default).
        devices = jax.devices() if mesh is None else list(mesh.devices.flat)
        on_cpu = matmul.on_cpu(devices)
        self._decode_options = matmul.decode_compiler_options(devices)
        self.decode_layout, self.head_copy = weights.default_layouts(
            cfg, slots, on_cpu, decode_layout, head_copy
        )
        # A 16-bit pool is stored as bits on CPU (`paged_cache`); elsewhere scatters are native.
        self._pool_as_bits = on_cpu
        self.default_sampling = default_sampling or SamplingParams(max_new_tokens=max_len)
        # Whether decode attention can read the pool in place once the table has all M columns.
        m = self.max_pages_per_slot
        self._reads_in_place = reads_in_place(self.slot_regions, slots, m, m, cfg.dtype)
        self._variant = [sampling.GREEDY] * slots
        self._processed = [False] * slots  # the slot reports processed log-probs
        self.compilations: dict[str, int] = {"prefill": 0, "insert": 0, "generate": 0}
        self._jit_cache: dict = {}
        self.params = self.load_params(params, lora=lora)

    # JetStream Engine API: properties -----------------------------------------------------------

    @property
    def max_concurrent_decodes(self) -> int:
        return self.slots

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self._max_prefill_length

    @property
    def mesh(self) -> jax.sharding.Mesh | None:
        return self._mesh

    def get_prefix_destination_sharding(self) -> Any:
        return None if self._mesh is None else replicated(self._mesh)

    # The pool's layout, as `SlotBook` decided it from the constructor's arguments.

    @property
    def allocator(self):
        """The page allocator (`page_allocator.PageAllocator` or `SlotRegionAllocator`)."""
        return self.book.allocator

    @property
    def max_pages_per_slot(self) -> int:
        return self.book.max_pages_per_slot

    @property
    def slot_regions(self) -> bool:
        return self.book.slot_regions

    @property
    def num_pages(self) -> int:
        return self.book.allocator.num_pages

    @property
    def share_prompt_pages(self) -> bool:
        return self.book.share_prompt_pages

    # Parameters ---------------------------------------------------------------------------------

    def load_params(self, params, lora=None) -> dict:
        """Place params ({"base", "lora"} or plain, plus optional `lora`) on the mesh.

        Returns `weights.decode_weights`' {"base", "lora", "lora_scale", "head", "arrays"}, the
        `params` argument of prefill/generate.
        """
        return weights.decode_weights(
            self.cfg,
            params,
            lora,
            mesh=self._mesh,
            rules=self.rules,
            decode_layout=self.decode_layout,
            head_copy=self.head_copy,
        )

    def update_params(self, params, lora=None) -> dict:
        """Swap weights (e.g. after a trainer step). Same shapes and LoRA scale -> no recompile."""
        self.params = self.load_params(params, lora=lora)
        return self.params

    # Compiled functions -------------------------------------------------------------------------

    def _compiled(self, name: str, fn, **jit_kwargs):
        if name not in self._jit_cache:
            kind = name.split(":")[0]

            def counted(*args, **kwargs):
                self.compilations[kind] = self.compilations.get(kind, 0) + 1  # once per trace
                if self._mesh is None:
                    return fn(*args, **kwargs)
                with use_mesh(self._mesh, self.rules):
                    return fn(*args, **kwargs)

            self._jit_cache[name] = jax.jit(counted, **jit_kwargs)
        return self._jit_cache[name]

    def _state_shardings(self):
        if self._mesh is None:
            return None
        if self._jit_cache.get("state_shardings") is None:
            shape = jax.eval_shape(self._empty_state)
            self._jit_cache["state_shardings"] = decode_state_shardings(
                self._mesh, self.rules, shape
            )
        return self._jit_cache["state_shardings"]

    def _empty_state(self) -> DecodeState:
        return empty_decode_state(
            self.cfg,
            self.slots,
            self.num_pages,
            self.page_size,
            self.slot_regions,
            as_bits=self._pool_as_bits,
        )

    def init_decode_state(self) -> DecodeState:
        """A fresh state with every slot idle; resets the host bookkeeping too."""
        for slot in range(self.slots):
            self.release(slot)
        fn = self._compiled("init", self._empty_state, out_shardings=self._state_shardings())
        return fn()

    # Prefill / insert ---------------------------------------------------------------------------

    def prefill(
        self,
        *,
        params: dict,
        existing_prefix: Prefix | None = None,
        padded_tokens: jax.Array | np.ndarray,
        true_length: int,
    ) -> Prefix:
        """Run the prompt padded_tokens[:true_length] (padded_tokens: [T]) through the model.

        existing_prefix: a prefix to continue (e.g. the conversation so far): the tokens are
        appended to it, attending to its cached keys/values, and the longer prefix is returned.
        Prefix plus tokens must fit max_len.
        """
        padded = np.asarray(padded_tokens)
        check_padded_prompt(padded, true_length, self.max_prefill_length)
        lengths = np.array([true_length], np.int32)
        tokens = padded[None].astype(np.int32)
        if existing_prefix is not None:
            return self._continue(params, existing_prefix, tokens, lengths)
        fn = self._prefill_compiled(params["lora_scale"])
        k, v, hidden = weights.call(params, fn, params["base"], params["lora"], tokens, lengths)
        return Prefix(k, v, hidden, np.int32(true_length), np.int32(0), int(true_length))

    def _continue(self, params: dict, prefix: Prefix, tokens: np.ndarray, lengths) -> Prefix:
        total = prefix.true_length + int(lengths[0])
        if total > self.max_len:
            raise ValueError(
                f"existing_prefix of {prefix.true_length} tokens + {int(lengths[0])} new tokens "
                f"= {total} exceeds max_len={self.max_len}"
            )
        scale = params["lora_scale"]
        fn = self._compiled(
            f"prefill_continue:{scale}",
            functools.partial(device_steps.continue_step, self.cfg, scale),
        )
        fields = (prefix.k, prefix.v, prefix.hidden, prefix.length, prefix.row)
        k, v, hidden = weights.call(
            params, fn, params["base"], params["lora"], fields, tokens, lengths
        )
        return Prefix(k, v, hidden, np.int32(total), np.int32(0), total)

    def prefill_many(self, *, params: dict, prompts: list[list[int]]) -> list[Prefix]:
        """Prefill several prompts in one call (a jaxpost extension of the JetStream API).

        The prompts are padded to one length bucket and the batch to a power of two (at most
        `slots`), so compilations stay bounded by (length buckets) x (batch buckets); a count
        that would pad more than a quarter of the rows goes as two or more calls
        (`state.prefill_batch_pieces`).
        """
        if not prompts:
            return []
        check_prompt_batch(prompts, self.slots, self.max_prefill_length)
        fn = self._prefill_compiled(params["lora_scale"])
        width = prefill_bucket(max(len(p) for p in prompts), self.max_prefill_length)
        made, start = [], 0
        for count in prefill_batch_pieces(len(prompts), self.slots):
            piece = prompts[start : start + count]
            start += count
            tokens, lengths = pad_prompts(piece, prefill_rows(count, self.slots), width)
            k, v, hidden = weights.call(params, fn, params["base"], params["lora"], tokens, lengths)
            made += [
                Prefix(k, v, hidden, np.int32(len(p)), np.int32(r), len(p))
                for r, p in enumerate(piece)
            ]
        return made

    def _prefill_compiled(self, scale: float):
        step = functools.partial(device_steps.prefill_step, self.cfg, scale)
        return self._compiled(f"prefill:{scale}", step)

    def can_admit(self, total_tokens: int, prefix: Prefix | None = None) -> bool:
        """Whether a sequence of up to total_tokens tokens fits the unreserved pages: the free
        pages minus what the live slots may still grow into. With `prefix`, its pages that a
        live slot already holds are shared, not needed again."""
        return self.book.can_admit(total_tokens, prefix)

    def unreserved_pages(self) -> int:
        """Free pages not promised to a live slot's growth up to its prompt + max_new_tokens."""
        return self.book.unreserved_pages()

    def insert(
        self,
        prefix: Prefix,
        decode_state: DecodeState,
        slot: int,
        *,
        sampling: SamplingParams | None = None,
        sample_index: int = 0,
        request_key: int = 0,
    ) -> DecodeState:
        """Start decoding `prefix` in `slot` (freeing what the slot held) with `sampling`.
        sample_index and request_key (`state.request_key` of the prompt) pick the sample's
        random stream with the seed (a seed of None: a fresh one for this sample)."""
        sp = sampling or self.default_sampling
        arrays = slot_sampling_arrays(sp, sample_index, request_key)  # checked before admitting
        limit = self.book.admit(slot, prefix, sp.max_new_tokens)
        self._variant[slot] = sp.variant
        self._processed[slot] = bool(arrays[0][4])  # as the slot's device flag says
        fn = self._compiled(
            "insert",
            functools.partial(device_steps.insert_step, self.page_size),
            donate_argnums=(0,),
            out_shardings=self._state_shardings(),
        )
        return fn(
            decode_state,
            (prefix.k, prefix.v, prefix.hidden, prefix.length, prefix.row),
            np.int32(slot),
            self.book.table[slot].copy(),
            np.int32(limit - prefix.true_length),  # the tokens the slot may generate
            *arrays,
        )

    def release(self, slot: int) -> None:
        """Retire the slot: its pages go back to the pool; the device stops decoding it."""
        self.book.release(slot)
        self._variant[slot] = sampling.GREEDY
        self._processed[slot] = False

    # Generate -----------------------------------------------------------------------------------

    def generate(self, params: dict, decode_state: DecodeState) -> tuple[DecodeState, StepResult]:
        """steps_per_call decode steps for every slot in one jitted call (no host sync)."""
        k = self.steps_per_call
        # Attend over the columns the longest live slot needs by the end of this call.
        longest = self.book.advance(k)
        live = np.flatnonzero(self.book.active)
        variant = sampling.widest_variant([self._variant[s] for s in live])
        # The processed log-probs cost a pass over the vocabulary: compiled in only when a
        # live slot asks for them.
        processed = any(self._processed[s] for s in live)
        width = table_width_bucket(self.allocator.pages_for(longest), self.max_pages_per_slot)
        full = self.max_pages_per_slot
        if 2 * width >= full and self._reads_in_place:
            # All M columns: attention reads the regions in place. Gathering w of M pages copies
            # and then reads them, about twice the traffic of reading in place (5M batch 16,
            # one layer: 8 of 12 pages gathered 0.26 ms, all 12 in place 0.23 ms).
            width = full
        scale = params["lora_scale"]
        shardings = self._state_shardings()
        fn = self._compiled(
            f"generate:{variant}:{processed}:{scale}:{width}",
            functools.partial(
                device_steps.decode_steps,
                self.cfg,
                self.steps_per_call,
                width,
                variant,
                scale,
                processed,
            ),
            donate_argnums=(3,),
            out_shardings=None if shardings is None else (shardings, replicated(self._mesh)),
            compiler_options=self._decode_options,
        )
        state, data = weights.call(
            params,
            fn,
            params["base"],
            params["lora"],
            params.get("head"),
            decode_state,
            self.book.table.copy(),
            self.book.active.copy(),
        )
        return state, StepResult(data, k)
