"""The CLI end to end, in subprocesses: quickstart smoke run, exact resume after SIGKILL and
SIGTERM, restore onto another mesh, and the bad-input errors (config typo, checkpoint of another
model, corrupt checkpoint)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import QUICKSTART, ROOT

from jaxpost import host_memory, nf4
from jaxpost.optim import make_schedule

# A short single-stage LoRA SFT run: enough steps that a kill lands mid-run.
SHORT = [
    f"--config={QUICKSTART}:test",
    "--config.pretrain.steps=0",
    "--config.train.eval_every=0",
    "--config.data.num_eval_examples=0",
    "--config.metrics.tensorboard=False",
    "--config.metrics.plot=False",
    "--config.checkpoint.async_save=True",
]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _cmd(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "jaxpost.train", *args, f"--config.workdir={workdir}"]


def _run(workdir: Path, *args: str, devices: int = 1, check: bool = True):
    proc = subprocess.run(
        _cmd(workdir, *args), env=_env(devices), capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def _records(workdir: Path, split: str = "sft") -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _losses(workdir: Path, split: str = "sft") -> dict[int, float]:
    """step -> loss; every record of a step (a killed run and its resume) must agree."""
    out: dict[int, float] = {}
    for r in _records(workdir, split):
        if r["step"] in out:
            assert out[r["step"]] == r["loss"], f"step {r['step']} logged twice with different loss"
        out[r["step"]] = r["loss"]
    return out


def _start_and_signal(workdir: Path, sig: int, after_step: int, args: list[str]):
    """Start a run, send `sig` once a checkpoint of step >= after_step is on disk."""
    proc = subprocess.Popen(
        _cmd(workdir, *args),
        env=_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpts = workdir / "sft" / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if any(s >= after_step for s in done):
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_quickstart_test_variant(tmp_path):
    work = tmp_path / "qs"
    proc = _run(work, f"--config={QUICKSTART}:test", "--config.lora.use_rslora=True",
                "--config.optimizer.min_lr_ratio=0.1")  # fmt: skip
    out = proc.stdout
    assert f"work directory: {work}" in out
    # By default the command restarts itself with glibc's huge-page tunable where that helps
    # (`host_memory.relaunch_env`); keeping freed memory is opt in.
    status = host_memory.huge_pages_unneeded_or_impossible()
    if status is None:  # this machine (glibc >= 2.35, kernel THP "madvise") and CI's
        tunable = host_memory.HUGETLB_TUNABLE
        status = f"transparent huge pages for malloc (GLIBC_TUNABLES={tunable}, restarted with it)"
    assert f"host memory: {status}; keep freed memory: off" in out
    assert "held-out accuracy before sft:" in out and "held-out accuracy after sft:" in out
    summary = json.loads((work / "summary.json").read_text())
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert (work / "training_curves.png").stat().st_size > 1000
    runs = {p.name for p in (work / "tensorboard").iterdir()}  # one per split
    assert {"pretrain", "sft", "sft_eval"} <= runs, runs
    assert list((work / "tensorboard" / "sft").glob("events.out.tfevents.*"))
    adapter = json.loads((work / "export" / "peft_adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 16 and adapter["use_rslora"]
    # The SFT stage's last update (0-based step 5 of 6, 1 warmup step) on the cosine schedule
    # ending at 0.1 x its peak of 2e-3.
    last = [r for r in _records(work, "sft") if r["step"] == 6][0]
    want = float(make_schedule(2e-3, "cosine", 1, 6, min_lr_ratio=0.1)(5))
    assert last["learning_rate"] == pytest.approx(want, rel=1e-6) and want > 2e-4
    pre, sft = _losses(work, "pretrain"), _losses(work, "sft")
    assert sorted(pre) == list(range(1, 7)) and sorted(sft) == list(range(1, 7))
    assert pre[6] < pre[1]  # training from random init lowers the loss
    assert json.loads((work / "config.json").read_text())["train"]["steps"] == 6


def test_resume_after_sigterm_and_sigkill_is_exact(tmp_path):
    args = [*SHORT, "--config.train.steps=32", "--config.checkpoint.every=4"]
    ref = tmp_path / "ref"
    _run(ref, *args)
    expected = _losses(ref)
    assert sorted(expected) == list(range(1, 33))

    work = tmp_path / "interrupted"
    code, out, err = _start_and_signal(work, signal.SIGTERM, after_step=4, args=args)
    assert code == 143, (out[-2000:], err[-2000:])
    assert "SIGTERM received: saved checkpoint at step" in out
    saved = int(out.split("saved checkpoint at step ")[1].split()[0])
    assert saved < 24
    from jaxpost.checkpoint import Checkpointer

    ckpt = Checkpointer(work / "sft" / "checkpoints")
    assert ckpt.latest_step() == saved and ckpt.read_meta(saved)["data_states"][0] is not None
    ckpt.close()

    # Resume, and this time die hard (no chance to save) after a later periodic checkpoint.
    code, out, err = _start_and_signal(work, signal.SIGKILL, after_step=saved + 8, args=args)
    assert code == -signal.SIGKILL, (out[-2000:], err[-2000:])
    assert f"resumed from step {saved}" in out
    assert max(_losses(work)) < 32, "the run finished before the kill; raise train.steps"

    _run(work, *args)
    # Bitwise equal per-step losses, including the data order; steps logged by both a killed
    # run and its resumption agree too (checked in _losses).
    assert _losses(work) == expected


def _config(workdir: Path, **overrides):
    spec = importlib.util.spec_from_file_location("quickstart_config", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("test")
    cfg.workdir = str(workdir)
    cfg.pretrain.steps, cfg.train.eval_every, cfg.data.num_eval_examples = 0, 0, 0
    cfg.metrics.tensorboard = cfg.metrics.plot = False
    cfg.train.steps, cfg.checkpoint.every, cfg.checkpoint.keep_every = 12, 4, 4
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def _run_in_process(cfg):
    from jaxpost import config as jconfig
    from jaxpost import loops
    from jaxpost.loops import runner

    jconfig.validate(cfg, num_devices=8)
    run = runner.Run.create(cfg)
    try:
        runner.run_recipe(run, loops.RECIPES[cfg.algorithm])
    finally:
        run.close()


def test_restore_on_a_different_mesh_and_bad_checkpoints(tmp_path):
    from jaxpost.checkpoint import CheckpointError

    args = [
        *SHORT,
        "--config.train.steps=12",
        "--config.checkpoint.every=4",
        "--config.checkpoint.keep_every=4",
    ]
    work = tmp_path / "mesh"
    _run(work, *args, devices=1)
    one_device = _losses(work)
    ckpts = work / "sft" / "checkpoints"
    for step in ("8", "12"):
        shutil.rmtree(ckpts / step)
    (work / "metrics.jsonl").unlink()
    proc = _run(work, *args, "--config.mesh.data=2", "--config.mesh.fsdp=4", devices=8)
    assert "resumed from step 4" in proc.stdout and "'fsdp': 4" in proc.stdout
    eight = _losses(work)
    assert sorted(eight) == list(range(5, 13))
    # Same batches and state; only the reduction order differs across 8 devices.
    np.testing.assert_allclose(
        [eight[s] for s in range(5, 13)], [one_device[s] for s in range(5, 13)], rtol=2e-5
    )

    with pytest.raises(CheckpointError, match=r"different model:\n  model.arch.num_layers: 2"):
        _run_in_process(_config(work, model__arch=_arch(num_layers=3)))
    with pytest.raises(CheckpointError, match=r"params/lora/.*checkpoint has shape \[2, 64, 16\]"):
        _run_in_process(_config(work, lora__rank=4))

    for f in (ckpts / "12" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\x00corrupt")
    corrupt = _run(work, *args, check=False)
    assert corrupt.returncode == 3
    assert "is corrupt or incomplete" in corrupt.stderr and str(ckpts / "12") in corrupt.stderr
    # One line: not followed by Orbax's abandoned reads ("Exception ignored in: <coroutine").
    assert len(corrupt.stderr.strip().splitlines()) == 1, corrupt.stderr[:2000]


def test_a_stage_resumed_over_a_longer_earlier_stage_is_refused(tmp_path):
    """A finished pretrain + SFT run re-run with more pretraining: the SFT checkpoints were
    trained from the old base, so continuing them would keep the old model (an audit saw the
    export unchanged, silently); the run stops, naming the directory to move away."""
    from jaxpost.checkpoint import CheckpointError

    work = tmp_path / "stages"
    short = dict(
        pretrain__steps=2, train__steps=2, checkpoint__every=2, checkpoint__keep_every=None
    )
    _run_in_process(_config(work, **short))
    _run_in_process(_config(work, **short))  # the same run again: nothing to do, no error
    with pytest.raises(CheckpointError, match=r"\[sft\] the checkpoints in .*sft/checkpoints were"):
        _run_in_process(_config(work, **{**short, "pretrain__steps": 3}))
    shutil.rmtree(work / "sft" / "checkpoints")
    _run_in_process(_config(work, **{**short, "pretrain__steps": 3}))


def test_an_unusable_work_directory_is_one_error_line(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _run(tmp_path / "file" / "run", *SHORT, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: cannot use the work directory '{tmp_path / 'file' / 'run'}'")
    )
    assert "Traceback" not in proc.stderr


# Runs the CLI with writes past a file size failing (EFBIG) as on a full disk: SIGXFSZ
# ignored, so the write is an error rather than a killed process; both survive the exec.
_SMALL_FILES = (
    "import os, resource, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'jaxpost.train', *sys.argv[1:]])\n"
)


def test_a_failing_background_save_is_one_error_line(tmp_path):
    """A background (async) save that cannot write its arrays: the run stops within steps of it
    with exit 3 and one `error:` line, without the tracebacks Orbax's threads printed (about 25,
    20 of them "Event loop is closed", before the draining loops and the CLI's log filter)."""
    work = tmp_path / "run"
    args = [*SHORT, "--config.train.steps=300", "--config.checkpoint.every=100",
            "--config.train.log_every=5"]  # fmt: skip
    proc = subprocess.run(  # the metrics fit in 100 kB, a checkpoint's arrays do not
        [sys.executable, "-c", _SMALL_FILES, *args, f"--config.workdir={work}"],
        env=_env(1), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: saving a checkpoint in {work / 'sft' / 'checkpoints'} failed")
    assert "checkpoints saved before it are intact" in last
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert "Event loop is closed" not in proc.stderr
    # The failure stops the run steps after the save at 100 started, not at the next save (200).
    logged = [json.loads(line)["step"] for line in (work / "metrics.jsonl").open()]
    assert 100 <= max(logged) < 150, logged[-5:]


def test_orbax_error_records_keep_their_cause_in_place_of_the_traceback():
    """An error Orbax logs and survives (a checkpoint it could not remove) keeps its cause."""
    import logging

    from jaxpost import train

    def record(path):
        rec = logging.LogRecord(
            "absl", logging.ERROR, path, 172, "Failed to remove checkpoint (%s)", ("/w/4",), None
        )
        try:
            raise FileNotFoundError(2, "No such file or directory")
        except FileNotFoundError:
            rec.exc_info = sys.exc_info()
        assert train._orbax_error_without_traceback(rec)  # kept, changed in place
        return logging.Formatter().format(rec)

    orbax = record("/venv/site-packages/orbax/checkpoint/_src/path/storage_backend.py")
    assert orbax == (
        "Failed to remove checkpoint (/w/4) (FileNotFoundError: [Errno 2] No such file or "
        "directory)"
    )
    assert "Traceback" in record("/venv/site-packages/grain/x.py")  # others as they were


def _arch(**changes):
    from jaxpost import config as jconfig

    return jconfig.arch("tiny", vocab_size=32, max_position_embeddings=256, **changes)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.train.stpes=3", 'Did you mean "steps"'),
        (
            "--config.train.batch_size=12",
            "train.batch_size=12: a batch of 12 rows does not split over the batch mesh axes "
            "(data=8 = 8)",
        ),
        ("--config.model.hf_path=/nonexistent/m", "model.hf_path='/nonexistent/m' is not a dir"),
    ],
)
def test_cli_rejects_bad_config_before_compiling(tmp_path, override, expected):
    extra = ["--config.mesh.data=8", "--config.mesh.fsdp=1"] if "batch" in override else []
    proc = _run(
        tmp_path / "bad", f"--config={QUICKSTART}:test", override, *extra, devices=8, check=False
    )
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert not (tmp_path / "bad" / "sft").exists()


