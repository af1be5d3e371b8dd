"""Train throughput: jaxpost full and LoRA SFT steps against a plain PyTorch loop, in one run.

  python benchmarks/train_throughput.py [--models 5M,50M] [--modes full,lora] [--steps 4]
                                        [--dtypes float32,bfloat16] [--rounds 1]
                                        [--out benchmarks/results/train_throughput.json]

For each Qwen3-style model (~5M and ~50M parameters, the rollout benchmark's shapes), sequence
256, batch 8, AdamW:
  jaxpost  `steps.make_train_step` + `losses.sft_loss` (fused chunked log-probs), one device;
           LoRA r=8, alpha=16 on q, k, v, o, gate, up, down with the base frozen. Systems
           (`jaxpost.host_memory`): "jax" runs as `python -m jaxpost.train` does by default,
           with glibc's huge-page tunable where the machine has a use for it;
           "jax_plain_malloc" without it; "jax_keep_memory" without it but with freed host
           memory kept (`--config.host.huge_pages=False --config.host.keep_freed_memory=True`)
  torch    the `transformers` Qwen3ForCausalLM of the same shape, torch CPU with 2 threads,
           torch.optim.AdamW, loss from model(labels=...); LoRA through PEFT (same targets);
           "torch_huge_pages" is the same loop under glibc's huge-page tunable
Each workload runs in float32 and in bfloat16 mixed precision (float32 master weights, optimizer
state, norms, softmax and loss; matmul operands in bfloat16 with float32 results): jaxpost with
ModelConfig(dtype="bfloat16"), torch under torch.autocast("cpu", bfloat16).
Every workload runs in its own subprocess (clean peak RSS, fresh thread pools). Each timed step
is bracketed by matmul FLOP/s probes of the same framework and dtype (this machine's speed drifts
by up to 2x, so the figure is taken in the same window as the step).

MFU = FLOPs per step / step time / measured matmul FLOP/s of the row's dtype (the issue's targets
are on the float32 rows), with FLOPs per token
  full SFT:  6 N + 12 L d T       (N: parameters in matmuls, the input embedding excluded; with
                                   tied embeddings the matrix counts once, as the LM head)
  LoRA SFT:  4 N + 12 L d T + 6 N_lora   (no weight gradients for the frozen base)
Peak memory is the worker process's peak RSS (the runtime's and XLA compiler's own memory
included), and for jaxpost also step_buffers_MB: the bytes of the step's buffers from XLA's
buffer assignment (`memory_analysis()`: inputs + outputs - donated aliases + temporaries), i.e.
params, optimizer state, batch, activations and gradients without the runtime around them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import MODEL_SHAPES, benchmark_model  # noqa: E402

SEQ, BATCH, RANK, ALPHA = 256, 8, 8, 16.0
LR = 1e-4
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def linear_dims(shape: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one transformer layer."""
    d, f, h, kv, hd = (shape[k] for k in ("hidden_size", "intermediate_size", "num_heads",
                                           "num_kv_heads", "head_dim"))  # fmt: skip
    return {"q": (d, h * hd), "k": (d, kv * hd), "v": (d, kv * hd), "o": (h * hd, d),
            "gate": (d, f), "up": (d, f), "down": (f, d)}  # fmt: skip


def matmul_params(shape: dict) -> dict[str, int]:
    """Parameters that enter matmuls (N), total parameters and LoRA factor parameters."""
    d, hd = shape["hidden_size"], shape["head_dim"]
    v, layers = shape["vocab_size"], shape["num_layers"]
    dims = linear_dims(shape)
    per_layer = sum(i * o for i, o in dims.values())
    norms = layers * (2 * d + 2 * hd) + d
    n = layers * per_layer + d * v  # the tied matrix counted once, as the LM head
    lora = layers * sum(RANK * (i + o) for i, o in dims.values())
    return {"N": n, "total": n + norms, "lora": lora}


def flops_per_token(shape: dict, mode: str) -> float:
    p = matmul_params(shape)
    attn = 12 * shape["num_layers"] * shape["num_heads"] * shape["head_dim"] * SEQ
    if mode == "full":
        return 6 * p["N"] + attn
    return 4 * p["N"] + attn + 6 * p["lora"]


def _batch(rng, vocab):
    import numpy as np

    tokens = rng.integers(0, vocab, (BATCH, SEQ)).astype(np.int32)
    return tokens


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# Workers -----------------------------------------------------------------------------------------


# framework -> (worker, glibc huge-page tunable, keep freed memory): see the module docstring.
SYSTEMS = {
    "jax": ("jax", True, False),
    "jax_plain_malloc": ("jax", False, False),
    "jax_keep_memory": ("jax", False, True),
    "torch": ("torch", False, False),
    "torch_huge_pages": ("torch", True, False),
}


