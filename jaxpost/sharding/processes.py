"""Several processes (hosts, or local CPU processes with gloo collectives).

`initialize_distributed` starts `jax.distributed` from arguments, a config or the environment;
host-side collectives let the processes agree on a value or share text; each process then feeds
its own rows and `global_batch` assembles them into one global array over the mesh.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxpost.sharding.mesh import DEFAULT_RULES, Rules, batch_mesh_axes, batch_sharding

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}; expected an integer") from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    config: Mapping | None = None,
    local_device_ids: Sequence[int] | None = None,
    cpu_collectives: str = "gloo",
    initialization_timeout: int = 300,
    detect_cluster: bool = False,
    announce: Callable[[str], None] | None = None,
) -> bool:
    """Start `jax.distributed` when a multi-process run is configured; returns whether it did.

    Each setting comes from the argument, else `config` (a mapping such as `config.mesh` with
    coordinator_address / num_processes / process_id), else the environment
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). Nothing configured: one process
    (a no-op), or with `detect_cluster` JAX's own detection of the cluster it runs on (TPU pod
    slices, SLURM, Open MPI, GKE), as MaxText does. num_processes == 1: a no-op. On CPU,
    cross-process collectives need an implementation: `cpu_collectives` ("gloo" or "mpi") is set
    before initialising. announce(line) is told where it connects before it blocks there (up to
    initialization_timeout seconds for every process to arrive). Must run before any other JAX
    computation. A setting that cannot work is a ValueError naming it.
    """
    config = config or {}
    address = (
        coordinator_address or config.get("coordinator_address") or os.environ.get(ENV_COORDINATOR)
    )
    n = num_processes if num_processes is not None else config.get("num_processes")
    n = n if n is not None else _env_int(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else config.get("process_id")
    pid = pid if pid is not None else _env_int(ENV_PROCESS_ID)
    if address is None and n is None and pid is None:
        if not detect_cluster:
            return False
        if cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        if announce:
            announce("jax.distributed: detecting the cluster (no coordinator address configured)")
        try:
            jax.distributed.initialize(initialization_timeout=initialization_timeout)
        except (ValueError, RuntimeError) as e:
            raise ValueError(
                "a multi-process run needs a coordinator: JAX detected no cluster "
                f"({str(e).splitlines()[0][:200]}); set coordinator_address, num_processes and "
                f"process_id (config.mesh or {ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / "
                f"{ENV_PROCESS_ID})"
            ) from e
        return True
    if n is not None and n == 1:
        return False
    if address is None or n is None or pid is None:
        raise ValueError(
            f"multi-process run half configured: coordinator_address={address!r}, "
            f"num_processes={n!r}, process_id={pid!r}; set all three (arguments, config.mesh or "
            f"{ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID})"
        )
    if not 0 <= pid < n:
        raise ValueError(f"process_id={pid} out of range for num_processes={n}")
    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator_address={address!r}; expected host:port, e.g. 10.0.0.2:1234")
    if announce:
        announce(
            f"jax.distributed: process {pid} of {n}, coordinator {address} (waiting up to "
            f"{initialization_timeout} s for every process)"
        )
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=n,
        process_id=pid,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return True


_AGREE = {"min": np.min, "max": np.max, "any": np.any}


def agree_across_processes(value, how: str):
    """One value every process of a multi-process run agrees on (a host-side collective).

    how: "min", "max" or "any" reduce every process's `value` (a Python or NumPy scalar);
    "first" takes process 0's (`value` may then be an array, e.g. seeds drawn from one
    process's entropy). With one process `value` is returned as it is. Every process must call
    this at the same point, or the run hangs, as with any collective.
    """
    if how not in (*_AGREE, "first"):
        raise ValueError(f"how={how!r}; expected one of {sorted((*_AGREE, 'first'))}")
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    if how == "first":
        return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))
    gathered = multihost_utils.process_allgather(np.asarray(value))
    return _AGREE[how](gathered).item()


def gather_across_processes(text: str) -> list[str]:
    """Every process's `text`, in process order (a host-side collective: every process must call
    it at the same point). With one process: [text]."""
    if jax.process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray(len(data), np.int64)))
    padded = np.zeros(max(1, int(lengths.max())), np.uint8)  # equal shapes on every process
    padded[: len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [bytes(rows[i, : lengths[i]]).decode() for i in range(len(lengths))]


@functools.lru_cache(maxsize=16)  # called for every batch; the answer depends on these alone
def _rows_shared_by_processes(mesh: Mesh, rules: Rules) -> str | None:
    """Why the batch axes do not give each process rows of its own (None if they do). Each
    process feeds different rows; rows two processes share would take one process's and
    silently drop the other's (with data = fsdp = 1, half the batch on two processes)."""
    s = batch_sharding(mesh, 1, rules)
    blocks = math.prod(mesh.shape[a] for a in jax.tree.leaves(s.spec[0]))
    owners: dict[int, set[int]] = {}
    for device, index in s.devices_indices_map((blocks,)).items():
        owners.setdefault(index[0].start or 0, set()).add(device.process_index)
    if all(len(p) == 1 for p in owners.values()):
        return None
    axes = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_mesh_axes(rules))
    return (
        f"the batch mesh axes ({axes}) split the batch into {blocks} block(s), which "
        f"{jax.process_count()} processes must not share: each process feeds rows of its own. "
        f"Make the batch axes a multiple of the process count (tensor parallelism then stays "
        "within a process's devices)"
    )


def global_batch(local: Mapping, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """Global jax.Arrays [B, ...] from each process's own rows [B_local, ...] (numpy).

    Processes hold consecutive blocks of the batch in process order (each process's devices
    own a contiguous range of the batch axes), so B = B_local x (number of distinct row blocks
    across processes); with one process this is B_local and the rows are simply placed.
    B_local must divide evenly over this process's share of the batch axes.
    """
    if jax.process_count() > 1:
        frozen = tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in rules)  # hashable
        if problem := _rows_shared_by_processes(mesh, frozen):
            raise ValueError(problem)
    out = {}
    for name, x in local.items():
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"batch entry {name!r} is a scalar; expected a leading batch dim")
        s = batch_sharding(mesh, x.ndim, rules)
        try:
            out[name] = jax.make_array_from_process_local_data(s, x)
        except ValueError as e:
            raise ValueError(
                f"batch entry {name!r} with local shape {x.shape} does not split over mesh "
                f"{dict(mesh.shape)} batch axes {s.spec[0]}: {e}"
            ) from e
    return out
