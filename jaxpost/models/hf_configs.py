"""HF `config.json` <-> `ModelConfig`, for the llama, mistral, qwen2, qwen3, gemma, gemma2 and
gemma3_text families.

transformers 5.x writes RoPE settings as `rope_parameters` (with `rope_theta` inside, nested per
layer type for Gemma 3); older configs use top-level `rope_theta`, `rope_scaling` and
`rope_local_base_freq`. Both spellings are read, with transformers' precedence (`rope_scaling`
over `rope_parameters`, a theta inside the dict over a top-level one). Anything in a config that
changes the math and that the model does not implement is a ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxpost.models.config import ModelConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_GEMMA = ("gemma", "gemma2", "gemma3_text")
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
# Gemma3TextConfig's defaults (transformers 5.x) for fields the released configs leave out.
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}
# head_dim when config.json leaves it out: these families' config classes default to a fixed
# size, not hidden_size // num_attention_heads (the others' default).
_HEAD_DIM_DEFAULTS = {"qwen3": 128, "gemma": 256, "gemma2": 256}
_LAYER_TYPES = {"full_attention": "global", "sliding_attention": "local"}
# Families whose transformers models have no sliding window: a layer_types or sliding_window
# key that a conversion left in their config.json is ignored, as transformers ignores it.
_NO_WINDOW = ("llama", "gemma")
# Fields compared when checking that a ModelConfig survives the trip to an HF config and back.
_MATH_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(ModelConfig)
    if f.name not in ("param_dtype", "dtype", "remat", "scan_layers", "attention_impl")
)


def _rope(spec: dict[str, Any], hf: dict[str, Any], theta_default: float, where: str):
    """(theta, ModelConfig.rope_scaling) from one HF RoPE dict; `hf` supplies top-level defaults."""
    kind = spec.get("rope_type", spec.get("type", "default"))
    theta = float(spec.get("rope_theta", theta_default))
    factor = spec.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise ValueError(f"{where}.partial_rotary_factor={factor} is not supported; expected 1.0")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(spec["factor"])}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor")
        missing = [k for k in keys if k not in spec]
        if missing:
            raise ValueError(f"{where} of rope_type 'llama3' lacks {missing}")
        scaling = {"type": "llama3", **{k: float(spec[k]) for k in keys}}
        scaling["original_max_position_embeddings"] = int(_original_context(spec, hf))
        return theta, scaling
    if kind == "yarn":
        return theta, _yarn(spec, hf)
    raise ValueError(
        f"{where}.rope_type={kind!r} is not supported; expected 'default', 'linear', 'llama3' "
        "or 'yarn'"
    )


def _original_context(spec: dict[str, Any], hf: dict[str, Any]):
    """The pre-training context of llama3 / YaRN scaling as transformers 5.x resolves it: a
    top-level `original_max_position_embeddings` first (Phi-3 / DeepSeek-V3 configs keep it
    there), then the RoPE dict's, then max_position_embeddings."""
    original = hf.get("original_max_position_embeddings") or spec.get(
        "original_max_position_embeddings", hf.get("max_position_embeddings")
    )
    if original is None:
        raise ValueError(
            f"rope_type {spec.get('rope_type', spec.get('type'))!r} needs "
            "original_max_position_embeddings"
        )
    return original


