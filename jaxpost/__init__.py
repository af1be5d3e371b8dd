"""jaxpost: JAX-native LLM post-training (SFT, LoRA/QLoRA, DPO, PPO, GRPO)."""

__version__ = "0.1.0"
