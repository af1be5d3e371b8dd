"""The benchmark models, Qwen3-style (q/k norm, GQA, tied embeddings) at the sizes the issues
name. Importable without JAX: `train_throughput.py`'s torch worker builds the same shapes."""

from __future__ import annotations

MODEL_SHAPES = {
    "5M": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=64,
    ),
    "50M": dict(
        vocab_size=32000, hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=8,
        num_kv_heads=4, head_dim=64,
    ),
}  # fmt: skip


def benchmark_model(name: str, **overrides):
    """The `jaxpost.models.ModelConfig` of benchmark model `name` ("5M" or "50M").

    Layers unrolled (scan_layers=False) unless overridden: with 4-8 layers compile time is no
    issue; the rollout engine then holds one weight and cache buffer per layer
    (`models.kv_cache`), and XLA:CPU's layer scan would stack every saved activation of a
    train step through dynamic-update-slices (~8% of the 50M step,
    `benchmarks/profile_train_step.py`)."""
    from jaxpost import models

    fields = dict(
        qk_norm=True, tie_embeddings=True, model_type="qwen3", rope_theta=1e6, scan_layers=False
    )
    return models.ModelConfig(**MODEL_SHAPES[name], **{**fields, **overrides})
