"""Full-parameter SFT of a local Hugging Face model on a chat JSONL (every weight trained).

  python -m jaxpost.train --config=configs/sft_full.py \
      --config.model.hf_path=/path/to/hf_model --config.data.train_path=train.jsonl

Variants: `:cpu` trains a built-in model from random init on the built-in arithmetic task (no
downloads; `:cpu,size=tiny|small|100m|1b` picks its size).
"""

import ml_collections

from jaxpost import config as jconfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = jconfig.parse_arg(arg, cpu=False, size="tiny")
    c = jconfig.defaults()
    c.algorithm = "sft"
    c.workdir = "/tmp/jaxpost/sft_full"
    c.lora.enabled = False
    c.model.hf_path = "/path/to/hf_model"
    c.data.train_path = "train.jsonl"
    c.data.format = "messages"
    c.data.max_length = 1024
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.01
    c.train.steps = 1000
    c.train.batch_size = 16
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.export.merged_hf = True  # full fine-tuning: the HF checkpoint is the artifact
    c.export.peft_adapter = False
    if arg.cpu:
        jconfig.builtin_task(c, arg.size)
        c.optimizer.learning_rate = 3e-3
        c.train.batch_size = 16
        c.export.merged_hf = False
    return c
