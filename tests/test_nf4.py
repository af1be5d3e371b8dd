"""NF4 with double-quantized scales: the code table against the paper's construction and
bitsandbytes, the error against a bound derived from the codes, agreement with bitsandbytes'
quantizer, storage per parameter, and a QLoRA SFT step (gradients for LoRA only)."""

from __future__ import annotations

import bitsandbytes.functional as bnb
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from scipy.stats import norm

from jaxpost import lora, models, nf4, sharding

forward = jax.jit(models.forward, static_argnums=0)


def _gaussian(seed: int, shape, std: float = 0.02) -> np.ndarray:
    return (std * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _bnb_quantize(w: np.ndarray):
    q, state = bnb.quantize_4bit(
        torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    return q, state


# Code tables ---------------------------------------------------------------------------------


def test_nf4_code_is_the_papers_construction():
    # Dettmers et al. 2023, Eq. 4 as implemented by bitsandbytes' create_normal_map: 8 positive
    # and 7 negative normal quantiles between offset and 1/2, an exact zero, scaled into [-1, 1].
    offset = 0.9677083
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(nf4.NF4_CODE, values / values.max(), atol=1e-6)
    np.testing.assert_array_equal(nf4.NF4_CODE, bnb.get_4bit_type("nf4", device="cpu").numpy())


def test_dynamic_code_matches_bitsandbytes():
    # Identical up to float32 rounding of linspace (torch and numpy differ in the last ulp).
    np.testing.assert_allclose(nf4.DYNAMIC_CODE, bnb.create_dynamic_map().numpy(), atol=1e-7)
    assert len(np.unique(nf4.DYNAMIC_CODE)) == 256


# Quantization error --------------------------------------------------------------------------


def _half_gap(code: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Half the width of the code interval containing s: the worst rounding error there."""
    j = np.clip(np.searchsorted(code, s, side="right") - 1, 0, len(code) - 2)
    return (code[j + 1].astype(np.float64) - code[j]) / 2


def test_error_within_the_nf4_bound_and_equal_to_bitsandbytes():
    shape = (257, 193)  # not a multiple of 64 or of 64 * 256: exercises the padding
    w = _gaussian(0, shape)
    q = nf4.quantize(jnp.asarray(w))
    deq = np.asarray(nf4.dequantize(q, shape), np.float64)
    err = np.abs(deq - w)

    # Independent float64 bound. Per 64-block with absmax M, rounding x/M to the nearest NF4
    # code errs by at most half the local code gap, times M. The absmax is itself stored with
    # error |M' - M| <= half the local gap of the 8-bit dynamic code times D, the absolute
    # maximum of the mean-centred maxima in its 256-block. So |x' - x| <= h4(x/M) M + h8(t) D.
    n = w.size
    flat = np.pad(w.reshape(-1).astype(np.float64), (0, (-n) % 64)).reshape(-1, 64)
    m = np.abs(flat).max(axis=1)
    centred = m - m.mean()
    d = np.pad(centred, (0, (-len(m)) % 256)).reshape(-1, 256)
    big_d = np.repeat(np.abs(d).max(axis=1), 256)[: len(m)]
    bound_m = _half_gap(nf4.DYNAMIC_CODE, centred / big_d) * big_d
    bound = _half_gap(nf4.NF4_CODE, flat / m[:, None]) * m[:, None] + bound_m[:, None]
    bound = bound.reshape(-1)[:n].reshape(shape)
    assert np.all(err <= bound * (1 + 1e-5) + 1e-9)
    assert np.max(err / bound) > 0.5  # the bound is tight, not vacuous
    # The coarse form: half the largest NF4 gap (-1 to -0.696: 0.1519) times the absmax, plus
    # the scale error.
    largest_half_gap = np.max(np.diff(nf4.NF4_CODE.astype(np.float64))) / 2
    assert largest_half_gap == pytest.approx(0.15190, abs=1e-5)
    assert err.max() <= largest_half_gap * m.max() + bound_m.max() + 1e-9

    # The RMS error of NF4 on Gaussian data is ~0.09 sigma; bitsandbytes gives the same figure.
    rms = np.sqrt(np.mean(err**2)) / w.std()
    assert 0.08 < rms < 0.10
    q_bnb, state = _bnb_quantize(w)
    deq_bnb = bnb.dequantize_4bit(q_bnb, state).numpy()
    rms_bnb = np.sqrt(np.mean((deq_bnb - w) ** 2)) / w.std()
    assert rms == pytest.approx(rms_bnb, rel=1e-3)

    # Bit-level agreement: the packed NF4 codes are identical; the 8-bit absmax codes agree up
    # to rounding of the mean (summation order) at a few midpoints.
    packed = np.asarray(q["codes"])[: q_bnb.numel()]
    np.testing.assert_array_equal(packed, q_bnb.numpy().reshape(-1))
    n_blocks = state.absmax.numel()
    same = np.asarray(q["absmax_codes"])[:n_blocks] == state.absmax.numpy()
    assert same.mean() > 0.99
    assert float(q["absmax_offset"]) == pytest.approx(float(state.offset), rel=1e-6)
    agree = np.repeat(same, 64)[:n].reshape(shape)
    np.testing.assert_allclose(deq[agree], deq_bnb[agree], rtol=1e-5, atol=1e-9)


def test_leading_axes_are_quantized_per_slice():
    w = _gaussian(1, (3, 40, 50))
    stacked = nf4.quantize(jnp.asarray(w), batch_dims=1)
    for i in range(3):
        one = nf4.quantize(jnp.asarray(w[i]))
        for key in one:
            np.testing.assert_array_equal(stacked[key][i], one[key])
    layer = lambda i: {k: v[i] for k, v in stacked.items()}
    np.testing.assert_array_equal(
        nf4.dequantize(stacked, (3, 40, 50)),
        np.stack([nf4.dequantize(layer(i), (40, 50)) for i in range(3)]),
    )
    assert nf4.dequantize(stacked, (3, 40, 50), jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("tiny", [0.0, 1e-40])
def test_zero_blocks_dequantize_to_zero_and_a_nan_spreads(tiny):
    """A block of zeros (a pruned head's rows; subnormals flush to zero on XLA:CPU) gets
    bitsandbytes' zero code 0x77 and dequantizes to exactly 0 (its reciprocal maximum was
    inf, and the block came back as +absmax, audit 32). A NaN weight spreads to the whole
    tensor through the maxima's mean, as in bitsandbytes, not to a finite code."""
    w = _gaussian(3, (128, 64))
    w[16:32] = tiny  # whole 64-blocks
    q = nf4.quantize(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(q["codes"])[16 * 32 : 32 * 32], 0x77)
    deq = np.asarray(nf4.dequantize(q, w.shape))
    np.testing.assert_array_equal(deq[16:32], 0.0)
    assert np.abs(deq - w).max() < 0.2 * np.abs(w).max()  # the rest as before

    w[100, 5] = np.nan
    assert np.isnan(np.asarray(nf4.dequantize(nf4.quantize(jnp.asarray(w)), w.shape))).all()


def test_quantize_and_dequantize_errors():
    with pytest.raises(TypeError, match="floating-point array, got int32"):
        nf4.quantize(jnp.zeros((4, 64), jnp.int32))
    with pytest.raises(ValueError, match="batch_dims=2 for an array of shape"):
        nf4.quantize(jnp.zeros((4, 64)), batch_dims=2)
    q = nf4.quantize(jnp.asarray(_gaussian(2, (64, 64))))
    with pytest.raises(ValueError, match=r"'codes' has shape \(2048,\); an array of shape"):
        nf4.dequantize(q, (64, 128))
    with pytest.raises(ValueError, match="not an NF4 tree"):
        nf4.dequantize({"kernel": jnp.zeros((4, 4))}, (4, 4))
    with pytest.raises(ValueError, match="leading 0 axes must match"):
        nf4.dequantize(q, ())


# The quantized base --------------------------------------------------------------------------


def test_quantized_base_bytes_per_parameter():
    cfg = models.ModelConfig(
        vocab_size=128,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=4,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
    )
    params = jax.jit(models.init, static_argnums=0)(cfg, jax.random.key(0))
    qparams = jax.jit(nf4.quantize_base, static_argnums=0)(cfg, params)
    n_params, n_bytes = 0, 0
    for block, module in lora.HF_MODULES:
        n_params += params["layers"][block][module]["kernel"].size
        assert "kernel" not in qparams["layers"][block][module]
        n_bytes += nf4.nbytes(qparams["layers"][block][module][nf4.KERNEL_KEY])
    assert n_params >= 10_000_000
    print(f"NF4 base: {n_params} parameters, {n_bytes} bytes, {n_bytes / n_params:.4f} B/param")
    # 4 bits + 8 bits per 64 + 32 bits per 64 * 256 (+ one float32 mean per kernel and layer).
    assert n_bytes / n_params == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-3)
    assert n_bytes / n_params <= 0.6
    # Embeddings, norms and the LM head stay as they were.
    for path in (("embedder", "embedding"), ("lm_head", "kernel"), ("final_norm", "scale")):
        np.testing.assert_array_equal(qparams[path[0]][path[1]], params[path[0]][path[1]])
    np.testing.assert_array_equal(
        qparams["layers"]["attn_norm"]["scale"], params["layers"]["attn_norm"]["scale"]
    )


TINY = models.ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)


@pytest.fixture(scope="module")
def tiny_params():
    return jax.jit(models.init, static_argnums=0)(TINY, jax.random.key(1))


def test_quantize_base_targets_and_errors(tiny_params):
    params = tiny_params
    q = nf4.quantize_base(TINY, params, targets=[r"layers/mlp/.*"])
    assert nf4.KERNEL_KEY in q["layers"]["mlp"]["up"] and "kernel" in q["layers"]["attn"]["q"]
    with pytest.raises(ValueError, match="NF4 target 'layers/mlp/w1/kernel' matches no layer"):
        nf4.quantize_base(TINY, params, targets=["layers/mlp/w1/kernel"])
    axes = nf4.quantized_logical_axes(models.logical_axes(TINY), q)
    assert axes["layers"]["mlp"]["up"][nf4.KERNEL_KEY]["codes"] == ("layers", nf4.BLOCKS_AXIS)
    assert axes["layers"]["mlp"]["up"][nf4.KERNEL_KEY]["absmax_offset"] == ("layers",)
    assert axes["layers"]["attn"]["q"]["kernel"] == ("layers", "embed", "heads")


def test_quantize_base_rounds_each_weight_as_bitsandbytes(tiny_params):
    # transformers + bitsandbytes quantize torch's weight [out, in]: blocks of 64 run along the
    # input axis. quantize_base must cut the same blocks out of the [in, out] kernel, or a
    # weight is rounded differently here and there (and an adapter trained on one base does
    # not fit the other). The kernels here are [64, 128] and [128, 64], so the two orders differ.
    qparams = nf4.quantize_base(TINY, tiny_params)
    for block, module in lora.HF_MODULES:
        for layer in range(TINY.num_layers):
            kernel = np.asarray(tiny_params["layers"][block][module]["kernel"][layer])
            q = {k: v[layer] for k, v in qparams["layers"][block][module][nf4.KERNEL_KEY].items()}
            q_bnb, state = _bnb_quantize(np.ascontiguousarray(kernel.T))
            np.testing.assert_array_equal(
                np.asarray(q["codes"])[: q_bnb.numel()], q_bnb.numpy().reshape(-1)
            )
            # The 8-bit codes of the block maxima: equal, or (the maxima's mean summed in
            # another order, last-ulp apart) the neighbouring code at a few midpoints.
            ours = np.asarray(q["absmax_codes"])[: state.absmax.numel()].astype(int)
            gap = np.abs(ours - state.absmax.numpy().astype(int))
            assert gap.max() <= 1 and gap.mean() < 0.05
            same = np.repeat(gap == 0, 64)[: kernel.size].reshape(kernel.T.shape)
            deq = np.asarray(nf4.dequantize_kernel(q, kernel.shape)).T
            deq_bnb = bnb.dequantize_4bit(q_bnb, state).numpy()
            np.testing.assert_allclose(deq[same], deq_bnb[same], rtol=1e-5, atol=1e-7)


def _cross_entropy(cfg, base, lp, tokens):
    logits = models.forward(cfg, base, tokens[:, :-1], lora=lp)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def test_qlora_forward_and_sft_step(tiny_params):
    params = tiny_params
    qparams = nf4.quantize_base(TINY, params)
    lp = lora.init(TINY, qparams, rank=8, alpha=16, key=jax.random.key(2))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 128, (4, 17)), jnp.int32)

    # The jitted forward dequantizes inside the matmul's producer and equals the plain model
    # built from the dequantized kernels.
    plain = jax.tree.map(lambda x: x, params)
    for block, module in lora.HF_MODULES:
        shape = params["layers"][block][module]["kernel"].shape
        plain["layers"][block][module] = {
            "kernel": nf4.dequantize_kernel(qparams["layers"][block][module][nf4.KERNEL_KEY], shape)
        }
    np.testing.assert_allclose(
        forward(TINY, qparams, tokens, lora=lp), forward(TINY, plain, tokens), atol=1e-5
    )

    optimizer = optax.adamw(3e-3, weight_decay=0.01)
    opt_state = optimizer.init(lp)

    @jax.jit
    def step(lp, opt_state, base, tokens):
        loss, grads = jax.value_and_grad(_cross_entropy, argnums=2)(TINY, base, lp, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, lp)
        return optax.apply_updates(lp, updates), opt_state, loss, grads

    losses = []
    for _ in range(6):
        lp, opt_state, loss, grads = step(lp, opt_state, qparams, tokens)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses
    # Merging into the NF4 base gives plain kernels (dequantized + scale * A @ B) with the same
    # logits as the partitioned QLoRA forward.
    merged = lora.merge(TINY, qparams, lp)
    assert nf4.KERNEL_KEY not in merged["layers"]["mlp"]["down"]
    np.testing.assert_allclose(
        forward(TINY, merged, tokens), forward(TINY, qparams, tokens, lora=lp), atol=1e-5
    )
    # Gradients and optimizer state exist for the LoRA factors only.
    assert jax.tree.structure(grads) == jax.tree.structure(lp)
    lora_size = sum(x.size for x in jax.tree.leaves(lp))
    state_size = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert state_size == 2 * lora_size  # Adam's two moments
    for g in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0


