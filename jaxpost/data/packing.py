"""Packing several examples into one row (segment ids, positions) or padding one per row.

Both produce rows of the train-step batch format, length T = max_length:
  tokens [T] int32, targets [T] int32, loss_mask [T] float32,
  segment_ids [T] int32 (1.. per example in the row, 0 = padding),
  positions [T] int32 (restarting at 0 for each example; 0 on padding).
Packing is grain's first-fit packer (`grain.experimental.FirstFitPackIterDataset`), whose state
is part of the iterator's checkpointable state.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

SEQUENCE_FEATURES = ("tokens", "targets", "loss_mask")


def _padding(pad_id: int, prefix: str = "") -> dict:
    return {f"{prefix}tokens": pad_id, f"{prefix}targets": pad_id, f"{prefix}loss_mask": 0.0}


def pack(
    ds: grain.IterDataset,
    seq_len: int,
    *,
    pad_id: int,
    num_packing_bins: int,
    seed: int = 0,
    shuffle_bins: bool = True,
) -> grain.IterDataset:
    """Sequence examples (each no longer than seq_len) -> packed rows of length seq_len."""
    packed = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={k: seq_len for k in SEQUENCE_FEATURES},
        num_packing_bins=num_packing_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
        padding_struct=_padding(pad_id),
    )
    return packed.map(_rename_packed)


def _rename_packed(row: dict) -> dict:
    # The packer emits <feature>_segment_ids / <feature>_positions for every feature; they agree.
    out = {k: row[k] for k in SEQUENCE_FEATURES}
    out["segment_ids"] = row["tokens_segment_ids"].astype(np.int32)
    out["positions"] = row["tokens_positions"].astype(np.int32)
    return out


def pad_example(example: dict, seq_len: int, pad_id: int, prefix: str = "") -> dict:
    """One sequence example (features under `prefix`) -> one padded row of length seq_len."""
    n = len(example[f"{prefix}tokens"])
    if n > seq_len:
        raise ValueError(f"example of {n} tokens does not fit in a row of {seq_len}")
    out = {}
    for k, fill in _padding(pad_id, prefix).items():
        v = example[k]
        row = np.full((seq_len,), fill, v.dtype)
        row[:n] = v
        out[k] = row
    out[f"{prefix}segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    out[f"{prefix}positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(
        np.int32
    )
    return out


def pad(
    ds: grain.IterDataset, seq_len: int, *, pad_id: int, prefixes: Sequence[str] = ("",)
) -> grain.IterDataset:
    """One example per row, right-padded to seq_len (for each side `prefix` of the example)."""

    def fn(example: dict) -> dict:
        out = {}
        for p in prefixes:
            out.update(pad_example(example, seq_len, pad_id, p))
        return out

    return ds.map(fn)


def packing_efficiency(batch: dict, prefix: str = "") -> float:
    """Non-pad fraction of a batch's token slots (segment_ids > 0)."""
    seg = np.asarray(batch[f"{prefix}segment_ids"])
    return float(np.count_nonzero(seg)) / max(seg.size, 1)


class PackingStats:
    """Running counts over the batches an iterator produced; `as_dict()` is ready to log."""

    def __init__(self):
        self.slots = 0  # token positions produced (rows x length)
        self.real = 0  # non-pad positions
        self.trained = 0  # positions with loss_mask > 0
        self.examples = 0
        self.rows = 0

    def update(self, batch: dict, prefix: str = "") -> None:
        seg = np.asarray(batch[f"{prefix}segment_ids"])
        self.slots += seg.size
        self.real += int(np.count_nonzero(seg))
        self.trained += int(np.count_nonzero(np.asarray(batch[f"{prefix}loss_mask"])))
        self.examples += int(seg.max(axis=-1).sum()) if seg.size else 0
        self.rows += seg.shape[0] if seg.ndim == 2 else 1

    @property
    def efficiency(self) -> float:
        return self.real / self.slots if self.slots else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "packing_efficiency": self.efficiency,
            "trained_token_fraction": self.trained / self.slots if self.slots else 0.0,
            "examples_per_row": self.examples / self.rows if self.rows else 0.0,
        }
