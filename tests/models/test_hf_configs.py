"""HF config.json <-> ModelConfig: published parameter counts by eval_shape (no memory), old
and new spellings of the same config (checked against transformers' own parsing), and every
unsupported setting named in its error."""

from __future__ import annotations

import math

import jax
import pytest
import transformers

from jaxpost import models

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 16,
    "num_hidden_layers": 42,
    "num_key_value_heads": 8,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "vocab_size": 256000,
}

# mistralai/Mistral-7B-v0.1: a 4096-token window on every layer (v0.2 and later write null).
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}

# google/gemma-3-4b-it: multimodal; the text config lists only what differs from the defaults.
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}


@pytest.mark.parametrize(
    "hf_config, count",
    [
        (LLAMA_31_8B, 8_030_261_248),
        (QWEN3_8B, 8_190_735_360),
        (GEMMA2_9B, 9_241_705_984),
        (MISTRAL_7B, 7_241_732_096),
    ],
    ids=["Llama-3.1-8B", "Qwen3-8B", "Gemma-2-9B", "Mistral-7B-v0.1"],
)
def test_published_parameter_counts(hf_config, count):
    cfg = models.config_from_hf(hf_config, dtype="bfloat16")
    shapes = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
    leaves = jax.tree.leaves(shapes)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    assert sum(x.size for x in leaves) == count == cfg.num_params()


def _hf_roundtrip(config: dict) -> dict:
    """What transformers itself makes of a config.json: its own to_dict after parsing it."""
    return transformers.AutoConfig.for_model(**config).to_dict()


@pytest.mark.parametrize(
    "legacy",
    [
        LLAMA_31_8B,
        QWEN3_8B,
        GEMMA2_9B,
        # Gemma 3 before transformers 5: top-level thetas, rope_scaling and a layer pattern.
        {
            **{k: v for k, v in GEMMA2_9B.items() if k != "architectures"},
            "model_type": "gemma3_text",
            "num_hidden_layers": 8,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window_pattern": 4,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
        },
        {
            **{k: v for k, v in QWEN3_8B.items() if k != "architectures"},
            "model_type": "qwen2",
            "use_sliding_window": True,
            "sliding_window": 1024,
            "max_window_layers": 30,
        },
        {**GEMMA2_9B, "model_type": "gemma", "hidden_act": "gelu", "head_dim": 128},
        GEMMA3_4B,
    ],
    ids=["llama3", "qwen3", "gemma2", "gemma3-legacy", "qwen2-sliding", "gemma-gelu", "gemma3-4b"],
)
def test_legacy_and_new_spellings_agree_with_transformers(legacy):
    """Old-style config.json and transformers 5's re-spelling of it map to the same config."""
    ours = models.config_from_hf(legacy)
    assert models.config_from_hf(_hf_roundtrip(legacy)) == ours
    assert models.config_from_hf(models.config_to_hf(ours)) == ours
    if legacy["model_type"] == "gemma3_text":
        assert ours.layer_types == ("local",) * 3 + ("global",) + ("local",) * 3 + ("global",)
        assert (ours.rope_theta, ours.rope_local_theta) == (1e6, 1e4)
        assert ours.rope_scaling == {"type": "linear", "factor": 8.0}
    if legacy["model_type"] == "qwen2":
        assert ours.layer_types == ("global",) * 30 + ("local",) * 6 and ours.qkv_bias
    if legacy["model_type"] == "gemma":
        assert ours.activation == "gelu_tanh"
    if legacy["model_type"] == "gemma3":  # the text model, with Gemma3TextConfig's defaults
        assert (ours.num_layers, ours.hidden_size, ours.num_heads, ours.head_dim) == (
            34,
            2560,
            8,
            256,
        )
        assert ours.layer_types[:6] == ("local",) * 5 + ("global",) and ours.sliding_window == 1024
        assert ours.tie_embeddings and ours.rope_scaling == {"type": "linear", "factor": 8.0}


def test_mistral_window_every_layer_null_or_default():
    # v0.1 writes 4096; v0.2 and later null (no window); a config without the key gets
    # MistralConfig's default, 4096, as transformers gives it.
    for value, window in ((4096, 4096), (None, None), ("absent", 4096)):
        hf = dict(MISTRAL_7B)
        if value == "absent":
            del hf["sliding_window"]
        else:
            hf["sliding_window"] = value
        ours = models.config_from_hf(hf)
        assert transformers.MistralConfig(**hf).sliding_window == window
        assert ours.layer_types == (None if window is None else ("local",) * 32)
        assert (ours.sliding_window if ours.layer_types else None) == window
        back = models.config_to_hf(ours)
        assert back["sliding_window"] == window and "attention_bias" not in back


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "phi3"}, "model_type='phi3' is not supported"),
        ({"model_type": "mistral", "attention_bias": True}, "attention_bias=True is not supported"),
        ({"model_type": "llava", "text_config": {}}, "model_type='llava' has a text_config"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope_type='longrope'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"model_type": "mistral", "layer_types": ["chunked_attention"] * 32}, "chunked_"),
    ],
)
def test_unsupported_config_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        models.config_from_hf({**LLAMA_31_8B, **change})


def test_config_to_hf_rejects_what_the_family_cannot_express():
    cfg = models.config_from_hf(LLAMA_31_8B).replace(final_logit_softcap=30.0)
    with pytest.raises(ValueError, match="final_logit_softcap=30.0"):
        models.config_to_hf(cfg)


def test_yarn_resolves_transformers_defaults_and_refuses_local_layers():
    hf = {**QWEN3_8B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    scaling = models.config_from_hf(hf).rope_scaling
    # original_max_position_embeddings defaults to max_position_embeddings, the betas to 32 / 1,
    # the attention factor to YaRN's 0.1 ln(factor) + 1.
    assert scaling["original_max_position_embeddings"] == QWEN3_8B["max_position_embeddings"]
    assert (scaling["beta_fast"], scaling["beta_slow"], scaling["truncate"]) == (32.0, 1.0, True)
    assert scaling["attention_factor"] == pytest.approx(0.1 * math.log(4.0) + 1.0)
    windowed = {**GEMMA2_9B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match="yarn rope_scaling with sliding-window"):
        models.config_from_hf(windowed)
