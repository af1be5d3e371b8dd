"""Shared benchmark helpers: timing, and probes of this machine's limits (memory bandwidth,
matmul FLOP/s) that throughput figures are quoted against."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def machine() -> dict:
    """What the figures were measured on: the CPU model, its logical cores, the vector and
    matrix extensions XLA:CPU's kernels use, and the library versions. This project's
    benchmarks have run on different 2-core machines (Intel Xeon with AMX, AMD EPYC without),
    whose figures differ, so every result file records its machine."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:  # not Linux: the model from platform, no flags
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    info = {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "isa": [f for f in wanted if f in flags],
        "jax": jax.__version__,
    }
    try:  # the installed version, without importing torch into a timed process
        info["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    return info


def describe_machine(info: dict) -> str:
    """One line of `machine()` for a benchmark's printout."""
    isa = ", ".join(info["isa"]) or "no AVX2"
    return f"{info['cpu']}, {info['logical_cpus']} logical CPUs ({isa}); jax {info['jax']}"


def timed(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of fn() in seconds; results are blocked on (JAX is asynchronous)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth in bytes/s of streaming an array far larger than the caches.

    Two probes, both read-only streams: a jitted XLA sum and NumPy's sum. The larger is this
    machine's attainable read bandwidth (a lower bound of the hardware peak).
    """
    n = nbytes // 4
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(x))
    xla = nbytes / min(timed(lambda: total(x), 1) for _ in range(repeats))
    host = np.ones((n,), np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        host.sum()
        best = min(best, time.perf_counter() - start)
    return {"xla_sum": xla, "numpy_sum": nbytes / best, "best": max(xla, nbytes / best)}


def matmul_flops(n: int = 1024, repeats: int = 10, dtype=jnp.float32) -> float:
    """FLOP/s of a jitted n x n x n matmul (best of `repeats`), the machine's compute limit.

    The result is float32 whatever the operands' dtype, as in the model's matmuls (XLA:CPU runs
    a bfloat16 x bfloat16 -> bfloat16 dot several times slower than the same dot into float32).
    """
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(mm(a, b))
    best = min(timed(lambda: mm(a, b), 1) for _ in range(repeats))
    return 2 * n**3 / best


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-markdown table of `rows` (dicts) restricted to `columns`."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