def jax_worker(
    model: str, mode: str, steps_: int, dtype: str = "float32", keep_freed_memory: bool = False
) -> dict:
    from jaxpost import host_memory

    # "jax_keep_memory": first thing, as `python -m jaxpost.train` does when asked (before JAX
    # starts its thread pools).
    if keep_freed_memory and (status := host_memory.keep_freed_memory()) != "applied":
        raise RuntimeError(f"host_memory.keep_freed_memory(): {status}")

    import jax
    import numpy as np
    from common import matmul_flops

    from jaxpost import lora, models, sharding, steps
    from jaxpost.losses import sft_loss

    cfg = benchmark_model(model, dtype=dtype)  # layers unrolled (`common.benchmark_model`)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    opt = steps.make_optimizer(name="adamw", learning_rate=LR, schedule="constant")
    base = jax.jit(models.init, static_argnums=0)(cfg, jax.random.key(0))
    lp = None
    if mode == "lora":
        targets = [rf"layers/(attn|mlp)/{t}/kernel" for t in TARGETS]
        lp = lora.init(cfg, base, rank=RANK, alpha=ALPHA, targets=targets, key=jax.random.key(1))
    trainable = "lora" if mode == "lora" else "full"
    state = steps.init_train_state(cfg, {"base": base, "lora": lp}, opt, mesh, trainable=trainable)
    del base, lp
    train_step = steps.make_train_step(cfg, sft_loss, opt, mesh, trainable=trainable)
    rng = np.random.default_rng(0)

    def batch():
        tokens = _batch(rng, cfg.vocab_size)
        mask = np.ones((BATCH, SEQ), np.float32)
        mask[:, -1] = 0.0
        return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": mask}

    t0 = time.perf_counter()
    state, m = train_step(state, batch())
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    state, m = train_step(state, batch())
    jax.block_until_ready(m)
    records = []
    for _ in range(steps_):
        b = batch()
        f0 = matmul_flops(1024, repeats=4, dtype=dtype)
        t0 = time.perf_counter()
        state, m = train_step(state, b)
        loss = float(m["loss"])
        dt = time.perf_counter() - t0
        f1 = matmul_flops(1024, repeats=4, dtype=dtype)
        records.append({"seconds": dt, "matmul_flops": (f0 + f1) / 2, "loss": loss})
    # The step's own buffers, from XLA's buffer assignment (cached executable, no recompile):
    # params + optimizer state + batch in, activations and gradients as temporaries.
    mem = train_step.lower(state, batch()).compile().memory_analysis()
    buffers = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return {
        "records": records,
        "compile_s": compile_s,
        "peak_rss_mb": _peak_rss_mb(),
        "step_buffers_mb": buffers / 1e6,
    }


def _torch_matmul_flops(n: int = 1024, repeats: int = 4, dtype: str = "float32") -> float:
    import torch

    a, b = (
        torch.randn(n, n, dtype=getattr(torch, dtype)),
        torch.randn(n, n, dtype=getattr(torch, dtype)),
    )
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def torch_worker(model: str, mode: str, steps_: int, dtype: str = "float32") -> dict:
    import contextlib

    import numpy as np
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    s = MODEL_SHAPES[model]
    config = Qwen3Config(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        head_dim=s["head_dim"], tie_word_embeddings=True, rope_theta=1e6,
        max_position_embeddings=4096, attn_implementation="sdpa",
    )  # fmt: skip
    net = Qwen3ForCausalLM(config)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        names = [f"{t}_proj" for t in TARGETS]
        net = get_peft_model(net, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=names))
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LR)
    rng = np.random.default_rng(0)

    def precision():
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=getattr(torch, dtype))

    def step():
        ids = torch.from_numpy(_batch(rng, s["vocab_size"]).astype(np.int64))
        with precision():
            loss = net(input_ids=ids, labels=ids).loss  # HF shifts labels inside
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    step()
    records = []
    for _ in range(steps_):
        f0 = _torch_matmul_flops(dtype=dtype)
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        f1 = _torch_matmul_flops(dtype=dtype)
        records.append({"seconds": dt, "matmul_flops": (f0 + f1) / 2, "loss": loss})
    return {"records": records, "compile_s": compile_s, "peak_rss_mb": _peak_rss_mb()}


# Driver ------------------------------------------------------------------------------------------


