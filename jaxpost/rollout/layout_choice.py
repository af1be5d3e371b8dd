"""Which weight layout the rollout engine decodes from on CPU: measured once per machine and shape.

`rollout.weights` keeps linear kernels either as the model has them, [in, out] (`matmul.dot`), or
transposed, [out, in] (the decode layout, `matmul.dot_t`). Which one XLA:CPU multiplies faster
at a decode step's few rows depends on the CPU and the shapes; no fixed rule fits the machines
this project measured (rollout benchmark, end-to-end tokens/s with [out, in] over [in, out]):
  Xeon with AMX, 50M model: float32 batch 16 1.06-1.20x, one row 0.84-1.03x; bfloat16 batch 16
    1.23x, one row 1.84x.
  2-core AMD EPYC (AVX-512): float32 50M batch 16 1.08-1.17x, one row 1.01-1.15x; 5M batch 16
    0.83-0.89x, one row 0.55-0.78x; bfloat16 5M one row 0.60x, 50M one row 0.88x.
`static` is the rule fitted to the Xeon; `measured` times the model's decode-step matmuls and
the greedy sampler's reductions over its logits in both layouts (`time_layouts`) and keeps the
other layout only when it is at least LAYOUT_MARGIN faster. The decision is stored per
machine in a JSON file ($JAXPOST_CACHE_DIR, default ~/.cache/jaxpost, `decode_layouts.json`),
so the engine on one machine decodes from the same layout, hence rounds the same, in every
run; delete the file to measure again. Another layout changes results only by the rounding
of the products' sums.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxpost.models import matmul
from jaxpost.models.config import ModelConfig
from jaxpost.rollout import sampling

# The measured layout replaces the static rule only when it is at least this much faster: a near
# tie, where the measurement's noise could decide, keeps the static rule's layout.
LAYOUT_MARGIN = 1.05
# Weight bytes per layout the measurement allocates at most: past the last-level cache a decode
# step streams its weights from memory whatever the model's size, so a larger model is measured on
# its first layers and the first rows of its head.
PROBE_BYTES = 256 << 20
CACHE_FILE = "decode_layouts.json"


def static(slots: int, dtype) -> bool:
    """The decode layout unless a float32 model has one slot (fitted to the Xeon above)."""
    return slots > 1 or jnp.dtype(dtype) != jnp.float32


def measured(cfg: ModelConfig, slots: int) -> bool:
    """Whether the decode layout is the faster one on this machine's CPU for `cfg` at `slots`
    rows: read from the machine's cache file, else measured (`time_layouts`) and stored there."""
    dtype = jnp.dtype(cfg.dtype).name
    return _measured(layer_shapes(cfg), cfg.num_layers, cfg.hidden_size, cfg.vocab_size, dtype,
                     slots)  # fmt: skip


