"""`jaxpost.models.matmul`: the mixed-precision dot's values and gradients against float64
NumPy on the rounded operands, float32 left to JAX exactly, and the bfloat16 backward of a model
free of float32 matmuls (the reason the custom VJP exists)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxpost import models
from jaxpost.losses import sft_loss
from jaxpost.models import matmul

from tiny_models import tiny_config


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def _bf16_as_f64(x):
    return np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float64)


def _assert_within(actual, expected, bound):
    """|actual - expected| <= bound elementwise (bound: an array of per-element error bounds)."""
    err = np.abs(np.asarray(actual, np.float64) - expected)
    assert np.all(err <= bound), float((err / bound).max())


def test_float32_is_jax_dot_with_jax_gradient():
    x, w, g = _rand(0, (24, 16)), _rand(1, (16, 8)), _rand(2, (24, 8))

    def ours(x, w):
        return jnp.vdot(matmul.dot(x, w, jnp.float32), g)

    def plain(x, w):
        return jnp.vdot(jnp.dot(x, w, preferred_element_type=jnp.float32), g)

    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("x_dtype, m", [(jnp.float32, 48), (jnp.bfloat16, 48), (jnp.bfloat16, 1)])
def test_bfloat16_values_and_gradients_match_float64_on_rounded_operands(x_dtype, m):
    k, n = 32, 40  # m = 1: the single-row product (batch-1 decode) is computed as two rows
    x = _rand(0, (m, k)).astype(x_dtype)
    w = _rand(1, (k, n))  # float32 master weights
    g = _rand(2, (m, n))
    y, vjp = jax.vjp(lambda x, w: matmul.dot(x, w, jnp.bfloat16), x, w)
    dx, dw = vjp(g)
    assert y.dtype == jnp.float32 and dx.dtype == x_dtype and dw.dtype == jnp.float32

    xr, wr, gr = _bf16_as_f64(x), _bf16_as_f64(w), _bf16_as_f64(g)
    # Products of bfloat16 numbers are exact in float32; only the float32 accumulation rounds.
    tol = 1e-5
    _assert_within(y, xr @ wr, tol * np.abs(xr) @ np.abs(wr))
    dx_ref = gr @ wr.T
    dx_tol = tol * np.abs(gr) @ np.abs(wr).T
    if x_dtype == jnp.bfloat16:
        dx_tol = dx_tol + np.abs(dx_ref) * 2.0**-8  # the cotangent is returned in x's dtype
    _assert_within(dx, dx_ref, dx_tol)
    # The weight gradient comes back in float32, without a bfloat16 round trip.
    _assert_within(dw, xr.T @ gr, tol * np.abs(xr).T @ np.abs(gr))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m", [1, 16, matmul.DOT_T_MAX_ROWS + 1])
def test_dot_t_of_a_transposed_kernel_matches_float64(dtype, m):
    """The decode layout's product: x [M, K] . w_t [N, K] -> [M, N] under jit (where XLA would
    fold the transpose back if it could), against float64 on the operands in compute dtype;
    more than DOT_T_MAX_ROWS rows take the direct x w_t^T product."""
    k, n = 32, 40
    x, w_t = _rand(0, (m, k)), _rand(1, (n, k))
    y = jax.jit(lambda x, w: matmul.dot_t(x, w, dtype))(x, w_t)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    if dtype == jnp.float32:
        xr, wr = np.asarray(x, np.float64), np.asarray(w_t, np.float64)
    else:
        xr, wr = _bf16_as_f64(x), _bf16_as_f64(w_t)
    _assert_within(y, xr @ wr.T, 1e-5 * np.abs(xr) @ np.abs(wr).T)


def test_weight_grad_contracts_rows_in_both_dtypes():
    x, g = _rand(3, (64, 16)), _rand(4, (64, 24))
    np.testing.assert_allclose(
        np.asarray(matmul.weight_grad(x, g)),
        np.asarray(x, np.float64).T @ np.asarray(g, np.float64),
        rtol=1e-5,
        atol=1e-5,
    )
    xb, gb = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
    out = matmul.weight_grad(xb, gb)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out), _bf16_as_f64(x).T @ _bf16_as_f64(g), rtol=1e-5, atol=1e-5
    )


def _dot_operands(hlo_text: str) -> list[tuple[tuple[int, ...], str]]:
    """(shape, element type) of both operands of every dot_general in a StableHLO module."""
    tensor = r"tensor<((?:\d+x)*)(\w+)>"
    sig = rf"stablehlo\.dot_general[^\n]*:\s*\({tensor}, {tensor}\)"
    out = []
    for dims_a, type_a, dims_b, type_b in re.findall(sig, hlo_text):
        for dims, dtype in ((dims_a, type_a), (dims_b, type_b)):
            out.append((tuple(int(d) for d in dims.split("x") if d), dtype))
    return out


def test_bfloat16_sft_gradient_has_no_float32_matmul_and_tracks_float32():
    cfg = tiny_config(qk_norm=True, tie_embeddings=True, model_type="qwen3", attention_impl="xla")
    params = models.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    batch = {
        "tokens": tokens,
        "targets": jnp.roll(tokens, -1, 1),
        "loss_mask": jnp.ones((2, 16), jnp.float32).at[:, -1].set(0.0),
    }

    def loss(c):
        def f(p):
            total, weight, _ = sft_loss(c, {"base": p, "lora": None}, batch)
            return total / weight

        return jax.grad(f)

    bf = cfg.replace(dtype="bfloat16")
    operands = _dot_operands(jax.jit(loss(bf)).lower(params).as_text())
    # Linear layers and the LM head multiply [tokens, features] views (rank 2, or the weight
    # gradient's [1, tokens, features]); every one of them must take bfloat16 operands. The
    # attention products (rank 4-5) are left to JAX's gradient.
    matrices = [(shape, dtype) for shape, dtype in operands if len(shape) <= 3]
    assert len(matrices) >= 2 * 3 * 7, operands  # 7 linears: forward, d input, d weight
    assert all(dtype == "bf16" for _, dtype in matrices), matrices

    g32 = jax.jit(loss(cfg))(params)
    g16 = jax.jit(loss(bf))(params)
    for path, a, b in zip(
        jax.tree_util.tree_leaves_with_path(g32), jax.tree.leaves(g32), jax.tree.leaves(g16)
    ):
        err = np.linalg.norm(np.asarray(b) - np.asarray(a)) / np.linalg.norm(np.asarray(a))
        assert err < 3e-2, (jax.tree_util.keystr(path[0]), err)


def _lora_operands(m=300, k=48, n=40, r=4):
    return (
        _rand(10, (m, k)),
        _rand(11, (k, n)),
        _rand(12, (k, r)),
        _rand(13, (r, n)),
        _rand(14, (m, n)),
    )


def test_lora_dot_has_the_values_and_gradients_of_the_unmerged_form():
    """x (w + s a b) with LoRA's gradients, against float64 NumPy of x w + s (x a) b."""
    x, w, a, b, g = _lora_operands()
    s = 2.5
    loss = lambda x, w, a, b: jnp.vdot(matmul.lora_dot(x, w, a, b, s, jnp.float32), g)
    y = matmul.lora_dot(x, w, a, b, s, jnp.float32)
    dx, dw, da, db = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w, a, b)
    x64, w64, a64, b64, g64 = (np.asarray(v, np.float64) for v in (x, w, a, b, g))
    weff = w64 + s * a64 @ b64
    tol = 1e-5 * (np.abs(x64) @ (np.abs(w64) + s * np.abs(a64) @ np.abs(b64)))
    _assert_within(y, x64 @ w64 + s * (x64 @ a64) @ b64, tol)
    _assert_within(dx, g64 @ weff.T, 1e-5 * np.abs(g64) @ np.abs(weff).T)
    _assert_within(dw, x64.T @ g64, 1e-5 * np.abs(x64).T @ np.abs(g64))
    gb = g64 @ b64.T
    _assert_within(da, s * x64.T @ gb, 1e-5 * s * np.abs(x64).T @ (np.abs(g64) @ np.abs(b64).T))
    xa = x64 @ a64
    _assert_within(db, s * xa.T @ g64, 1e-5 * s * (np.abs(x64) @ np.abs(a64)).T @ np.abs(g64))


