"""LoRA SFT of a local Hugging Face model on a chat JSONL (only the adapters are trained); writes
the adapter in PEFT format.

  python -m jaxpost.train --config=configs/sft_lora.py \
      --config.model.hf_path=/path/to/hf_model --config.data.train_path=train.jsonl

Variants: `:cpu` trains a built-in model on the built-in arithmetic task (no downloads;
`:cpu,size=tiny|small|100m|1b` picks its size); `:rank=N` sets the LoRA rank.
"""

import ml_collections

from jaxpost import config as jconfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = jconfig.parse_arg(arg, cpu=False, size="tiny", rank=16)
    c = jconfig.defaults()
    c.algorithm = "sft"
    c.workdir = "/tmp/jaxpost/sft_lora"
    c.model.hf_path = "/path/to/hf_model"
    c.lora.enabled = True
    c.lora.rank = arg.rank
    c.lora.alpha = 2.0 * arg.rank
    c.lora.dropout = 0.05
    # Regexes over parameter paths: attention and MLP projections.
    c.lora.targets = (r"layers/attn/(q|k|v|o)/kernel", r"layers/mlp/(gate|up|down)/kernel")
    c.data.train_path = "train.jsonl"
    c.data.format = "messages"
    c.data.max_length = 1024
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 50
    c.train.steps = 1000
    c.train.batch_size = 16
    c.export.peft_adapter = True
    c.export.merged_hf = False
    if arg.cpu:
        jconfig.builtin_task(c, arg.size)
        c.optimizer.learning_rate = 2e-3
    return c
