"""The ceilings XLA:CPU's own matmuls put on this machine's figures, next to what jaxpost reaches.

  python benchmarks/xla_ceilings.py [--models 5M,50M] [--parts decode,train] [--repeats 5]
                                   [--out benchmarks/results/xla_ceilings.json]
  python benchmarks/xla_ceilings.py --models 50M --parts streams
                                   --out benchmarks/results/xla_matvec_streams.json
  python benchmarks/xla_ceilings.py --models 50M --parts cores
                                   --out benchmarks/results/xla_decode_cores.json

The performance targets of the train and rollout benchmarks are fractions of two probes: a
1024^3 float32 matmul (training MFU) and a streaming sum (batch-1 decode bandwidth). This script
measures how much of each probe XLA:CPU's matmuls themselves reach at the shapes a model runs,
with every other op removed, so a figure of `train_throughput.py` or `rollout_throughput.py`
can be read against what any XLA program could do here. Float32, one device.

decode  The model's weight matvecs alone, in the order one token reads them (per layer q, k, v,
        o, gate, up, down, then the LM head), each feeding the next, in a jitted scan of 128
        tokens, compiled with the engine's decode options: no attention, norms, cache or
        sampling; with weights [in, out] (x @ w) and [out, in] (`matmul.dot_t`, the engine's
        decode layout), the faster being the ceiling. Reported as tokens/s and as the
        fraction of the bandwidth bound of rollout_throughput.py (every weight + the KV cache
        of the mean context, 64 + 64 tokens, per token, over the measured read bandwidth);
        beside it the engine's batch-1 decode (`run_jaxpost_decode` of rollout_throughput.py)
        in the same window.
streams (not run by default) Each product of the decode step alone: the rate at which
        XLA:CPU reads its weight for a single row, in a chain of that one shape over 128 MiB
        of distinct weights, in both layouts, beside the streaming-sum probe. Where the
        decode chain above falls short of the bound, this says which shapes lose it.
cores   (not run by default) The streaming-sum probe and the decode chain above, each in a
        process pinned to one CPU and in one on all of them: how much a decode step gains from
        more cores against what the probe gains. XLA:CPU splits a single-row product over
        threads only when its weight is large (the MLP's, the head), and runs independent
        products (q, k, v; gate, up) side by side; the small attention products run on one
        thread whatever the CPU count.
train   A full SFT step's matmuls alone (sequence 256, batch 8): per linear layer the forward
        X W and the backward dY W^T and X^T dY; per layer the attention's six batched matmuls
        (QK^T, PV and their four backward products, causal blocks not skipped, as the MFU
        formula counts them); the LM head's three. Each shape is timed alone (best of several)
        and the times summed. The step's FLOPs (the MFU formula of train_throughput.py) over
        that sum and the 1024^3 probe is the MFU a step would reach if every other op were
        free; beside it the jaxpost step (`jax_worker` of train_throughput.py) in the same
        window. Single matmuls one after another: XLA may overlap independent ones in a real
        step, which is why the sum is an estimate, not a bound.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rollout_throughput as rt  # noqa: E402
import train_throughput as tt  # noqa: E402
from common import (  # noqa: E402
    describe_machine,
    format_table,
    machine,
    matmul_flops,
    memory_bandwidth,
    timed,
)
from shapes import MODEL_SHAPES  # noqa: E402

from jaxpost import models  # noqa: E402
from jaxpost.models import matmul  # noqa: E402

TOKENS = 128


def _best(fn, *args, repeats: int) -> float:
    """Best of `repeats` timed calls of fn(*args), after one call that compiles it."""
    jax.block_until_ready(fn(*args))
    return min(timed(lambda: fn(*args), 1) for _ in range(repeats))


# Decode ------------------------------------------------------------------------------------------


def decode_chain_seconds(shape: dict, repeats: int, transposed: bool) -> float:
    """Seconds for TOKENS tokens of the model's matvecs alone (see the module docstring).

    transposed: weights [out, in] times `matmul.dot_t` (the engine's decode layout on CPU);
    else [in, out] weights and x @ w."""
    keys = iter(jax.random.split(jax.random.key(0), 8 * shape["num_layers"] + 1))
    layers = [
        {
            name: jax.random.normal(next(keys), io[::-1] if transposed else io) * 0.02
            for name, io in tt.linear_dims(shape).items()
        }
        for _ in range(shape["num_layers"])
    ]
    d, vocab = shape["hidden_size"], shape["vocab_size"]
    head = jax.random.normal(next(keys), (vocab, d) if transposed else (d, vocab)) * 0.02
    mm = (lambda x, w: matmul.dot_t(x, w, jnp.float32)) if transposed else jnp.matmul

    def token(x, _):
        for w in layers:
            q, k, v = mm(x, w["q"]), mm(x, w["k"]), mm(x, w["v"])
            # The cheapest glue that makes o depend on q, k and v (attention is left out).
            a = q + jnp.tile(k * v, q.shape[-1] // k.shape[-1])
            x = x + mm(a, w["o"])
            x = x + mm(jax.nn.silu(mm(x, w["gate"])) * mm(x, w["up"]), w["down"])
        # Every logit must be used, as greedy sampling does: from a slice of the logits XLA
        # would compute only the columns the slice keeps.
        logits = mm(x, head)
        return x + 1e-3 * jnp.max(logits, axis=-1, keepdims=True), None

    # Compiled with the engine's decode options (single-threaded Eigen on CPU).
    options = matmul.decode_compiler_options()
    run = jax.jit(
        lambda x: jax.lax.scan(token, x, None, length=TOKENS)[0], compiler_options=options
    )
    return _best(run, jnp.ones((1, d), jnp.float32), repeats=repeats)


# Weights per chain of one product: well past the last-level cache (32 MiB on the machines of the
# result files), so every product reads its weight from memory, as a 50M decode step does.
STREAM_BYTES = 128 * 2**20


def matvec_stream_gbs(i: int, o: int, transposed: bool, repeats: int) -> float:
    """GB/s at which XLA:CPU reads an [i, o] weight for one single-row product, in a chain of
    such products over distinct weights (STREAM_BYTES in all, at most 1,024 of them), each
    product's input the previous one's output, as a decode step orders them. Engine's decode
    compile options; transposed: [o, i] weights times `matmul.dot_t`."""
    count = max(2, min(1024, STREAM_BYTES // (4 * i * o)))
    keys = jax.random.split(jax.random.key(1), count)
    weights = [jax.random.normal(k, (o, i) if transposed else (i, o)) * 0.02 for k in keys]
    mm = (lambda x, w: matmul.dot_t(x, w, jnp.float32)) if transposed else jnp.matmul

    def chain(x, weights):
        for w in weights:
            y = mm(x, w)
            x = jnp.tanh(jnp.tile(y, (1, -(-i // o)))[:, :i])  # the next input, from all of y
        return x

    run = jax.jit(chain, compiler_options=matmul.decode_compiler_options())
    seconds = _best(run, jnp.ones((1, i), jnp.float32), weights, repeats=repeats)
    return 4 * i * o * count / seconds / 1e9


def stream_rows(name: str, repeats: int) -> list[dict]:
    """Per product of the model's decode step, the read rate of its weight (matvec_stream_gbs)
    in both layouts, beside the streaming-sum probe the decode bound divides by."""
    shape = MODEL_SHAPES[name]
    dims = {**tt.linear_dims(shape), "head": (shape["hidden_size"], shape["vocab_size"])}
    probe = max(memory_bandwidth()["best"] for _ in range(2)) / 1e9
    rows = []
    for part, (i, o) in dims.items():
        rates = {
            layout: matvec_stream_gbs(i, o, layout == "[out, in]", repeats)
            for layout in ("[in, out]", "[out, in]")
        }
        rows.append({
            "model": name,
            "product": part,
            "weight [in, out]": f"[{i}, {o}]",
            "MB": 4 * i * o / 1e6,
            "per token": shape["num_layers"] if part != "head" else 1,
            **{f"{layout} GB/s": r for layout, r in rates.items()},
            "best of probe": max(rates.values()) / probe,
            "probe GB/s": probe,
        })  # fmt: skip
    return rows


def decode_rows(name: str, repeats: int) -> dict:
    cfg = rt.MODELS[name]
    params = jax.jit(models.init, static_argnums=0)(cfg, jax.random.key(0))
    prompt = list(np.random.default_rng(0).integers(0, cfg.vocab_size, rt.PROMPT))
    engine_decode, tokens = rt.run_jaxpost_decode(cfg, params, prompt, steps_per_call=8)
    chain, chain_t, engine, bandwidth = float("inf"), float("inf"), float("inf"), 0.0
    shape = MODEL_SHAPES[name]
    for _ in range(repeats):  # alternated, best kept: the host's speed drifts
        bandwidth = max(bandwidth, memory_bandwidth()["best"])
        chain = min(chain, decode_chain_seconds(shape, repeats=1, transposed=False))
        chain_t = min(chain_t, decode_chain_seconds(shape, repeats=1, transposed=True))
        engine = min(engine, engine_decode()[0])
    bound = bandwidth / rt.bytes_per_token(cfg, rt.PROMPT + rt.NEW // 2)
    # The ceiling: the faster of the two weight layouts.
    chain_tps, engine_tps = TOKENS / min(chain, chain_t), tokens / engine
    return {
        "model": name,
        "bound tok/s": bound,
        "bandwidth GB/s": bandwidth / 1e9,
        "matvecs [in, out] tok/s": TOKENS / chain,
        "matvecs [out, in] tok/s": TOKENS / chain_t,
        "matvecs alone tok/s": chain_tps,
        "matvecs alone of bound": chain_tps / bound,
        "engine decode tok/s": engine_tps,
        "engine of bound": engine_tps / bound,
        "engine of matvecs alone": engine_tps / chain_tps,
    }


def _pinned_decode(name: str, cpus: list[int], repeats: int, out) -> None:
    """In a fresh process pinned to `cpus`: the streaming-sum probe and the decode chain's
    faster layout, put on `out` as a dict."""
    # Every thread of the process: importing this module (JAX, the benchmarks) has started
    # some already, and a thread's mask is its own; threads started later inherit it.
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), cpus)
    probe = memory_bandwidth(repeats=repeats)["best"]  # the probe every decode bound divides by
    shape = MODEL_SHAPES[name]
    chain = min(decode_chain_seconds(shape, repeats, transposed=t) for t in (False, True))
    out.put({"probe": probe, "chain tok/s": TOKENS / chain})


def cores_rows(name: str, repeats: int) -> list[dict]:
    """The streaming-sum probe and the decode chain (`decode_chain_seconds`, faster layout) in a
    process pinned to one CPU and in one on all of them (module docstring, `cores`)."""
    ctx = multiprocessing.get_context("spawn")  # a fresh XLA client, created after pinning
    cpus = sorted(os.sched_getaffinity(0))
    measured = {}
    for label, pinned in (("one CPU", cpus[:1]), (f"{len(cpus)} CPUs", cpus)):
        queue = ctx.Queue()
        child = ctx.Process(target=_pinned_decode, args=(name, pinned, repeats, queue))
        child.start()
        measured[label] = queue.get()
        child.join()
    per_token = rt.bytes_per_token(rt.MODELS[name], rt.PROMPT + rt.NEW // 2)
    every = measured[label]  # the last: all CPUs
    return [
        {
            "model": name,
            "CPUs": label,
            "probe GB/s": m["probe"] / 1e9,
            "probe of all-CPU probe": m["probe"] / every["probe"],
            "matvecs alone tok/s": m["chain tok/s"],
            "matvecs of all-CPU bound": m["chain tok/s"] * per_token / every["probe"],
            "matvecs of this probe's bound": m["chain tok/s"] * per_token / m["probe"],
        }
        for label, m in measured.items()
    ]


# Train -------------------------------------------------------------------------------------------


def train_matmul_seconds(shape: dict, repeats: int) -> dict[str, float]:
    """Seconds of one full SFT step's matmuls, by part, each shape timed alone."""
    t = tt.BATCH * tt.SEQ
    rand = lambda *s: jax.random.normal(jax.random.key(sum(s)), s)  # noqa: E731
    fwd = jax.jit(lambda x, w: x @ w)
    grad_x = jax.jit(lambda g, w: g @ w.T)
    grad_w = jax.jit(lambda x, g: x.T @ g)

    def linear(i: int, o: int) -> float:
        x, w, g = rand(t, i), rand(i, o), rand(t, o)
        return sum(_best(f, a, b, repeats=repeats) for f, a, b in
                   ((fwd, x, w), (grad_x, g, w), (grad_w, x, g)))  # fmt: skip

    b, s, h, kvh, hd = (tt.BATCH, tt.SEQ, shape["num_heads"], shape["num_kv_heads"],
                        shape["head_dim"])  # fmt: skip
    q, k = rand(b, kvh, h // kvh * s, hd), rand(b, kvh, s, hd)
    p = rand(b, kvh, h // kvh * s, s)
    scores = jax.jit(lambda q, k: jnp.einsum("bkqd,bksd->bkqs", q, k))  # QK^T, and dP = dO V^T
    mix = jax.jit(lambda p, v: jnp.einsum("bkqs,bksd->bkqd", p, v))  # PV, and dQ = dS K
    back = jax.jit(lambda p, o: jnp.einsum("bkqs,bkqd->bksd", p, o))  # dV = P^T dO, dK = dS^T Q
    attention = 2 * sum(
        _best(f, a, c, repeats=repeats) for f, a, c in ((scores, q, k), (mix, p, k), (back, p, q))
    )
    layers = shape["num_layers"]
    return {
        "linear": layers * sum(linear(i, o) for i, o in tt.linear_dims(shape).values()),
        "attention": layers * attention,
        "lm_head": linear(shape["hidden_size"], shape["vocab_size"]),
    }


def train_rows(name: str, repeats: int) -> dict:
    shape = MODEL_SHAPES[name]
    step = tt.jax_worker(name, "full", 2)["records"]
    parts = train_matmul_seconds(shape, repeats)
    peak = matmul_flops(1024, repeats=repeats)
    flops = tt.flops_per_token(shape, "full") * tt.BATCH * tt.SEQ
    matmuls = sum(parts.values())
    best = min(step, key=lambda r: r["seconds"])
    return {
        "model": name,
        "matmul GFLOP/s": peak / 1e9,
        "matmuls alone s": matmuls,
        **{f"{k} s": v for k, v in parts.items()},
        "MFU if only matmuls %": 100 * flops / matmuls / peak,
        "jaxpost step s": best["seconds"],
        "jaxpost MFU %": 100 * flops / best["seconds"] / best["matmul_flops"],
        "step minus matmuls s": best["seconds"] - matmuls,
    }


# --parts: each part's title and its rows for one model (model name, --repeats) -> list.
PARTS = {
    "decode": ("Batch-1 decode, float32:", lambda n, r: [decode_rows(n, r)]),
    "streams": ("Single-row products, float32, each in a chain of its own shape:", stream_rows),
    "cores": ("Batch-1 decode matvecs on one CPU and on all, float32:", cores_rows),
    "train": ("Full SFT step (seq 256, batch 8), float32:", lambda n, r: [train_rows(n, r)]),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="5M,50M")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", default="decode,train", help=f"of {', '.join(PARTS)}")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    names, parts = args.models.split(","), args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown --parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)
    results = {"machine": host}
    for part in parts:
        title, rows_of = PARTS[part]
        rows = [row for n in names for row in rows_of(n, args.repeats)]
        results[part] = rows
        print(f"\n{title}")
        print(format_table(rows, list(rows[0])), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**results, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
