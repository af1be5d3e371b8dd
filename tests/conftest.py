"""Test-wide settings: 8 simulated CPU devices so mesh tests run in-process.

Must run before JAX is imported anywhere. Single-device tests place arrays on jax.devices()[0]
(JAX's default) and are unaffected.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# The rollout engine stores the CPU weight layout it measures (`rollout.layout_choice`): here in
# a directory of this run's own, not the user's ~/.cache.
if "JAXPOST_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAXPOST_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxpost-test-cache-")
    # pytest-xdist's workers inherit the variable; the process that made the directory removes it.
    atexit.register(shutil.rmtree, os.environ["JAXPOST_CACHE_DIR"], ignore_errors=True)


# Multi-process runs -----------------------------------------------------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from cli_helpers import ROOT, free_port  # noqa: E402


def launch_processes(worker: Path, args, num_processes: int = 2, timeout: float = 240) -> list:
    """Run `python worker <args(pid, port)>` as num_processes local processes of one
    `jax.distributed` job (coordinator port on 127.0.0.1 chosen here) and wait for all of them.

    The workers get this checkout on PYTHONPATH and none of the test-wide XLA_FLAGS /
    JAX_PLATFORMS (each sets its own device count). Fails naming every process that did not
    exit 0, with the tail of its output. Returns each process's output.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), *map(str, args(pid, port))],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(num_processes)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [
        f"process {pid} exited with {p.returncode}:\n{log[-3000:]}"
        for pid, (p, log) in enumerate(zip(procs, logs))
        if p.returncode != 0
    ]
    assert not failed, "\n\n".join(failed)
    return logs


@pytest.fixture
def launch():
    """`launch_processes` (see there), for tests in any subdirectory."""
    return launch_processes