def _yarn(spec: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig.rope_scaling for YaRN, with transformers' defaults and precedence resolved."""
    original = _original_context(spec, hf)
    factor = spec.get("factor")
    if factor is None:  # DeepSeek-V3 style: the ratio of the two context lengths
        factor = float(hf["max_position_embeddings"]) / float(original)
    factor = float(factor)

    def mscale(m: float = 1.0) -> float:  # YaRN's Eq. 21
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attention = spec.get("attention_factor")
    if attention is None:
        m, m_all = spec.get("mscale"), spec.get("mscale_all_dim")
        attention = mscale(m) / mscale(m_all) if m and m_all else mscale()
    return {
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": int(original),
        "beta_fast": float(spec.get("beta_fast") or 32),
        "beta_slow": float(spec.get("beta_slow") or 1),
        "attention_factor": float(attention),
        "truncate": bool(spec.get("truncate", True)),
    }


def _layer_types(hf: dict[str, Any], family: str, num_layers: int) -> tuple[str, ...] | None:
    """Per-layer 'global' / 'local', or None when no layer has a sliding window."""
    if family in _NO_WINDOW:
        return None
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        return None  # transformers drops the window entirely without use_sliding_window
    names = hf.get("layer_types")
    if names is None:
        if family == "gemma2":
            names = [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)
            ]
        elif family == "gemma3_text":
            pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
            names = [
                "sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(num_layers)
            ]
        elif family in ("qwen2", "qwen3"):
            start = int(hf.get("max_window_layers", num_layers))
            names = [
                "sliding_attention" if i >= start else "full_attention" for i in range(num_layers)
            ]
        elif family == "mistral" and hf.get("sliding_window"):
            names = ["sliding_attention"] * num_layers  # Mistral 7B v0.1: every layer
        else:
            return None
    bad = sorted({n for n in names if n not in _LAYER_TYPES})
    if bad:
        raise ValueError(
            f"layer_types contains {bad}; expected 'full_attention' or 'sliding_attention'"
        )
    if len(names) != num_layers:
        raise ValueError(f"layer_types has {len(names)} entries, num_hidden_layers={num_layers}")
    types = tuple(_LAYER_TYPES[n] for n in names)
    if "local" in types and not hf.get("sliding_window"):
        raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
    return types if "local" in types else None


