"""Per-token log-probs of given token ids under the model, the quantity every loss starts from.

SFT (cross-entropy), DPO (sequence log-prob ratios), PPO and GRPO (importance ratios, entropy
bonus) all call `token_logprobs`. It runs the transformer up to the final norm and hands the
hidden states and the LM head to `jaxpost.kernels.fused_logprobs`, which computes the
log-softmax in token chunks (or the Pallas kernel on TPU): a [B, T, V] float32 logits array is
never materialised, in the forward or the backward pass.
"""

from __future__ import annotations

import jax

from jaxpost import models
from jaxpost.kernels import fused_logprobs as _fused
from jaxpost.models.config import ModelConfig


def _dropout_rate(lora) -> float:
    return 0.0 if lora is None or isinstance(lora, dict) else float(getattr(lora, "dropout", 0.0))


def _check_batch(batch: dict) -> tuple[int, int]:
    for key in ("tokens", "targets"):
        if key not in batch:
            raise KeyError(f"batch has no {key!r}; keys are {sorted(batch)}")
    tokens, targets = batch["tokens"], batch["targets"]
    if tokens.ndim != 2 or targets.shape != tokens.shape:
        raise ValueError(
            f"batch 'tokens' {tokens.shape} and 'targets' {targets.shape}; expected both [B, T]"
        )
    return tokens.shape


def final_hidden(
    cfg: ModelConfig, params: dict, batch: dict, rng: jax.Array | None = None
) -> jax.Array:
    """The final normed hidden states [B, T, D] of batch["tokens"] (the LM head's input).

    params: {"base": model params, "lora": LoraParams | plain LoRA tree | None}; rng: key for
    LoRA dropout (ignored when the adapter has no dropout).
    """
    _check_batch(batch)
    base, lora = params["base"], params.get("lora")
    dropout_rng = rng if rng is not None and _dropout_rate(lora) > 0 else None
    hidden, _ = models.apply(
        cfg,
        base,
        batch["tokens"],
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        lora=lora,
        return_hidden=True,
        dropout_rng=dropout_rng,
    )
    return hidden


def token_logprobs(
    cfg: ModelConfig,
    params: dict,
    batch: dict,
    with_entropy: bool = False,
    *,
    with_lse: bool = False,
    with_logit_mean: bool = False,
    rng: jax.Array | None = None,
    impl: str = "auto",
) -> dict[str, jax.Array]:
    """log p(targets[b, t] | tokens[b, :t+1]) for every position, from one forward pass.

    params: {"base": model params, "lora": LoraParams | plain LoRA tree | None}.
    batch: "tokens" [B, T] int32, "targets" [B, T] int32 (the next token of each position);
      optional "segment_ids" and "positions" [B, T] int32 for packed rows.
    rng: key for LoRA dropout (ignored when the adapter has no dropout; None = deterministic).
    Returns float32 [B, T] arrays: "logp"; "entropy" of the full next-token distribution
    (with_entropy); "lse", the log-partition function (with_lse, for z-loss); "logit_mean",
    the mean logit over the vocabulary (with_logit_mean, for label smoothing). Positions outside
    the loss mask are computed too: callers weight them by the mask.
    """
    b, t = _check_batch(batch)
    hidden = final_hidden(cfg, params, batch, rng)
    out = _fused.fused_logprobs(
        hidden.reshape(b * t, cfg.hidden_size),
        models.lm_head_kernel(cfg, params["base"]),
        batch["targets"].reshape(b * t).astype("int32"),
        softcap=cfg.final_logit_softcap,
        with_entropy=with_entropy,
        with_logit_mean=with_logit_mean,
        impl=impl,
        compute_dtype=cfg.dtype,
    )
    keep = {"logp"}
    keep |= {"entropy"} if with_entropy else set()
    keep |= {"lse"} if with_lse else set()
    keep |= {"logit_mean"} if with_logit_mean else set()
    return {k: v.reshape(b, t) for k, v in out.items() if k in keep}
