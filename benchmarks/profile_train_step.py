"""Where the time of one jaxpost train step goes, by model part, from an XLA:CPU profile.

  python benchmarks/profile_train_step.py [--model 50M] [--mode full|lora] [--scan] [--top 25]
                                          [--huge-pages] [--keep-freed-memory]

Builds the train step of `train_throughput.py` (same shapes, seq 256, batch 8, AdamW), times three
steps, then profiles one with `jax.profiler` and sums each XLA op's time by the part of the model
its HLO metadata names (attn, mlp, norm, the loss's chunk loop, the optimizer, ...), split into
matmuls (YNNPACK / dot thunks) and everything else. Times are summed over the runtime's threads,
so independent ops that ran concurrently count twice: compare parts, not the total, with the wall
step time. Needs TensorFlow's xplane proto (installed with the `jetstream` extra) to read the trace.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import MODEL_SHAPES, benchmark_model  # noqa: E402
from train_throughput import ALPHA, BATCH, RANK, SEQ, TARGETS  # noqa: E402

from jaxpost import host_memory, lora, models, sharding, steps  # noqa: E402
from jaxpost.losses import sft_loss  # noqa: E402


def _part(op_name: str) -> str:
    for part in ("attn/", "mlp/", "norm", "linear_cross_entropy", "adam", "clip"):
        if part in op_name:
            return part.strip("/")
    return re.sub(r"\d+", "", op_name)[-50:] or "(no metadata)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="50M", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--mode", default="full", choices=("full", "lora"))
    ap.add_argument("--scan", action="store_true", help="scan over layers (default: unrolled)")
    ap.add_argument("--dtype", default="float32", help="compute dtype of the matmuls")
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--ops", default="", help="also list the slowest single ops of this part")
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="keep freed host memory in the process (`jaxpost.host_memory`), as "
        "`python -m jaxpost.train --config.host.keep_freed_memory=True` does",
    )
    ap.add_argument(
        "--huge-pages",
        action="store_true",
        help="restart under glibc's huge-page tunable (`jaxpost.host_memory`), as "
        "`python -m jaxpost.train` does by default",
    )
    args = ap.parse_args()
    # Before the first JAX op starts the backend.
    if args.huge_pages:
        print("host memory:", host_memory.restart_with_huge_pages())
    if args.keep_freed_memory:
        print("host memory:", host_memory.keep_freed_memory())

    cfg = benchmark_model(args.model, scan_layers=args.scan, dtype=args.dtype)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    opt = steps.make_optimizer(name="adamw", learning_rate=1e-4, schedule="constant")
    base = jax.jit(models.init, static_argnums=0)(cfg, jax.random.key(0))
    lp = None
    if args.mode == "lora":
        targets = [rf"layers/(attn|mlp)/{t}/kernel" for t in TARGETS]
        lp = lora.init(
            cfg, base, rank=RANK, alpha=ALPHA, targets=targets, key=jax.random.key(1),
            dropout=args.lora_dropout,
        )  # fmt: skip
    trainable = "lora" if args.mode == "lora" else "full"
    state = steps.init_train_state(cfg, {"base": base, "lora": lp}, opt, mesh, trainable=trainable)
    step = steps.make_train_step(cfg, sft_loss, opt, mesh, trainable=trainable)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.float32)
    mask[:, -1] = 0.0
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": mask}

    state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    print("step seconds:", " ".join(f"{t:.3f}" for t in times))

    hlo = step.lower(state, batch).compile().as_text()
    op_names = dict(re.findall(r'%([\w.\-]+) = [^\n]*?op_name="([^"]+)"', hlo))
    shapes = dict(re.findall(r"%([\w.\-]+) = (\S+)", hlo))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            state, m = step(state, batch)
            jax.block_until_ready(m)
        from tensorflow.tsl.profiler.protobuf import xplane_pb2

        space = xplane_pb2.XSpace()
        path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    seconds = collections.Counter()
    per_op = collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if "XLAEigen" not in line.name and "PjRt" not in line.name:
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "?")
                if name.startswith(("ThunkExecutor", "Slinky")):
                    continue
                kind = "matmul" if name.startswith(("ynn_fusion", "dot")) else "other"
                part = _part(op_names.get(name, ""))
                seconds[(part, kind)] += event.duration_ps / 1e12
                if args.ops and args.ops == part:
                    op = re.sub(r"\.\d+$", "", name)  # one row per kind of op, all layers
                    key = (op, op_names.get(name, ""), shapes.get(name, ""))
                    per_op[key] += event.duration_ps / 1e12
    print(f"op time summed over threads: {sum(seconds.values()):.3f} s")
    for (part, kind), s in seconds.most_common(args.top):
        print(f"{s:8.3f} s  {kind:6s}  {part}")
    if per_op:
        print(f"slowest ops of {args.ops}, summed over layers:")
        for (name, op, shape), s in per_op.most_common(args.top):
            print(f"{s:8.3f} s  {name:22s} {shape[:32]:32s} {op[-60:]}")


if __name__ == "__main__":
    main()