def test_lora_dot_in_bfloat16_rounds_the_merged_kernel_once():
    x, w, a, b, _ = _lora_operands()
    y = jax.jit(lambda *v: matmul.lora_dot(*v, 2.5, jnp.bfloat16))(x, w, a, b)
    assert y.dtype == jnp.float32
    weff = np.asarray(w, np.float64) + 2.5 * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    weff = weff.astype(ml_dtypes.bfloat16).astype(np.float64)  # rounded once, as merged
    xr = _bf16_as_f64(x)
    _assert_within(y, xr @ weff, 1e-5 * np.abs(xr) @ np.abs(weff))


def test_lora_dot_costs_no_weight_gradient_when_the_kernel_is_frozen():
    """Differentiating only the LoRA factors (LoRA training) compiles no x^T g for the frozen
    kernel: the step's matmul FLOPs are the forward's and a few low-rank products, not 2x."""
    x, w, a, b, g = _lora_operands(m=512, k=64, n=96)
    # Nonlinear in the output, so the gradients need the forward product.
    loss = lambda x, w, a, b: jnp.vdot(jnp.sin(matmul.lora_dot(x, w, a, b, 2.0, jnp.float32)), g)
    full_matmul = 2 * 512 * 64 * 96

    def flops(argnums):
        compiled = jax.jit(jax.grad(loss, argnums=argnums)).lower(x, w, a, b).compile()
        cost = compiled.cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops((2, 3)) < 1.5 * full_matmul  # the forward; no dx, no dw
    assert flops((1, 2, 3)) >= 2 * full_matmul  # asked for, the kernel's gradient is there


