"""Optimizers and schedules against independent references: HF's Adafactor and torch's SGD
(torch), the Lion paper's update (float64 NumPy), transformers' schedule formulas in float64;
and every hyper-parameter refused by name (`make_optimizer` and the config)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from jaxpost import config as jconfig
from jaxpost import optim


def _run(opt, params, grads):
    """The params after one update per gradient in `grads`."""
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _grads(rng, shapes, steps, scale=1.0):
    return [
        {k: jnp.asarray(scale * rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
        for _ in range(steps)
    ]


@pytest.mark.parametrize("b1", [None, 0.9])
def test_adafactor_matches_transformers(b1):
    """HF's Adafactor with a fixed learning rate (scale_parameter=False, relative_step=False):
    factored second moments for every matrix, LoRA's [in, r] factors included (optax factors
    only arrays >= 128 on both sides: its updates were 60% off HF's there), the plain ones for
    vectors, RMS clipping at 1, the decay scaled by the learning rate (p -= lr * wd * p), and
    beta1 as the momentum. A scanned model's per-layer leaves [L, ...] are L of HF's tensors."""
    rng = np.random.default_rng(0)
    shapes = {
        "kernel": (128, 160),
        "lora_a": (256, 8),
        "lora_b": (8, 256),
        "bias": (160,),
        "layers": {"q": {"kernel": (2, 64, 8)}, "attn_norm": {"scale": (2, 48)}},
    }
    is_shape = lambda x: isinstance(x, tuple)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                          is_leaf=is_shape)  # fmt: skip
    # Small gradients (LoRA-sized): eps = 1e-8, Adam's, in place of 1e-30 shrank them 20-fold.
    grads = [
        jax.tree.map(
            lambda s: jnp.asarray(1e-5 * rng.normal(size=s), jnp.float32), shapes, is_leaf=is_shape
        )  # fmt: skip
        for _ in range(4)
    ]
    lr, wd = 1e-2, 0.1
    opt = optim.make_optimizer(
        name="adafactor", learning_rate=lr, schedule="constant", weight_decay=wd, b1=b1,
        max_grad_norm=None,
    )  # fmt: skip
    ours = _run(opt, params, grads)

    # HF's tensors: one per layer of a stacked leaf.
    def split(tree):
        flat = {}
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            name = "/".join(str(k.key) for k in path)
            parts = list(x) if name.startswith("layers/") else [x]
            for i, part in enumerate(parts):
                flat[(name, i)] = np.asarray(part, np.float64)
        return flat

    start = split(params)
    torch_params = {k: torch.tensor(v) for k, v in start.items()}
    flags = {"/".join(str(k.key) for k in p): d
             for p, d in jax.tree_util.tree_leaves_with_path(optim.decay_mask(params))}  # fmt: skip
    groups = [
        {"params": [p for k, p in torch_params.items() if flags[k[0]]], "weight_decay": wd},
        {"params": [p for k, p in torch_params.items() if not flags[k[0]]], "weight_decay": 0.0},
    ]
    theirs = transformers.optimization.Adafactor(
        groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, beta1=b1
    )
    for g in grads:
        for k, gk in split(g).items():
            torch_params[k].grad = torch.tensor(gk)
        theirs.step()
    moved = split(ours)
    for k, p in torch_params.items():
        # The moves (lr-sized: 4 steps of 1e-2), to float32 rounding of the weights (~2e-7).
        expected = p.numpy() - start[k]
        assert np.max(np.abs(expected)) > 3e-3, k
        np.testing.assert_allclose(moved[k] - start[k], expected, rtol=0, atol=1e-6, err_msg=k)


def test_adafactor_decay_is_scaled_by_the_learning_rate():
    params = {"kernel": jnp.ones((4, 4))}
    opt = optim.make_optimizer(
        name="adafactor", learning_rate=1e-3, schedule="constant", weight_decay=0.1
    )
    zero = [{"kernel": jnp.zeros((4, 4))}]
    np.testing.assert_allclose(_run(opt, params, zero)["kernel"], 1 - 1e-3 * 0.1, rtol=1e-7)


def test_lion_matches_the_paper_with_its_default_b2():
    """Lion (Chen et al. 2023, Algorithm 2): u = sign(b1 m + (1 - b1) g), m = b2 m + (1 - b2) g,
    p -= lr (u + wd p); b1 = 0.9, b2 = 0.99 by default (the paper's, not Adam's 0.999)."""
    rng = np.random.default_rng(1)
    shapes = {"kernel": (6, 5)}
    params = {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
    grads = _grads(rng, shapes, 5)
    lr, wd = 1e-2, 0.3
    opt = optim.make_optimizer(
        name="lion", learning_rate=lr, schedule="constant", weight_decay=wd, max_grad_norm=None
    )
    ours = _run(opt, params, grads)
    p = np.asarray(params["kernel"], np.float64)
    m = np.zeros_like(p)
    for g in grads:
        g = np.asarray(g["kernel"], np.float64)
        u = np.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
        p = p - lr * (u + wd * p)
    np.testing.assert_allclose(ours["kernel"], p, rtol=0, atol=1e-6)


def test_sgd_is_torch_sgd():
    """b1 is the momentum (none by default, as torch's); weight decay is torch.optim.SGD's L2
    term, added to the gradient and so carried by the momentum."""
    rng = np.random.default_rng(2)
    shapes = {"kernel": (5, 3)}
    params = {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    grads = _grads(rng, shapes, 5)
    for momentum in (None, 0.9):
        opt = optim.make_optimizer(
            name="sgd", learning_rate=0.1, schedule="constant", weight_decay=0.1, b1=momentum,
            max_grad_norm=None,
        )  # fmt: skip
        ours = _run(opt, params, grads)
        p = torch.tensor(np.asarray(params["kernel"]), dtype=torch.float64)
        theirs = torch.optim.SGD([p], lr=0.1, momentum=momentum or 0.0, weight_decay=0.1)
        for g in grads:
            p.grad = torch.tensor(np.asarray(g["kernel"]), dtype=torch.float64)
            theirs.step()
        np.testing.assert_allclose(ours["kernel"], p.detach().numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "sgd", "b2": 0.9}, "b2=0.9 is not used by sgd"),
        ({"name": "lion", "eps": 1e-8}, "eps=1e-08 is not used by lion"),
        ({"name": "adafactor", "b2": 0.999}, "b2=0.999 is not used by adafactor"),
        ({"b1": 1.5}, r"b1=1.5 must be in \[0, 1\)"),
        ({"b2": 1.0}, r"b2=1.0 must be in \[0, 1\)"),  # Adam's first update would be NaN
        ({"eps": -1.0}, "eps=-1.0 must be finite and >= 0"),
        ({"learning_rate": -1e-3}, "learning_rate=-0.001 must be finite and > 0"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1 must be finite and >= 0"),
        ({"min_lr_ratio": 2.0}, r"min_lr_ratio=2.0 must be in \[0, 1\]"),
        ({"warmup_steps": 50, "total_steps": 10}, "warmup_steps=50 exceeds total_steps=10"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(**kwargs)


def test_config_names_bad_optimizer_keys():
    cfg = jconfig.defaults()
    cfg.data.task = "arithmetic"
    cfg.optimizer.name = "sgd"
    cfg.optimizer.b2 = 0.95
    cfg.optimizer.b1 = 1.0
    cfg.pretrain.learning_rate = -3e-3  # trained by gradient ascent before this was checked
    cfg.optimizer.learning_rate = 0.0
    with pytest.raises(jconfig.ConfigError) as err:
        jconfig.validate(cfg)
    for problem in (
        "optimizer.b1=1.0 must be in [0, 1)",
        "optimizer.b2=0.95 is not used by sgd; leave it None",
        "pretrain.learning_rate=-0.003 must be > 0",
        "optimizer.learning_rate=0.0 must be finite and > 0",
    ):
        assert problem in str(err.value)


def test_schedules_keep_their_precision_at_the_end_of_long_runs():
    """transformers' formulas in float64 at every step of a short run and near the end of a
    1e6-step one (where 1 - p in float32 kept only a few digits: 4.8% off at the last step)."""
    for total, warmup in ((10, 3), (1_000_000, 1000)):
        ratio = 0.1
        cos = optim.make_schedule(1e-3, "cosine", warmup, total, ratio)
        lin = optim.make_schedule(1e-3, "linear", warmup, total)
        points = range(total + 2) if total < 100 else (total - 3, total - 1, total, total + 5)
        for s in points:
            p = min(max((s - warmup) / (total - warmup), 0.0), 1.0)
            cos_ref = 1e-3 * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * p)))
            lin_ref = 1e-3 * (1 - p)
            if s < warmup:
                cos_ref = lin_ref = 1e-3 * s / warmup
            np.testing.assert_allclose(float(cos(s)), cos_ref, rtol=1e-5)
            np.testing.assert_allclose(float(lin(s)), lin_ref, rtol=1e-5, atol=1e-15)
    np.testing.assert_allclose(float(lin(jnp.int32(999_999))), 1e-3 / 999_000, rtol=1e-5)


def test_default_hyperparameters_are_each_optimizers_own():
    for name, expected in optim.DEFAULTS.items():
        assert set(expected) <= {"b1", "b2", "eps"}, name
    assert optim.DEFAULTS["adamw"] == {"b1": 0.9, "b2": 0.999, "eps": 1e-8}  # torch's AdamW
    assert optim.DEFAULTS["lion"]["b2"] == 0.99 and optim.DEFAULTS["adafactor"]["eps"] == 1e-30
    # AdamW with the defaults left None is optax's AdamW with torch's constants.
    rng = np.random.default_rng(3)
    params = {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    grads = _grads(rng, {"kernel": (4, 3)}, 3)
    ours = optim.make_optimizer(name="adamw", learning_rate=1e-2, schedule="constant",
                                weight_decay=0.01, max_grad_norm=None)  # fmt: skip
    reference = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    jax.tree.map(
        np.testing.assert_array_equal, _run(ours, params, grads), _run(reference, params, grads)
    )
