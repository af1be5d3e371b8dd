"""Run a sweep of `python -m jaxpost.train` runs and tabulate / plot their final metrics.

  python experiments/run_sweep.py experiments/lora_rank_sweep.py [--out DIR] [--base SPEC]
      [--set key=value ...] [--only name,name]

A sweep definition is a Python file with:
  NAME = "lora_rank_sweep"                      # default output directory experiments/results/NAME
  BASE = "configs/quickstart.py"                # the --config spec every point starts from
  OVERRIDES = {"lora.alpha": 32.0}              # --config.key=value for every point
  POINTS = [("rank1", {"lora.rank": 1}), ...]   # named override dicts, run in this order
  SHARE_PRETRAIN = True                         # optional: one pretraining for all points
  COLUMNS = {"rank": "lora.rank", ...}          # optional: markdown header -> result key
  PLOT = {"x": "lora.rank", "y": ["accuracy_after"], "logx": True, "baseline": "accuracy_before"}

Each point trains in `<out>/runs/<name>` (its log in `train.log`). The runner is resumable: a
point whose `summary.json` exists is not run again, and an interrupted point resumes from its
own checkpoints. A SIGTERM to the sweep is passed on to the running trainer, which saves and
exits (exit code 143). A point that fails is reported and the sweep goes on; the tables hold
the points that finished and the exit code is 1.

With SHARE_PRETRAIN the points may only override keys the pretraining stage does not read
(`lora.*`, `optimizer.learning_rate`, `train.steps`, `export.*`), so every point's pretraining
would be the same deterministic computation; it runs once and its final checkpoint is copied
into the other points' work directories, whose pretrain stage then resumes at its last step.

Results: `<out>/results.csv` (every override and final metric), `<out>/results.md` (COLUMNS)
and `<out>/results.png` (PLOT). Result keys: the point's overrides ("lora.rank"), its "seed",
the run's summary ("accuracy_before", "accuracy_after", "seconds"), the last logged value of
each metric per split ("sft/loss", "sft_eval/accuracy"), "trainable_params", "total_params" and
"trainable_percent".
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import math
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHAREABLE = ("lora.", "export.", "optimizer.learning_rate", "train.steps")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class SweepError(Exception):
    """A sweep definition, override or run that cannot proceed; the message says why."""


class PointFailed(SweepError):
    """One point's run failed; the sweep goes on with the others and reports it at the end."""


