"""Host-side page bookkeeping: which pages of the pool (`paged_cache`) each decode slot holds.

Both allocators are plain Python bookkeeping: per-slot page lists (and, for the free list, a
holder count per page), so memory in use is the pages covering live tokens (a page shared by
the samples of one prompt counts once), and a page is free again when its last holder retires.
`SlotBook` is the engine's record of its slots on top of an allocator: page-table rows, length
bounds, limits and admission.
"""

from __future__ import annotations

import math
import weakref

import numpy as np

from jaxpost.rollout.paged_cache import SCRATCH_PAGE


class PagesExhausted(RuntimeError):
    """Raised by `PageAllocator.grow` when the free list cannot cover a request."""


class SlotPages:
    """What both allocators share: the pages each slot holds, in table order, and the limit of
    max_pages_per_slot. Subclasses decide which pages a slot gets (`grow`, `share`, `release`,
    `returned_on_release`, `table_row`) and how many are free (`capacity`, `num_free`,
    `num_used`)."""

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

    def returned_on_release(self, slot: int) -> int:
        """How many pages `release(slot)` would return: those no other slot holds."""
        return sum(self._holders[page] == 1 for page in self.slot_pages[slot])

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

    def pages(self, prefix, releasing: int | None = None) -> list[int]:
        """The pages to share for `prefix` ([] if no live slot holds them, or only the slot
        `releasing`)."""
        entry = self._entries.get(id(prefix))
        if entry is None or entry[0]() is not prefix or entry[2] <= {releasing}:
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

    def returned_on_release(self, slot: int) -> int:
        return len(self.slot_pages[slot])

    def release(self, slot: int) -> int:
        returned = len(self.slot_pages[slot])
        self.slot_pages[slot] = []
        return returned

    def table_row(self, slot: int) -> list[int]:
        """The slot's whole region, held or not: every write of the slot stays in its region."""
        return self.region(slot)


class SlotBook:
    """The engine's host-side record of its decode slots: the pages each holds (an allocator),
    its page-table row, an upper bound of its cache length and its token limit (prompt +
    max_new_tokens).

    A slot is admitted only if the free pages cover every live slot's remaining growth up to
    its limit, so generation never runs out of pages midway; but pages are only taken as tokens
    arrive (`advance`), so memory in use follows the live tokens.

    num_pages: None, slot regions (`SlotRegionAllocator`, each slot its own max_len of pages);
    an int, a free-list pool of that many pages, scratch page included (`PageAllocator`).
    share_prompt_pages: slots admitted from the same prefix share its full pages
    (`PromptPageIndex`; default: with a free list). True with num_pages=None gives a full-size
    free list.
    """

    def __init__(
        self,
        slots: int,
        max_len: int,
        page_size: int,
        num_pages: int | None = None,
        share_prompt_pages: bool | None = None,
    ):
        self.max_len = max_len
        self.page_size = page_size
        self.max_pages_per_slot = -(-max_len // page_size)
        self.slot_regions = num_pages is None and not share_prompt_pages
        if self.slot_regions:
            self.allocator = SlotRegionAllocator(page_size, slots, self.max_pages_per_slot)
        else:
            full = slots * self.max_pages_per_slot + 1  # every slot at max_len, plus scratch
            self.allocator = PageAllocator(
                num_pages or full, page_size, slots, self.max_pages_per_slot
            )
        if share_prompt_pages is None:
            share_prompt_pages = not self.slot_regions
        self.share_prompt_pages = share_prompt_pages
        self.table = np.array([self.allocator.table_row(s) for s in range(slots)], np.int32)
        self.active = np.zeros((slots,), bool)
        self.len_bound = np.zeros((slots,), np.int64)  # >= the slot's cache length
        self.limit = np.zeros((slots,), np.int64)  # prompt + max_new_tokens, at most max_len
        self.prompt_pages = PromptPageIndex()

    def can_admit(self, total_tokens: int, prefix=None) -> bool:
        """Whether a sequence of up to total_tokens tokens fits the unreserved pages. With
        `prefix`, its pages that a live slot already holds are shared, not needed again."""
        need, unreserved, _ = self._admission(total_tokens, prefix)
        return need <= unreserved

    def _admission(self, total_tokens: int, prefix, releasing: int | None = None):
        """(pages needed, unreserved pages, pages to share) for a sequence of up to
        total_tokens tokens from `prefix`, counted as if slot `releasing` had been released."""
        shared = self._shareable_pages(prefix, releasing)
        need = self.allocator.pages_for(min(total_tokens, self.max_len)) - len(shared)
        return need, self.unreserved_pages(releasing), shared

    def unreserved_pages(self, releasing: int | None = None) -> int:
        """Free pages not promised to a live slot's growth up to its limit; with `releasing`,
        as they would be once that slot's pages went back."""
        pending = sum(
            self.allocator.pages_for(int(self.limit[s])) - len(self.allocator.slot_pages[s])
            for s in np.flatnonzero(self.active)
            if s != releasing
        )
        returned = 0 if releasing is None else self.allocator.returned_on_release(releasing)
        return self.allocator.num_free + returned - pending

    def _shareable_pages(self, prefix, releasing: int | None = None) -> list[int]:
        """The full pages of `prefix` that a live slot (other than `releasing`) holds ([] if
        none or sharing is off)."""
        if prefix is None or not self.share_prompt_pages:
            return []
        return self.prompt_pages.pages(prefix, releasing)

    def admit(self, slot: int, prefix, max_new_tokens: int) -> int:
        """Start `slot` on `prefix` (its true_length prompt tokens) with up to max_new_tokens
        more: release what the slot held, map the prefix's pages a live slot holds, take pages
        for the rest of the prompt. Returns the slot's limit. Raises if the pool cannot
        reserve the slot's growth (the rule of `can_admit`), before touching anything, so a
        live sequence in `slot` keeps its pages and goes on decoding."""
        n = prefix.true_length
        limit = min(n + max_new_tokens, self.max_len)
        # Checked against the pool as it will be once the slot's pages are back.
        need, unreserved, shared = self._admission(limit, prefix, releasing=slot)
        if need > unreserved:
            raise RuntimeError(
                f"page pool exhausted: slot {slot} needs {need} pages, {unreserved} unreserved"
            )
        self.release(slot)
        self.allocator.share(slot, shared)
        self.allocator.grow(slot, n)
        self.table[slot] = self.allocator.table_row(slot)
        if self.share_prompt_pages and n >= self.page_size:
            full_pages = self.allocator.slot_pages[slot][: n // self.page_size]
            self.prompt_pages.add(prefix, slot, full_pages)
        self.active[slot], self.len_bound[slot], self.limit[slot] = True, n, limit
        return limit

    def release(self, slot: int) -> None:
        """The slot retired: its pages go back to the pool, its row to scratch (or its region)."""
        self.allocator.release(slot)
        self.prompt_pages.discard(slot)
        self.table[slot] = self.allocator.table_row(slot)
        self.active[slot] = False
        self.len_bound[slot] = self.limit[slot] = 0

    def advance(self, steps: int) -> int:
        """Take pages for `steps` more tokens in every live slot (up to its limit), ahead of a
        decode call of that many steps; the host never waits for the device to learn the true
        lengths. Returns the longest live length bound (1 if no slot is live)."""
        live = np.flatnonzero(self.active)
        for slot in live:
            bound = min(int(self.len_bound[slot]) + steps, int(self.limit[slot]))
            if self.allocator.grow(slot, bound):
                self.table[slot] = self.allocator.table_row(slot)
            self.len_bound[slot] = bound
        return int(self.len_bound[live].max(initial=1))
