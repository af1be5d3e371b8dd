"""jaxpost.host_memory: under glibc's huge-page tunable, and with freed host memory kept,
repeated executions fault in their temporaries far less often; the settings are refused, by
name, where they cannot help (off the CPU, once JAX's backend has started, the kernel's or C
library's support missing). Each measured case runs in a fresh process, since the malloc
settings are per process and must precede JAX's backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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


def _run(*args: str, platforms: str = "cpu", tunables: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    env["JAX_PLATFORMS"] = platforms
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300
    )


def _faults(mode: str, tunables: str = "") -> dict:
    proc = _run("-c", f"CALLS = {CALLS}\n" + _SCRIPT, mode, tunables=tunables)
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


def test_huge_pages_tunable_saves_most_page_faults_at_the_same_memory():
    pages = 6144 * 6144 * 4 // 4096  # the temporary's 4 KiB pages
    why_not = host_memory.huge_pages_unneeded_or_impossible()
    if why_not is not None:  # not glibc >= 2.35, or kernel THP "always" / "never": no restart
        env, status = host_memory.relaunch_env({})
        assert env is None and status == why_not
        return
    defaults, huge = _faults("defaults"), _faults("defaults", host_memory.HUGETLB_TUNABLE)
    assert defaults["faults"] > 0.9 * pages * CALLS, defaults
    # 2 MiB pages: 512 times fewer faults where the kernel finds free huge pages; fewer than a
    # quarter leaves room for a fragmented machine's 4 KiB fallbacks (scratch: 40-500 times).
    assert huge["faults"] < 0.25 * defaults["faults"], (huge, defaults)
    # Unlike keeping freed memory, the temporary is still returned after each call.
    assert huge["rss"] < defaults["rss"] + 0.5 * defaults["temp_bytes"], (huge, defaults)


def test_relaunch_env_adds_the_tunable_once_and_keeps_the_users_own():
    # In a fresh process: this test process's backend may have started.
    code = r"""
import json
from jaxpost import host_memory as hm
cases = [{}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
         {"GLIBC_TUNABLES": hm.HUGETLB_TUNABLE, hm.RESTARTED: "1"},
         {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {hm.RESTARTED: "1"}]
out = []
for environ in cases:
    env, status = hm.relaunch_env({**environ, "PATH": "/bin"})
    keys = ("GLIBC_TUNABLES", hm.RESTARTED, "PATH")
    out.append([None if env is None else {k: env.get(k) for k in keys}, status])
print(json.dumps({"why_not": hm.huge_pages_unneeded_or_impossible(), "cases": out,
                  "started": hm.backend_started()}))
"""
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["started"] is False  # deciding started nothing
    if got["why_not"] is not None:
        assert all(case == [None, got["why_not"]] for case in got["cases"])
        return
    tunable, restarted = host_memory.HUGETLB_TUNABLE, host_memory.RESTARTED
    fresh, other, active, users, looped = got["cases"]
    assert fresh == [{"GLIBC_TUNABLES": tunable, restarted: "1", "PATH": "/bin"},
                     f"relaunch with GLIBC_TUNABLES={tunable}"]  # fmt: skip
    assert other[0]["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{tunable}"
    assert active == [None, f"transparent huge pages for malloc (GLIBC_TUNABLES={tunable}, "
                            "restarted with it)"]  # fmt: skip
    assert users == [None, "malloc as GLIBC_TUNABLES sets it (glibc.malloc.hugetlb=0)"]
    assert looped[0] is None and "restarted once already" in looped[1]


def test_huge_pages_refused_off_the_cpu_and_after_the_backend_started():
    if host_memory.huge_pages_unneeded_or_impossible() is not None:
        return  # the machine's answer comes first; checked in the test above
    proc = _run("-c", "from jaxpost import host_memory as hm; print(hm.relaunch_env({})[1])",
                platforms="tpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "malloc defaults: JAX does not run on the CPU"
    import jax

    jax.devices()
    assert host_memory.relaunch_env({}) == (None, "malloc defaults: JAX's backend already started")


@pytest.mark.parametrize(
    "text, mode",
    [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
     ("always madvise [never]", "never"), ("", None)],
)  # fmt: skip
def test_thp_mode_reads_the_bracketed_choice(text, mode):
    assert host_memory.thp_mode(text) == mode


def test_train_called_as_a_function_never_restarts_its_caller():
    """`jaxpost.train.main` restarts only `python -m jaxpost.train` itself: called from a
    script or notebook, the process is not its own, and the log line says so."""
    code = r"""
from jaxpost import config as jconfig, host_memory, train
cfg = jconfig.defaults()
print(host_memory.relaunch_env()[0] is not None)
print(train._host_memory(cfg, may_relaunch=False))  # a restart would run this script twice
cfg.host.huge_pages = False
print(train._host_memory(cfg, may_relaunch=False))
"""
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    would_help, line, off = proc.stdout.strip().splitlines()  # three lines: run once
    if would_help == "True":  # this machine and CI's (glibc >= 2.35, kernel THP "madvise")
        assert (
            line
            == "malloc defaults: not started as python -m jaxpost.train; keep freed memory: off"
        )
    else:
        assert line.startswith(("malloc defaults", "transparent huge pages")), line
    assert off == "malloc defaults (host.huge_pages=False); keep freed memory: off"