class SweepStopped(SweepError):
    """The sweep was sent SIGTERM: its running point saved a checkpoint and stopped."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    base: str
    overrides: dict[str, Any]
    points: list[tuple[str, dict[str, Any]]]
    share_pretrain: bool = False
    columns: dict[str, str] | None = None
    plot: dict[str, Any] | None = None


def load_definition(path: str | Path) -> Sweep:
    """Import a sweep definition file and check its fields (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep definition {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [k for k in ("BASE", "POINTS") if not hasattr(module, k)]
    if missing:
        raise SweepError(f"sweep definition {path} does not define {', '.join(missing)}")
    points = [(str(n), dict(o)) for n, o in module.POINTS]
    names = [n for n, _ in points]
    bad = [n for n in names if not _NAME_RE.match(n)]
    if bad:
        raise SweepError(f"{path}: point names {bad} must match {_NAME_RE.pattern} (directories)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"{path}: point names {dupes} appear more than once")
    sweep = Sweep(
        name=getattr(module, "NAME", path.stem),
        base=module.BASE,
        overrides=dict(getattr(module, "OVERRIDES", {})),
        points=points,
        share_pretrain=bool(getattr(module, "SHARE_PRETRAIN", False)),
        columns=getattr(module, "COLUMNS", None),
        plot=getattr(module, "PLOT", None),
    )
    if sweep.share_pretrain:
        for name, overrides in points:
            unshareable = [k for k in overrides if not k.startswith(SHAREABLE)]
            if unshareable:
                raise SweepError(
                    f"{path}: point {name!r} overrides {unshareable}, which the pretraining "
                    f"stage may read, so it cannot share pretraining; shareable keys start with "
                    f"{SHAREABLE}, or set SHARE_PRETRAIN = False"
                )
    return sweep


def format_value(key: str, value: Any) -> str:
    """A Python value as ml_collections' config_flags parses it on the command line."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float | str):
        return str(value)
    if value is None:
        return "None"
    if isinstance(value, tuple | list):
        return "(" + ",".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    raise SweepError(f"override {key}={value!r}: expected a bool, int, float, str, tuple or None")


def parse_set(items: list[str]) -> dict[str, Any]:
    """--set key=value strings -> overrides (values passed through to config_flags as text)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SweepError(f"--set {item!r}: expected key=value, e.g. train.steps=100")
        out[key] = value
    return out


def train_command(base: str, overrides: dict[str, Any], workdir: Path) -> list[str]:
    args = [sys.executable, "-m", "jaxpost.train", f"--config={base}"]
    args += [f"--config.{k}={format_value(k, v)}" for k, v in overrides.items()]
    return args + [f"--config.workdir={workdir}"]


def _spec(base: str, overrides: dict[str, Any]) -> dict:
    """What a run was launched with, stored next to it so a changed sweep is not mixed in."""
    return {"base": base, "overrides": {k: format_value(k, v) for k, v in overrides.items()}}


def _shared_part(spec: dict) -> dict:
    keep = {k: v for k, v in spec["overrides"].items() if not k.startswith(SHAREABLE)}
    return {"base": spec["base"], "overrides": keep}


def _pretrain_checkpoint(workdir: Path) -> Path | None:
    """The final pretraining checkpoint of a run, once its pretrain stage has finished."""
    config = workdir / "config.json"
    if not config.exists():
        return None
    steps = json.loads(config.read_text()).get("pretrain", {}).get("steps", 0)
    final = workdir / "pretrain" / "checkpoints" / str(steps)
    return final if steps and (final / "commit_success.txt").exists() else None


def seed_pretrain(runs: Path, workdir: Path, spec: dict, log) -> None:
    """Copy a finished pretraining of a compatible point into `workdir` (see SHARE_PRETRAIN)."""
    if (workdir / "pretrain").exists():
        return
    for donor in sorted(p for p in runs.iterdir() if p.is_dir() and p != workdir):
        donor_spec = donor / "sweep_point.json"
        if not donor_spec.exists():
            continue
        if _shared_part(json.loads(donor_spec.read_text())) != _shared_part(spec):
            continue
        final = _pretrain_checkpoint(donor)
        if final is not None:
            shutil.copytree(final, workdir / "pretrain" / "checkpoints" / final.name)
            log(f"  pretraining: reusing {donor.name}'s final checkpoint ({final})")
            return


_STOPPED = (143, -signal.SIGTERM)  # the trainer's exit code after saving on SIGTERM


def _train(command: list[str], out) -> int:
    """Run one trainer to its end. A SIGTERM to the sweep (a job scheduler, `timeout`, `kill`)
    is passed on to the trainer, which saves a checkpoint and exits, instead of killing the
    sweep alone and leaving the trainer running. Ctrl-C reaches both from the terminal."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_point(sweep: Sweep, name: str, overrides: dict, runs: Path, log) -> bool:
    """Train one point unless its result exists; returns whether it ran."""
    workdir = runs / name
    spec = _spec(sweep.base, overrides)
    spec_path = workdir / "sweep_point.json"
    if spec_path.exists() and json.loads(spec_path.read_text()) != spec:
        raise SweepError(
            f"{workdir} holds a run of point {name!r} with other settings "
            f"({spec_path.read_text().strip()}); use another --out or delete that directory"
        )
    if (workdir / "summary.json").exists():
        log(f"{name}: done earlier, skipped ({workdir})")
        return False
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2))
    command = train_command(sweep.base, overrides, workdir)
    log(f"{name}: {' '.join(command[1:])}")
    if sweep.share_pretrain:
        seed_pretrain(runs, workdir, spec, log)
    with open(workdir / "train.log", "a") as out:
        code = _train(command, out)
    if code in _STOPPED:
        raise SweepStopped(
            f"stopped by SIGTERM during point {name!r} (it saved a checkpoint); run the same "
            "command again to resume"
        )
    if code != 0 or not (workdir / "summary.json").exists():
        tail = (workdir / "train.log").read_text().splitlines()[-15:]
        raise PointFailed(
            f"point {name!r} failed (exit code {code}); log {workdir / 'train.log'} ends:\n  "
            + "\n  ".join(tail)
        )
    return True


def _param_counts(workdir: Path) -> dict[str, int]:
    """Trainable (the exported adapter's tensors, or every weight without LoRA) and total."""
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
    elif not cfg.lora.enabled:
        trainable = total
    else:
        raise SweepError(f"{workdir} trained LoRA but exported no adapter to count parameters")
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
    }


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
            if key in ("step", "split") or key.endswith("_sum"):
                continue
            name = f"{record['split']}/{key}"
            if name not in last or record["step"] >= last[name][0]:
                last[name] = (record["step"], value)
    row.update({name: value for name, (_, value) in sorted(last.items())})
    row.update(_param_counts(workdir))
    return row


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.4g}"


def write_tables(rows: list[dict], columns: dict[str, str] | None, out: Path) -> list[Path]:
    """results.csv (every key) and results.md (`columns`: header -> key; default: all keys)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    columns = columns or {k: k for k in keys}
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in columns.values()) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return [out / "results.csv", out / "results.md"]


def write_plot(rows: list[dict], plot: dict[str, Any], png: Path) -> Path:
    """y against x over the points; a dashed line for `baseline` (e.g. accuracy before)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = plot["x"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    usable = sorted((r for r in rows if r.get(x_key) is not None), key=lambda r: r[x_key])
    xs = [r[x_key] for r in usable]
    for y_key in plot["y"]:
        ax.plot(xs, [r.get(y_key, math.nan) for r in usable], marker="o", label=y_key)
    if plot.get("baseline") and usable and plot["baseline"] in usable[0]:
        ax.axhline(usable[0][plot["baseline"]], ls="--", color="gray", label=plot["baseline"])
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


def run_sweep(
    sweep: Sweep, out: Path, *, extra: dict[str, Any] | None = None, only=None, log=print
) -> list[dict]:
    """Run (or skip) every selected point, then write the tables and the plot; returns rows."""
    points = sweep.points
    if only:
        unknown = sorted(set(only) - {n for n, _ in points})
        if unknown:
            raise SweepError(
                f"--only {unknown}: no such points; points are {[n for n, _ in points]}"
            )
        points = [(n, o) for n, o in points if n in only]
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for name, point in points:
        overrides = {**sweep.overrides, **(extra or {}), **point}
        try:
            run_point(sweep, name, overrides, runs, log)
        except PointFailed as e:
            log(f"error: {e}")
            failed.append(name)
            continue
        seed = json.loads((runs / name / "config.json").read_text()).get("seed")
        rows.append({"point": name, **point, "seed": seed, **collect(runs / name)})
    if rows:
        written = write_tables(rows, sweep.columns, out)
        if sweep.plot:
            written.append(write_plot(rows, sweep.plot, out / "results.png"))
        log("results: " + ", ".join(str(p) for p in written))
    if failed:
        raise PointFailed(
            f"{len(failed)} of {len(points)} points failed: {', '.join(failed)} (their logs are "
            f"above); the results hold the other {len(rows)}. Re-running the sweep runs only "
            "the failed points again"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "definition", help="a sweep definition file, e.g. experiments/lora_rank_sweep.py"
    )
    parser.add_argument("--out", help="output directory (default experiments/results/NAME)")
    parser.add_argument(
        "--base", help="replace the definition's BASE, e.g. configs/quickstart.py:test"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for every point (after OVERRIDES, before the point's)",
    )
    parser.add_argument("--only", help="comma-separated point names to run")
    args = parser.parse_args(argv)
    try:
        sweep = load_definition(args.definition)
        if args.base:
            sweep = dataclasses.replace(sweep, base=args.base)
        out = Path(args.out) if args.out else REPO / "experiments" / "results" / sweep.name
        only = args.only.split(",") if args.only else None
        run_sweep(sweep, out.absolute(), extra=parse_set(args.set), only=only)
    except SweepStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 143
    except PointFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
