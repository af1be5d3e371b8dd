"""jaxpost.host_memory: with freed host memory kept, repeated executions stop faulting in their
temporaries; it is refused off the CPU and once JAX's backend has started. Each case runs in a
fresh process, since the malloc settings are per process and must precede JAX's backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxpost import host_memory

# A jitted function whose [N, N] float32 outer product (N = 6144: 151 MB, far above glibc's
# 32 MB mmap ceiling) is a temporary: the dot after it needs it materialised. Runs it 4 times
# and reports the minor page faults of the last two.
_SCRIPT = r"""
import json, resource, sys
from jaxpost import host_memory
status = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else "glibc defaults"
import jax, jax.numpy as jnp

@jax.jit
def f(x, v):
    return jnp.outer(x, x) @ v

x = jnp.linspace(0.0, 1.0, 6144, dtype=jnp.float32)
v = jnp.ones((6144, 4), jnp.float32)
temp = f.lower(x, v).compile().memory_analysis().temp_size_in_bytes
for _ in range(2):
    f(x, v).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    f(x, v).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"status": status, "temp_bytes": temp, "faults_per_call": faults / 2}))
"""


def _run(*args: str, platforms: str = "cpu") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = platforms
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300
    )


def _faults(mode: str) -> dict:
    proc = _run("-c", _SCRIPT, mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="the malloc settings are glibc's")
def test_kept_memory_stops_the_page_faults_of_each_execution():
    pages = 6144 * 6144 * 4 // 4096  # the temporary's 4 KiB pages
    glibc, kept = _faults("glibc"), _faults("keep")
    assert kept["status"] == "applied"
    assert glibc["temp_bytes"] >= 6144 * 6144 * 4  # the outer product is a temporary
    # glibc's defaults: every call maps its temporary afresh and faults in every page of it.
    assert glibc["faults_per_call"] > 0.9 * pages, glibc
    # Kept: the freed block is reused in place.
    assert kept["faults_per_call"] < 0.02 * pages, kept


def test_refused_once_the_backend_has_started():
    import jax

    jax.devices()  # this test process's backend is running
    status = host_memory.keep_freed_memory()
    assert status.startswith("not applied") and "backend already started" in status


def test_refused_when_jax_does_not_run_on_the_cpu():
    # JAX_PLATFORMS names the backend; deciding must not start it (there is no TPU here).
    code = (
        "from jaxpost import host_memory; print(host_memory.keep_freed_memory()); "
        "print(host_memory.backend_started())"
    )
    proc = _run("-c", code, platforms="tpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["not applied: JAX does not run on the CPU", "False"]
