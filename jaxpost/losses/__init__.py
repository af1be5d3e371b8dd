"""Losses: pure functions `loss_fn(cfg, params, batch, rng) -> (loss_sum, weight_sum, aux)`.

Sums, not means, so the step's global mean (total loss_sum / total weight_sum) is exact under
padding, packing and gradient accumulation. All of them start from `token_logprobs`.
"""

from jaxpost.losses.logprobs import token_logprobs
from jaxpost.losses.sft import make_sft_loss, sft_loss

__all__ = ["make_sft_loss", "sft_loss", "token_logprobs"]
