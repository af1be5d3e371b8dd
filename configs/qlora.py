"""QLoRA SFT: the frozen base is stored as NF4 (4-bit NormalFloat, double-quantized scales) and
dequantized inside each matmul; LoRA adapters are trained in float32 and written in PEFT format.

  python -m jaxpost.train --config=configs/qlora.py \
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
    c.workdir = "/tmp/jaxpost/qlora"
    c.model.hf_path = "/path/to/hf_model"
    c.model.dtype = "bfloat16"
    c.lora.enabled = True
    c.lora.quantize_base = True
    c.lora.rank = arg.rank
    c.lora.alpha = 2.0 * arg.rank
    c.lora.dropout = 0.05
    c.data.train_path = "train.jsonl"
    c.data.format = "messages"
    c.data.max_length = 1024
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 50
    c.train.steps = 1000
    c.train.batch_size = 16
    c.export.peft_adapter = True
    if arg.cpu:
        jconfig.builtin_task(c, arg.size)
        c.model.dtype = "float32"
        c.optimizer.learning_rate = 2e-3
    return c