def run_worker(framework: str, model: str, mode: str, dtype: str, steps_: int) -> dict:
    from jaxpost import host_memory

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    env["JAX_PLATFORMS"] = "cpu"
    # The environment `python -m jaxpost.train` restarts itself with (the tunable only where the
    # machine has a use for it: glibc >= 2.35, kernel THP "madvise").
    if SYSTEMS[framework][1]:
        env = host_memory.huge_pages_env(env)[0] or env
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, model, mode, dtype]
    cmd += ["--steps", str(steps_)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{framework} {model} {mode} {dtype} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(framework: str, model: str, mode: str, dtype: str, result: dict) -> dict:
    shape = MODEL_SHAPES[model]
    tokens = BATCH * SEQ
    flops = flops_per_token(shape, mode) * tokens
    recs = result["records"]
    secs = statistics.median(r["seconds"] for r in recs)
    mfu = statistics.median(flops / r["seconds"] / r["matmul_flops"] for r in recs)
    return {
        "model": model,
        "params_M": matmul_params(shape)["total"] / 1e6,
        "mode": mode,
        "dtype": dtype,
        "framework": framework,
        "step_s": secs,
        "tokens_per_s": tokens / secs,
        "matmul_GFLOPs": statistics.median(r["matmul_flops"] for r in recs) / 1e9,
        "MFU_%": 100 * mfu,
        "peak_rss_MB": result["peak_rss_mb"],
        "step_buffers_MB": result.get("step_buffers_mb"),
        "first_step_s": result["compile_s"],
        "glibc_tunables": result.get("glibc_tunables", ""),
        "loss": recs[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="5M,50M")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument(
        "--frameworks",
        default="jax,torch",
        help="jax: jaxpost's train step as `python -m jaxpost.train` runs it (glibc's huge-page "
        "tunable where it helps); jax_plain_malloc: without it; jax_keep_memory: freed host "
        "memory kept instead (`jaxpost.host_memory`); torch: the plain PyTorch loop; "
        "torch_huge_pages: the same under glibc's huge-page tunable",
    )
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every cell this many times, round-robin, and pool each cell's timed steps: "
        "this host's speed drifts by 10-25%% within an hour, and rounds spread each cell "
        "over several windows so the ratios between cells compare like with like",
    )
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "train_throughput.json"))  # fmt: skip
    ap.add_argument("--worker", nargs=4, metavar=("FRAMEWORK", "MODEL", "MODE", "DTYPE"))
    args = ap.parse_args()
    if args.worker:
        framework, model, mode, dtype = args.worker
        worker, _, keep = SYSTEMS[framework]
        if worker == "torch":
            result = torch_worker(model, mode, args.steps, dtype)
        else:
            result = jax_worker(model, mode, args.steps, dtype, keep_freed_memory=keep)
        result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
        print(json.dumps(result))
        return

    from common import describe_machine, format_table, machine

    unknown = set(args.frameworks.split(",")) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown --frameworks {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)
    load = os.getloadavg()
    cells = [(framework, model, mode, dtype) for dtype in args.dtypes.split(",")
             for model in args.models.split(",") for mode in args.modes.split(",")
             for framework in args.frameworks.split(",")]  # fmt: skip
    results: dict[tuple, dict] = {}
    for round_ in range(args.rounds):
        for cell in cells:
            result = run_worker(*cell, args.steps)
            row = summarise(*cell, result)
            print(
                f"{' '.join(cell[1:] + cell[:1])}: {row['tokens_per_s']:.0f} tok/s, "
                f"MFU {row['MFU_%']:.1f}%, peak {row['peak_rss_MB']:.0f} MB"
                + (f" (round {round_ + 1})" if args.rounds > 1 else ""),
                flush=True,
            )
            if cell in results:  # pool the steps; the first round's compile time and the peak
                pooled = results[cell]
                pooled["records"] += result["records"]
                pooled["peak_rss_mb"] = max(pooled["peak_rss_mb"], result["peak_rss_mb"])
            else:
                results[cell] = result
    rows = [summarise(*cell, results[cell]) for cell in cells]
    by = {(r["model"], r["mode"], r["dtype"], r["framework"]): r for r in rows}
    for r in rows:
        torch_row = by.get((r["model"], r["mode"], r["dtype"], "torch"))
        full_row = by.get((r["model"], "full", r["dtype"], r["framework"]))
        if r["framework"].startswith("jax") and torch_row:
            r["x_torch"] = r["tokens_per_s"] / torch_row["tokens_per_s"]
        if r["mode"] == "lora" and full_row:
            r["x_full"] = r["tokens_per_s"] / full_row["tokens_per_s"]

    columns = ["model", "params_M", "mode", "dtype", "framework", "step_s", "tokens_per_s",
               "x_torch", "x_full", "matmul_GFLOPs", "MFU_%", "peak_rss_MB", "step_buffers_MB",
               "first_step_s"]  # fmt: skip
    print()
    print(format_table(rows, columns))
    print(f"\nload average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"(1/5/15 min, {os.cpu_count()} CPUs); at end: {os.getloadavg()[0]:.2f}")  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        meta = {"seq": SEQ, "batch": BATCH, "lora_rank": RANK, "lora_alpha": ALPHA, "lr": LR,
                "load_avg_start": load, "load_avg_end": os.getloadavg(),
                "machine": host}  # fmt: skip
        json.dump({"rows": rows, "settings": meta, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
