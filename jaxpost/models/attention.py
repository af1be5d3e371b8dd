"""The one entry point through which every self-attention of the model passes.

It forwards to `jaxpost.kernels.flash_attention.flash_attention`, whose dispatch picks the
plain-XLA reference or the Pallas flash-attention kernel by backend and shape (TPU and T >= 128
get the kernel under "auto"; see `jaxpost.kernels.dispatch`). `impl` (from
`ModelConfig.attention_impl`) forces either: "xla" the reference, "pallas" the kernel (Mosaic
on TPU, Pallas's interpreter elsewhere, for tests).
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
    """q [B, T, H, D], k/v [B, T, KVH, D], segment_ids [B, T] -> [B, T, H, D].

    sliding_window: None, a Python int or a traced int32 scalar (per-layer windows under a
    layer scan); <= 0 means global attention.
    """
    return flash_attention.flash_attention(
        q,
        k,
        v,
        segment_ids,
        causal=causal,
        sliding_window=sliding_window,
        softcap=softcap,
        scale=scale,
        impl=impl,
    )
