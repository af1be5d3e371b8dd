"""Rollout throughput: the jaxpost engine against three baselines, in one run.

  python benchmarks/rollout_throughput.py [--models 5M,50M] [--dtype float32|bfloat16]
                                          [--out rollout_throughput.json]

Generated tokens/s (greedy, 64-token prompts) for
  jaxpost     continuous batching over the paged-cache engine (`rollout.Driver`; it admits
              the largest max_new_tokens first, and on the mixed workload also as
              "jaxpost fifo", in the given order)
  while_loop  a fixed-batch sampler: prefill a batch into a dense KV cache (the head on the
              last position only), then one jitted `lax.while_loop` decodes until every row is
              done; batches run one after another
              (on the mixed workload also as "while_loop sorted": batches of similar lengths)
  naive       re-runs the whole (padded) sequence every step, one jitted call per token; its
              step cost does not depend on the position, so it is timed over a few steps
  hf          `transformers` generate on the same weights (torch CPU, 2 threads)
and, at batch 1, "jaxpost decode": the engine's generate calls alone (prefill excluded),
the figure the bandwidth bound describes; with --compare-layout also the engine with the
weight layout it does not default to ("jaxpost [in, out]" or "jaxpost [out, in]";
`rollout.Engine(decode_layout=...)`), for the layout's gain (the "layout" column is the one the
engine measured as this machine's faster, `rollout.layout_choice`; the jax baselines use it too),
each compiled beforehand and timed --repeats times in alternation (best run kept), on three
workloads: batch 1 and batch 16 with 128 new tokens each (uniform), and 64 requests
with output lengths drawn from 8 to 128 through 16 slots (mixed). Only requested tokens count.
The last columns compare with this machine's limits, measured in each workload's window (once
per round of runs, best kept): at batch 1 the bytes one token must read (all weights + the KV
cache) over the read bandwidth; at batch 16 the FLOPs per token over the matmul FLOP/s.
--dtype bfloat16 stores the weights and the KV cache in bfloat16 and multiplies in bfloat16 (float32
results) in every system, `transformers` included; the limits then count 2-byte weights and the
bfloat16 matmul FLOP/s.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    describe_machine,
    format_table,
    machine,
    matmul_flops,
    memory_bandwidth,
)
from shapes import MODEL_SHAPES, benchmark_model  # noqa: E402

from jaxpost import models, rollout  # noqa: E402
from jaxpost.models import matmul  # noqa: E402
from jaxpost.models.kv_cache import DenseKVCache  # noqa: E402

PROMPT, NEW = 64, 128
# --compare-layout's extra system, by the decode_layout it runs the engine with.
LAYOUTS = {False: "jaxpost [in, out]", True: "jaxpost [out, in]"}
MODELS = {name: benchmark_model(name) for name in MODEL_SHAPES}


def workloads(rng, vocab):
    prompt = lambda: list(rng.integers(0, vocab, PROMPT))
    return {
        "uniform b1": (1, [prompt() for _ in range(2)], [NEW] * 2),
        "uniform b16": (16, [prompt() for _ in range(16)], [NEW] * 16),
        "mixed b16": (16, [prompt() for _ in range(64)], list(rng.integers(8, NEW + 1, 64))),
    }


# Systems: each prepares (compiles) a workload and returns a function that runs it once and
# returns (seconds, first request's tokens); `main` alternates the systems' runs. ---------------


def make_engine(cfg, params, slots, steps_per_call, **engine_kwargs):
    return rollout.Engine(
        cfg,
        params,
        slots=slots,
        max_len=PROMPT + NEW,
        max_prefill_length=PROMPT,
        page_size=16,
        steps_per_call=steps_per_call,
        **engine_kwargs,
    )


def run_jaxpost(
    cfg, params, batch, prompts, news, steps_per_call, admission="longest_first", **engine_kwargs
):
    engine = make_engine(cfg, params, batch, steps_per_call, **engine_kwargs)
    reqs = [
        rollout.Request(p, rollout.SamplingParams(max_new_tokens=int(n), temperature=0.0))
        for p, n in zip(prompts, news)
    ]
    driver = rollout.Driver(engine, admission=admission)
    # Compile every shape the workload needs (prefill batch x length buckets) beforehand, as
    # for the baselines: an RL loop sees the same shapes every step.
    driver.run(reqs, progress=False)

    def timed():
        start = time.perf_counter()
        outs = driver.run(reqs, progress=False)
        return time.perf_counter() - start, outs[0][0].tokens

    return timed


def run_jaxpost_decode(cfg, params, prompt, steps_per_call):
    """Batch-1 decode alone: the engine's generate calls for one request, prefill excluded.

    This is the figure the bandwidth bound describes (a prefill is compute-bound); the
    end-to-end `jaxpost` column includes the prefills and the driver's host work.
    Returns the timed function and the number of tokens it decodes."""
    engine = make_engine(cfg, params, 1, steps_per_call)
    p = engine.params
    greedy = rollout.SamplingParams(max_new_tokens=NEW, temperature=0.0)
    (prefix,) = engine.prefill_many(params=p, prompts=[prompt])
    calls = NEW // steps_per_call
    state = engine.init_decode_state()

    def decode():
        nonlocal state
        state = engine.insert(prefix, state, 0, sampling=greedy)
        jax.block_until_ready(state)
        start = time.perf_counter()
        results = []
        for _ in range(calls):
            state, result = engine.generate(p, state)
            results.append(result)
        tokens = [result.to_numpy()["tokens"][0] for result in results]
        return time.perf_counter() - start, list(np.concatenate(tokens))

    decode()  # compile
    return decode, calls * steps_per_call


# Compiled with the engine's decode options (single-threaded Eigen on CPU), so the comparison
# is of the two samplers, not of their compile flags.
@functools.partial(
    jax.jit, static_argnums=(0, 3), compiler_options=matmul.decode_compiler_options()
)
def _while_loop_sample(cfg, params, prompts, max_steps, max_new):
    """Fixed batch: prefill [B, P] into a dense cache, then decode until every row is done."""
    b, p = prompts.shape
    # A 16-bit cache stored as its bits on CPU, as the engine's pools are (`kv_cache.store`).
    cache = DenseKVCache.create(cfg, b, p + max_steps, as_bits=matmul.on_cpu())
    # The head on the last position alone, as the engine's prefill and `transformers`
    # generate do: the [B, P, V] logits would cost the 50M model ~0.2 s per batch of 16.
    hidden, cache = models.apply(cfg, params, prompts, cache=cache, return_hidden=True)
    logits = models.logits_from_hidden(cfg, params, hidden[:, -1])
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = jnp.zeros((b, max_steps), jnp.int32).at[:, 0].set(first)

    def cond(carry):
        step, _, _, _ = carry
        return (step < max_steps) & jnp.any(step < max_new)

    def body(carry):
        step, tok, cache, out = carry
        pos = jnp.full((b, 1), p + step - 1, jnp.int32)
        logits, cache = models.apply(cfg, params, tok[:, None], positions=pos, cache=cache)
        tok = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return step + 1, tok, cache, out.at[:, step].set(tok)

    _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, out))
    return out


def run_while_loop(cfg, params, batch, prompts, news, by_length=False):
    """by_length: sort the requests by output length first, so each fixed batch holds similar
    lengths (static batching's own remedy for mixed lengths; needs the lengths up front)."""
    first, first_at = news[0], 0  # the first request's length and its row after sorting
    if by_length:
        order = np.argsort(-np.asarray(news), kind="stable")
        prompts, news = [prompts[i] for i in order], [news[i] for i in order]
        first_at = int(np.flatnonzero(order == 0)[0])
    groups = [
        (np.asarray(prompts[i : i + batch], np.int32), np.asarray(news[i : i + batch], np.int32))
        for i in range(0, len(prompts), batch)
    ]
    jax.block_until_ready(_while_loop_sample(cfg, params, groups[0][0], NEW, groups[0][1]))

    def timed():
        start = time.perf_counter()
        outs = [_while_loop_sample(cfg, params, p, NEW, n) for p, n in groups]
        outs = np.concatenate(jax.device_get(outs))
        return time.perf_counter() - start, list(outs[first_at][:first])

    return timed


@functools.partial(jax.jit, static_argnums=0)
def _naive_step(cfg, params, seq, length):
    logits = models.forward(cfg, params, seq)
    nxt = jnp.argmax(logits[:, length - 1], axis=-1).astype(jnp.int32)
    return seq.at[:, length].set(nxt)


def run_naive(cfg, params, batch, prompts, steps):
    seq = np.zeros((batch, PROMPT + NEW), np.int32)
    seq[:, :PROMPT] = prompts[:batch]
    seq = jnp.asarray(seq)
    jax.block_until_ready(_naive_step(cfg, params, seq, PROMPT))

    def timed():
        out = seq
        start = time.perf_counter()
        for i in range(steps):
            out = _naive_step(cfg, params, out, PROMPT + i)
        out = jax.device_get(out)
        return time.perf_counter() - start, list(out[0, PROMPT : PROMPT + steps])

    return timed


def load_hf_model(cfg, params):
    import torch
    import transformers

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        models.save_hf(cfg, params, d)
        dtype = getattr(torch, jnp.dtype(cfg.param_dtype).name)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    return model.eval()


def run_hf(model, batch, prompts, news):
    import torch

    def gen(ids, n):
        with torch.no_grad():
            return model.generate(
                torch.tensor(ids),
                attention_mask=torch.ones(len(ids), len(ids[0]), dtype=torch.long),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

    gen(prompts[:batch], 4)  # warm up

    def timed():
        start = time.perf_counter()
        first = None
        for i in range(0, len(prompts), batch):
            out = gen(prompts[i : i + batch], int(max(news[i : i + batch])))
            first = first if first is not None else out[0, PROMPT:].tolist()
        return time.perf_counter() - start, first[: news[0]]

    return timed


# Limits ------------------------------------------------------------------------------------


def bytes_per_token(cfg, context):
    """Batch 1: every weight is read once per token (tied embedding = the LM head, read
    whole), plus the KV cache of the context."""
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context
    weight_bytes = jnp.dtype(cfg.param_dtype).itemsize
    return weight_bytes * cfg.num_params() + jnp.dtype(cfg.dtype).itemsize * kv


def flops_per_token(cfg, context):
    """Matmul FLOPs of one decoded token: 2 x (layer weights + LM head) + attention."""
    weights = cfg.num_params(include_embedding=False) + cfg.vocab_size * cfg.hidden_size
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
    return 2 * weights + attention


def prefix_match(a, b):
    n = 0
    for x, y in zip(a, b):
        if int(x) != int(y):
            break
        n += 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="5M,50M")
    ap.add_argument("--workloads", default="uniform b1,uniform b16,mixed b16")
    ap.add_argument("--skip", default="", help="baselines to leave out, e.g. hf,naive")
    ap.add_argument("--steps-per-call", type=int, default=8)
    ap.add_argument("--naive-steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per system (best kept)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--out", default="rollout_throughput.json")
    ap.add_argument(
        "--compare-layout",
        action="store_true",
        help="also run the engine with the weight layout it does not default to",
    )
    args = ap.parse_args(argv)

    host = machine()
    print(f"machine: {describe_machine(host)}")
    bw = memory_bandwidth()
    flops = matmul_flops(dtype=args.dtype)
    print(
        f"machine: read bandwidth {bw['best'] / 1e9:.2f} GB/s (xla {bw['xla_sum'] / 1e9:.2f}, "
        f"numpy {bw['numpy_sum'] / 1e9:.2f}); matmul {flops / 1e9:.1f} GFLOP/s ({args.dtype})"
    )
    rows = []
    rng = np.random.default_rng(0)
    for name in args.models.split(","):
        cfg = MODELS[name].replace(dtype=args.dtype, param_dtype=args.dtype)
        params = jax.jit(models.init, static_argnums=0)(cfg, jax.random.key(0))
        skip = set(args.skip.split(","))
        hf_model = None if "hf" in skip else load_hf_model(cfg, params)
        print(f"model {name}: {cfg.num_params() / 1e6:.1f}M parameters")
        for wname, (batch, prompts, news) in workloads(rng, cfg.vocab_size).items():
            if wname not in args.workloads.split(","):
                continue
            useful = int(sum(news))
            # The jax baselines run on the engine's own copy of the weights: one buffer per
            # layer and, on CPU, the engine's choice of kernel layout (`rollout.Engine`).
            engine_weights = make_engine(cfg, params, batch, 1)
            layer_params = engine_weights.params["base"]
            layout = "[out, in]" if engine_weights.decode_layout else "[in, out]"
            row = {"model": name, "workload": wname, "requests": len(prompts), "layout": layout}
            systems = {
                "jaxpost": (
                    run_jaxpost(cfg, params, batch, prompts, news, args.steps_per_call),
                    useful,
                ),
                "while_loop": (run_while_loop(cfg, layer_params, batch, prompts, news), useful),
            }
            if wname.startswith("mixed"):
                # The default admits the longest max_new_tokens first; show the given order
                # too, and the fixed-batch sampler given the same knowledge of the lengths.
                systems["jaxpost fifo"] = (
                    run_jaxpost(cfg, params, batch, prompts, news, args.steps_per_call, "fifo"),
                    useful,
                )
                systems["while_loop sorted"] = (
                    run_while_loop(cfg, layer_params, batch, prompts, news, by_length=True),
                    useful,
                )
            if args.compare_layout:  # the engine with the layout it does not default to
                other = not engine_weights.decode_layout
                systems[LAYOUTS[other]] = (
                    run_jaxpost(cfg, params, batch, prompts, news, args.steps_per_call,
                                decode_layout=other),
                    useful,
                )  # fmt: skip
            if batch == 1:
                systems["jaxpost decode"] = run_jaxpost_decode(
                    cfg, params, prompts[0], args.steps_per_call
                )
            if wname.startswith("uniform") and "naive" not in skip:
                naive = run_naive(cfg, layer_params, batch, prompts, args.naive_steps)
                systems["naive"] = (naive, batch * args.naive_steps)
            if hf_model is not None:
                systems["hf"] = (run_hf(hf_model, batch, prompts, news), useful)
            # The machine's speed drifts: alternate the systems and keep each one's best run;
            # a pause before each run lets the previous system's threads go idle.
            # The limits are measured in the same window, once per round (best kept), as the
            # machine's bandwidth drifts between runs as much as its speed does.
            best, tokens = {}, {}
            row_bw, row_flops = 0.0, 0.0
            for _ in range(args.repeats):
                for sname, (timed, count) in systems.items():
                    time.sleep(0.5)
                    t, tokens[sname] = timed()
                    best[sname] = max(best.get(sname, 0.0), count / t)
                if batch == 1:
                    row_bw = max(row_bw, memory_bandwidth()["best"])
                else:
                    row_flops = max(row_flops, matmul_flops(dtype=args.dtype))
            for sname in systems:
                row[f"{sname} tok/s"] = best[sname]
            if "while_loop sorted" in best:
                row["fifo x wl"] = row["jaxpost fifo tok/s"] / row["while_loop tok/s"]
                row["x wl sorted"] = row["jaxpost tok/s"] / row["while_loop sorted tok/s"]
            ours, wl, hf = tokens["jaxpost"], tokens["while_loop"], tokens.get("hf", [])
            if "hf" in best:
                row["x hf"] = row["jaxpost tok/s"] / row["hf tok/s"]
            row["x while_loop"] = row["jaxpost tok/s"] / row["while_loop tok/s"]
            if args.compare_layout:  # tokens/s with the decode layout over without
                default = engine_weights.decode_layout
                system = {default: "jaxpost", not default: LAYOUTS[not default]}
                row["layout gain"] = best[system[True]] / best[system[False]]
            # Same greedy tokens? (random weights have small logit gaps, so float differences
            # between XLA and torch may flip a late argmax; report the matching prefix.)
            row["match wl/hf"] = f"{prefix_match(ours, wl)}/{prefix_match(ours, hf)} of {len(ours)}"
            context = PROMPT + float(np.mean(news)) / 2
            if batch == 1:
                bound = row_bw / bytes_per_token(cfg, context)
                row["limit"] = f"{bound:,.0f} tok/s ({row_bw / 1e9:.1f} GB/s)"
            else:
                bound = row_flops / flops_per_token(cfg, context)
                row["limit"] = f"{bound:,.0f} tok/s ({row_flops / 1e9:.0f} GFLOP/s)"
            row["of limit"] = f"{100 * row['jaxpost tok/s'] / bound:.0f}%"
            if batch == 1:
                row["decode of limit"] = f"{100 * row['jaxpost decode tok/s'] / bound:.0f}%"
                assert tokens["jaxpost decode"] == ours, "decode-only run gave other tokens"
            rows.append(row)
            print(format_table([row], list(row)), flush=True)
        del hf_model
    columns = [
        "model",
        "workload",
        "requests",
        "layout",
        "jaxpost tok/s",
        "jaxpost decode tok/s",
        "jaxpost fifo tok/s",
        "jaxpost [in, out] tok/s",
        "jaxpost [out, in] tok/s",
        "while_loop tok/s",
        "while_loop sorted tok/s",
        "naive tok/s",
        "hf tok/s",
        "x while_loop",
        "x hf",
        "fifo x wl",
        "x wl sorted",
        "layout gain",
        "limit",
        "of limit",
        "decode of limit",
        "match wl/hf",
    ]
    print()
    print(format_table(rows, columns))
    with open(args.out, "w") as f:
        json.dump(
            {"machine": host, "bandwidth": bw, "matmul_flops": flops, "rows": rows,
             "args": vars(args)},
            f,
            indent=1,
        )  # fmt: skip


if __name__ == "__main__":
    main()
