"""Keep freed host memory in the process when JAX runs on the CPU (glibc's malloc).

XLA:CPU allocates an execution's temporaries as one block (a train step's activations and
gradients: `compiled.memory_analysis().temp_size_in_bytes`, 1.79 GB for the 50M benchmark model's
full SFT step) and frees it when the execution ends. glibc's malloc serves every block above
32 MB with a fresh anonymous mmap and gives it back with munmap, so each step faults its
temporaries in again, page by page, and the kernel zeroes every page first: 515,000 minor page
faults and about 1 s of system time per 4.2 s step of that model (`resource.getrusage` around
the step; `strace` shows one 1.79 GB mmap/munmap pair per step). PyTorch's CPU tuning guides
recommend a caching allocator (jemalloc or tcmalloc through LD_PRELOAD) for the same reason;
this does the equivalent from inside the process, with glibc's own switches (`mallopt`):

- M_ARENA_MAX = 1: every thread allocates from the main arena. A thread's own arena can only
  serve a block larger than its 64 MB heap from mmap, whatever the other settings say.
- M_MMAP_MAX = 0: large blocks come from the heap (brk), not from mmap.
- M_TRIM_THRESHOLD = -1: the heap is never trimmed, so a freed block stays mapped and the next
  step reuses it without a fault.

Most executions then run without page faults, and that step took 3.69 instead of 4.06 s on this
project's 2-core CI machine, LoRA's 2.66 instead of 2.95 s (`benchmarks/results/
train_host_memory.json`, the two side by side in one run). The cost is resident memory, which
is why it is opt in. The heap never shrinks, and it fragments. An execution's temporaries are
freed asynchronously, after the caller has its result, and small allocations split freed
blocks. So a step sometimes finds no free block of its size and grows the heap by another.
The 50M step's peak RSS rose from 3.3 to 4.8 GB. A bare jitted function with a 151 MB
temporary grew its heap by 2 to 10 such blocks over its first 60 calls before settling, faulting
on a few calls in ten along the way (`tests/test_host_memory.py`).

Arenas are bound to threads at their first allocation, so this must run before JAX starts its
CPU backend (its thread pools); afterwards it changes nothing for them and is refused. It is
for CPU runs only: on TPU / GPU the temporaries live in device memory. `jaxpost.train` applies
it when asked (config `host.keep_freed_memory`, default False), as does the "jax_keep_memory"
system of `benchmarks/train_throughput.py`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import sys

import jax

# mallopt parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Packages that give JAX an accelerator backend (found without importing or initialising them).
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")


def backend_started() -> bool:
    """Whether JAX has already created its backends (and so its thread pools)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def runs_on_cpu() -> bool:
    """Whether JAX's default backend is, or will be, the CPU, decided without starting it:
    `JAX_PLATFORMS` / `jax_platforms` if set (its first entry), else whether an accelerator
    plugin (libtpu, a CUDA or ROCm plugin, any `jax_plugins` entry point) is installed."""
    if backend_started():
        return jax.default_backend() == "cpu"
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


def keep_freed_memory() -> str:
    """Apply the three malloc settings of the module docstring if JAX runs on the CPU under
    glibc and has not started its backend yet. Returns what happened, one line for the log:
    "applied", or why not ("not on CPU", "not glibc", "backend already started")."""
    if backend_started():
        return "not applied: JAX's backend already started (apply before the first JAX op)"
    if not runs_on_cpu():
        return "not applied: JAX does not run on the CPU"
    libc = _glibc()
    if libc is None:
        return "not applied: the C library is not glibc"
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    if not all(libc.mallopt(param, value) == 1 for param, value in settings):
        return "not applied: mallopt refused a setting"
    return "applied"
