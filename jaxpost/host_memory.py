"""Host-memory settings for CPU runs, against the page faults of XLA:CPU's temporaries.

XLA:CPU allocates an execution's temporaries as one block (a train step's activations and
gradients: `compiled.memory_analysis().temp_size_in_bytes`, 1.79 GB for the 50M benchmark model's
full SFT step) and frees it when the execution ends. glibc's malloc serves every block above
32 MB with a fresh anonymous mmap and gives it back with munmap, so each step faults its
temporaries in again, page by page, and the kernel zeroes every page first: 515,000 minor page
faults and about 1 s of system time per 4.2 s step of that model (`resource.getrusage` around
the step; `strace` shows one 1.79 GB mmap/munmap pair per step). Both cures below are for CPU
runs only: on TPU / GPU the temporaries live in device memory.

**Huge pages** (`relaunch_env`; the default of `python -m jaxpost.train`, config
`host.huge_pages`). glibc 2.35 and later take the tunable `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`,
under which malloc asks the kernel for transparent huge pages (`madvise(MADV_HUGEPAGE)`) on the
blocks it maps. A step's temporaries then fault in 2 MiB at a time instead of 4 KiB. On the 50M
full-SFT step (scratch runs, 6 steps each): 12,000-19,000 instead of 515,000 faults and 0.3-0.5
instead of 1 s of system time per step, 3.7-3.9 instead of 4.2 s, at the same peak RSS (3.1-3.2
GB); LoRA 2.6 instead of 2.9-3.0 s. Side by side in `benchmarks/results/train_host_memory.json`
(each system in its own processes, three rounds): 3.83 against 4.05 s, LoRA 2.67 against
3.05 s. The block is still unmapped after each step: fewer, larger
faults are what is saved, not memory. glibc reads its tunables once, when the process starts,
so no call switches them on from inside. `relaunch_env()` says whether starting the process
again with the tunable would help, and with which environment, and `jaxpost.train` re-executes
itself under it (same PID, arguments and working directory) before it does anything else. That
needs the kernel's THP mode to be `madvise`: with `always` every large anonymous mapping gets
huge pages already, with `never` none can. A script or notebook that calls jaxpost directly can
be started with the variable set.

**Keeping freed memory** (`keep_freed_memory`; opt in, config `host.keep_freed_memory`), for
machines whose kernel has huge pages off. PyTorch's CPU tuning guides recommend a caching
allocator (jemalloc or tcmalloc through LD_PRELOAD) for the faults above; this does the
equivalent from inside the process, with glibc's own switches (`mallopt`):

- M_ARENA_MAX = 1: every thread allocates from the main arena. A thread's own arena can only
  serve a block larger than its 64 MB heap from mmap, whatever the other settings say.
- M_MMAP_MAX = 0: large blocks come from the heap (brk), not from mmap.
- M_TRIM_THRESHOLD = -1: the heap is never trimmed, so a freed block stays mapped and the next
  step reuses it without a fault.

Most executions then run without page faults, and that step took 3.81 instead of 4.05 s on this
project's 2-core CI machine, LoRA's 2.73 instead of 3.05 s (`benchmarks/results/
train_host_memory.json`, side by side in one run). The cost is resident memory. The
heap never shrinks, and it fragments. An execution's temporaries are freed asynchronously,
after the caller has its result, and small allocations split freed blocks. So a step sometimes
finds no free block of its size and grows the heap by another. The 50M LoRA step's peak RSS
was 4.0 instead of 2.6 GB in that file, the full step's 4.7 instead of 3.3 GB in earlier runs.
A bare jitted function with a 151 MB temporary grew its heap by 2 to 10 such blocks over its
first 60 calls before settling, faulting on a few calls in ten along the way
(`tests/test_host_memory.py`). Arenas are bound to threads at their first allocation, so this
must run before JAX starts its CPU backend (its thread pools); afterwards it changes nothing
for them and is refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

import jax

# mallopt parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# The glibc tunable that turns on transparent huge pages for malloc's blocks (glibc >= 2.35).
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
_HUGETLB_MIN_GLIBC = (2, 35)
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
# Set in the environment of a restart by `relaunch_env`: for the log, and so that a process
# restarts at most once whatever happens to GLIBC_TUNABLES.
RESTARTED = "JAXPOST_RESTARTED_FOR_HUGE_PAGES"

# Packages that give JAX an accelerator backend (found without importing or initialising them).
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")


def backend_started() -> bool:
    """Whether JAX has already created its backends (and so its thread pools).

    JAX has no public query for this; should its private one move, the answer is True, so the
    settings here are refused (saying the backend started) rather than applied too late."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True


