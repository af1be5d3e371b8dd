"""Flax linen building blocks of the decoder: norm, linear (with LoRA and NF4 hooks), attention,
MLP and the transformer block.

Each block is applied with explicit variables, `Block(...).apply({"params": p, "lora": l}, ...)`;
`jaxpost.models.transformer` stacks the blocks' parameters over layers and loops or scans.
Every parameter carries logical axis names (see `jaxpost.sharding`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpost.models import matmul
from jaxpost.models.attention import attention
from jaxpost.models.config import ModelConfig

Initializer = Any


def _normal(stddev: float = 0.02) -> Initializer:
    return nn.initializers.normal(stddev)


class RMSNorm(nn.Module):
    """RMSNorm in float32. offset=1 gives Gemma's x * (1 + w) with w stored around zero."""

    eps: float
    offset: float = 0.0
    axis_name: str = "embed"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(init, (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            # Gemma scales in float32 before the cast back.
            return (normed * (self.offset + scale.astype(jnp.float32))).astype(x.dtype)
        # Llama / Qwen cast back to the input dtype before multiplying by the weight.
        return scale.astype(x.dtype) * normed.astype(x.dtype)


class Linear(nn.Module):
    """y = x @ kernel (+ bias) (+ LoRA: dropout(x) @ a @ b * lora_scale).

    kernel: [in, out] under "params". When the base was quantized by `jaxpost.nf4`, the params
    hold `nf4.KERNEL_KEY` (NF4 blocks and double-quantized scales, in bitsandbytes' [out, in]
    order) instead, dequantized here, inside the matmul's producer. LoRA factors live in the
    separate "lora" collection as a: [in, r], b: [r, out]; when that collection is absent the
    layer is the base layer exactly. With more than `matmul.LORA_MERGE_MIN_ROWS` rows and no
    dropout, the layer multiplies by the merged kernel + lora_scale * a @ b instead
    (`matmul.lora_dot`, the same function and gradients).
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1], self.features)
        if self.is_initializing() or self.has_variable("params", "kernel"):
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(_normal(), self.axes),
                shape,
                self.param_dtype,
            )
        elif self.has_variable("params", "kernel_t"):
            kernel = None
        else:
            from jaxpost import nf4  # the quantized path is optional; keep the import local

            q = self.get_variable("params", nf4.KERNEL_KEY)
            kernel = nf4.dequantize_kernel(q, shape, self.dtype)
        # Matmuls run on [tokens, in] 2-D views: with [B, T, in] operands XLA:CPU computes the
        # weight gradient (a contraction over B and T) through a strided transpose of the
        # activations' gradient, which cost ~30% of the backward pass (50M model).
        lead = x.shape[:-1]
        x = x.astype(self.dtype).reshape(-1, x.shape[-1])
        factors = None
        if self.has_variable("lora", "a"):
            factors = self.get_variable("lora", "a"), self.get_variable("lora", "b")
        dropout = self.lora_dropout > 0 and not self.deterministic
        if kernel is None:
            y = matmul.dot_t(x, self.get_variable("params", "kernel_t"), self.dtype)
        elif factors and not dropout and x.shape[0] > matmul.LORA_MERGE_MIN_ROWS:
            # Many rows (a train step, a prefill): one product with the merged kernel.
            y = matmul.lora_dot(x, kernel, *factors, self.lora_scale, self.dtype)
            factors = None  # applied
        else:
            y = matmul.dot(x, kernel, self.dtype)
        if factors:  # few rows, or dropout on the LoRA input: the low-rank product added
            a, b = factors
            xd = nn.Dropout(self.lora_dropout, deterministic=False)(x) if dropout else x
            lora_term = matmul.low_rank_rounded if kernel is None else matmul.low_rank
            y = y + lora_term(xd, a, b, self.lora_scale, self.dtype)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype).reshape(*lead, self.features)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding, HF's rotate-half layout. x [B, T, N, D], positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class _Common(nn.Module):
    """Shared fields of the sub-modules below."""

    cfg: ModelConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    def linear(self, features: int, axes: tuple[str, str], name: str, bias: bool = False):
        return Linear(
            features,
            axes,
            use_bias=bias,
            dtype=jnp.dtype(self.cfg.dtype),
            param_dtype=jnp.dtype(self.cfg.param_dtype),
            lora_scale=self.lora_scale,
            lora_dropout=self.lora_dropout,
            deterministic=self.deterministic,
            name=name,
        )

    def norm(self, name: str, axis_name: str = "embed"):
        return RMSNorm(
            self.cfg.rms_norm_eps,
            self.cfg.norm_offset,
            axis_name,
            jnp.dtype(self.cfg.param_dtype),
            name=name,
        )


class Attention(_Common):
    """Self-attention with GQA, optional q/k norm, RoPE, soft-cap and sliding window.

    Without a cache it attends within the given sequence (training, prefill of a fresh prompt).
    With a cache layer it writes the new keys/values and attends over the cache (decode).
    """

    @nn.compact
    def __call__(
        self,
        x,
        positions,
        segment_ids,
        inv_freq,
        window,
        cache_meta=None,
        cache_layer=None,
        layer=None,
    ):
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.linear(cfg.num_heads * cfg.head_dim, ("embed", "heads"), "q", cfg.qkv_bias)(x)
        k = self.linear(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), "k", cfg.qkv_bias)(
            x
        )
        v = self.linear(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), "v", cfg.qkv_bias)(
            x
        )
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = self.norm("q_norm", "head_dim")(q)
            k = self.norm("k_norm", "head_dim")(k)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        kwargs = dict(
            sliding_window=window, softcap=cfg.attn_logit_softcap, scale=cfg.attention_scale
        )
        new_layer = None
        if cache_layer is None:
            out = attention(q, k, v, segment_ids, causal=True, impl=cfg.attention_impl, **kwargs)
        else:
            out, new_layer = cache_meta.update_and_attend(
                cache_layer, layer, q, k, v, positions, **kwargs
            )
        out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
        return self.linear(cfg.hidden_size, ("heads", "embed"), "o", cfg.o_bias)(out), new_layer


class MLP(_Common):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU (Llama, Qwen) or GeGLU-tanh (Gemma)."""

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = self.linear(cfg.intermediate_size, ("embed", "mlp"), "gate")(x)
        up = self.linear(cfg.intermediate_size, ("embed", "mlp"), "up")(x)
        if cfg.activation == "silu":
            act = jax.nn.silu(gate)
        else:
            act = jax.nn.gelu(gate, approximate=True)
        return self.linear(cfg.hidden_size, ("mlp", "embed"), "down")(act * up)


class Block(_Common):
    """Pre-norm decoder block; Gemma 2/3 add norms on the attention and MLP outputs."""

    @nn.compact
    def __call__(
        self,
        x,
        positions,
        segment_ids,
        inv_freq,
        window,
        cache_meta=None,
        cache_layer=None,
        layer=None,
    ):
        """cache_layer: the cache's fields, stacked (with `layer` the index) or this layer's."""
        cfg = self.cfg
        sub = dict(
            cfg=cfg,
            lora_scale=self.lora_scale,
            lora_dropout=self.lora_dropout,
            deterministic=self.deterministic,
        )
        h, new_layer = Attention(**sub, name="attn")(
            self.norm("attn_norm")(x),
            positions,
            segment_ids,
            inv_freq,
            window,
            cache_meta,
            cache_layer,
            layer,
        )
        if cfg.post_attn_norm:
            h = self.norm("post_attn_norm")(h)
        x = x + h
        h = MLP(**sub, name="mlp")(self.norm("mlp_norm")(x))
        if cfg.post_mlp_norm:
            h = self.norm("post_mlp_norm")(h)
        return x + h, new_layer
