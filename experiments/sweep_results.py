"""The results of a sweep's finished runs: one row per run, tables, the mean and sample standard
deviation over seeds, and the plot. Used by run_sweep.py (see its docstring for the files)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Keys that a point's settings fix, whatever its seed: shown as they are, not as mean ± std.
PARAM_KEYS = ("trainable_params", "total_params", "trainable_percent")
# A metrics.jsonl record's own fields, not metrics (`jaxpost.metrics.MetricsWriter.write`).
RECORD_KEYS = ("step", "split", "wall_time")


class ResultsError(Exception):
    """A finished run whose results cannot be read; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Spread:
    """One key over a point's seeds: the mean and the sample standard deviation (ddof=1), which
    is None when a single seed has the key."""

    mean: float
    std: float | None


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a sweep: a point, once per seed when the sweep has seeds."""

    point: str
    seed: int | None
    point_overrides: dict[str, Any]
    overrides: dict[str, Any]  # all of them, in the order they are passed to the trainer
    spec: dict  # what it is launched with, kept in <workdir>/sweep_point.json
    workdir: Path

    @property
    def label(self) -> str:
        return f"point {self.point!r}" + ("" if self.seed is None else f" seed {self.seed}")


def _param_counts(workdir: Path) -> dict[str, int | float]:
    """Trainable (the exported adapter's tensors, or every weight without LoRA), total (the base
    model) and trainable_percent with PEFT's denominator (`print_trainable_parameters`: every
    parameter of the adapted model, the adapter's included), so 100 for full fine-tuning."""
    import jax

    from jaxpost import config as jconfig
    from jaxpost import models

    cfg = jconfig.from_json((workdir / "config.json").read_text())
    model_cfg = jconfig.model_config(cfg)
    shapes = jax.eval_shape(lambda: models.init(model_cfg, jax.random.key(0)))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    adapter = workdir / "export" / "peft_adapter" / "adapter_model.safetensors"
    if adapter.exists():
        from safetensors import safe_open

        with safe_open(adapter, framework="np") as f:
            trainable = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
        percent = 100.0 * trainable / (total + trainable)
    elif not cfg.lora.enabled:
        trainable, percent = total, 100.0
    else:
        raise ResultsError(f"{workdir} trained LoRA but exported no adapter to count parameters")
    return {"trainable_params": trainable, "total_params": total, "trainable_percent": percent}


