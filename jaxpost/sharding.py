"""One device mesh with axes (data, fsdp, tensor) and logical-axis rules onto it.

Parameters and activations are annotated with logical names (vocab, embed, mlp, heads, kv_heads,
head_dim, batch, length, ...). `rules` map each name to mesh axes. A mesh axis that does not
divide a dimension is dropped for that array (e.g. one KV head under tensor=2), so any model runs
on any mesh; only the memory layout changes.

Several processes (hosts, or local CPU processes with gloo collectives): `initialize_distributed`
starts `jax.distributed` from arguments, a config or the environment; each process then feeds
its own rows and `global_batch` assembles them into one global array over the mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("lora_rank", None),
    ("quant_blocks", ("fsdp", "tensor")),  # the flat codes of an NF4 base (`nf4.BLOCKS_AXIS`)
    # Activations: the batch carries data parallelism, hidden features stay whole.
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all). One size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"{len(devices)} devices cannot be split into mesh {dict(zip(MESH_AXES, sizes))}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices "
            f"but {len(devices)} are available"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def _mesh_axes_for(name: str | None, rules: Rules):
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(
        f"logical axis {name!r} has no sharding rule; rules cover {[r[0] for r in rules]}"
    )


def logical_to_spec(
    shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` with logical `names`, dropping non-dividing axes."""
    if len(shape) != len(names):
        raise ValueError(f"shape {tuple(shape)} and logical names {tuple(names)} differ in rank")
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, names):
        chosen = []
        for axis in _mesh_axes_for(name, rules):
            if axis not in mesh.shape:
                raise ValueError(
                    f"the sharding rule for {name!r} names mesh axis {axis!r}, but the mesh has "
                    f"axes {tuple(mesh.axis_names)} (jaxpost meshes: {MESH_AXES}, from make_mesh)"
                )
            size = mesh.shape[axis]
            if axis in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def logical_to_sharding(shape, names, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(shape, names, mesh, rules))


# Mesh axes that shard weights only to save memory (every use gathers them, as FSDP does), so
# which dimension they split does not matter to the math: when the rule's dimension does not
# divide (a 5376-wide embed over fsdp=512), `weight_spec` moves them to another one that does.
REFIT_AXES = ("fsdp",)


def weight_spec(
    shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
    """`logical_to_spec` for a parameter or optimizer-state leaf, plus: a REFIT_AXES axis that
    some rule of this leaf asks for but no dimension could take (it does not divide) goes to
    the largest other sharded-by-rule dimension it divides, instead of being dropped; without
    that, a model whose hidden size the fsdp axis does not divide would be replicated whole on
    every device."""
    spec = list(logical_to_spec(shape, names, mesh, rules))
    spec += [None] * (len(shape) - len(spec))
    axes_of = [(a,) if isinstance(a, str) else tuple(a or ()) for a in spec]
    used = {a for axes in axes_of for a in axes}
    wanted = {a for name in names for a in _mesh_axes_for(name, rules)}
    for axis in REFIT_AXES:
        if axis in used or axis not in wanted or mesh.shape[axis] == 1:
            continue
        candidates = [d for d, name in enumerate(names) if _mesh_axes_for(name, rules)]
        for d in sorted(candidates, key=lambda d: -shape[d]):
            taken = math.prod(mesh.shape[a] for a in axes_of[d])
            if shape[d] % (taken * mesh.shape[axis]) == 0:
                axes_of[d] = (*axes_of[d], axis)
                used.add(axis)
                break
    return PartitionSpec(*(None if not a else a[0] if len(a) == 1 else a for a in axes_of))


def warn_replicated(abstract_tree, shardings_tree, mesh: Mesh, min_bytes: int = 64 << 20):
    """Warn about leaves of at least `min_bytes` that the fsdp / tensor axes (when > 1) do not
    split at all (no dimension divides): each device then holds all of them. Returns their
    '/'-joined paths."""
    split_axes = [a for a in ("fsdp", "tensor") if a in mesh.shape and mesh.shape[a] > 1]
    if not split_axes:
        return []
    whole, total = [], 0
    leaves = jax.tree_util.tree_leaves_with_path(abstract_tree)
    for (path, x), s in zip(leaves, jax.tree.leaves(shardings_tree)):
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        used = {a for p in s.spec if p for a in ((p,) if isinstance(p, str) else p)}
        if nbytes >= min_bytes and not used & set(split_axes):
            whole.append("/".join(str(getattr(k, "key", k)) for k in path))
            total += nbytes
    if whole:
        sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in split_axes)
        warnings.warn(
            f"{len(whole)} weight arrays ({total / 2**30:.2f} GiB) are held whole on every "
            f"device: no dimension of theirs divides by the mesh's {sizes} (e.g. {whole[:3]}); "
            "choose mesh sizes that divide the model's dimensions",
            stacklevel=2,
        )
    return whole


def tree_shardings(abstract_tree, axes_tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for every leaf of `abstract_tree` (arrays or ShapeDtypeStructs): the
    parameters, optimizer state or LoRA factors named by `axes_tree` (`weight_spec`)."""
    return jax.tree.map(
        lambda x, names: NamedSharding(mesh, weight_spec(x.shape, names, mesh, rules)),
        abstract_tree,
        axes_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# Activation annotations --------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxpost_mesh", default=None
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Within this context, `constrain` pins activations to the mesh (trace-time setting)."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) set by the enclosing `use_mesh`, or None (kernels shard_map over it)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `use_mesh` or on a 1-device mesh."""
    active = _ACTIVE.get()
    if active is None or active[0].size == 1:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, logical_to_sharding(x.shape, names, mesh, rules))


# Multi-process ----------------------------------------------------------------------------------

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


def batch_mesh_axes(rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the rows of a batch split over (the "batch" rule's)."""
    return _mesh_axes_for("batch", rules)


def batch_rows_problem(
    rows: int, axis_sizes: Mapping[str, int], rules: Rules = DEFAULT_RULES, what: str = "batch"
) -> str | None:
    """Why `rows` cannot split evenly over the mesh axes of the "batch" rule (None if they can):
    rows that do not split are replicated, and every device computes the whole batch.

    axis_sizes: mesh axis name -> size (`mesh.shape`, or a config's sizes before any mesh).
    """
    axes = [a for a in _mesh_axes_for("batch", rules) if axis_sizes.get(a, 1) > 1]
    n = math.prod(axis_sizes[a] for a in axes)
    if rows % n == 0:
        return None
    split = " x ".join(f"{a}={axis_sizes[a]}" for a in axes)
    return (
        f"a {what} of {rows} rows does not split over the batch mesh axes ({split} = {n}); "
        f"use a multiple of {n} rows"
    )


def check_batch_rows(rows: int, mesh: Mesh, rules: Rules = DEFAULT_RULES, what: str = "batch"):
    """ValueError naming the problem unless `rows` split over the "batch" rule's mesh axes."""
    problem = batch_rows_problem(rows, mesh.shape, rules, what)
    if problem:
        raise ValueError(problem)


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Rows split over the mesh axes of the "batch" rule (all of them, no divisibility drop)."""
    axes = tuple(a for a in _mesh_axes_for("batch", rules) if mesh.shape[a] > 1)
    first = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


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
    axes = " x ".join(f"{a}={mesh.shape[a]}" for a in _mesh_axes_for("batch", rules))
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
