"""Memory of an NF4 (QLoRA) base against float32 / bfloat16, and the NF4 round-trip error.

Measured on real arrays for a model that fits this machine, and on abstract shapes
(jax.eval_shape, no memory) for Llama-3-8B-sized layers. Prints a table; --json writes it.

    python benchmarks/nf4_memory.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import lora, models, nf4

CONFIGS = {
    # ~50M parameters, measured on real arrays.
    "qwen3-50m": models.ModelConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=12,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        qk_norm=True,
        model_type="qwen3",
    ),
    # Llama-3-8B shapes, abstract only.
    "llama3-8b": models.ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
    ),
}


def _kernel_stats(params: dict, qparams: dict) -> tuple[int, int]:
    """(number of quantized kernel parameters, bytes of their NF4 trees)."""
    n, b = 0, 0
    for block, module in lora.HF_MODULES:
        n += int(np.prod(params["layers"][block][module]["kernel"].shape))
        b += nf4.nbytes(qparams["layers"][block][module][nf4.KERNEL_KEY])
    return n, b


def measure(name: str, cfg: models.ModelConfig, real: bool) -> dict:
    init = jax.jit(models.init, static_argnums=0)
    quantize = jax.jit(nf4.quantize_base, static_argnums=0)
    if real:
        params = init(cfg, jax.random.key(0))
        jax.block_until_ready(quantize(cfg, params))  # compile outside the timed call
        start = time.perf_counter()
        qparams = jax.block_until_ready(quantize(cfg, params))
        seconds = time.perf_counter() - start
        w = params["layers"]["mlp"]["up"]["kernel"]
        deq = nf4.dequantize_kernel(qparams["layers"]["mlp"]["up"][nf4.KERNEL_KEY], w.shape)
        rms = float(jnp.sqrt(jnp.mean((deq - w) ** 2)) / jnp.std(w))
    else:
        params = jax.eval_shape(init, cfg, jax.random.key(0))
        qparams = jax.eval_shape(quantize, cfg, params)
        seconds, rms = float("nan"), float("nan")
    n_kernel, nf4_bytes = _kernel_stats(params, qparams)
    total = cfg.num_params()
    other = nf4.nbytes(params) - 4 * n_kernel  # float32 embeddings, norms, head
    return {
        "model": name,
        "measured": real,
        "params": total,
        "quantized_params": n_kernel,
        "fp32_bytes": 4 * total,
        "bf16_bytes": 2 * total,
        "nf4_kernel_bytes": nf4_bytes,
        "nf4_bytes_per_param": nf4_bytes / n_kernel,
        "qlora_base_bytes_bf16_rest": nf4_bytes + other // 2,
        "quantize_seconds": seconds,
        "rms_error_over_sigma": rms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = [
        measure("qwen3-50m", CONFIGS["qwen3-50m"], real=True),
        measure("llama3-8b", CONFIGS["llama3-8b"], real=False),
    ]
    gib = 2**30
    header = (
        f"{'model':<11} {'measured':>8} {'params':>14} {'fp32 GiB':>9} {'bf16 GiB':>9} "
        f"{'NF4 B/param':>11} {'QLoRA base GiB':>14} {'rms err/sigma':>13} {'quantize s':>10}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['model']:<11} {str(r['measured']):>8} {r['params']:>14,} "
            f"{r['fp32_bytes'] / gib:>9.3f} {r['bf16_bytes'] / gib:>9.3f} "
            f"{r['nf4_bytes_per_param']:>11.4f} {r['qlora_base_bytes_bf16_rest'] / gib:>14.3f} "
            f"{r['rms_error_over_sigma']:>13.4f} {r['quantize_seconds']:>10.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
