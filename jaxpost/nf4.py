"""NF4 quantization with double-quantized block scales (QLoRA, Dettmers et al. 2023).

A tensor is flattened row-major and cut into blocks of 64 values (a model's kernels are
quantized transposed, [out, in], as bitsandbytes quantizes torch's weights: `quantize_kernel`).
Each block is divided by its absolute maximum and every value is rounded to the nearest of the
16 NF4 codes (quantiles of a standard normal, rescaled to [-1, 1], with an exact zero). Two
4-bit codes share a uint8, the first value in the high nibble, as bitsandbytes packs them.

The 64-value block maxima ("absmax", one float32 per block) are quantized again ("double
quantization"): their mean is subtracted, the centred values are cut into blocks of 256 and
each is rounded to bitsandbytes' signed 8-bit dynamic code after division by that block's
absolute maximum. The storage cost is 4 bits + 8/64 bits + 32/(64*256) bits per value, about
0.516 bytes per parameter.

A quantized tensor is a dict of arrays, so it can sit in a parameter tree and be scanned over:
  "codes":         uint8 [n_blocks * 32]     packed NF4 codes
  "absmax_codes":  uint8 [n_super * 256]     8-bit codes of the centred block maxima
  "absmax_scale":  float32 [n_super]         absolute maximum of each 256-block of centred maxima
  "absmax_offset": float32 []                the mean of the block maxima
with n_blocks = ceil(n / 64) and n_super = ceil(n_blocks / 256). Leading axes added by
`quantize(w, batch_dims=k)` (e.g. the stacked layer axis) prefix every leaf; each slice along
them is quantized on its own, so `Linear` inside the layer scan sees one layer's tree.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64
SCALE_BLOCK = 256

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")): the paper's construction with
# offset 0.9677 (norm.ppf over 8 positive and 7 negative evenly spaced quantiles, plus 0),
# normalised so that the extreme codes are -1 and 1.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)


def dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit code (functional.create_dynamic_map), sorted [256].

    For exponent e = 0..6 it holds 2**e fraction values (midpoints of linspace(0.1, 1)) times
    10**(e - 6), with both signs, then 0 and 1: fine steps near zero, coarse ones near 1.
    """
    data: list[float] = []
    non_sign = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign - max_exponent_bits) + 1
        bounds = np.linspace(0.1, 1, items, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        data += list(scale * means) + list(-scale * means)
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return np.sort(np.asarray(data, dtype=np.float32))


DYNAMIC_CODE = dynamic_code()


def _midpoints(code: np.ndarray) -> np.ndarray:
    return ((code[:-1] + code[1:]) / np.float32(2.0)).astype(np.float32)


def _round_to_code(scaled: jax.Array, code: np.ndarray) -> jax.Array:
    """Index of the nearest code value; ties go to the lower code (torch.bucketize semantics)."""
    return jnp.searchsorted(jnp.asarray(_midpoints(code)), scaled, side="left").astype(jnp.uint8)


def _blockwise_scale(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """x [n_blocks * block] -> (x / block absmax clipped to [-1, 1], absmax [n_blocks])."""
    blocks = x.reshape(-1, block)
    # A NaN weight makes its block's maximum NaN, and so (through the mean offset of the
    # maxima) every dequantized weight, as in bitsandbytes; XLA's max would skip it.
    absmax = jnp.where(
        jnp.isnan(blocks).any(axis=-1), jnp.nan, jnp.max(jnp.abs(blocks), axis=-1)
    )  # fmt: skip
    # Multiply by the reciprocal as bitsandbytes does, so the codes agree bit for bit. A block
    # of zeros (or of subnormals, which XLA:CPU flushes to zero) gets code 0 and dequantizes
    # to exactly 0.
    normal = absmax >= jnp.finfo(jnp.float32).tiny
    inv = jnp.where(normal, 1.0 / jnp.where(normal, absmax, 1.0), 0.0)
    return jnp.clip(blocks * inv[:, None], -1.0, 1.0).reshape(-1), absmax


def _quantize_flat(w: jax.Array) -> dict[str, jax.Array]:
    n = w.size
    n_blocks = -(-n // BLOCK)
    n_super = -(-n_blocks // SCALE_BLOCK)
    # Zero padding leaves every block maximum unchanged.
    flat = jnp.pad(w.reshape(-1).astype(jnp.float32), (0, n_blocks * BLOCK - n))
    scaled, absmax = _blockwise_scale(flat, BLOCK)
    q = _round_to_code(scaled, NF4_CODE)
    codes = (q[0::2] << 4) | q[1::2]

    offset = jnp.mean(absmax)
    # Padding the maxima with the mean gives centred zeros, which change no 256-block maximum.
    centred = jnp.pad(absmax - offset, (0, n_super * SCALE_BLOCK - n_blocks))
    scaled2, absmax2 = _blockwise_scale(centred, SCALE_BLOCK)
    return {
        "codes": codes,
        "absmax_codes": _round_to_code(scaled2, DYNAMIC_CODE),
        "absmax_scale": absmax2,
        "absmax_offset": offset,
    }


def _dequantize_flat(q: dict[str, jax.Array], shape: tuple[int, ...], dtype) -> jax.Array:
    n = math.prod(shape)
    n_blocks = -(-n // BLOCK)
    absmax = jnp.asarray(DYNAMIC_CODE)[q["absmax_codes"].astype(jnp.int32)].reshape(-1, SCALE_BLOCK)
    absmax = (absmax * q["absmax_scale"][:, None]).reshape(-1)[:n_blocks] + q["absmax_offset"]
    packed = q["codes"].astype(jnp.int32)
    idx = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1, BLOCK)
    values = jnp.asarray(NF4_CODE)[idx] * absmax[:, None]
    return values.reshape(-1)[:n].reshape(shape).astype(dtype)


def expected_sizes(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of the leaves `quantize` produces for one tensor of `shape` (no batch axes)."""
    n_blocks = -(-math.prod(shape) // BLOCK)
    n_super = -(-n_blocks // SCALE_BLOCK)
    return {
        "codes": (n_blocks * BLOCK // 2,),
        "absmax_codes": (n_super * SCALE_BLOCK,),
        "absmax_scale": (n_super,),
        "absmax_offset": (),
    }


def quantize(w: jax.Array, batch_dims: int = 0) -> dict[str, jax.Array]:
    """NF4-quantize w; each slice over the first `batch_dims` axes is quantized on its own.

    w [*batch, *shape] float -> the dict described in the module docstring, every leaf with
    the leading [*batch] axes. Jittable.
    """
    if not 0 <= batch_dims < w.ndim:
        raise ValueError(
            f"batch_dims={batch_dims} for an array of shape {w.shape}; expected "
            f"0 <= batch_dims < {w.ndim} (at least one axis must be quantized)"
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"quantize expects a floating-point array, got {w.dtype}")
    return _quantize_batched(w, batch_dims)


# Jitted so that eager callers (quantize_base outside jit) compile once per shape instead of
# dispatching dozens of small ops; under an outer jit this is inlined.
@functools.partial(jax.jit, static_argnums=1)
def _quantize_batched(w: jax.Array, batch_dims: int) -> dict[str, jax.Array]:
    fn = _quantize_flat
    for _ in range(batch_dims):
        fn = jax.vmap(fn)
    return fn(w)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _dequantize_batched(q, inner: tuple[int, ...], batch: int, dtype) -> jax.Array:
    fn = lambda t: _dequantize_flat(t, inner, dtype)
    for _ in range(batch):
        fn = jax.vmap(fn)
    return fn(q)


def dequantize(q: dict[str, jax.Array], shape, dtype=jnp.float32) -> jax.Array:
    """The float array [*shape] that `q` encodes, in `dtype`. Jittable; integer inputs, so no
    gradient flows into the quantized weights.

    shape is the full shape: any axes that `q`'s leaves carry in front of the flat codes
    (e.g. a stacked layer axis) lead it, so a per-layer tree takes (in, out) and the stacked
    tree (L, in, out).
    """
    if not isinstance(q, dict) or set(q) != {
        "codes",
        "absmax_codes",
        "absmax_scale",
        "absmax_offset",
    }:
        keys = sorted(q) if isinstance(q, dict) else type(q).__name__
        raise ValueError(
            f"not an NF4 tree: got {keys}; expected keys absmax_codes, absmax_offset, "
            "absmax_scale, codes (from jaxpost.nf4.quantize)"
        )
    shape = tuple(int(s) for s in shape)
    batch = q["codes"].ndim - 1
    if len(shape) <= batch or tuple(q["codes"].shape[:batch]) != shape[:batch]:
        raise ValueError(
            f"NF4 codes of shape {tuple(q['codes'].shape)} cannot hold an array of shape "
            f"{shape}: the leading {batch} axes must match and at least one axis must remain"
        )
    inner = shape[batch:]
    want = expected_sizes(inner)
    for name, size in want.items():
        got = tuple(q[name].shape[batch:])
        if got != size:
            raise ValueError(
                f"NF4 leaf {name!r} has shape {tuple(q[name].shape)}; an array of shape "
                f"{shape} needs {shape[:batch] + size}"
            )
    return _dequantize_batched(q, inner, batch, jnp.dtype(dtype))


def nbytes(tree) -> int:
    """Total bytes of the array leaves of `tree` (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# Quantizing a model's base ------------------------------------------------------------------

DEFAULT_TARGETS = (r"layers/attn/(q|k|v|o)/kernel", r"layers/mlp/(gate|up|down)/kernel")


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def match_targets(targets, paths, what: str) -> list[str]:
    """The `paths` (sorted) that the target regexes select, for LoRA and NF4 alike: targets
    are regexes fully matched against paths such as "layers/attn/q/kernel"; one string is one
    regex (as PEFT's target_modules takes a string); None = DEFAULT_TARGETS (every linear).
    A ValueError, labelled `what`, names a target that is not a regex or matches nothing."""
    if isinstance(targets, str):
        targets = (targets,)
    targets = DEFAULT_TARGETS if targets is None else tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            f"{what} targets={targets!r}; expected a regex or a non-empty sequence of regexes"
        )
    chosen: set[str] = set()
    for target in targets:
        try:
            pattern = re.compile(target)
        except re.error as e:
            raise ValueError(f"{what} target {target!r} is not a valid regex: {e}") from e
        found = [k for k in paths if pattern.fullmatch(k)]
        if not found:
            raise ValueError(
                f"{what} target {target!r} matches no layer kernel; targets are regexes fully "
                f"matched against {sorted(paths)}"
            )
        chosen.update(found)
    return sorted(chosen)


# The parameter name of a quantized kernel. Its blocks run along the input axis: the NF4 tree
# is that of the kernel transposed to [out, in], torch's nn.Linear layout, which is the layout
# bitsandbytes (and so transformers' and PEFT's QLoRA) quantizes. Each weight is then rounded
# exactly as there, and a LoRA adapter trained on this base fits a bitsandbytes-quantized one.
# (Blocks along the output axis, the [in, out] kernel's row-major order, would round every
# weight differently: two independent NF4 roundings, as far apart as either is from the
# float weights.) The name differs from the earlier "kernel_nf4" ([in, out] blocks), so a
# checkpoint holding those is refused by its tree check rather than read in the wrong order.
KERNEL_KEY = "kernel_t_nf4"


def quantize_kernel(kernel: jax.Array, batch_dims: int = 0) -> dict[str, jax.Array]:
    """The NF4 tree of a kernel [*batch, in, out], quantized in [out, in] order (KERNEL_KEY)."""
    return quantize(jnp.swapaxes(kernel, -1, -2), batch_dims=batch_dims)


def dequantize_kernel(q: dict[str, jax.Array], shape, dtype=jnp.float32) -> jax.Array:
    """The kernel [*batch, in, out] (`shape`) that `quantize_kernel` encoded, in `dtype`."""
    *lead, d_in, d_out = (int(s) for s in shape)
    return jnp.swapaxes(dequantize(q, (*lead, d_out, d_in), dtype), -1, -2)


def quantize_base(cfg, params: dict, targets=None) -> dict:
    """params with every targeted layer kernel [L, in, out] replaced by KERNEL_KEY.

    targets are regexes fully matched against '/'-joined paths such as "layers/attn/q/kernel"
    (default: attention q, k, v, o and MLP gate, up, down). Embeddings, norms, biases and the LM
    head are never quantized. Each layer is quantized on its own (its own absmax mean, as
    bitsandbytes quantizes each layer's weight), so the layer scan hands `Linear` a
    self-contained tree. Jittable (cfg static).
    """
    kernels = [
        name
        for name in map(_path_str, (p for p, _ in jax.tree_util.tree_leaves_with_path(params)))
        if name.startswith("layers/") and name.endswith("/kernel")
    ]
    chosen = set(match_targets(targets, kernels, "NF4"))

    def rebuild(tree, prefix):
        out = {}
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                out[key] = rebuild(value, path + "/")
            elif path in chosen:
                if value.ndim != 3 or value.shape[0] != cfg.num_layers:
                    raise ValueError(
                        f"{path} has shape {value.shape}; expected stacked [L={cfg.num_layers}, "
                        "in, out]"
                    )
                out[KERNEL_KEY] = quantize_kernel(value, batch_dims=1)
            else:
                out[key] = value
        return out

    return rebuild(params, "")


# The logical axis of the flat NF4 codes and 8-bit absmax codes (the bulk of a quantized base):
# split over the fsdp and tensor mesh axes (`sharding.DEFAULT_RULES`), as the float kernels they
# replace are, so QLoRA's memory per device falls with the mesh; each layer's kernel is gathered
# when it is dequantized, as FSDP gathers float kernels.
BLOCKS_AXIS = "quant_blocks"


def quantized_logical_axes(axes: dict, qparams: dict) -> dict:
    """Logical axes for params that may hold quantized kernels: `axes` (from
    models.logical_axes) with each KERNEL_KEY tree's codes named ("layers", BLOCKS_AXIS) and its
    small per-256-block scales and offset ("layers", ...) replicated within a layer. Plain
    params get `axes` back unchanged, so callers need not ask whether a base is quantized."""

    def names(leaf_key: str, x) -> tuple:
        if leaf_key in ("codes", "absmax_codes"):
            return ("layers", BLOCKS_AXIS)
        return ("layers",) + (None,) * (x.ndim - 1)

    def walk(ax, qp):
        out = {}
        for key, value in qp.items():
            if key == KERNEL_KEY:
                out[key] = {k: names(k, x) for k, x in value.items()}
            elif isinstance(value, dict):
                out[key] = walk(ax[key], value)
            else:
                out[key] = ax[key]
        return out

    return walk(axes, qparams)
