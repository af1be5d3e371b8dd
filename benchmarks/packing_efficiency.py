"""Packing efficiency (real tokens / row slots) of the pipeline's first-fit packer by the number
of rows it fills at once, against best-fit-decreasing over the whole set (TRL's "bfd").

    python benchmarks/packing_efficiency.py [--examples 2000] [--bins 8,16,32,64,128,256]

Two length distributions: uniform from 2 to the row length (256), and lognormal (median ~90,
clipped to 512, the shape of typical SFT sets). No model, no accelerator; seconds to run.
"""

from __future__ import annotations

import argparse

import grain
import numpy as np

from jaxpost.data import packing


def first_fit(lengths: np.ndarray, row: int, bins: int) -> float:
    examples = [
        {
            k: np.ones(n, np.float32 if k == "loss_mask" else np.int32)
            for k in packing.SEQUENCE_FEATURES
        }
        for n in lengths
    ]
    ds = grain.MapDataset.source(examples).to_iter_dataset()
    rows = list(packing.pack(ds, row, pad_id=0, num_packing_bins=bins))
    return float(lengths.sum()) / (len(rows) * row)


def best_fit_decreasing(lengths: np.ndarray, row: int) -> float:
    free: list[int] = []
    for n in sorted(lengths.tolist(), reverse=True):
        fits = [i for i, f in enumerate(free) if f >= n]
        if fits:
            i = min(fits, key=lambda i: free[i])
            free[i] -= n
        else:
            free.append(row - n)
    return float(lengths.sum()) / (len(free) * row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--bins", default="8,16,32,64,128,256")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sets = {
        "uniform 2..256": (rng.integers(2, 257, args.examples), 256),
        "lognormal": (np.clip(rng.lognormal(4.5, 0.8, args.examples).astype(int), 2, 512), 512),
    }
    bins = [int(b) for b in args.bins.split(",")]
    print("| lengths | " + " | ".join(f"first-fit, {b} rows" for b in bins) + " | BFD |")
    print("|---" * (len(bins) + 2) + "|")
    for name, (lengths, row) in sets.items():
        cells = [f"{first_fit(lengths, row, b):.1%}" for b in bins]
        cells.append(f"{best_fit_decreasing(lengths, row):.1%}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