def test_cli_rejects_typo_in_config_file(tmp_path):
    config = tmp_path / "typo.py"
    config.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('qs', {QUICKSTART!r})\n"
        "qs = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(qs)\n\n\n"
        "def get_config(arg=None):\n"
        "    c = qs.get_config('test')\n"
        "    c.optimizer.learning_rat = 1e-3\n"
        "    return c\n"
    )
    proc = _run(tmp_path / "bad", f"--config={config}", check=False)
    assert proc.returncode == 2
    assert "'optimizer.learning_rat'" in proc.stderr
    assert "did you mean 'optimizer.learning_rate'" in proc.stderr


def test_cli_rejects_an_override_of_a_missing_key(tmp_path):
    """A mistyped --config.key=value is one line naming the key and ml_collections' nearest
    suggestion (exit 2), not a traceback out of the flag parser; nothing is written."""
    proc = _run(
        tmp_path / "bad", f"--config={QUICKSTART}:test", "--config.train.step=3", check=False
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        'error: no such config key: step; Did you mean "steps" instead of "step"? '
        "(in --config.train.step=3)"
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()
    # A value of the wrong type too: absl's own "FATAL Flags parsing error" exited 1.
    proc = _run(tmp_path / "bad", f"--config={QUICKSTART}:test", "--config.train.steps=ten",
                check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: flag --config.train.steps=ten: invalid literal for int() with base 10: 'ten'"
    )
    assert not (tmp_path / "bad").exists()
    # A config file's variant of the wrong type, and None for a key that takes none.
    for args, message in [
        ([f"--config={ROOT / 'configs' / 'sft_lora.py'}:cpu,rank=abc"],
         "error: config variant rank='abc': expected int (default 16)"),
        ([f"--config={QUICKSTART}:test", "--config.train.steps=None"],
         "error: --config.train.steps=None: train.steps takes a value of type int (default"),
    ]:  # fmt: skip
        proc = _run(tmp_path / "bad", *args, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_qlora_config_trains_through_the_cli(tmp_path):
    """configs/qlora.py (its built-in-task variant) through the CLI: the loss falls, the
    checkpoint holds the base as NF4 only, and the optimizer state covers only the LoRA factors."""
    work = tmp_path / "qlora"
    qlora = Path(QUICKSTART).with_name("qlora.py")
    proc = _run(work, f"--config={qlora}:cpu", "--config.train.steps=30",
                "--config.train.log_every=5", "--config.checkpoint.every=30",
                "--config.host.keep_freed_memory=True",
                "--config.host.huge_pages=False")  # fmt: skip
    # Applied before JAX's backend started; no restart when huge pages are switched off.
    out = proc.stdout
    assert "host memory: malloc defaults (host.huge_pages=False); keep freed memory: applied" in out
    losses = _losses(work)
    assert sorted(losses) == [5, 10, 15, 20, 25, 30]
    assert losses[30] < losses[5] - 0.2
    meta = json.loads((work / "sft" / "checkpoints" / "30" / "state" / "_METADATA").read_text())
    paths = [ast.literal_eval(k) for k in meta["tree_metadata"]]  # tuple reprs of tree paths
    base = [p for p in paths if p[:2] == ("params", "base")]
    projections = {p[4] for p in base if p[2] == "layers" and p[3] in ("attn", "mlp")}
    assert {"q", "k", "v", "o", "gate", "up", "down"} <= projections
    assert not [p for p in base if p[-1] == "kernel"]  # no dense copy of a quantized kernel
    assert {p[-2] for p in base if nf4.KERNEL_KEY in p} == {nf4.KERNEL_KEY}
    opt = [p for p in paths if p[0] == "opt_state" and len(p) > 4]
    assert opt and all(p[-1] in ("a", "b") for p in opt), opt[:3]
    assert (work / "export" / "peft_adapter" / "adapter_model.safetensors").exists()


def test_bfloat16_mixed_precision_tracks_float32_through_the_cli(tmp_path):
    """model.compute_dtype=bfloat16 over float32 parameters: the same run's losses stay within
    bfloat16 rounding of the float32 run's, and the exported LoRA factors stay float32."""
    args = [f"--config={QUICKSTART}:test", "--config.train.eval_every=0",
            "--config.data.num_eval_examples=0", "--config.metrics.tensorboard=False",
            "--config.metrics.plot=False"]  # fmt: skip
    _run(tmp_path / "f32", *args)
    _run(tmp_path / "bf16", *args, "--config.model.compute_dtype=bfloat16")
    for split in ("pretrain", "sft"):
        ref, mixed = _losses(tmp_path / "f32", split), _losses(tmp_path / "bf16", split)
        assert sorted(mixed) == sorted(ref) == list(range(1, 7))
        for step in ref:
            assert abs(mixed[step] - ref[step]) <= 0.01 * ref[step], (split, step, mixed, ref)
    assert _losses(tmp_path / "bf16", "pretrain")[6] < _losses(tmp_path / "bf16", "pretrain")[1]
    from safetensors.numpy import load_file

    adapter = load_file(tmp_path / "bf16" / "export" / "peft_adapter" / "adapter_model.safetensors")
    assert adapter and all(v.dtype == np.float32 for v in adapter.values())
    saved = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert saved["model"]["compute_dtype"] == "bfloat16"


def test_bad_rows_of_a_chat_jsonl_through_the_cli(tmp_path):
    """An HF model directory (a tiny model + a BPE tokenizer made here) and a chat JSONL with a
    row cut short: one `error:` line naming file, row and column (exit 2, no traceback); with
    data.skip_malformed the run says what it skipped and dropped, stops when one epoch of data
    runs out, and exports merged weights with the model's tokenizer and generation config."""
    import bpe_tokenizer
    import jax

    from jaxpost import models

    from tiny_models import tiny_config

    model = tmp_path / "model"
    cfg = tiny_config(vocab_size=bpe_tokenizer.VOCAB, model_type="qwen3", qk_norm=True)
    models.save_hf(cfg, models.init(cfg, jax.random.key(0)), model)
    bpe_tokenizer.save(model)
    (model / "generation_config.json").write_text('{"eos_token_id": 3}')
    good = json.dumps(
        {"messages": [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]}
    )
    cut = good[:40]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join([good, cut, good, good]) + "\n")
    args = [
        f"--config={ROOT / 'configs' / 'sft_lora.py'}",
        f"--config.model.hf_path={model}",
        f"--config.data.train_path={data}",
        "--config.data.max_length=32",
        "--config.train.steps=2",
        "--config.train.batch_size=2",
        "--config.train.log_every=1",
        "--config.optimizer.warmup_steps=0",
        "--config.metrics.progress_bar=False",
        "--config.metrics.tensorboard=False",
        "--config.metrics.plot=False",
        "--config.host.huge_pages=False",
    ]
    proc = _run(tmp_path / "bad", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert cut == '{"messages": [{"role": "user", "content"'
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: chat.jsonl row 2: invalid JSON (Expecting ':' delimiter at column 41)"
    )

    # Skipping the cut row; a row too long for max_length left out; one epoch of data for a
    # 5-step run: 4 usable rows are 2 batches, so the stage is 2 steps; it saves and exports.
    long = json.dumps({"messages": [{"role": "user", "content": "1+2"},
                                    {"role": "assistant", "content": "3 " * 60}]})  # fmt: skip
    data = tmp_path / "chat2.jsonl"
    data.write_text("\n".join([good, cut, good, long, good, good]) + "\n")
    work = tmp_path / "skip"
    proc = _run(work, *args, f"--config.data.train_path={data}", "--config.train.steps=5",
                "--config.data.skip_malformed=True", "--config.data.truncation=drop",
                "--config.data.num_epochs=1", "--config.export.merged_hf=True",
                f"--config.data.eval_path={data}", "--config.train.eval_every=1",
                "--config.train.eval_batches=2")  # fmt: skip
    for split in ("train", "eval"):  # the eval split is read once, not at every evaluation
        said = (
            f"data: skipped 1 malformed of 6 rows of data.{split}_path (data.skip_malformed=True)"
        )
        assert proc.stdout.count(said + "; first: chat2.jsonl row 2: invalid JSON") == 1
    assert (  # the stage, and its learning-rate schedule, end with the epoch
        "[sft] data: data.num_epochs=1 gives 2 steps of 2 rows; the stage and its schedule run "
        "2, not 5" in proc.stdout
    )
    assert (
        "[sft] data: 1 rows were left out under data.truncation='drop'; first: chat2.jsonl row 4"
    ) in proc.stdout
    assert (work / "sft" / "checkpoints" / "2").is_dir()
    assert sorted(_losses(work)) == [1, 2]
    evals = _records(work, "sft_eval")
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:  # plain SFT: the eval nll is the eval loss (token means over all batches)
        assert r["nll"] == pytest.approx(r["loss"], rel=1e-6)
    exported = work / "export" / "hf_model"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (exported / name).is_file(), name
    assert models.load_hf(exported)[0] == models.load_hf(model)[0]
    # Readable as any directory the run makes (it was 0700, a temporary directory's mode).
    assert (
        exported.stat().st_mode & 0o777 == (work / "export" / "peft_adapter").stat().st_mode & 0o777
    )
    # The adapter carries the tokenizer (and the generation config, whose end-of-turn ids
    # tokenizer.load reads), as TRL's save_model writes the tokenizer.
    adapter = sorted(p.name for p in (work / "export" / "peft_adapter").iterdir())
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                       "generation_config.json"}  # fmt: skip
    assert tokenizer_files <= {p.name for p in model.iterdir()}
    assert adapter == sorted({"adapter_config.json", "adapter_model.safetensors"} | tokenizer_files)


def test_a_second_run_in_the_same_work_directory_is_refused(tmp_path):
    from jaxpost.loops.runner import WorkdirInUse, lock_workdir

    held = lock_workdir(tmp_path / "w")
    with pytest.raises(WorkdirInUse, match=rf"{tmp_path / 'w'} is in use by another run \(pid "):
        lock_workdir(tmp_path / "w")
    held.close()  # the run ends: the directory is free again
    lock_workdir(tmp_path / "w").close()
