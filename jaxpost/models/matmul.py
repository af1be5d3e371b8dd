"""Matmuls with float32 results whose gradients stay in the compute dtype (mixed precision).

`dot(x, w, compute_dtype)` is `x @ w` with both operands cast to `compute_dtype` and a float32
result. Under float32 it is exactly `jnp.dot(..., preferred_element_type=float32)` with JAX's own
gradient. Under a low-precision compute dtype (bfloat16) it carries its own VJP, for two reasons
measured on XLA:CPU (jax 0.10, a Xeon with AMX, [2048, 512] x [512, 2048]-class shapes):

- JAX's transpose of a bfloat16 x bfloat16 -> float32 dot multiplies the float32 cotangent with
  the bfloat16 operand, which XLA computes as a float32 matmul: 250-290 GF/s, against 1,100-1,700
  GF/s for bfloat16 operands. The VJP here rounds the cotangent to the compute dtype first, as a
  bfloat16 network on a TPU does (its activations, hence their cotangents, are bfloat16).
- The weight gradient x^T g, a 2-D dot contracting over rows, misses XLA:CPU's fast bfloat16
  path (about 220 GF/s); the same contraction over a [1, M, K] view, which XLA canonicalises
  through a physical transpose into a plain row-major dot, runs at 800-1,100 GF/s.

The weight gradient is returned in the dtype `w` came in (the float32 master weights), without a
round trip through the compute dtype.

A single-row bfloat16 product (batch-1 decode) is computed as two rows: XLA:CPU sends a
bfloat16 matrix-vector product to a slow path, 1.2 ms for a [1, 512] x [512, 2048] product
against 0.10 ms with two rows (18.6 vs 1.3 ms for a [512, 32000] LM head).

`decode_compiler_options` are the compile options for programs whose matmuls have few rows (a
decode loop): on XLA:CPU, single-threaded Eigen and 512-bit vectors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NT = (((1,), (1,)), ((), ()))  # g [M, N] . w [K, N] -> [M, K]
# `dot_t` computes more rows than this (a prefill's batch x prompt tokens) as x w_t^T directly.
DOT_T_MAX_ROWS = 256


def decode_compiler_options(devices=None) -> dict | None:
    """`jax.jit(..., compiler_options=...)` for a decode loop on `devices` (default: the default
    backend's): on CPUs, single-threaded Eigen and 512-bit vectors in XLA's own kernels; None
    elsewhere.

    A decode step is a chain of small matvecs, which Eigen splits over its threads at a
    synchronisation cost larger than the gain, while XLA:CPU's runtime already runs independent
    ops (q, k, v; gate, up) side by side. Same-process A/B of the rollout engine on the rollout
    benchmark's models: 50M 1.12x tokens/s at batch 1, 1.02x at batch 16; 5M 1.03x. A train
    step's matmuls are YNNPACK fusions, not Eigen: 0.996x there, so it is not used for training.

    XLA:CPU emits a float32 single-row product (batch-1 decode) as its own loop, vectorized at
    the preferred width, 256 bits unless told otherwise. At 512 bits (AVX-512) the 50M model's
    batch-1 decode matvecs took 1.00 instead of 1.08 s of op time over 128 tokens, and
    alternated engine runs gave 1.06-1.10x tokens/s (50M float32), 1.00-1.02x (5M float32),
    1.00x (50M bfloat16, whose single rows run as two-row YNNPACK products) and 1.02-1.03x at
    batch 16. LLVM's x86 backend widens to 512 bits only on targets with AVX-512; elsewhere the
    option changes nothing. A train step gains nothing from it (alternated 50M steps).
    """
    if on_cpu(devices):
        return {"xla_cpu_multi_thread_eigen": False, "xla_cpu_prefer_vector_width": 512}
    return None


def on_cpu(devices=None) -> bool:
    """Whether every one of `devices` (default: the default backend's) is a CPU: the one test
    behind the CPU-only decode choices (this compile option, `rollout.Engine`'s layouts)."""
    devices = jax.devices() if devices is None else list(devices)
    return all(d.platform == "cpu" for d in devices)


def weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    """x [M, K], g [M, N] -> x^T g [K, N] in float32 (a contraction over the rows)."""
    if x.dtype == jnp.float32:
        return jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))
    return jax.lax.dot_general(
        x[None], g[None], (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32
    )


def dot(x: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
    """x [M, K] @ w [K, N] -> float32 [M, N], operands in compute_dtype."""
    compute_dtype = jnp.dtype(compute_dtype)
    if compute_dtype == jnp.float32:
        return jnp.dot(
            x.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=jnp.float32
        )
    if x.shape[0] == 1:  # the slow matrix-vector path (module docstring): use two rows
        return _low_precision_dot(jnp.broadcast_to(x, (2, x.shape[1])), w, compute_dtype)[:1]
    return _low_precision_dot(x, w, compute_dtype)


def dot_t(x: jax.Array, w_t: jax.Array, compute_dtype) -> jax.Array:
    """x [M, K] . w_t [N, K] -> float32 [M, N]: `dot` for a kernel stored transposed, [out, in]
    (the decode layout of `models.to_decode_layout`); for inference.

    Computed as the [N, M] product w_t x^T, then transposed. For a decode step's few rows,
    XLA:CPU runs that product faster than x w with w [K, N]: 8 independent 16-row products
    with a [512, 2048] weight took 1.32 ms against 2.17 ms, [2048, 512] 1.42 against 2.31 ms
    (float32, default compile options); the rollout engine at batch 16 gains 1.06-1.20x
    tokens/s on the 50M benchmark model, but a float32 single row is no faster (see
    `rollout.Engine`).
    The optimization barrier keeps XLA from folding the transpose back into the dot, which
    would give the x w_t^T product, no faster than x w.
    More than DOT_T_MAX_ROWS rows (a prefill) are computed as x w_t^T: there the transpose
    of the [N, M] product is a strided copy, fused into its consumer at a fraction of the
    matmul's speed (8 [2048, 512] kernels times 1024 rows, each followed by a SiLU: float32
    89 -> 63 ms, bfloat16 54 -> 20 ms; at 256 rows both ways are within 4%, at 128 the
    transposed product is 1.15-1.2x faster). The 50M rollout benchmark model prefills 16 x 64
    tokens in 231 instead of 320 ms (float32).
    """
    compute_dtype = jnp.dtype(compute_dtype)
    if x.shape[0] == 1 and compute_dtype != jnp.float32:  # see `dot`: use two rows
        return dot_t(jnp.broadcast_to(x, (2, x.shape[1])), w_t, compute_dtype)[:1]
    if x.shape[0] > DOT_T_MAX_ROWS:
        xc, wc = x.astype(compute_dtype), w_t.astype(compute_dtype)
        return jax.lax.dot_general(xc, wc, _NT, preferred_element_type=jnp.float32)
    y = jax.lax.dot_general(
        w_t.astype(compute_dtype), x.astype(compute_dtype), _NT, preferred_element_type=jnp.float32
    )
    return jax.lax.optimization_barrier(y).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_dot(x, w, compute_dtype):
    return jnp.dot(
        x.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=jnp.float32
    )


def _fwd(x, w, compute_dtype):
    return _low_precision_dot(x, w, compute_dtype), (x, w)


def _bwd(compute_dtype, res, g):
    x, w = res
    xc, wc, gc = x.astype(compute_dtype), w.astype(compute_dtype), g.astype(compute_dtype)
    dx = jax.lax.dot_general(gc, wc, _NT, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), weight_grad(xc, gc).astype(w.dtype)


_low_precision_dot.defvjp(_fwd, _bwd)


# LoRA ---------------------------------------------------------------------------------------------

# `layers.Linear` computes LoRA with `lora_dot` (the merged kernel) for more rows than this: a
# train step's or a prefill's tokens, not a decode step's few rows, where forming w + s a b would
# read and write the kernel once more for a handful of rows.
LORA_MERGE_MIN_ROWS = 256


def lora_dot(x, w, a, b, scale: float, compute_dtype) -> jax.Array:
    """x [M, K] @ (w [K, N] + scale * a [K, r] @ b [r, N]) -> float32 [M, N], with LoRA's
    gradients: dx = g (w + s a b)^T, da = s x^T (g b^T), db = s (x a)^T g.

    The same function as `dot(x, w) + scale * dot(dot(x, a), b)`, computed as one matmul with the
    merged kernel (forming it costs K x N, against M x N for adding the low-rank product to the
    output). Unmerged, a [2048, 512] x [512, 2048] train-step linear of the 50M model carried two
    [M, N] passes forward and two backward around its two matmuls (the low-rank product added
    to the output, its cotangent read back). The base kernel's weight gradient x^T g is returned
    too, as autodiff would; under LoRA training nothing uses it and XLA drops it, so the
    frozen kernel costs no weight-gradient matmul. Not for dropout on the LoRA input, which
    needs the unmerged form.
    """
    return _lora_dot(x, w, a, b, float(scale), jnp.dtype(compute_dtype))


def _merged_kernel(w, a, b, scale, compute_dtype):
    delta = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))
    return (w.astype(jnp.float32) + scale * delta).astype(compute_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lora_dot(x, w, a, b, scale, compute_dtype):
    w_eff = _merged_kernel(w, a, b, scale, compute_dtype)
    return jnp.dot(x.astype(compute_dtype), w_eff, preferred_element_type=jnp.float32)


def _lora_fwd(x, w, a, b, scale, compute_dtype):
    # The merged kernel is formed again in the backward pass rather than kept: K x N per linear
    # would stay alive until the backward pass reaches it.
    return _lora_dot(x, w, a, b, scale, compute_dtype), (x, w, a, b)


def _lora_bwd(scale, compute_dtype, res, g):
    x, w, a, b = res
    w_eff = _merged_kernel(w, a, b, scale, compute_dtype)
    xc, gc = x.astype(compute_dtype), g.astype(compute_dtype)
    dx = jax.lax.dot_general(gc, w_eff, _NT, preferred_element_type=jnp.float32)
    dw = weight_grad(xc, gc)  # dead code unless the base kernel is differentiated
    xa = dot(xc, a, compute_dtype).astype(compute_dtype)  # as `low_rank`'s forward rounds it
    _, da, db = _factor_grads(xc, xa, gc, b, scale, compute_dtype)
    return dx.astype(x.dtype), dw.astype(w.dtype), da.astype(a.dtype), db.astype(b.dtype)


def _factor_grads(xc, xa, gc, b, scale, compute_dtype):
    """For the term s (x a) b with output cotangent g: (g b^T [M, r], da, db) in float32, from
    x, x a and g in the compute dtype.

    da = s x^T (g b^T) is computed as the transpose of the [r, K] product (g b^T)^T x: XLA:CPU
    contracts the rows of a [M, K] x [M, r] pair into [K, r] 3-9x slower than into [r, K]
    (M = 2048, K = 512: 1.07 against 0.12 ms); the barrier keeps XLA from folding the transpose
    back into the product.
    """
    gb = jax.lax.dot_general(gc, b.astype(compute_dtype), _NT, preferred_element_type=jnp.float32)
    da = scale * jax.lax.optimization_barrier(weight_grad(gb.astype(compute_dtype), xc)).T
    db = scale * weight_grad(xa, gc)
    return gb, da, db


_lora_dot.defvjp(_lora_fwd, _lora_bwd)


def low_rank(x, a, b, scale: float, compute_dtype) -> jax.Array:
    """scale * (x [M, K] @ a [K, r]) @ b [r, N] -> float32 [M, N], x a rounded to compute_dtype:
    the LoRA term added to the base product where the kernel is not merged (`layers.Linear`: a
    decode step's few rows, dropout on the LoRA input). Its own VJP computes da in the fast
    orientation (`_factor_grads`); autodiff's would contract x's rows into [K, r]."""
    compute_dtype = jnp.dtype(compute_dtype)
    # Cast outside the custom VJP, so autodiff returns x's cotangent in x's own dtype.
    return _low_rank(x.astype(compute_dtype), a, b, float(scale), compute_dtype)


def low_rank_rounded(x, a, b, scale: float, compute_dtype) -> jax.Array:
    """`low_rank`'s value for inference beside a transposed kernel (`dot_t`, the decode layout):
    the operands and x a rounded to compute_dtype as there, multiplied as float32.

    The products of rounded operands are exact in float32 and both sum in float32, so this is
    `low_rank` up to summation order. The decode layout hands these dots activations that XLA
    keeps transposed ([K, M], from `dot_t`'s [N, M] products), and XLA:CPU computes a bfloat16 x
    bfloat16 -> float32 dot contracting such an operand on a path that does not implement it
    ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32"); its float32 dot takes
    any layout. The LoRA factors are rank r, so the float32 products cost little.
    """
    compute_dtype = jnp.dtype(compute_dtype)
    if compute_dtype == jnp.float32:
        return low_rank(x, a, b, scale, compute_dtype)
    rounded = lambda t: t.astype(compute_dtype).astype(jnp.float32)
    xa = jnp.dot(rounded(x), rounded(a), preferred_element_type=jnp.float32)
    return scale * jnp.dot(rounded(xa), rounded(b), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _low_rank(x, a, b, scale, compute_dtype):
    return _low_rank_fwd(x, a, b, scale, compute_dtype)[0]


def _low_rank_fwd(xc, a, b, scale, compute_dtype):
    xa = dot(xc, a, compute_dtype).astype(compute_dtype)  # `dot`: its single-row rule
    return scale * dot(xa, b, compute_dtype), (xc, xa, a, b)


def _low_rank_bwd(scale, compute_dtype, res, g):
    xc, xa, a, b = res
    gb, da, db = _factor_grads(xc, xa, g.astype(compute_dtype), b, scale, compute_dtype)
    ga = gb.astype(compute_dtype)
    dx = scale * jax.lax.dot_general(
        ga, a.astype(compute_dtype), _NT, preferred_element_type=jnp.float32
    )
    return dx.astype(xc.dtype), da.astype(a.dtype), db.astype(b.dtype)


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)
