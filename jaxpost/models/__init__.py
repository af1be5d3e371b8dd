"""Models: the transformer (Llama / Qwen2 / Qwen3 / Gemma 1-2-3 by config), KV cache, HF I/O."""

from jaxpost.models.config import ModelConfig
from jaxpost.models.hf import load_hf, read_config
from jaxpost.models.hf_configs import config_from_hf, config_to_hf
from jaxpost.models.hf_save import save_hf
from jaxpost.models.kv_cache import DenseKVCache
from jaxpost.models.transformer import (
    apply,
    embed,
    forward,
    init,
    lm_head_kernel,
    logical_axes,
    logits_from_hidden,
    to_decode_layout,
    unstack_layers,
)

__all__ = [
    "DenseKVCache",
    "ModelConfig",
    "apply",
    "config_from_hf",
    "config_to_hf",
    "embed",
    "forward",
    "init",
    "lm_head_kernel",
    "load_hf",
    "logical_axes",
    "logits_from_hidden",
    "read_config",
    "save_hf",
    "to_decode_layout",
    "unstack_layers",
]
