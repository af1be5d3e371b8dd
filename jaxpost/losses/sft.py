"""Supervised fine-tuning: token cross-entropy over the loss mask, with z-loss and label smoothing.

Per token t with mask m_t, target y_t, log-partition Z_t = logsumexp(logits_t) and V classes:
  ce_t     = -(1 - eps) * log p(y_t) - eps * mean_v log p(v)        (label smoothing eps)
           = -(1 - eps) * log p(y_t) - eps * (mean_v logits_t - Z_t)
  z_t      = Z_t ** 2                                               (PaLM's z-loss)
  loss_sum = sum_t m_t * (ce_t + z_coef * z_t),   weight_sum = sum_t m_t.
The step divides the summed loss_sum by the summed weight_sum of all micro-batches, so the
result is the exact token mean of the global batch under padding, packing and accumulation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxpost import models
from jaxpost.kernels import dispatch as _dispatch
from jaxpost.losses.linear_cross_entropy import linear_cross_entropy
from jaxpost.losses.logprobs import final_hidden, token_logprobs
from jaxpost.models.config import ModelConfig


def sft_loss(
    cfg: ModelConfig,
    params: dict,
    batch: dict,
    rng: jax.Array | None = None,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss_sum, weight_sum, aux) of one (micro-)batch; see the module docstring.

    batch: "tokens", "targets" [B, T] int32, "loss_mask" [B, T] float (0 on prompt, padding
    and segment ends), optional "segment_ids" / "positions". aux holds unnormalised sums with
    the same denominator as the loss: "nll" (plain cross-entropy, no smoothing) and, when on,
    "z_loss" (sum of Z^2).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}; expected 0 <= label_smoothing < 1")
    if z_loss < 0:
        raise ValueError(f"z_loss={z_loss}; expected a coefficient >= 0")
    if "loss_mask" not in batch:
        raise KeyError(f"batch has no 'loss_mask'; keys are {sorted(batch)}")
    if not _dispatch.use_kernel(impl, "fused_logprobs", tpu_profitable=cfg.vocab_size >= 8192):
        return _sft_loss_fused_grad(cfg, params, batch, rng, z_loss, label_smoothing)
    out = token_logprobs(
        cfg,
        params,
        batch,
        rng=rng,
        with_lse=z_loss > 0 or label_smoothing > 0,
        with_logit_mean=label_smoothing > 0,
        impl=impl,
    )
    mask = batch["loss_mask"].astype(jnp.float32)
    nll = -out["logp"]
    per_token = nll
    if label_smoothing > 0:
        # Z - mean_v logits = -mean_v log p(v): the uniform-target cross-entropy.
        uniform = out["lse"] - out["logit_mean"]
        per_token = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    aux = {"nll": jnp.sum(nll * mask)}
    if z_loss > 0:
        z = out["lse"] ** 2
        per_token = per_token + z_loss * z
        aux["z_loss"] = jnp.sum(z * mask)
    return jnp.sum(per_token * mask), jnp.sum(mask), aux


def _sft_loss_fused_grad(cfg, params, batch, rng, z_loss, label_smoothing):
    """The XLA path: the same loss through `linear_cross_entropy`, which forms the LM head's
    gradient while each chunk's logits are live instead of recomputing them in the backward."""
    hidden = final_hidden(cfg, params, batch, rng)
    b, t, d = hidden.shape
    mask = batch["loss_mask"].astype(jnp.float32).reshape(b * t)
    loss, stats = linear_cross_entropy(
        hidden.reshape(b * t, d),
        models.lm_head_kernel(cfg, params["base"]),
        batch["targets"].reshape(b * t),
        nll_weight=(1.0 - label_smoothing) * mask,
        uniform_weight=label_smoothing * mask if label_smoothing > 0 else None,
        z_weight=z_loss * mask if z_loss > 0 else None,
        softcap=cfg.final_logit_softcap,
        compute_dtype=cfg.dtype,
    )
    aux = {"nll": jnp.sum(stats["nll"] * mask)}
    if z_loss > 0:
        aux["z_loss"] = jnp.sum(stats["lse"] ** 2 * mask)
    return loss, jnp.sum(mask), aux


def make_sft_loss(z_loss: float = 0.0, label_smoothing: float = 0.0) -> Callable:
    """`sft_loss` with its options bound: a `loss_fn(cfg, params, batch, rng)` for the steps."""
    return functools.partial(sft_loss, z_loss=z_loss, label_smoothing=label_smoothing)