def _activation(hf: dict[str, Any], family: str) -> str:
    if family in ("gemma2", "gemma3_text"):
        key, default = "hidden_activation", "gelu_pytorch_tanh"
    else:
        key, default = "hidden_act", "gelu_pytorch_tanh" if family == "gemma" else "silu"
    name = hf.get(key) or default
    if family == "gemma" and name == "gelu":
        # Gemma 1's released configs say "gelu" but mean the tanh approximation (as transformers).
        name = "gelu_pytorch_tanh"
    if name not in _ACTIVATIONS:
        raise ValueError(f"{key}={name!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def config_from_hf(hf: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    """Map an HF config dict (the contents of config.json) to a ModelConfig.

    dtype sets both the parameter and the compute dtype.
    """
    family = hf.get("model_type")
    if family == "gemma3":
        # Multimodal Gemma 3: its language model only (the vision tower is not loaded).
        text = hf.get("text_config")
        if not isinstance(text, dict):
            raise ValueError("model_type='gemma3' config has no text_config dict")
        tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
        return config_from_hf(
            {**text, "model_type": "gemma3_text", "tie_word_embeddings": tie}, dtype
        )
    if "text_config" in hf:
        raise ValueError(
            f"model_type={family!r} has a text_config (a multimodal model); of multimodal "
            "configs only 'gemma3' is supported"
        )
    if family == "gemma3_text":
        # Released Gemma 3 configs omit fields that equal transformers' defaults.
        hf = {**_GEMMA3_TEXT_DEFAULTS, **hf}
    if family in ("mistral", "gemma2"):
        # Their config classes' default window (Mistral v0.2 and later configs write null: none).
        hf = {"sliding_window": 4096, **hf}
    if family == "mistral" and hf.get("attention_bias"):
        raise ValueError("attention_bias=True is not supported for mistral (no biases)")
    if family not in ARCHITECTURES:
        raise ValueError(
            f"model_type={family!r} is not supported; expected one of {sorted(ARCHITECTURES)}"
        )
    if hf.get("quantization_config"):
        raise ValueError("quantization_config is set; jaxpost loads unquantized checkpoints only")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported; the MLP projections have no bias")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=True is not supported; attention is causal")
    gemma = family in _GEMMA

    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    layers = int(hf["num_hidden_layers"])
    head_dim = hf.get("head_dim") or _HEAD_DIM_DEFAULTS.get(family) or hidden // heads
    if family == "gemma3_text":
        nested = hf.get("rope_parameters") or {}
        full = dict(nested.get("full_attention") or {})
        full.update(hf.get("rope_scaling") or {})
        local = nested.get("sliding_attention") or {}
        theta, scaling = _rope(full, hf, hf.get("rope_theta", 1_000_000.0), "rope_parameters")
        local_theta, local_scaling = _rope(
            local, hf, hf.get("rope_local_base_freq", 10_000.0), "rope_parameters.sliding_attention"
        )
        if local_scaling is not None:
            raise ValueError("rope scaling on sliding_attention layers is not supported")
    else:
        spec = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        theta, scaling = _rope(spec, hf, hf.get("rope_theta", 10_000.0), "rope_parameters")
        local_theta = None
    if family == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    layer_types = _layer_types(hf, family, layers)
    softcaps = (None, None)
    if family == "gemma2":
        softcaps = (hf.get("attn_logit_softcapping", 50.0), hf.get("final_logit_softcapping", 30.0))
    elif family == "gemma3_text":
        softcaps = (hf.get("attn_logit_softcapping"), hf.get("final_logit_softcapping"))
    scalar = hf.get("query_pre_attn_scalar", 256) if family in ("gemma2", "gemma3_text") else None
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        model_type=family,
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_offset=1.0 if gemma else 0.0,
        activation=_activation(hf, family),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=family in ("qwen3", "gemma3_text"),
        embed_scale=gemma,
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        post_attn_norm=family in ("gemma2", "gemma3_text"),
        post_mlp_norm=family in ("gemma2", "gemma3_text"),
        attn_logit_softcap=None if softcaps[0] is None else float(softcaps[0]),
        final_logit_softcap=None if softcaps[1] is None else float(softcaps[1]),
        query_pre_attn_scalar=None if scalar is None else float(scalar),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        sliding_window=int(hf["sliding_window"]) if layer_types else None,
        layer_types=layer_types,
        param_dtype=dtype,
        dtype=dtype,
    )


def math_view(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that define the function the model computes, with equivalent spellings merged."""
    view = {name: getattr(cfg, name) for name in _MATH_FIELDS}
    view["query_pre_attn_scalar"] = cfg.attention_scale
    view["rope_local_theta"] = cfg.rope_local_theta or cfg.rope_theta
    view["sliding_window"] = cfg.sliding_window if cfg.layer_types else None
    view["layer_types"] = cfg.layer_windows
    return view


def _rope_dict(theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        out.update({k: v for k, v in scaling.items() if k != "type"}, rope_type=scaling["type"])
    return out


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers loads for cfg.model_type (with `architectures`).

    Raises ValueError when cfg uses a switch its family cannot express (e.g. a llama config
    with soft-caps): the written config would silently describe a different model.
    """
    family = cfg.model_type
    if family not in ARCHITECTURES:
        raise ValueError(
            f"ModelConfig.model_type={family!r} cannot be saved in HF format; expected one of "
            f"{sorted(ARCHITECTURES)}"
        )
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": cfg.param_dtype,
    }
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.activation]
    hf["hidden_activation" if family in ("gemma2", "gemma3_text") else "hidden_act"] = act
    if family not in ("qwen2", "mistral"):
        hf["attention_bias"] = cfg.qkv_bias
    if family == "llama":
        hf["mlp_bias"] = False
    if family == "mistral":
        hf["sliding_window"] = cfg.sliding_window if cfg.layer_types else None
    types = ["sliding_attention" if w else "full_attention" for w in cfg.layer_windows]
    if family in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = cfg.layer_types is not None
        hf["sliding_window"] = cfg.sliding_window
        hf["max_window_layers"] = cfg.num_layers
        hf["layer_types"] = types
    if family in ("gemma2", "gemma3_text"):
        hf["sliding_window"] = cfg.sliding_window
        hf["layer_types"] = types
        hf["query_pre_attn_scalar"] = _number(cfg.query_pre_attn_scalar or cfg.head_dim)
        hf["attn_logit_softcapping"] = cfg.attn_logit_softcap
        hf["final_logit_softcapping"] = cfg.final_logit_softcap
    if family == "gemma3_text":
        hf["use_bidirectional_attention"] = False
        local = cfg.rope_local_theta or cfg.rope_theta
        hf["rope_parameters"] = {
            "full_attention": _rope_dict(cfg.rope_theta, cfg.rope_scaling),
            "sliding_attention": _rope_dict(local, None),
        }
    else:
        # The 5.x spelling plus the legacy top-level keys, which 4.x releases read.
        hf["rope_parameters"] = _rope_dict(cfg.rope_theta, cfg.rope_scaling)
        hf["rope_theta"] = cfg.rope_theta
        if cfg.rope_scaling is not None:
            hf["rope_scaling"] = hf["rope_parameters"]
    mine, back = math_view(cfg), math_view(config_from_hf(hf, cfg.param_dtype))
    lost = [
        f"{name}={mine[name]!r} (as {family}: {back[name]!r})"
        for name in _MATH_FIELDS
        if mine[name] != back[name]
    ]
    if lost:
        raise ValueError(
            f"ModelConfig cannot be written as an HF {family} config: " + "; ".join(lost)
        )
    return hf