def will_run_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting it (for use
    before the backend starts; afterwards ask `jax.default_backend()`): `JAX_PLATFORMS` /
    `jax_platforms` if set (its first entry), else whether an accelerator plugin (libtpu, a
    CUDA or ROCm plugin, any `jax_plugins` entry point) is installed."""
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES):
        return False
    if importlib.util.find_spec("jax_plugins") is not None:
        return False
    return not list(importlib.metadata.entry_points(group="jax_plugins"))


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version  # only glibc has it (not musl)
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc


def _too_late_or_not_cpu() -> str | None:
    """Why malloc settings made now cannot help this process's JAX (the backend's threads
    already hold their arenas, or JAX will not run on the CPU), or None if they can."""
    if backend_started():
        return "JAX's backend already started"
    if not will_run_on_cpu():
        return "JAX does not run on the CPU"
    return None


def keep_freed_memory() -> str:
    """Apply the three malloc settings of the module docstring if JAX runs on the CPU under
    glibc and has not started its backend yet. Returns what happened, one line for the log:
    "applied", or why not ("not on CPU", "not glibc", "backend already started"), or which
    settings a refusal by mallopt left in force."""
    if (why := _too_late_or_not_cpu()) is not None:
        return f"not applied: {why}"
    libc = _glibc()
    if libc is None:
        return "not applied: the C library is not glibc"
    settings = {"M_ARENA_MAX": (_M_ARENA_MAX, 1), "M_MMAP_MAX": (_M_MMAP_MAX, 0),
                "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, -1)}  # fmt: skip
    # Each mallopt takes effect when called and glibc has no call that restores its defaults,
    # so a refusal after the first leaves the earlier settings in force: say which.
    for i, (name, (param, value)) in enumerate(settings.items()):
        if libc.mallopt(param, value) != 1:
            done = ", ".join(list(settings)[:i]) or "none"
            return f"partly applied: mallopt refused {name} (in force: {done})"
    return "applied"


def _glibc_version(libc) -> tuple[int, ...]:
    text = libc.gnu_get_libc_version().decode()
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def thp_mode(text: str | None = None) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never") from `text` in
    the format of /sys/kernel/mm/transparent_hugepage/enabled (`always [madvise] never`,
    the bracketed one in force), read from there by default; None where there is no such file."""
    if text is None:
        try:
            with open(_THP_ENABLED) as f:
                text = f.read()
        except OSError:
            return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def huge_pages_unneeded_or_impossible() -> str | None:
    """Why this machine has no use for the tunable (the status line), or None if it has: the
    C library is not glibc >= 2.35, or the kernel's THP mode is not `madvise`."""
    libc = _glibc()
    if libc is None or _glibc_version(libc) < _HUGETLB_MIN_GLIBC:
        return "malloc defaults: glibc.malloc.hugetlb needs glibc >= 2.35"
    mode = thp_mode()
    if mode == "always":
        return "transparent huge pages: the kernel gives them to every large mapping"
    if mode != "madvise":
        return f"malloc defaults: the kernel's transparent huge pages are {mode or 'absent'}"
    return None


def huge_pages_env(environ) -> tuple[dict | None, str]:
    """(environment, status) for a new process on this machine: `environ` with the tunable
    added, or None when that would change nothing, with the status line that says why: the
    machine has no use for it (`huge_pages_unneeded_or_impossible`), it is already on, the user
    set `glibc.malloc.hugetlb` to another value (left as set), or `environ` is already that of a
    restart (a process restarts at most once)."""
    if (status := huge_pages_unneeded_or_impossible()) is not None:
        return None, status
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    if HUGETLB_TUNABLE in tunables:
        how = ", restarted with it" if environ.get(RESTARTED) else ""
        return None, f"transparent huge pages for malloc (GLIBC_TUNABLES={HUGETLB_TUNABLE}{how})"
    own = [t for t in tunables if t.startswith("glibc.malloc.hugetlb=")]
    if own:  # the user's choice (0: off; 2: hugetlbfs pages), left as it is
        return None, f"malloc as GLIBC_TUNABLES sets it ({own[-1]})"
    if environ.get(RESTARTED):
        return None, "malloc defaults: restarted once already and the tunable is not set"
    env = {**environ, "GLIBC_TUNABLES": ":".join([*tunables, HUGETLB_TUNABLE]), RESTARTED: "1"}
    return env, "relaunch with GLIBC_TUNABLES=" + env["GLIBC_TUNABLES"]


def relaunch_env(environ=None) -> tuple[dict | None, str]:
    """`huge_pages_env` for restarting this process (`environ` default: its own), which must
    also be one the tunable can still help: JAX's backend not started, JAX on the CPU."""
    env, status = huge_pages_env(os.environ if environ is None else environ)
    if env is not None and (why := _too_late_or_not_cpu()) is not None:
        return None, f"malloc defaults: {why}"
    return env, status


def restart_with_huge_pages() -> str:
    """Re-execute this process under glibc's huge-page tunable if `relaunch_env` says that would
    help (same PID, interpreter, arguments and working directory; this call then never returns);
    otherwise return `relaunch_env`'s status line. For a command's entry point, first thing:
    whatever the process did before is done again."""
    env, status = relaunch_env()
    if env is None:
        return status
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