def layer_shapes(cfg: ModelConfig) -> tuple[tuple[int, int], ...]:
    """[in, out] of one layer's linear kernels in a decode step's order: q, k, v, o, gate, up,
    down."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return ((d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d))


@functools.cache  # one file read (or measurement) per process and shape
def _measured(shapes, num_layers: int, hidden: int, vocab: int, dtype: str, slots: int) -> bool:
    key = json.dumps([_machine(), jax.__version__, shapes, num_layers, hidden, vocab, dtype, slots])
    path = cache_dir() / CACHE_FILE
    entry = _read(path).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("decode_layout"), bool):
        return entry["decode_layout"]  # otherwise absent or damaged: measure again
    itemsize = jnp.dtype(dtype).itemsize
    layer_bytes = sum(k * n for k, n in shapes) * itemsize
    head_rows = min(vocab, PROBE_BYTES // 2 // (hidden * itemsize))
    layers = max(1, min(num_layers, PROBE_BYTES // 2 // layer_bytes))
    seconds = time_layouts(shapes, layers, hidden, head_rows, dtype, slots)
    default = static(slots, dtype)
    choice = (not default) if seconds[default] > LAYOUT_MARGIN * seconds[not default] else default
    stored = _read(path)  # another process may have added entries meanwhile
    stored[key] = {
        "decode_layout": choice,
        "seconds [in, out]": seconds[False],
        "seconds [out, in]": seconds[True],
    }
    _write(path, stored)
    return choice


def cache_dir() -> Path:
    return Path(os.environ.get("JAXPOST_CACHE_DIR") or Path.home() / ".cache" / "jaxpost")


def _machine() -> str:
    """The CPU's model name (what decides the layout), or the architecture if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: measure again
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> None:
    """Atomically (a concurrent reader sees the old file or the new one); a cache that cannot be
    written is not an error, the choice then lasts for this process."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".decode_layouts.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def time_layouts(
    shapes, layers: int, hidden: int, head_rows: int, dtype: str, slots: int, rounds: int = 7
) -> dict[bool, float]:
    """{decode_layout: seconds} of a decode step's matmul chain at `slots` rows: `layers` layers
    of `shapes` (each kernel its own buffer, as the engine holds them) and a [hidden, head_rows]
    head with the greedy sampler's reductions, in each layout, compiled with the engine's decode
    options. (Without the sampler the 5M benchmark model's batch-16 layouts measured as a tie,
    where the engine runs [in, out] 1.11-1.20x faster.) The layouts alternate for
    `rounds` rounds of at least 20 ms each; each keeps its fastest round (other work on the
    machine only adds time)."""
    dt = jnp.dtype(dtype)

    def chain(x, kernels, head, transposed):
        prod = matmul.dot_t if transposed else matmul.dot
        h = x
        for layer in range(layers):
            wq, wk, wv, wo, wg, wu, wd = kernels[7 * layer : 7 * layer + 7]
            # Attention does not depend on the layout: k and v need only be computed.
            a = prod(h, wq, dt) + jnp.sum(prod(h, wk, dt)) + jnp.sum(prod(h, wv, dt))
            h = h + prod(a.astype(dt), wo, dt).astype(dt)
            mid = jax.nn.silu(prod(h, wg, dt)) * prod(h, wu, dt)
            h = h + prod(mid.astype(dt), wd, dt).astype(dt)
        # The head's logits and the greedy sampler's reductions over them, in the orientation
        # the engine gives them in each layout (`device_steps.decode_steps`: vocab_first).
        logits = prod(h, head, dt)
        rows = jnp.zeros((x.shape[0],), jnp.float32)
        ints = jnp.zeros((x.shape[0],), jnp.int32)
        keys = jax.random.split(jax.random.key(0), x.shape[0])
        logits = logits.T if transposed else logits
        return sampling.sample(logits, keys, rows, ints, rows + 1, rows, sampling.GREEDY,
                               vocab_first=transposed)  # fmt: skip

    runs = {}
    x = jnp.full((slots, hidden), 0.5, dt)
    for transposed in (False, True):
        shape = (lambda k, n: (n, k)) if transposed else (lambda k, n: (k, n))
        # Entries 1 / fan-in keep the activations near 0.5 through any number of layers.
        kernels = [jnp.full(shape(k, n), 1 / k, dt) for _ in range(layers) for k, n in shapes]
        head = jnp.full(shape(hidden, head_rows), 1 / hidden, dt)
        f = jax.jit(
            functools.partial(chain, transposed=transposed),
            compiler_options=matmul.decode_compiler_options(),
        )
        jax.block_until_ready(f(x, kernels, head))  # compile
        runs[transposed] = functools.partial(f, x, kernels, head)

    def seconds(run, reps):
        start = time.perf_counter()
        for _ in range(reps):
            out = run()
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / reps

    reps = max(1, int(0.02 / max(seconds(run, 1) for run in runs.values())))
    times = {False: [], True: []}
    for _ in range(rounds):
        for transposed, run in runs.items():
            times[transposed].append(seconds(run, reps))
    return {t: min(v) for t, v in times.items()}