def test_qlora_forward_sharded_over_a_mesh(tiny_params):
    """The trainer's path: NF4 base and LoRA placed by their logical axes on 8 devices."""
    qparams = nf4.quantize_base(TINY, tiny_params)
    lp = jax.tree.map(lambda x: x + 0.01, lora.init(TINY, qparams, rank=4, alpha=8))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    axes = nf4.quantized_logical_axes(models.logical_axes(TINY), qparams)
    placed = jax.device_put(qparams, sharding.tree_shardings(qparams, axes, mesh))
    placed_lora = jax.device_put(lp, sharding.tree_shardings(lp, lora.logical_axes(lp), mesh))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 128, (4, 17)), jnp.int32)
    # The codes are split over fsdp x tensor (4 ways), as the float kernels they replace are.
    codes = placed["layers"]["mlp"]["up"][nf4.KERNEL_KEY]["codes"]
    assert {s.data.shape for s in codes.addressable_shards} == {(2, codes.shape[1] // 4)}
    with sharding.use_mesh(mesh):
        sharded = forward(TINY, placed, tokens, lora=placed_lora)
    np.testing.assert_allclose(sharded, forward(TINY, qparams, tokens, lora=lp), atol=1e-5)


def test_quantizing_a_sharded_base_keeps_each_device_to_its_share(tiny_params):
    """The CLI's QLoRA path: a base loaded over fsdp=8 is quantized where it lies, each device
    keeping 1/8 of the codes (eagerly, every device held them all, audit 33), and the values
    equal quantizing on one device (the maxima's mean, reduced in another order, to 1 ulp)."""
    from jaxpost import train_state

    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    axes = models.logical_axes(TINY)
    base = jax.device_put(tiny_params, sharding.tree_shardings(tiny_params, axes, mesh))
    quantized = train_state.quantize_base(TINY, base, mesh)
    reference = nf4.quantize_base(TINY, tiny_params)
    up = quantized["layers"]["mlp"]["up"][nf4.KERNEL_KEY]
    for leaf in (up["codes"], up["absmax_codes"]):  # [L, blocks]: the bulk of the NF4 base
        assert {s.data.shape for s in leaf.addressable_shards} == {
            (leaf.shape[0], leaf.shape[1] // 8)
        }
    for name in ("q", "o"):
        got = quantized["layers"]["attn"][name][nf4.KERNEL_KEY]
        want = reference["layers"]["attn"][name][nf4.KERNEL_KEY]
        np.testing.assert_array_equal(got["codes"], want["codes"])
        shape = tiny_params["layers"]["attn"][name]["kernel"].shape
        np.testing.assert_allclose(
            nf4.dequantize_kernel(got, shape), nf4.dequantize_kernel(want, shape), atol=1e-7
        )
