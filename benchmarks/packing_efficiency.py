"""Packing efficiency (real tokens / row slots) of the pipeline's streaming best-fit packer by
the number of rows it keeps open, against grain's first-fit and best-fit packers (which emit
every open row once an example does not fit) and best-fit-decreasing over the whole set (TRL's
"bfd"), with the packer's own speed.

    python benchmarks/packing_efficiency.py [--examples 2000] [--bins 16,64,256]

Two length distributions: uniform from 2 to the row length (256), and lognormal (median ~90,
clipped to 512, the shape of typical SFT sets). No model, no accelerator; seconds to run.
"""

from __future__ import annotations

import argparse
import time

import grain
import numpy as np

from jaxpost.data import packing


def streaming(packer: str, lengths: np.ndarray, row: int, bins: int) -> tuple[float, float]:
    """(fraction of slots filled, examples packed per second) of one streaming packer."""
    examples = [
        {
            k: np.ones(n, np.float32 if k == "loss_mask" else np.int32)
            for k in packing.SEQUENCE_FEATURES
        }
        for n in lengths
    ]
    ds = grain.MapDataset.source(examples).to_iter_dataset()
    if packer == "jaxpost":
        packed = packing.pack(ds, row, pad_id=0, num_packing_bins=bins)
    else:
        cls = getattr(grain.experimental, f"{packer}PackIterDataset")
        features = packing.SEQUENCE_FEATURES
        packed = cls(ds, length_struct=dict.fromkeys(features, row), num_packing_bins=bins)
    start = time.perf_counter()
    rows = list(packed)
    speed = len(lengths) / (time.perf_counter() - start)
    return float(lengths.sum()) / (len(rows) * row), speed


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
    parser.add_argument("--bins", default="16,64,256")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sets = {
        "uniform 2..256": (rng.integers(2, 257, args.examples), 256),
        "lognormal": (np.clip(rng.lognormal(4.5, 0.8, args.examples).astype(int), 2, 512), 512),
    }
    bins = [int(b) for b in args.bins.split(",")]
    print("| lengths | open rows | jaxpost best fit | grain FirstFit | grain BestFit | BFD |")
    print("|---|---|---|---|---|---|")
    for name, (lengths, row) in sets.items():
        bfd = f"{best_fit_decreasing(lengths, row):.1%}"
        for b in bins:
            cells = []
            for packer in ("jaxpost", "FirstFit", "BestFit"):
                fill, speed = streaming(packer, lengths, row, b)
                cells.append(f"{fill:.1%} ({speed:,.0f} ex/s)")
            print(f"| {name} | {b} | " + " | ".join(cells) + f" | {bfd} |")


if __name__ == "__main__":
    main()
