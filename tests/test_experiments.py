"""experiments/run_sweep.py and sweep_results.py: definitions, overrides, and real tiny sweeps
run through `python -m jaxpost.train` on the quickstart's `:test` settings (tables, plot, shared
pretraining, resume by skipping finished points, --only, several seeds)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("run_sweep", REPO / "experiments" / "run_sweep.py")
run_sweep = importlib.util.module_from_spec(_spec)
sys.modules["run_sweep"] = run_sweep  # dataclasses look their module up while being built
_spec.loader.exec_module(run_sweep)
sweep_results = run_sweep.sweep_results  # imported by run_sweep from beside it

RANK_SWEEP = REPO / "experiments" / "lora_rank_sweep.py"
# The smallest runs that still go through every stage: 2 pretraining + 2 LoRA steps, 8 eval
# prompts, no periodic evaluation, a small generated train split.
FAST = [
    "pretrain.steps=2",
    "train.steps=2",
    "train.eval_every=0",
    "checkpoint.every=2",
    "data.num_train_examples=256",
    "data.num_eval_examples=8",
    "metrics.plot=False",
]


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "sweep_def.py"
    path.write_text(body)
    return path


def test_rank_sweep_definition():
    sweep = run_sweep.load_definition(RANK_SWEEP)
    assert sweep.base == "configs/quickstart.py"
    assert [o["lora.rank"] for _, o in sweep.points] == [1, 2, 4, 8, 16]
    assert sweep.share_pretrain
    assert set(sweep.columns.values()) >= {"lora.rank", "trainable_params", "accuracy_after"}


def test_definition_errors(tmp_path):
    path = _write(tmp_path, "BASE = 'configs/quickstart.py'\nPOINTS = [('a', {}), ('a', {})]\n")
    with pytest.raises(run_sweep.SweepError, match=r"\['a'\] appear more than once"):
        run_sweep.load_definition(path)
    path = _write(
        tmp_path,
        "BASE = 'configs/quickstart.py'\nSHARE_PRETRAIN = True\n"
        "POINTS = [('a', {'lora.rank': 2}), ('b', {'pretrain.steps': 3})]\n",
    )
    with pytest.raises(run_sweep.SweepError, match=r"point 'b' overrides \['pretrain.steps'\]"):
        run_sweep.load_definition(path)
    with pytest.raises(run_sweep.SweepError, match="does not define POINTS"):
        run_sweep.load_definition(_write(tmp_path, "BASE = 'configs/quickstart.py'\n"))
    base = "BASE = 'configs/quickstart.py'\nPOINTS = [('a', {})]\n"
    with pytest.raises(run_sweep.SweepError, match=r"SEEDS: seeds \[1\] appear more than once"):
        run_sweep.load_definition(_write(tmp_path, base + "SEEDS = [0, 1, 1]\n"))
    with pytest.raises(run_sweep.SweepError, match="SEEDS: expected a non-empty list"):
        run_sweep.load_definition(_write(tmp_path, base + "SEEDS = 3\n"))
    with pytest.raises(run_sweep.SweepError, match="expected comma-separated integers"):
        run_sweep.parse_seeds("0,one")
    sweep = run_sweep.load_definition(_write(tmp_path, base + "OVERRIDES = {'seed': 1}\n"))
    sweep = run_sweep.dataclasses.replace(sweep, seeds=run_sweep.parse_seeds("0,1"))
    with pytest.raises(run_sweep.SweepError, match="'seed' is set by OVERRIDES, --set and by"):
        run_sweep.plan_runs(sweep, tmp_path, {"seed": "2"})


def test_command_line_values():
    cmd = run_sweep.train_command(
        "configs/quickstart.py:test",
        {"lora.rank": 4, "lora.alpha": 8.0, "export.merged_hf": True, "lora.targets": ("q",)},
        Path("/tmp/w"),
    )
    assert cmd[1:] == [
        "-m",
        "jaxpost.train",
        "--config=configs/quickstart.py:test",
        "--config.lora.rank=4",
        "--config.lora.alpha=8.0",
        "--config.export.merged_hf=True",
        "--config.lora.targets=('q',)",
        "--config.workdir=/tmp/w",
    ]
    with pytest.raises(run_sweep.SweepError, match=r"override lora.rank=\{1\}"):
        run_sweep.format_value("lora.rank", {1})
    with pytest.raises(run_sweep.SweepError, match="expected key=value"):
        run_sweep.parse_set(["train.steps"])


def _lora_params(rank: int, layers=2, h=64, inter=192, heads=4, kv_heads=2, head_dim=16) -> int:
    """(in + out) * r per adapted linear: q, k, v, o, gate, up, down."""
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h)
    return layers * rank * per_layer


def _csv_rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_two_point_sweep(tmp_path, capsys, monkeypatch):
    # The training subprocesses get one CPU device, not the suite's 8 simulated ones: these
    # runs check the sweep machinery, and a 1-device step compiles and runs several times faster.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    out = tmp_path / "sweep"
    argv = [str(RANK_SWEEP), "--out", str(out), "--base", "configs/quickstart.py:test"]
    argv += [a for s in FAST for a in ("--set", s)]
    # One point at a time: the second --only keeps the first point's row in the tables.
    assert run_sweep.main(argv + ["--only", "rank1"]) == 0
    assert [r["point"] for r in _csv_rows(out)] == ["rank1"]
    assert "1 of 5 runs finished; absent from the tables: point 'rank2' (not finished)" in (
        capsys.readouterr().out
    )
    assert run_sweep.main(argv + ["--only", "rank2"]) == 0
    rows = _csv_rows(out)
    assert [r["point"] for r in rows] == ["rank1", "rank2"]
    for r, rank in zip(rows, (1, 2)):
        assert int(r["lora.rank"]) == rank
        assert int(r["trainable_params"]) == _lora_params(rank)
        # PEFT's print_trainable_parameters counts the adapter in the denominator.
        total = int(r["total_params"])
        assert float(r["trainable_percent"]) == pytest.approx(
            100 * _lora_params(rank) / (total + _lora_params(rank))
        )
        for key in ("accuracy_before", "accuracy_after"):
            assert 0.0 <= float(r[key]) <= 1.0
        for key in ("sft/loss", "sft_eval/loss"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0
    # The pretraining is shared: identical base model, so identical accuracy before LoRA.
    assert rows[0]["accuracy_before"] == rows[1]["accuracy_before"]
    log2 = (out / "runs" / "rank2" / "train.log").read_text()
    assert "[pretrain] resumed from step 2" in log2
    assert "[pretrain] step" not in log2  # rank2 did not train the base again

    table = (out / "results.md").read_text().strip().splitlines()
    assert table[0].startswith("| rank r | trainable params |")
    assert len(table) == 4  # header, rule, two points
    for line, rank in zip(table[2:], (1, 2)):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == str(rank) and cells[1] == f"{_lora_params(rank):,}"
        assert all(c and float(c.replace(",", "")) >= 0 for c in cells)
    assert (out / "results.png").stat().st_size > 1000
    assert not (out / "results_by_seed.md").exists()

    # Resume: finished points are skipped, not retrained.
    capsys.readouterr()
    both = argv + ["--only", "rank1,rank2"]
    assert run_sweep.main(both) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 2
    # The same output directory with other settings is refused rather than mixed.
    changed = both[:-2] + ["--set", "data.num_eval_examples=4"] + both[-2:]
    assert run_sweep.main(changed) == 2
    assert "with other settings" in capsys.readouterr().err
    assert json.loads((out / "runs" / "rank1" / "sweep_point.json").read_text())["base"] == (
        "configs/quickstart.py:test"
    )
    # Another sweep into the same directory is refused before it runs anything.
    assert json.loads((out / "sweep.json").read_text()) == {
        "name": "lora_rank_sweep",
        "definition": "experiments/lora_rank_sweep.py",
    }
    other = _write(tmp_path, 'NAME = "lr_sweep"\nBASE = "configs/quickstart.py:test"\n'
                   'POINTS = [("lr1", {"optimizer.learning_rate": 1e-3})]\n')  # fmt: skip
    assert run_sweep.main([str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sweep 'lora_rank_sweep'" in err and "sweep 'lr_sweep'" in err
    assert "use another --out" in err and not (out / "runs" / "lr1").exists()
    assert [r["point"] for r in _csv_rows(out)] == ["rank1", "rank2"]


def test_a_failed_point_is_reported_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    definition = _write(
        tmp_path,
        'BASE = "configs/quickstart.py:test"\n'
        'POINTS = [("bad", {"lora.rank": 0}), ("ok", {"lora.rank": 2})]\n',
    )
    out = tmp_path / "sweep"
    argv = [str(definition), "--out", str(out)] + [a for s in FAST for a in ("--set", s)]
    assert run_sweep.main(argv) == 1
    said = capsys.readouterr()
    assert "point 'bad' failed (exit code 2)" in said.out and "lora.rank=0 must be > 0" in said.out
    assert "1 of 2 runs failed: point 'bad'" in said.err
    assert [(r["point"], r["seed"]) for r in _csv_rows(out)] == [("ok", "0")]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_seeds_sweep_tables_mean_and_std(tmp_path, capsys, monkeypatch):
    """--seeds: one run per seed under runs/<point>/seed<N>, pretraining not shared across
    seeds, a row per run in results.csv and results_by_seed.md, and results.md's mean ± std
    equal to NumPy's float64 mean and std(ddof=1) of the runs' CSV values."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    definition = _write(
        tmp_path,
        'NAME = "seeds"\nBASE = "configs/quickstart.py:test"\nSHARE_PRETRAIN = True\n'
        'POINTS = [("rank2", {"lora.rank": 2})]\nSEEDS = [5]\n'
        'COLUMNS = {"rank": "lora.rank", "params": "trainable_params",'
        ' "acc": "accuracy_after", "loss": "sft/loss", "eval loss": "sft_eval/loss"}\n'
        'PLOT = {"x": "lora.rank", "y": ["sft/loss"], "baseline": "pretrain/loss"}\n',
    )
    out = tmp_path / "sweep"
    argv = [str(definition), "--out", str(out), "--seeds", "0,1"]  # replaces SEEDS = [5]
    assert run_sweep.main(argv + [a for s in FAST for a in ("--set", s)]) == 0

    runs = out / "runs" / "rank2"
    assert sorted(p.name for p in runs.iterdir()) == ["seed0", "seed1"]
    for seed in (0, 1):
        assert json.loads((runs / f"seed{seed}" / "config.json").read_text())["seed"] == seed
        spec = json.loads((runs / f"seed{seed}" / "sweep_point.json").read_text())
        assert spec["overrides"]["seed"] == str(seed)
    # SHARE_PRETRAIN does not carry seed 0's base model over to seed 1.
    assert "[pretrain] resumed" not in (runs / "seed1" / "train.log").read_text()

    rows = _csv_rows(out)
    assert [(r["point"], r["seed"]) for r in rows] == [("rank2", "0"), ("rank2", "1")]
    assert rows[0]["sft/loss"] != rows[1]["sft/loss"]  # the seeds trained different models
    by_seed = (out / "results_by_seed.md").read_text().strip().splitlines()
    assert _cells(by_seed[0]) == ["rank", "params", "acc", "loss", "eval loss", "seed"]
    assert [_cells(line)[-1] for line in by_seed[2:]] == ["0", "1"]
    table = (out / "results.md").read_text().strip().splitlines()
    assert len(table) == 3  # header, rule, one point
    assert _cells(table[0]) == ["rank", "params", "acc", "loss", "eval loss", "seeds"]
    cells = dict(zip(_cells(table[0]), _cells(table[2])))
    assert (cells["rank"], cells["params"], cells["seeds"]) == ("2", f"{_lora_params(2):,}", "2")
    for header, key in (("acc", "accuracy_after"), ("loss", "sft/loss"),
                        ("eval loss", "sft_eval/loss")):  # fmt: skip
        values = np.array([float(r[key]) for r in rows], dtype=np.float64)
        mean, std = (float(x) for x in cells[header].split(" ± "))
        # The table prints 4 significant digits.
        assert mean == pytest.approx(values.mean(), rel=1e-3, abs=1e-12)
        assert std == pytest.approx(values.std(ddof=1), rel=1e-3, abs=1e-12)
    assert (out / "results.png").stat().st_size > 1000


