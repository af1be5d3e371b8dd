"""HF checkpoints under `jax.distributed`: 2 processes x 2 CPU devices load a checkpoint onto one
mesh, compute the single-device logits, and save a checkpoint equal to the one loaded; a LoRA
adapter sharded over both exports (PEFT format, merged weights) as it does from one process."""

from __future__ import annotations

from pathlib import Path

import hf_multiprocess_worker
import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import lora, models

# One compilation per config (op-by-op eager dispatch is far slower on CPU).
jit_forward = jax.jit(models.forward, static_argnums=0)

WORKER = Path(__file__).with_name("hf_multiprocess_worker.py")


def test_two_process_load_and_save(tmp_path, launch):
    checkpoint = tmp_path / "hf"
    hf_tiny.build("llama", seed=8).save_pretrained(checkpoint)
    launch(WORKER, lambda pid, port: [pid, 2, port, checkpoint, tmp_path])

    cfg, params = models.load_hf(checkpoint)
    ids = jnp.asarray(hf_multiprocess_worker.token_ids())
    want = np.asarray(jit_forward(cfg, params, ids))
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want, atol=1e-5, rtol=0)
    cfg2, saved = models.load_hf(tmp_path / "saved")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, saved, params)

    # The adapter sharded over both processes exports as it does from one process.
    adapter = hf_multiprocess_worker.lora_adapter(cfg, params)
    lora.save_peft(cfg, adapter, tmp_path / "adapter_one")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "adapter" / name).read_bytes() == (
            tmp_path / "adapter_one" / name
        ).read_bytes(), name
    _, merged = models.load_hf(tmp_path / "merged")
    want = lora.merge(cfg, params, adapter)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), merged, want)
    assert (tmp_path / "merged" / "generation_config.json").is_file()  # the source's
