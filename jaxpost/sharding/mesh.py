"""The device mesh (data, fsdp, tensor) and the logical-axis rules that map arrays onto it.

Parameters and activations are annotated with logical names (vocab, embed, mlp, heads, kv_heads,
head_dim, batch, length, ...). `rules` map each name to mesh axes. A mesh axis that does not
divide a dimension is dropped for that array (e.g. one KV head under tensor=2), so any model runs
on any mesh; only the memory layout changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import math
import warnings
from collections.abc import Mapping, Sequence

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
    # A LoRA factor's rank side: fsdp, so that the factor of the pair without an embed side
    # (b of q / k / v / gate / up, a of o / down) is split too (`weight_spec` moves it to the
    # other dimension when the rank does not divide).
    ("lora_rank", "fsdp"),
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
    bad = {
        a: s
        for a, s in zip(MESH_AXES, sizes)
        if not isinstance(s, int | np.integer) or isinstance(s, bool) or s < 1 and s != -1
    }
    if bad:
        raise ValueError(f"mesh sizes {bad}: each size is a positive integer, or -1 for the rest")
    sizes = [int(s) for s in sizes]
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


def check_rules(rules: Rules) -> None:
    """ValueError unless `rules` is DEFAULT_RULES' kind: (logical name, mesh axes) pairs, one
    rule for each of DEFAULT_RULES' logical names and none for a name no array has (a misspelt
    or repeated rule would otherwise be ignored, and its array laid out by the default)."""
    if isinstance(rules, Mapping) or not all(
        isinstance(r, tuple | list) and len(r) == 2 and isinstance(r[0], str) for r in rules
    ):
        raise ValueError(
            f"rules must be a sequence of (logical name, mesh axes) pairs like "
            f"sharding.DEFAULT_RULES, e.g. (('batch', ('data', 'fsdp')), ...); got {rules!r:.200}"
        )
    names = [r[0] for r in rules]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        # The first rule of a name is the one used: a later one, meant to override it, would
        # be silently ignored.
        raise ValueError(
            f"sharding rules: {twice} have more than one rule; give each logical axis one (to "
            "change a default, replace its pair rather than appending another)"
        )
    known = [r[0] for r in DEFAULT_RULES]
    unknown = [n for n in names if n not in known]
    missing = [n for n in known if n not in names]
    if unknown or missing:
        near = {n: difflib.get_close_matches(n, missing or known, n=1) for n in unknown}
        hints = [f"{n!r} (did you mean {m[0]!r}?)" if m else repr(n) for n, m in near.items()]
        raise ValueError(
            "sharding rules: "
            + "; ".join(
                part
                for part in (
                    unknown and f"no array has the logical axes {', '.join(hints)}",
                    missing and f"no rule for {missing}",
                )
                if part
            )
            + f" (the logical axes are {known})"
        )


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
    check_rules(rules)
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
    check_rules(rules)
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