def test_aggregate_over_seeds():
    rng = np.random.default_rng()
    losses = rng.uniform(0.1, 3.0, size=5)
    rows = [{"point": "a", "lora.rank": 4, "seed": s, "loss": float(v), "trainable_params": 10}
            for s, v in enumerate(losses)]  # fmt: skip
    rows.append({"point": "b", "lora.rank": 8, "seed": 0, "loss": 0.5, "note": "x"})
    a, b = sweep_results.by_point(rows, ["lora.rank"])
    assert (a["point"], a["seeds"], a["lora.rank"], a["trainable_params"]) == ("a", 5, 4, 10)
    assert a["loss"].mean == pytest.approx(np.mean(losses), rel=1e-12)
    assert a["loss"].std == pytest.approx(np.std(losses, ddof=1), rel=1e-12)
    assert (b["seeds"], b["loss"], b["note"]) == (1, sweep_results.Spread(0.5, None), "x")
    assert sweep_results._cell(b["loss"]) == "0.5"  # a single seed shows just the value


def _fake_run(run, marker: str) -> None:
    """A run directory whose pretraining finished (2 steps) and whose checkpoint says `marker`."""
    final = run.workdir / "pretrain" / "checkpoints" / "2"
    final.mkdir(parents=True)
    (final / "commit_success.txt").write_text("")
    (final / "marker").write_text(marker)
    (run.workdir / "config.json").write_text(json.dumps({"pretrain": {"steps": 2}}))
    (run.workdir / "sweep_point.json").write_text(json.dumps(run.spec))


