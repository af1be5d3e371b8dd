"""The paged KV cache (device side) and its page allocator (host side).

Device layout, as documented in `jaxpost.kernels.paged_attention` with a leading layer axis:
  k_pages, v_pages: [L, KVH, P, S, D]   P pages of S tokens, shared by every decode slot
  page_table:       [B, M] int32        slot b's pages in order (M = max pages per slot)
  lengths:          [B] int32           valid tokens in slot b, including those being written
Two ways to hand out the pool's pages, each with its host-side allocator:
  free list     (`PageAllocator`) any free page to any slot, so a pool smaller than slots x
                max_len serves more slots than dense memory would, and the samples of one
                prompt can share its pages. Page 0 is a scratch page that is never handed out:
                idle and finished slots (length 0) write to it, so their writes land somewhere
                harmless and never on a page another slot holds.
  slot regions  (`SlotRegionAllocator`) a pool of exactly B x M pages, slot b's pages being
                region b (pages b*M .. b*M + M-1) in order. No page is shared, so there is no
                scratch page: an idle slot writes into its own region. Decode attention reads
                the pool in place as a dense [KVH, B, M*S, D] sequence instead of gathering each
                slot's pages (`kernels.paged_attention.reference`), which on CPU saves a copy of
                every live key and value per layer and step.
On CPU a 16-bit float pool is stored as its uint16 bits (`bits_dtype`, `kv_cache.store`): XLA:CPU
would otherwise copy every pool to uint16 and back around each step's write: a quarter of the
step's op time at the 50M benchmark shapes (bfloat16, batch 16).
Both allocators are plain Python bookkeeping: per-slot page lists (and, for the free list, a
holder count per page), so memory in use is the pages covering live tokens (a page shared by
the samples of one prompt counts once), and a page is free again when its last holder retires.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import jax
import jax.numpy as jnp

from jaxpost.kernels.paged_attention import paged_attention
from jaxpost.models.attention import attention
from jaxpost.models.config import ModelConfig
from jaxpost.models.kv_cache import layer_array, load, make_layers, store, stored_dtype

SCRATCH_PAGE = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    """Implements the cache protocol of `jaxpost.models.kv_cache` over pages (see module doc)."""

    k_pages: jax.Array | None
    v_pages: jax.Array | None
    page_table: jax.Array | None  # None while stored in a DecodeState (the host holds it)
    lengths: jax.Array
    impl: str = dataclasses.field(default="auto", metadata=dict(static=True))
    slot_regions: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # None: the pools hold their values. A 16-bit float dtype's name: they hold its bits (uint16).
    bits_dtype: str | None = dataclasses.field(default=None, metadata=dict(static=True))

    LAYER_FIELDS = ("k_pages", "v_pages")

    @classmethod
    def create(
        cls,
        cfg: ModelConfig,
        num_pages: int,
        page_size: int,
        slots: int,
        dtype=None,
        per_layer: bool | None = None,
        slot_regions: bool = False,
        as_bits: bool = False,
    ) -> PagedKVCache:
        """Zero pools and lengths, no page table: the host's table is set per call (see
        `rollout.Engine`). per_layer: the layout of `jaxpost.models.kv_cache` (default: iff
        not scan_layers). slot_regions: the pool is slots regions; as_bits: a 16-bit float
        pool is stored as its bits (module docstring)."""
        if slot_regions and num_pages % slots:
            raise ValueError(f"slot_regions: {num_pages} pages do not split into {slots} slots")
        stored, bits_dtype = stored_dtype(dtype or cfg.dtype, as_bits)
        per_layer = (not cfg.scan_layers) if per_layer is None else per_layer
        shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
        return cls(
            k_pages=make_layers(shape, stored, cfg.num_layers, per_layer),
            v_pages=make_layers(shape, stored, cfg.num_layers, per_layer),
            page_table=None,
            lengths=jnp.zeros((slots,), jnp.int32),
            impl=cfg.attention_impl,
            slot_regions=slot_regions,
            bits_dtype=bits_dtype,
        )

    @property
    def page_size(self) -> int:
        return self.k_pages[0].shape[-2]

    def update_and_attend(
        self, layers: dict, layer, q, k, v, positions, *, sliding_window, softcap, scale
    ):
        """Write k/v [B, T, KVH, D] at `positions` [B, T] through the page table, then attend.

        layers / layer: the page pools in either layout of `jaxpost.models.kv_cache`.
        T == 1 is decode: attention over the slot's pages (`paged_attention`; read in place
        when the pool is in slot regions and the table has all M columns). T > 1 is the
        prefill of a fresh prompt at positions 0..T-1: it attends within the given tokens, as in
        training, and only stores k/v. Slots with length 0 write to the scratch page, or, in
        slot regions, to their own first page (position -1: its last offset), which nobody
        reads: the slot is idle or finished. Returns ([B, T, H, D], new layer arrays).
        """
        kp, vp = layers["k_pages"], layers["v_pages"]
        num_pages, page_size = kp.shape[-3:-1]  # [(L,) KVH, P, S, D]
        b, t = positions.shape
        rows = jnp.arange(b)[:, None]
        page_idx = jnp.clip(positions // page_size, 0, self.page_table.shape[1] - 1)
        pages = self.page_table[rows, page_idx]
        if not self.slot_regions:  # a finished slot's row may hold pages other slots share
            pages = jnp.where((self.lengths > 0)[:, None], pages, SCRATCH_PAGE)
        offsets = positions % page_size
        kp, vp = (
            _write_pages(kp, layer, pages, offsets, k, self.bits_dtype),
            _write_pages(vp, layer, pages, offsets, v, self.bits_dtype),
        )
        if t == 1:
            out = paged_attention(
                q[:, 0],
                load(layer_array(kp, layer), self.bits_dtype),
                load(layer_array(vp, layer), self.bits_dtype),
                self.lengths,
                self.page_table,
                sliding_window=sliding_window,
                softcap=softcap,
                scale=scale,
                impl=self.impl,
                slot_regions=reads_in_place(
                    self.slot_regions,
                    b,
                    self.page_table.shape[1],
                    num_pages // b,
                    self.bits_dtype or kp.dtype,
                ),
            )[:, None]
        else:
            out = attention(
                q,
                k,
                v,
                None,
                causal=True,
                sliding_window=sliding_window,
                softcap=softcap,
                scale=scale,
                impl=self.impl,
            )
        return out, {"k_pages": kp, "v_pages": vp}


def reads_in_place(slot_regions: bool, slots: int, columns: int, max_pages: int, dtype) -> bool:
    """Whether decode attention reads the pool in place (`kernels.paged_attention.reference`'s
    slot_regions) rather than gathering the table's pages: a float32 pool in slot regions, a
    table of all M columns, and more than one slot. Measured on CPU (rollout benchmark models,
    batch-16 decode): float32 gained 1.03-1.16x tokens/s; a bfloat16 pool did not (1.00-1.02x
    stored as bits, 0.89-0.95x before): XLA:CPU copies the whole view for the matmul, as the
    gather copies the live pages. At one slot XLA:CPU copied every whole pool around the
    in-place read in each step (the write is then a dynamic-update-slice), 7-10% slower than
    gathering."""
    float32 = jnp.dtype(dtype) == jnp.float32
    return slot_regions and float32 and slots > 1 and columns == max_pages


def _write_pages(pool, layer, pages, offsets, values, bits_dtype):
    """pool[(layer,) :, pages, offsets] = values [B, T, KVH, D] (pool [(L,) KVH, P, S, D])."""
    if layer is None:
        # Adjacent advanced indices keep their place: the target is [KVH, B, T, D].
        index, values = (slice(None), pages, offsets), jnp.moveaxis(values, 2, 0)
    else:
        # `layer` and (pages, offsets) are separated by a slice: NumPy rules put the broadcast
        # index dims first, so the target is [B, T, KVH, D].
        index = (layer, slice(None), pages, offsets)
    return store(pool, index, values, bits_dtype)


class PagesExhausted(RuntimeError):
    """Raised by `PageAllocator.grow` when the free list cannot cover a request."""


class SlotPages:
    """What both allocators share: the pages each slot holds, in table order, and the limit of
    max_pages_per_slot. Subclasses decide which pages a slot gets (`grow`, `share`, `release`,
    `table_row`) and how many are free (`capacity`, `num_free`, `num_used`)."""

    def __init__(self, num_pages: int, page_size: int, slots: int, max_pages_per_slot: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self.max_pages_per_slot = max_pages_per_slot
        self.slot_pages: list[list[int]] = [[] for _ in range(slots)]

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def _pages_within_limit(self, slot: int, tokens: int) -> int:
        want = self.pages_for(tokens)
        if want > self.max_pages_per_slot:
            raise PagesExhausted(
                f"slot {slot} needs {want} pages for {tokens} tokens; a slot holds at most "
                f"{self.max_pages_per_slot} (raise max_len)"
            )
        return want


class PageAllocator(SlotPages):
    """Free list of page ids 1..num_pages-1 (0 is scratch) and the pages each slot holds.

    A page may be held by several slots (`share`: the full prompt pages of the n samples of one
    prompt); it returns to the free list when its last holder releases it.
    """

    def __init__(self, num_pages: int, page_size: int, slots: int, max_pages_per_slot: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: need at least 2 (page 0 is scratch)")
        super().__init__(num_pages, page_size, slots, max_pages_per_slot)
        # Pop from the end: low page ids are handed out first, which keeps tests readable.
        self._free = list(range(num_pages - 1, 0, -1))
        self._holders = [0] * num_pages  # slots holding each page

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages that can be handed out: all but the scratch page."""
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        """Distinct pages held by some slot (a shared page counts once)."""
        return self.capacity - len(self._free)

    def can_grow(self, slot: int, tokens: int) -> bool:
        need = self.pages_for(tokens) - len(self.slot_pages[slot])
        return need <= self.num_free and self.pages_for(tokens) <= self.max_pages_per_slot

    def grow(self, slot: int, tokens: int) -> bool:
        """Make slot hold pages for `tokens` tokens. Returns whether its page list changed."""
        want = self._pages_within_limit(slot, tokens)
        have = self.slot_pages[slot]
        need = want - len(have)
        if need <= 0:
            return False
        if need > len(self._free):
            raise PagesExhausted(f"slot {slot} needs {need} more pages, {len(self._free)} are free")
        for _ in range(need):
            page = self._free.pop()
            self._holders[page] = 1
            have.append(page)
        return True

    def share(self, slot: int, pages: list[int]) -> None:
        """Let an empty slot start with `pages`, which other slots hold (no copy, no new page)."""
        if self.slot_pages[slot]:
            raise ValueError(f"slot {slot} already holds pages; share into an empty slot")
        if len(pages) > self.max_pages_per_slot:
            raise PagesExhausted(
                f"slot {slot} cannot share {len(pages)} pages; a slot holds at most "
                f"{self.max_pages_per_slot}"
            )
        for page in pages:
            if page == SCRATCH_PAGE or self._holders[page] == 0:
                raise ValueError(f"page {page} is not held by any slot; only held pages are shared")
            self._holders[page] += 1
        self.slot_pages[slot] = list(pages)

    def release(self, slot: int) -> int:
        """Drop the slot's pages; those no other slot holds return to the free list. Returns
        how many pages returned."""
        returned = []
        for page in self.slot_pages[slot]:
            self._holders[page] -= 1
            if self._holders[page] == 0:
                returned.append(page)
        self._free.extend(reversed(returned))
        self.slot_pages[slot] = []
        return len(returned)

    def table_row(self, slot: int) -> list[int]:
        """The slot's page-table row, padded with the scratch page to max_pages_per_slot."""
        pages = self.slot_pages[slot]
        return pages + [SCRATCH_PAGE] * (self.max_pages_per_slot - len(pages))