def collect(workdir: Path) -> dict[str, Any]:
    """Final metrics of one run: summary values, the last logged value per split, counts."""
    summary = json.loads((workdir / "summary.json").read_text())
    row: dict[str, Any] = {
        k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    last: dict[str, tuple[int, float]] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for key, value in record.items():
            if key in RECORD_KEYS or key.endswith("_sum"):
                continue
            name = f"{record['split']}/{key}"
            if name not in last or record["step"] >= last[name][0]:
                last[name] = (record["step"], value)
    row.update({name: value for name, (_, value) in sorted(last.items())})
    row.update(_param_counts(workdir))
    return row


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def by_point(rows: list[dict], settings: Iterable[str]) -> list[dict]:
    """One row per point from its seeds' runs (in the order points first appear): `seeds` (how
    many runs), the `settings` keys as they are, and every other number as a Spread."""
    settings = set(settings) | set(PARAM_KEYS)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["point"], []).append(row)
    out = []
    for point, runs in groups.items():
        keys: list[str] = []
        for run in runs:
            keys += [k for k in run if k not in keys and k not in ("point", "seed")]
        merged: dict[str, Any] = {"point": point, "seeds": len(runs)}
        for key in keys:
            values = [run[key] for run in runs if run.get(key) is not None]
            if not values:
                continue
            if key in settings or not all(_is_number(v) for v in values):
                # A setting is the same in every seed; if not, show each distinct value.
                distinct = list(dict.fromkeys(values))
                merged[key] = distinct[0] if len(distinct) == 1 else ", ".join(map(str, distinct))
            else:
                std = statistics.stdev(values) if len(values) > 1 else None
                merged[key] = Spread(statistics.fmean(values), std)
        out.append(merged)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Spread):
        return _cell(value.mean) + ("" if value.std is None else f" ± {_cell(value.std)}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _markdown(rows: list[dict], columns: dict[str, str], path: Path) -> Path:
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in columns.values()) + " |" for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _keys(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    return keys


def write_tables(
    rows: list[dict],
    columns: dict[str, str] | None,
    out: Path,
    *,
    settings: Iterable[str] | None = None,
) -> list[Path]:
    """results.csv (one row per run, every key) and results.md (`columns`: header -> key;
    default: all keys). With `settings` (the runs are several seeds of each point; the keys the
    points set), results.md has one row per point, numbers as `mean ± std` and a `seeds` column,
    and results_by_seed.md the runs' rows."""
    keys = _keys(rows)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    written = [out / "results.csv"]
    if settings is None:
        return written + [_markdown(rows, columns or {k: k for k in keys}, out / "results.md")]
    run_columns = dict(columns or {k: k for k in keys})
    if "seed" not in run_columns.values():
        run_columns["seed"] = "seed"  # otherwise a point's rows cannot be told apart
    written.append(_markdown(rows, run_columns, out / "results_by_seed.md"))
    points = by_point(rows, settings)
    point_columns = dict(columns or {k: k for k in _keys(points) if k != "seeds"})
    point_columns["seeds"] = "seeds"
    return written + [_markdown(points, point_columns, out / "results.md")]


def _mean(value: Any) -> Any:
    return value.mean if isinstance(value, Spread) else value


def write_plot(rows: list[dict], plot: dict[str, Any], png: Path) -> Path:
    """y against x over the points; a dashed line for `baseline` (e.g. accuracy before). Rows
    from `by_point` are drawn as their means with the standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = plot["x"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    usable = sorted((r for r in rows if r.get(x_key) is not None), key=lambda r: _mean(r[x_key]))
    xs = [_mean(r[x_key]) for r in usable]
    for y_key in plot["y"]:
        ys = [_mean(r.get(y_key, math.nan)) for r in usable]
        errors = [r[y_key].std if isinstance(r.get(y_key), Spread) else None for r in usable]
        if any(e is not None for e in errors):
            yerr = [0.0 if e is None else e for e in errors]
            ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=f"{y_key} (mean ± std)")
        else:
            ax.plot(xs, ys, marker="o", label=y_key)
    if plot.get("baseline") and usable and plot["baseline"] in usable[0]:
        baseline = usable[0][plot["baseline"]]
        label = plot["baseline"] + (" (mean)" if isinstance(baseline, Spread) else "")
        ax.axhline(_mean(baseline), ls="--", color="gray", label=label)
    if plot.get("logx"):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(x_key)
    ax.set_title(plot.get("title", ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def finished_rows(plan: list[Run]) -> tuple[list[dict], list[str]]:
    """The result rows of the runs in `plan` that finished with the settings they would be
    launched with now, and a note for each of the others."""
    rows, absent = [], []
    for run in plan:
        spec_path = run.workdir / "sweep_point.json"
        if not (run.workdir / "summary.json").exists() or not spec_path.exists():
            absent.append(f"{run.label} (not finished)")
        elif json.loads(spec_path.read_text()) != run.spec:
            absent.append(f"{run.label} (run with other settings)")
        else:
            seed = json.loads((run.workdir / "config.json").read_text()).get("seed")
            row = {"point": run.point, **run.point_overrides, "seed": seed}
            rows.append(row | collect(run.workdir))
    return rows, absent


def write_results(
    plan: list[Run],
    columns: dict[str, str] | None,
    plot: dict[str, Any] | None,
    out: Path,
    settings: Iterable[str] | None,
    log,
) -> list[dict]:
    """Tables and plot (if `plot`) from every finished run in `plan`, whenever it ran; returns
    their rows. `settings` as in `write_tables`: None unless there are several seeds."""
    rows, absent = finished_rows(plan)
    said = f"{len(rows)} of {len(plan)} runs finished"
    if absent:
        said += "; absent from the tables: " + ", ".join(absent)
    if not rows:
        log(f"results: {said}; no tables written")
        return rows
    written = write_tables(rows, columns, out, settings=settings)
    if settings is None:
        (out / "results_by_seed.md").unlink(missing_ok=True)  # from an earlier multi-seed run
    if plot:
        plotted = rows if settings is None else by_point(rows, settings)
        written.append(write_plot(plotted, plot, out / "results.png"))
    log(f"results ({said}): " + ", ".join(str(p) for p in written))
    return rows