def test_shared_pretraining_stays_within_a_seed(tmp_path):
    definition = _write(
        tmp_path,
        'BASE = "configs/quickstart.py:test"\nSHARE_PRETRAIN = True\nSEEDS = [0, 1]\n'
        'POINTS = [("a", {"lora.rank": 1}), ("b", {"lora.rank": 2})]\n',
    )
    sweep = run_sweep.load_definition(definition)
    runs = tmp_path / "runs"
    a0, a1, b0, b1 = run_sweep.plan_runs(sweep, runs, {})
    assert (a1.workdir, b0.seed) == (runs / "a" / "seed1", 0)
    _fake_run(a0, "a seed 0")
    for receiver in (b1, b0):  # b1 finds no seed-1 pretraining yet; then a1 runs
        run_sweep.seed_pretrain(runs, receiver.workdir, receiver.spec, print)
    assert not (b1.workdir / "pretrain").exists()
    assert (b0.workdir / "pretrain/checkpoints/2/marker").read_text() == "a seed 0"
    _fake_run(a1, "a seed 1")
    run_sweep.seed_pretrain(runs, b1.workdir, b1.spec, print)
    assert (b1.workdir / "pretrain/checkpoints/2/marker").read_text() == "a seed 1"

    # One directory never holds a point's run without seeds and its per-seed runs.
    unseeded = run_sweep.plan_runs(run_sweep.dataclasses.replace(sweep, seeds=None), runs, {})
    with pytest.raises(run_sweep.SweepError, match="holds per-seed runs of point 'a'"):
        run_sweep._check_layout(unseeded[0])


