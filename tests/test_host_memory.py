"""jaxpost.host_memory: with freed host memory kept, repeated executions stop faulting in their
temporaries; it is refused off the CPU and once JAX's backend has started. Each case runs in a
fresh process, since the malloc settings are per process and must precede JAX's backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from jaxpost import host_memory

# A jitted function whose [N, N] float32 outer product (N = 6144: 151 MB, far above glibc's
# 32 MB mmap ceiling) is a temporary: the dot after it needs it materialised. After 8 warm-up
# calls, reports the minor page faults of CALLS more and the resident memory after them.
CALLS = 24
_SCRIPT = r"""
import json, resource, sys, time
from jaxpost import host_memory
status = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else "malloc defaults"
import jax, jax.numpy as jnp

@jax.jit
def f(x, v):
    return jnp.outer(x, x) @ v

def rss():  # resident bytes (Linux); 0 where /proc is absent
    try:
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    except OSError:
        return 0

x = jnp.linspace(0.0, 1.0, 6144, dtype=jnp.float32)
v = jnp.ones((6144, 4), jnp.float32)
temp = f.lower(x, v).compile().memory_analysis().temp_size_in_bytes
for _ in range(8):
    f(x, v).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(CALLS):
    f(x, v).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
time.sleep(1.0)  # temporaries are freed after the caller has its result: let that happen
print(json.dumps({"status": status, "temp_bytes": temp, "faults": faults, "rss": rss()}))
"""


def _run(*args: str, platforms: str = "cpu") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = platforms
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300
    )


def _faults(mode: str) -> dict:
    proc = _run("-c", f"CALLS = {CALLS}\n" + _SCRIPT, mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kept_memory_saves_most_page_faults_and_keeps_the_heap():
    pages = 6144 * 6144 * 4 // 4096  # the temporary's 4 KiB pages
    defaults, kept = _faults("defaults"), _faults("keep")
    if host_memory._glibc() is None:  # macOS, musl: refused by name, nothing changed
        assert kept["status"] == "not applied: the C library is not glibc"
        return
    assert kept["status"] == "applied"
    assert defaults["temp_bytes"] >= 6144 * 6144 * 4  # the outer product is a temporary
    # Malloc's defaults: every call maps its temporary afresh and faults in every page of it.
    assert defaults["faults"] > 0.9 * pages * CALLS, defaults
    # Kept: most calls reuse a freed block in place. Not all: a block split by small
    # allocations no longer fits, and the call grows the heap instead (module docstring; 0-5
    # of 24 calls faulted in scratch runs).
    assert kept["faults"] < 0.5 * defaults["faults"], (kept, defaults)
    # The price: the heap keeps at least one freed temporary resident after the calls.
    assert kept["rss"] - defaults["rss"] > 0.9 * defaults["temp_bytes"], (kept, defaults)


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
