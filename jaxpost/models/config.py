"""The model configuration: one dataclass covers the Llama, Qwen2/3 and Gemma 1/2/3 families.

A family is a choice of switches (norm offset, GeGLU, soft-caps, q/k norm, sliding windows...),
not a subclass. `jaxpost.models.hf` maps HF `config.json` files onto this dataclass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np

RematPolicy = Literal["none", "block", "save_dots"]
LayerType = Literal["global", "local"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer.

    Fields that do not apply to a family keep their neutral default (e.g. no soft-cap).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "llama"  # HF family name, used when saving back to HF format
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    # Gemma's RMSNorm multiplies by (1 + w) and stores w around 0.
    norm_offset: float = 0.0
    activation: Literal["silu", "gelu_tanh"] = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k
    embed_scale: bool = False  # Gemma: multiply embeddings by sqrt(hidden_size)
    tie_embeddings: bool = False
    # Gemma 2/3 extra norms around the attention and MLP outputs.
    post_attn_norm: bool = False
    post_mlp_norm: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Attention scale is query_pre_attn_scalar ** -0.5 when set (Gemma 2/3), else head_dim ** -0.5.
    query_pre_attn_scalar: float | None = None
    rope_theta: float = 10000.0
    # {"type": "llama3", factor, low_freq_factor, high_freq_factor,
    #  original_max_position_embeddings}, {"type": "linear", "factor": f} or
    # {"type": "yarn", factor, original_max_position_embeddings, beta_fast, beta_slow,
    #  attention_factor, truncate}; applies to global layers only.
    rope_scaling: dict[str, Any] | None = None
    # Local (sliding-window) layers' RoPE base; Gemma 3 uses 10k locally and 1M globally.
    rope_local_theta: float | None = None
    sliding_window: int | None = None
    # One entry per layer; None means every layer is global.
    layer_types: tuple[LayerType, ...] | None = None
    # Numerics and compilation.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of matmuls; norms, softmax and logits stay float32
    remat: RematPolicy = "none"
    scan_layers: bool = True
    # "auto" lets kernels.dispatch choose; "xla" / "pallas" force the reference / the kernel.
    attention_impl: Literal["auto", "xla", "pallas"] = "auto"

    def __post_init__(self):
        problems = []
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                problems.append(
                    f"layer_types has {len(self.layer_types)} entries, "
                    f"expected num_layers={self.num_layers}"
                )
            bad = sorted(set(self.layer_types) - {"global", "local"})
            if bad:
                problems.append(f"layer_types has {bad}; expected 'global' or 'local'")
            if "local" in self.layer_types and not self.sliding_window:
                problems.append("layer_types has local layers but sliding_window is not set")
        kind = None if self.rope_scaling is None else self.rope_scaling.get("type")
        if self.rope_scaling is not None and kind not in ("llama3", "linear", "yarn"):
            problems.append(
                f"rope_scaling type {kind!r} is not supported; expected 'llama3', 'linear' or "
                "'yarn'"
            )
        if kind == "yarn" and self.layer_types is not None and "local" in self.layer_types:
            # YaRN's attention factor would then differ between layers (global ones only).
            problems.append("yarn rope_scaling with sliding-window (local) layers is not supported")
        if self.remat not in ("none", "block", "save_dots"):
            problems.append(f"remat={self.remat!r}; expected 'none', 'block' or 'save_dots'")
        if self.attention_impl not in ("auto", "xla", "pallas"):
            problems.append(f"attention_impl={self.attention_impl!r}; expected auto, xla or pallas")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                problems.append(
                    f"{name}={getattr(self, name)!r}; expected float32, bfloat16 or float16"
                )
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def __hash__(self) -> int:
        # Configs are jit-static arguments; rope_scaling is a dict, so hash its items instead.
        values = tuple(
            tuple(sorted(v.items())) if isinstance(v, dict) else v
            for v in (getattr(self, f.name) for f in dataclasses.fields(self))
        )
        return hash(values)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # Derived quantities ------------------------------------------------------------------------

    @property
    def attention_scale(self) -> float:
        """The factor on q . k: query_pre_attn_scalar ** -0.5 (Gemma 2/3) or head_dim ** -0.5,
        times YaRN's attention factor squared (transformers scales cos and sin by it, so both
        rotated q and k; folded in here, the KV cache holds the plain rotated keys)."""
        scalar = self.query_pre_attn_scalar
        scale = float(scalar if scalar is not None else self.head_dim) ** -0.5
        if self.rope_scaling is not None and self.rope_scaling.get("type") == "yarn":
            scale *= float(self.rope_scaling["attention_factor"]) ** 2
        return scale

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Sliding window per layer, 0 for a global layer."""
        if self.layer_types is None:
            return (0,) * self.num_layers
        return tuple(self.sliding_window if t == "local" else 0 for t in self.layer_types)

    @property
    def uniform_window(self) -> int | None:
        """The window shared by every layer (0 = global), or None when layers differ."""
        windows = set(self.layer_windows)
        return windows.pop() if len(windows) == 1 else None

    def inv_freq(self, local: bool) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2] in float64 (cast at use)."""
        theta = self.rope_local_theta if (local and self.rope_local_theta) else self.rope_theta
        inv = 1.0 / (theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        if local or self.rope_scaling is None:
            return inv
        kind = self.rope_scaling["type"]
        if kind == "linear":
            return inv / float(self.rope_scaling["factor"])
        if kind == "yarn":
            return _yarn_inv_freq(inv, self.head_dim, self.rope_theta, self.rope_scaling)
        # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        factor = float(self.rope_scaling["factor"])
        low = float(self.rope_scaling.get("low_freq_factor", 1.0))
        high = float(self.rope_scaling.get("high_freq_factor", 4.0))
        original = float(self.rope_scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = original / low, original / high
        smooth = (original / wavelen - low) / (high - low)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return np.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count, as HF counts it (tied embeddings once)."""
        d, h, kv, hd, f = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
        )
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.qkv_bias:
            attn += h * hd + 2 * kv * hd
        if self.o_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * hd
        norms = d * (2 + int(self.post_attn_norm) + int(self.post_mlp_norm))
        per_layer = attn + 3 * d * f + norms
        total = self.num_layers * per_layer + d
        if include_embedding:
            total += self.vocab_size * d
        if not self.tie_embeddings:
            total += self.vocab_size * d
        return total


def _yarn_inv_freq(inv: np.ndarray, dim: int, theta: float, spec: dict[str, Any]) -> np.ndarray:
    """YaRN (Peng et al. 2023): frequencies of more than beta_fast rotations over the original
    context are kept, those of fewer than beta_slow divided by `factor`, a linear ramp over the
    dimensions between (transformers' `_compute_yarn_parameters`)."""
    factor = float(spec["factor"])
    original = float(spec["original_max_position_embeddings"])

    def dim_of(rotations: float) -> float:  # the dimension index that turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(float(spec["beta_fast"])), dim_of(float(spec["beta_slow"]))
    if spec.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: extrapolate (the original frequency), 0: interpolate (/ factor)
    return inv / factor * (1.0 - keep) + inv * keep