def test_sigterm_to_the_sweep_stops_its_trainer_after_a_checkpoint(tmp_path):
    """A scheduler's SIGTERM reaches the running trainer, which saves and exits; the sweep
    exits 143 and leaves no trainer behind holding the work directory."""
    import fcntl
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "sweep"
    sets = [
        a for s in FAST + ["train.steps=100000", "checkpoint.every=100000"] for a in ("--set", s)
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    sweep = subprocess.Popen(
        [sys.executable, str(REPO / "experiments" / "run_sweep.py"), str(RANK_SWEEP), "--out",
         str(out), "--base", "configs/quickstart.py:test", "--only", "rank1", *sets],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = out / "runs" / "rank1" / "train.log"
    deadline = time.monotonic() + 240
    while not (log.exists() and "[sft] step" in log.read_text()):
        assert sweep.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=120) == 143
    assert "stopped by SIGTERM during point 'rank1'" in sweep.stderr.read()
    assert "saved checkpoint" in log.read_text() or (out / "runs" / "rank1" / "sft").exists()
    with open(out / "runs" / "rank1" / ".lock") as lock:  # no trainer holds it any more
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_collect_takes_the_last_record_of_each_step(tmp_path):
    """A resumed run appends to metrics.jsonl: the record written last for a step stands, and
    the latest step of each split is the final value."""
    import jax

    from jaxpost import config as jconfig
    from jaxpost import lora, models

    spec = importlib.util.spec_from_file_location("quickstart_cfg", REPO / "configs/quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("test")
    (tmp_path / "config.json").write_text(jconfig.to_json(cfg))
    (tmp_path / "summary.json").write_text(json.dumps({"accuracy_after": 0.25, "data": {}}))
    records = [
        {"step": 1, "split": "sft", "wall_time": 1.5e9, "loss": 3.0, "loss_sum": 30.0},
        {"step": 2, "split": "sft", "loss": 2.0},
        {"step": 2, "split": "sft_eval", "loss": 2.5},
        {"step": 2, "split": "sft", "loss": 1.5},  # the resumed run redid step 2
        {"step": 1, "split": "pretrain", "loss": 4.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    model_cfg = jconfig.model_config(cfg)
    base = jax.jit(models.init, static_argnums=0)(model_cfg, jax.random.key(0))
    adapter = lora.init(model_cfg, base, rank=3, alpha=6.0, key=jax.random.key(1))
    lora.save_peft(model_cfg, adapter, tmp_path / "export" / "peft_adapter")

    row = sweep_results.collect(tmp_path)
    assert row["accuracy_after"] == 0.25 and "data" not in row
    assert (row["sft/loss"], row["sft_eval/loss"], row["pretrain/loss"]) == (1.5, 2.5, 4.0)
    assert "sft/loss_sum" not in row and "sft/wall_time" not in row
    assert row["trainable_params"] == _lora_params(3)
    assert row["total_params"] == model_cfg.num_params()
    # PEFT's print_trainable_parameters: trainable / (base + adapter parameters).
    total = model_cfg.num_params()
    assert row["trainable_percent"] == pytest.approx(
        100 * _lora_params(3) / (total + _lora_params(3))
    )

    # Full fine-tuning: every parameter trains and none is added.
    cfg.lora.enabled = False
    (tmp_path / "config.json").write_text(jconfig.to_json(cfg))
    shutil.rmtree(tmp_path / "export")
    row = sweep_results.collect(tmp_path)
    assert row["trainable_params"] == row["total_params"] == total
    assert row["trainable_percent"] == 100.0
