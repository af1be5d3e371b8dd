"""Where the rollout engine keeps LoRA factors on a mesh: decode time and collectives.

The engine keeps an adapter whole on every device (`rollout.weights`). This script measures the
alternatives on a (data 1, fsdp 2, tensor 2) mesh of simulated CPU devices: the factors split
as their base kernels are (a over the kernel's in axis, b over its out axis, the rank whole),
and split as the trainer splits them (the rank over fsdp too, `lora.logical_axes`). Each is
placed into the same engine (`engine.params["lora"]`), the generate program compiled for it,
and timed over whole driver runs (4 slots, 16-token prompts, 64 new tokens, greedy; best and
median of --repeats). Collectives are counted in the compiled generate program.

  python benchmarks/lora_decode_placement.py
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import describe_machine, format_table, machine  # noqa: E402

from jaxpost import lora, models, rollout  # noqa: E402
from jaxpost.sharding import make_mesh, replicated, tree_shardings  # noqa: E402

CFG = models.ModelConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=32, model_type="qwen3",
)  # fmt: skip
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute")


def placements(adapter, mesh) -> dict:
    """Name -> shardings of the factor tree."""
    tree = adapter.params
    trainer = tree_shardings(tree, lora.logical_axes(adapter).params, mesh)
    kernels = tree_shardings(
        jax.eval_shape(lambda: models.init(CFG, jax.random.key(0))), models.logical_axes(CFG), mesh
    )["layers"]
    as_base = {"layers": {}}
    for block, module in adapter.modules:
        layers, fan_in, fan_out = kernels[block][module]["kernel"].spec
        split = lambda *spec: jax.sharding.NamedSharding(mesh, PartitionSpec(*spec))
        as_base["layers"].setdefault(block, {})[module] = {
            "a": split(layers, fan_in, None),
            "b": split(layers, None, fan_out),
        }
    return {
        "whole (the engine's)": jax.tree.map(lambda _: replicated(mesh), tree),
        "split as the base kernels": as_base,
        "split as the trainer splits": trainer,
    }


def count_collectives(engine) -> dict:
    # The widest page table's program (one per table width the run needed; the same weights).
    names = [k for k in engine._jit_cache if k.startswith("generate")]
    name = max(names, key=lambda k: int(k.split(":")[-1]))
    p = engine.params
    state = engine.init_decode_state()
    args = (p["base"], p["lora"], p.get("head"), state, engine.book.table, engine.book.active)
    hlo = engine._jit_cache[name].lower(*args).compile().as_text()
    return {op: len(re.findall(r"= \S+ " + op + r"(-start)?\(", hlo)) for op in COLLECTIVES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    info = machine()
    print(describe_machine(info))
    params = models.init(CFG, jax.random.key(0))
    adapter = lora.init(CFG, params, rank=args.rank, key=jax.random.key(1))
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    sp = rollout.SamplingParams(max_new_tokens=64, temperature=0.0)
    requests = [rollout.Request(list(range(1, 17)), sp) for _ in range(4)]
    rows = []
    for name, where in placements(adapter, mesh).items():
        engine = rollout.Engine(CFG, params, lora=adapter, slots=4, max_len=128,
                                max_prefill_length=32, page_size=8, mesh=mesh,
                                decode_layout=False, head_copy=False)  # fmt: skip
        engine.params["lora"] = jax.device_put(engine.params["lora"], where)
        driver = rollout.Driver(engine)
        first = driver.run(requests)  # compiles for this placement
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = driver.run(requests)
            seconds.append(time.perf_counter() - start)
        assert [o[0].tokens for o in out] == [o[0].tokens for o in first]
        row = {"placement": name, "best s": min(seconds), "median s": statistics.median(seconds)}
        rows.append({**row, **count_collectives(engine)})
    base = rows[0]["median s"]
    for row in rows:
        row["x whole"] = row["median s"] / base
    print(format_table(rows, ["placement", "best s", "median s", "x whole", *COLLECTIVES]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": info, "rows": rows, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
