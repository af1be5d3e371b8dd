"""The paged KV cache (device side); its pages are handed out by `page_allocator` (host side).

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
The allocators and the engine's per-slot bookkeeping are in `page_allocator`.
"""

from __future__ import annotations

import dataclasses

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