@pytest.mark.parametrize("m", [1, 300])
def test_low_rank_has_the_values_and_gradients_of_autodiff(m):
    """The unmerged LoRA term s (x a) b with its own VJP (da in the fast orientation) against
    float64 NumPy, at a decode step's single row and a train step's many."""
    x, _, a, b, _ = _lora_operands(m=m)
    g = _rand(15, (m, b.shape[1]))
    s = 1.5
    loss = lambda x, a, b: jnp.vdot(matmul.low_rank(x, a, b, s, jnp.float32), g)
    y = matmul.low_rank(x, a, b, s, jnp.float32)
    dx, da, db = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, a, b)
    x64, a64, b64, g64 = (np.asarray(v, np.float64) for v in (x, a, b, g))
    ax, ab, ag = np.abs(x64), np.abs(a64), np.abs(b64)
    _assert_within(y, s * (x64 @ a64) @ b64, 1e-5 * s * (ax @ ab) @ ag)
    gb = g64 @ b64.T
    _assert_within(dx, s * gb @ a64.T, 1e-5 * s * (np.abs(g64) @ ag.T) @ ab.T)
    _assert_within(da, s * x64.T @ gb, 1e-5 * s * ax.T @ (np.abs(g64) @ ag.T))
    _assert_within(db, s * (x64 @ a64).T @ g64, 1e-5 * s * (ax @ ab).T @ np.abs(g64))


def test_low_rank_returns_each_gradient_in_its_operands_dtype():
    """float32 operands multiplied in bfloat16: every gradient comes back float32, as autodiff
    of a cast-then-multiply gives (the VJP once returned x's gradient in bfloat16)."""
    x, _, a, b, _ = _lora_operands(m=4)
    loss = lambda x, a, b: matmul.low_rank(x, a, b, 2.0, jnp.bfloat16).sum()
    grads = jax.grad(loss, argnums=(0, 1, 2))(x, a, b)
    assert [g.dtype for g in grads] == [jnp.float32] * 3
    ref = jax.grad(
        lambda x, a, b: (2.0 * (x.astype(jnp.bfloat16) @ a.astype(jnp.bfloat16)).astype(
            jnp.float32) @ b).sum(), argnums=(0, 1, 2)
    )(x, a, b)  # fmt: skip
    for got, want in zip(grads, ref):
        np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2)
