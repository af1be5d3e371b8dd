"""Which implementation runs: the Pallas kernel or the plain-XLA reference, and how.

The kernels in this package are written for TPU (Mosaic): grid + BlockSpecs, SMEM scalar
prefetch, VMEM scratch accumulators. `impl` is the switch every entry point takes (and
`ModelConfig.attention_impl` feeds it):

  "xla"     always the reference;
  "pallas"  always the kernel; compiled by Mosaic on TPU, run by Pallas's interpreter
            (`interpret=True`) on any other backend, which is for testing only (slow);
  "auto"    the kernel on TPU when the entry point's shape rule says it pays off, else the
            reference. GPU and CPU always get the reference under "auto" (XLA, which on GPU
            fuses attention through cuDNN where it can); no kernel here has been shown faster
            there.

Under a multi-device mesh (`jaxpost.sharding.use_mesh`), `per_shard` runs a kernel inside
`jax.shard_map`: a Mosaic call is opaque to XLA's SPMD partitioner, which would otherwise gather
every operand onto every device. Attention shards over batch and heads, log-probs over tokens.

Tests that want the TPU interpreter's stricter simulation (memory spaces, DMA semantics,
uninitialised out-of-bounds reads) wrap the call in `tpu_interpret_mode()`; any `pallas_call`
traced inside it runs in TPU interpret mode regardless of the `interpret` argument.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from jaxpost import sharding

IMPLS = ("auto", "xla", "pallas")


def check_impl(impl: str, where: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{where} impl={impl!r}; expected one of {', '.join(IMPLS)}")


def on_tpu() -> bool:
    return jax.default_backend() == "tpu"


def use_kernel(impl: str, where: str, tpu_profitable: bool) -> bool:
    """True when the kernel should run: forced by impl="pallas", or "auto" on a TPU where the
    caller's shape rule (`tpu_profitable`) holds."""
    check_impl(impl, where)
    if impl == "auto":
        return on_tpu() and tpu_profitable
    return impl == "pallas"


def interpret() -> bool:
    """The `interpret` argument for pallas_call: compile on TPU, interpret everywhere else."""
    return not on_tpu()


@contextlib.contextmanager
def tpu_interpret_mode() -> Iterator[None]:
    """Run every Pallas kernel traced inside this context in TPU interpret mode (tests).

    Functions jitted inside must be traced inside (a cached trace from outside is reused as is).
    """
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        yield


def sharded_over(name: str, size: int) -> bool:
    """Whether the active mesh splits a dimension of `size` with logical name `name`."""
    active = sharding.active_mesh()
    if active is None:
        return False
    mesh, rules = active
    return sharding.logical_to_spec((size,), (name,), mesh, rules)[0] is not None


def per_shard(
    fn: Callable, args: Sequence, names: Sequence[Sequence[str | None] | None], out_rank: int
):
    """fn(*args), run per shard of the active mesh when there is one with more than one device.

    names: logical axis names per argument (None: replicated, e.g. a scalar). Every output is
    laid out like the first argument's leading `out_rank` dimensions. Mesh axes that do not
    divide a dimension are dropped, as in `jaxpost.sharding.logical_to_spec`.
    """
    active = sharding.active_mesh()
    if active is None or active[0].size == 1:
        return fn(*args)
    mesh, rules = active
    specs = tuple(
        PartitionSpec() if n is None else sharding.logical_to_spec(a.shape, n, mesh, rules)
        for a, n in zip(args, names)
    )
    out_spec = PartitionSpec(*tuple(specs[0])[:out_rank])
    # check_vma=False: pallas_call output shapes carry no varying-axes annotation.
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)(*args)
