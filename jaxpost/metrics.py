"""Metric writers for a training run: stdout, JSONL, TensorBoard, a progress bar and a PNG plot.

Only process 0 writes (the metrics are global means already). One JSONL record per logged step:
`{"step": 12, "split": "train", "wall_time": 1796000000.123, "loss": ..., ...}`, wall_time
being the Unix time the record was written (TensorBoard's events carry it too). TensorBoard
gets one run per split (`<workdir>/tensorboard/<split>/`) with the metric names as tags, so a
stage's train and eval curves share a chart, and a resumed split purges what an earlier attempt
logged past the step it resumes from (each split's own run: the stages' steps overlap).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np


def _scalar(value) -> float | None:
    try:
        out = float(np.asarray(value))
    except (TypeError, ValueError):
        return None
    return out


_writers_opened = itertools.count()


class MetricsWriter:
    """Write scalar metrics to any of stdout, `<workdir>/metrics.jsonl` and TensorBoard events."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        stdout: bool = True,
        jsonl: bool = True,
        tensorboard: bool = True,
        echo=None,
    ):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0
        self.stdout = stdout
        self.echo = echo or (lambda line: print(line, flush=True))
        self._jsonl = None
        self.tensorboard = tensorboard and self.enabled
        self._tb: dict[str, Any] = {}  # split -> its SummaryWriter, opened at its first record
        self._purge: dict[str, int] = {}  # split -> the step its next writer purges from
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl = open(self.workdir / "metrics.jsonl", "a")  # noqa: SIM115

    def _tb_writer(self, split: str):
        if split not in self._tb:
            from tensorboardX import SummaryWriter

            # Event files are named by the second they open in; the suffix keeps a writer
            # reopened within one second from overwriting the last one's file, and sorts after it.
            self._tb[split] = SummaryWriter(
                str(self.workdir / "tensorboard" / split),
                purge_step=self._purge.pop(split, None),
                filename_suffix=f".{os.getpid()}.{next(_writers_opened):04d}",
            )
        return self._tb[split]

    @property
    def jsonl_path(self) -> Path:
        return self.workdir / "metrics.jsonl"

    def write(self, step: int, metrics: Mapping[str, object], split: str = "train") -> None:
        """Log scalars; non-scalar values are ignored."""
        if not self.enabled:
            return
        scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        record = {"step": int(step), "split": split, "wall_time": round(time.time(), 3), **scalars}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self.tensorboard:
            tb = self._tb_writer(split)
            for name, value in scalars.items():
                tb.add_scalar(name, value, int(step))
            tb.flush()
        if self.stdout:
            # Sums are for exact aggregation (JSONL); the console shows the means.
            shown = {k: v for k, v in scalars.items() if not k.endswith("_sum")}
            body = "  ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
            self.echo(f"[{split}] step {step}: {body}")

    def forget_after(self, step: int, splits: Iterable[str]) -> int:
        """Drop the records of `splits` logged after `step`: those of an attempt that died past
        its last checkpoint, which the resumed run logs again (each step once in the file).
        A JSONL line cut short by the kill goes too; each split's TensorBoard run gets a purge
        from step + 1 (TensorBoard then hides the earlier attempt's later events). Returns how
        many JSONL lines were dropped."""
        if not self.enabled:
            return 0
        splits = set(splits)
        if self.tensorboard:
            for split in splits:
                if split in self._tb:  # (a writer purges only when it opens)
                    self._tb.pop(split).close()
                self._purge[split] = int(step) + 1
                if (self.workdir / "tensorboard" / split).is_dir():
                    self._tb_writer(split)  # purge now: the split may log nothing more
        if self._jsonl is None:
            return 0

        def stale(line: str) -> bool:
            try:
                record = json.loads(line)
            except ValueError:
                return True
            return record.get("split") in splits and record.get("step", 0) > step

        path = self.jsonl_path.resolve()  # a symlinked file is rewritten where it points
        lines = path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if not stale(line)]
        if len(keep) < len(lines):
            self._jsonl.close()
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line if line.endswith("\n") else line + "\n" for line in keep))
            os.replace(tmp, path)
            self._jsonl = open(self.jsonl_path, "a")  # noqa: SIM115
        return len(lines) - len(keep)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for tb in self._tb.values():
            tb.close()
        self._tb.clear()


def _fmt(v: float) -> str:
    if v == 0 or (1e-3 <= abs(v) < 1e5):
        return f"{v:.4g}"
    return f"{v:.3e}"


class Progress:
    """A tqdm bar over training steps with ETA, steps/s and tokens/s (process 0 only)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self._bar = None
        self._t0 = time.perf_counter()
        self._tokens = 0
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=1.0,
            )

    def update(self, tokens: int, loss: float | None = None) -> None:
        self._tokens += tokens
        if self._bar is None:
            return
        rate = self._tokens / max(time.perf_counter() - self._t0, 1e-9)
        postfix = {"tok/s": f"{rate:.0f}"}
        if loss is not None and math.isfinite(loss):
            postfix["loss"] = f"{loss:.4f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    @property
    def tokens_per_second(self) -> float:
        return self._tokens / max(time.perf_counter() - self._t0, 1e-9)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(jsonl_path: str | Path, png_path: str | Path, names=("loss", "accuracy")) -> Path:
    """One panel per metric in `names` found in the JSONL, a line per split; returns png_path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(jsonl_path)
    present = [n for n in names if any(n in r for r in records)]
    if not present:
        raise ValueError(f"{jsonl_path} has no metric among {names} to plot")
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.5), squeeze=False)
    for ax, name in zip(axes[0], present):
        for split in sorted({r["split"] for r in records if name in r}):
            # A resumed run appends; the last record of each step is the one that stands.
            by_step = {r["step"]: r[name] for r in records if r["split"] == split and name in r}
            steps = sorted(by_step)
            ax.plot(
                steps,
                [by_step[s] for s in steps],
                marker="." if len(steps) < 30 else None,
                label=split,
            )
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
