"""Run a sweep of `python -m jaxpost.train` runs and tabulate / plot their final metrics.

  python experiments/run_sweep.py experiments/lora_rank_sweep.py [--out DIR] [--base SPEC]
      [--set key=value ...] [--only name,name] [--seeds 0,1,2]

A sweep definition is a Python file with:
  NAME = "lora_rank_sweep"                      # default output directory experiments/results/NAME
  BASE = "configs/quickstart.py"                # the --config spec every point starts from
  OVERRIDES = {"lora.alpha": 32.0}              # --config.key=value for every point
  POINTS = [("rank1", {"lora.rank": 1}), ...]   # named override dicts, run in this order
  SEEDS = [0, 1, 2]                             # optional: each point once per --config.seed
  SHARE_PRETRAIN = True                         # optional: one pretraining (per seed) for all
  COLUMNS = {"rank": "lora.rank", ...}          # optional: markdown header -> result key
  PLOT = {"x": "lora.rank", "y": ["accuracy_after"], "logx": True, "baseline": "accuracy_before"}

Each point trains in `<out>/runs/<name>` (its log in `train.log`); with SEEDS (or --seeds, which
replaces them) once per seed, as --config.seed=N, in `<out>/runs/<name>/seed<N>`. A run whose
`summary.json` exists is not run again, an interrupted one resumes from its checkpoints, and a
SIGTERM to the sweep reaches the running trainer, which saves and exits (exit code 143). A run
that fails is reported and the sweep goes on (exit code 1). `<out>/sweep.json` records NAME: a
sweep of another NAME is refused in that --out rather than replacing its tables.

With SHARE_PRETRAIN the points may only override keys the pretraining stage does not read
(SHAREABLE), so every point's pretraining would be the same deterministic computation; it runs
once per seed and its final checkpoint is copied into the other runs of that seed, whose
pretrain stage then resumes at its last step.

After each invocation the results are rebuilt from every run of the definition that finished in
this --out (with --only, the earlier ones too) with the settings it would be launched with now:
`results.csv` (a row per run: overrides, seed, final metrics), `results.md` (COLUMNS; with several
seeds a row per point, numbers as `mean ± std` over seeds plus a `seeds` column, and the runs'
rows in `results_by_seed.md`) and `results.png` (PLOT; error bars = std over seeds). Result keys:
the point's overrides ("lora.rank"), "seed", the run's summary ("accuracy_after", "seconds"), the
last logged value of each metric per split ("sft/loss", "sft_eval/accuracy"), "trainable_params",
"total_params" and "trainable_percent" (as PEFT's print_trainable_parameters: 100 * trainable /
(base + adapter parameters); 100 for full fine-tuning).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

# The results module sits beside this file, which runs as a script from any working directory
# and is loaded by the tests from its path, so neither puts experiments/ on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep_results  # noqa: E402
from sweep_results import Run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHAREABLE = ("lora.", "export.", "optimizer.learning_rate", "train.steps")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class SweepError(Exception):
    """A sweep definition, override or run that cannot proceed; the message says why."""


class PointFailed(SweepError):
    """One run failed; the sweep goes on with the others and reports it at the end."""


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
    seeds: list[int] | None = None
    definition: str = ""  # the definition file, recorded in <out>/sweep.json


def check_seeds(seeds: Any, where: str) -> list[int]:
    """A non-empty list of distinct integers, or a SweepError naming `where` they came from."""
    if not isinstance(seeds, list | tuple) or not seeds:
        raise SweepError(f"{where}: expected a non-empty list of integer seeds, got {seeds!r}")
    bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool)]
    if bad:
        raise SweepError(f"{where}: seeds {bad} are not integers")
    dupes = sorted({s for s in seeds if seeds.count(s) > 1})
    if dupes:
        raise SweepError(f"{where}: seeds {dupes} appear more than once")
    return list(seeds)


def parse_seeds(text: str) -> list[int]:
    """--seeds 0,1,2 -> [0, 1, 2]."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise SweepError(
            f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2"
        ) from None
    return check_seeds(seeds, "--seeds")


