"""Tiny random `transformers` models of every supported family, shared by the HF tests.

Every parameter is redrawn (biases and norm weights too, which transformers initialises to
constants), so a tensor mapped to the wrong place changes the logits. Soft-caps, the query
pre-attention scalar and the sliding window are set so that each of them changes the output
on 24-token inputs.
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 160
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    attn_implementation="eager",
)


def hf_config(family: str) -> transformers.PretrainedConfig:
    if family == "llama":
        return transformers.LlamaConfig(
            **_COMMON,
            num_hidden_layers=2,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                # Small, so that the 24-token inputs reach the rescaled frequencies.
                "original_max_position_embeddings": 16,
            },
        )
    if family == "mistral":
        # Mistral 7B v0.1's every-layer window, shorter than the 24-token test inputs.
        return transformers.MistralConfig(
            **_COMMON, num_hidden_layers=2, sliding_window=7, rope_theta=1e6
        )
    if family == "qwen2":
        return transformers.Qwen2Config(**_COMMON, num_hidden_layers=2, tie_word_embeddings=True)
    if family == "qwen3":
        # head_dim independent of hidden / heads.
        return transformers.Qwen3Config(**_COMMON, num_hidden_layers=2, head_dim=24)
    if family == "gemma":
        return transformers.GemmaConfig(
            **{**_COMMON, "num_key_value_heads": 1}, num_hidden_layers=2, head_dim=16
        )
    if family == "gemma2":
        return transformers.Gemma2Config(
            **_COMMON,
            num_hidden_layers=2,
            head_dim=16,
            sliding_window=5,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
        )
    if family == "gemma3_text":
        return transformers.Gemma3TextConfig(
            **_COMMON,
            num_hidden_layers=3,
            head_dim=16,
            sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        )
    raise ValueError(f"unknown family {family!r}")


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


def build(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A float32 causal LM with every parameter redrawn from `seed`, in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family)).eval()
    return randomize(model, gemma=family.startswith("gemma"))


def build_gemma3_multimodal(seed: int = 0) -> transformers.PreTrainedModel:
    """Gemma3ForConditionalGeneration: the gemma3_text model above plus a tiny SigLIP tower."""
    torch.manual_seed(seed)
    text = hf_config("gemma3_text").to_dict()
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        vision_use_head=False,
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
        image_token_index=VOCAB - 1,
    )
    config._attn_implementation = "eager"
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    return randomize(model, gemma=True)


def randomize(model: transformers.PreTrainedModel, gemma: bool) -> transformers.PreTrainedModel:
    """Redraw every parameter in place (norm weights around Gemma's 0 or the others' 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                # Gemma stores w for (1 + w); the others store the multiplier itself.
                p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    # Generation must run its full length: no end-of-sequence stop.
    model.generation_config.eos_token_id = None
    return model