class PromptPageIndex:
    """The full prompt pages of each prefix that live slots hold, so the prefix's other samples
    map the same pages (`PageAllocator.share`) instead of copying the prompt again.

    Only full pages are shared: decoding writes at positions past the prompt, never into a full
    prompt page, so shared pages stay read-only. The engine's insert still writes every prompt
    position, shared pages included, with the values they already hold (the same prefix), so
    sharing needs no device-side change. Prefixes are keyed by identity; a weak reference tells
    a live prefix from a dead one whose id was reused.
    """

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, list[int], set[int]]] = {}

    def __len__(self) -> int:
        """Prefixes whose pages some live slot holds."""
        return len(self._entries)

    def pages(self, prefix) -> list[int]:
        """The pages to share for `prefix` ([] if no live slot holds them)."""
        entry = self._entries.get(id(prefix))
        if entry is None or entry[0]() is not prefix:
            return []
        return entry[1]

    def add(self, prefix, slot: int, pages: list[int]) -> None:
        """Record that `slot` holds `pages`, the full prompt pages of `prefix`."""
        entry = self._entries.get(id(prefix))
        if entry is None or entry[0]() is not prefix:
            entry = self._entries[id(prefix)] = (weakref.ref(prefix), list(pages), set())
        entry[2].add(slot)

    def discard(self, slot: int) -> None:
        """The slot retired. A prefix no live slot holds is forgotten: its pages may be free."""
        for key, (_, _, holders) in list(self._entries.items()):
            holders.discard(slot)
            if not holders:
                del self._entries[key]