def _display_path(path: Path) -> str:
    """Relative to the repository when inside it, so a committed sweep.json is portable."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


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
    seeds = getattr(module, "SEEDS", None)
    sweep = Sweep(
        name=getattr(module, "NAME", path.stem),
        base=module.BASE,
        overrides=dict(getattr(module, "OVERRIDES", {})),
        points=points,
        share_pretrain=bool(getattr(module, "SHARE_PRETRAIN", False)),
        columns=getattr(module, "COLUMNS", None),
        plot=getattr(module, "PLOT", None),
        seeds=None if seeds is None else check_seeds(seeds, f"{path}: SEEDS"),
        definition=_display_path(path),
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
    """Copy a finished pretraining of a compatible run into `workdir` (see SHARE_PRETRAIN). The
    seed is not SHAREABLE, so only a run of the same seed is compatible."""
    if (workdir / "pretrain").exists():
        return
    specs = [*runs.glob("*/sweep_point.json"), *runs.glob("*/seed*/sweep_point.json")]
    for donor in sorted(p.parent for p in specs if p.parent != workdir):
        if _shared_part(json.loads((donor / "sweep_point.json").read_text())) != _shared_part(spec):
            continue
        final = _pretrain_checkpoint(donor)
        if final is not None:
            shutil.copytree(final, workdir / "pretrain" / "checkpoints" / final.name)
            log(f"  pretraining: reusing {donor.relative_to(runs)}'s final checkpoint ({final})")
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


def plan_runs(sweep: Sweep, runs: Path, extra: dict[str, Any]) -> list[Run]:
    """Every run of the sweep, in order: each point, once per seed when there are seeds."""
    if sweep.seeds is not None:
        setters = [w for w, o in (("OVERRIDES", sweep.overrides), ("--set", extra)) if "seed" in o]
        setters += [f"point {n!r}" for n, o in sweep.points if "seed" in o]
        if setters:
            raise SweepError(
                f"'seed' is set by {', '.join(setters)} and by the seed list {sweep.seeds} "
                "(SEEDS or --seeds), which gives each run its seed; remove one of them"
            )
    plan = []
    for (name, point), seed in itertools.product(sweep.points, sweep.seeds or [None]):
        overrides = {**sweep.overrides, **extra, **point}
        if seed is not None:
            overrides["seed"] = seed
        workdir = runs / name if seed is None else runs / name / f"seed{seed}"
        plan.append(Run(name, seed, point, overrides, _spec(sweep.base, overrides), workdir))
    return plan


def _check_layout(run: Run) -> None:
    """A point's directory holds either one run (no seeds) or one per seed, never both."""
    if run.seed is not None and (run.workdir.parent / "sweep_point.json").exists():
        raise SweepError(
            f"{run.workdir.parent} holds a run of point {run.point!r} without seeds, so its "
            "per-seed runs cannot go under it; use another --out for the sweep with seeds"
        )
    if run.seed is None and any(run.workdir.glob("seed*/sweep_point.json")):
        raise SweepError(
            f"{run.workdir} holds per-seed runs of point {run.point!r} (seed*/); run the sweep "
            "with its seeds (SEEDS or --seeds), or use another --out for the one without"
        )


def run_point(sweep: Sweep, run: Run, runs: Path, log) -> bool:
    """Train one run unless its result exists; returns whether it ran."""
    workdir = run.workdir
    _check_layout(run)
    spec_path = workdir / "sweep_point.json"
    if spec_path.exists() and json.loads(spec_path.read_text()) != run.spec:
        raise SweepError(
            f"{workdir} holds a run of {run.label} with other settings "
            f"({spec_path.read_text().strip()}); use another --out or delete that directory"
        )
    if (workdir / "summary.json").exists():
        log(f"{run.label}: done earlier, skipped ({workdir})")
        return False
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(run.spec, indent=2))
    command = train_command(sweep.base, run.overrides, workdir)
    log(f"{run.label}: {' '.join(command[1:])}")
    if sweep.share_pretrain:
        seed_pretrain(runs, workdir, run.spec, log)
    with open(workdir / "train.log", "a") as out:
        code = _train(command, out)
    if code in _STOPPED:
        raise SweepStopped(
            f"stopped by SIGTERM during {run.label} (it saved a checkpoint); run the same "
            "command again to resume"
        )
    if code != 0 or not (workdir / "summary.json").exists():
        tail = (workdir / "train.log").read_text().splitlines()[-15:]
        raise PointFailed(
            f"{run.label} failed (exit code {code}); log {workdir / 'train.log'} ends:\n  "
            + "\n  ".join(tail)
        )
    return True


def claim_out(sweep: Sweep, out: Path) -> None:
    """Record the sweep in <out>/sweep.json, refusing an --out that holds another sweep, whose
    tables this one's would replace."""
    record = out / "sweep.json"
    if record.exists():
        other = json.loads(record.read_text())
        if other.get("name") != sweep.name:
            raise SweepError(
                f"{out} holds the results of sweep {other.get('name')!r} (definition "
                f"{other.get('definition')}), not of sweep {sweep.name!r} ({sweep.definition}); "
                "use another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    mine = {"name": sweep.name, "definition": sweep.definition}
    record.write_text(json.dumps(mine, indent=2) + "\n")


def run_sweep(
    sweep: Sweep, out: Path, *, extra: dict[str, Any] | None = None, only=None, log=print
) -> list[dict]:
    """Run (or skip) the selected points (all by default), then write the tables and the plot
    of every finished run; returns their rows."""
    names = [n for n, _ in sweep.points]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise SweepError(f"--only {unknown}: no such points; points are {names}")
    plan = plan_runs(sweep, out / "runs", extra or {})
    claim_out(sweep, out)
    selected = [r for r in plan if not only or r.point in only]
    (out / "runs").mkdir(exist_ok=True)
    failed = []
    for run in selected:
        try:
            run_point(sweep, run, out / "runs", log)
        except PointFailed as e:
            log(f"error: {e}")
            failed.append(run.label)
    several = sweep.seeds is not None and len(sweep.seeds) > 1
    settings = {k for _, point in sweep.points for k in point} if several else None
    rows = sweep_results.write_results(plan, sweep.columns, sweep.plot, out, settings, log)
    if failed:
        raise PointFailed(
            f"{len(failed)} of {len(selected)} runs failed: {', '.join(failed)} (their logs are "
            f"above); the results hold the {len(rows)} finished. Re-running the sweep runs only "
            "the failed ones again"
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
    parser.add_argument(
        "--seeds", help="comma-separated seeds, each point once per seed (replaces SEEDS)"
    )
    args = parser.parse_args(argv)
    try:
        sweep = load_definition(args.definition)
        if args.base:
            sweep = dataclasses.replace(sweep, base=args.base)
        if args.seeds:
            sweep = dataclasses.replace(sweep, seeds=parse_seeds(args.seeds))
        out = Path(args.out) if args.out else REPO / "experiments" / "results" / sweep.name
        only = args.only.split(",") if args.only else None
        run_sweep(sweep, out.absolute(), extra=parse_set(args.set), only=only)
    except SweepStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 143
    except PointFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (SweepError, sweep_results.ResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
