"""`python -m jaxpost.train` as two local processes of one `jax.distributed` job: the run
trains, a process that dies takes the run down at once, and the environment without the
multi-process flag is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cli_helpers import QUICKSTART, free_port

ARGS = [
    f"--config={QUICKSTART}:test",
    "--config.pretrain.steps=0",
    "--config.data.num_eval_examples=0",
    "--config.train.eval_every=0",
    "--config.train.log_every=1",
    "--config.metrics.tensorboard=False",
    "--config.metrics.plot=False",
    "--config.host.huge_pages=False",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=1",
]


def _start(workdir: Path, *args: str, num_processes: int = 2) -> list[subprocess.Popen]:
    """The CLI as `num_processes` processes of one job (one CPU device each), the coordinator
    and process ids from the JAX_* environment, as a cluster launcher sets them."""
    port = free_port()
    procs = []
    for pid in range(num_processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(num_processes),
            JAX_PROCESS_ID=str(pid),
        )
        cmd = [sys.executable, "-m", "jaxpost.train", *ARGS, *args]
        cmd += ["--config.mesh.multi_process=True", f"--config.workdir={workdir}"]
        log = open(workdir.parent / f"{workdir.name}.{pid}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _log(workdir: Path, pid: int) -> str:
    return (workdir.parent / f"{workdir.name}.{pid}.log").read_text()


def _wait(procs, timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    return [p.wait() for p in procs]


def test_two_process_run_trains_and_a_dead_process_stops_it_at_once(tmp_path):
    work = tmp_path / "run"
    codes = _wait(_start(work, "--config.train.steps=3"), timeout=300)
    assert codes == [0, 0], _log(work, 0)[-3000:] + _log(work, 1)[-3000:]
    assert "jax.distributed: process 1 of 2, coordinator 127.0.0.1:" in _log(work, 1)
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "sft"]
    assert [r["step"] for r in train] == [1, 2, 3]
    # Throughput counts both processes' rows (the step's own global token count).
    assert all(r["tokens_per_sec"] > 0 and r["tokens"] > 0 for r in train)

    # Process 1 is killed mid-run: process 0, in a collective with it, must not wait out
    # jax.distributed's 5-minute shutdown barrier.
    work = tmp_path / "killed"
    procs = _start(work, "--config.train.steps=100000", "--config.checkpoint.every=100000")
    deadline = time.monotonic() + 240
    while "[sft] step 1:" not in _log(work, 0):
        assert procs[0].poll() is None and time.monotonic() < deadline, _log(work, 0)[-3000:]
        time.sleep(0.2)
    procs[1].kill()
    killed = time.monotonic()
    codes = _wait(procs[:1], timeout=120)
    waited = time.monotonic() - killed
    assert codes[0] not in (0, None) and waited < 45, (waited, codes, _log(work, 0)[-3000:])


def test_environment_without_the_multi_process_flag_is_refused(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    env["JAX_COORDINATOR_ADDRESS"] = "127.0.0.1:1"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxpost.train", *ARGS, f"--config.workdir={tmp_path / 'w'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "but mesh.multi_process=False: this process would train alone" in proc.stderr
    assert not (tmp_path / "w").exists()