class SlotRegionAllocator(SlotPages):
    """Slot b's pages are region b of the pool, pages b*M .. b*M + M-1, taken in order (module
    docstring). The pool is exactly slots x M pages, no scratch page; pages are not shared.

    Same bookkeeping surface as `PageAllocator`: pages are held as tokens arrive and counted in
    num_used, so memory in use still reads as the pages covering live tokens.
    """

    def __init__(self, page_size: int, slots: int, max_pages_per_slot: int):
        super().__init__(slots * max_pages_per_slot, page_size, slots, max_pages_per_slot)

    @property
    def capacity(self) -> int:
        return self.num_pages

    @property
    def num_free(self) -> int:
        return self.capacity - self.num_used

    @property
    def num_used(self) -> int:
        return sum(len(pages) for pages in self.slot_pages)

    def region(self, slot: int) -> list[int]:
        first = slot * self.max_pages_per_slot
        return list(range(first, first + self.max_pages_per_slot))

    def can_grow(self, slot: int, tokens: int) -> bool:
        return self.pages_for(tokens) <= self.max_pages_per_slot

    def grow(self, slot: int, tokens: int) -> bool:
        want = self._pages_within_limit(slot, tokens)
        if want <= len(self.slot_pages[slot]):
            return False
        self.slot_pages[slot] = self.region(slot)[:want]
        return True

    def share(self, slot: int, pages: list[int]) -> None:
        if pages:
            raise ValueError("slot regions share no pages; use a free-list PageAllocator")

    def release(self, slot: int) -> int:
        returned = len(self.slot_pages[slot])
        self.slot_pages[slot] = []
        return returned

    def table_row(self, slot: int) -> list[int]:
        """The slot's whole region, held or not: every write of the slot stays in its region."""
        return self.region(slot)
