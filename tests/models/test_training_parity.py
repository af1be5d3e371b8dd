"""jaxpost's train steps against the PyTorch stack on the same model, batches and settings: a
`transformers` model trained by torch's AdamW with `clip_grad_norm_`, `get_cosine_schedule_with
_warmup`, HF Trainer's decay groups and TRL's loss normalisation (the masked cross-entropy summed
over the micro-batches, divided by the batch's trained tokens: `num_items_in_batch`); under LoRA
a PEFT model loaded from jaxpost's exported adapter. Losses, pre-clip gradient norms and learning
rates agree step by step, and so do the weights after the last step."""

from __future__ import annotations

import hf_tiny
import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

from jaxpost import lora, models, sharding, steps
from jaxpost.losses import sft_loss

ONE = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
SETTINGS = dict(lr=3e-3, weight_decay=0.1, warmup=1, total=4, clip=0.5)


def _batches(rng, count=3, b=4, t=24):
    """Rows padded at the end, the loss on a random span of each, so micro-batches (rows
    i * k + j) hold unequal numbers of trained tokens."""
    out = []
    for _ in range(count):
        tokens = rng.integers(1, hf_tiny.VOCAB, (b, t)).astype(np.int32)
        mask = np.zeros((b, t), np.float32)
        seg = np.ones((b, t), np.int32)
        for r in range(b):
            end = int(rng.integers(t // 3, t + 1))
            start = int(rng.integers(0, end // 2))
            mask[r, start : end - 1] = 1.0
            seg[r, end:] = 0
            tokens[r, end:] = 0
        out.append({
            "tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": mask,
            "segment_ids": seg, "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        })  # fmt: skip
    return out


def _torch_steps(model, batches, grad_accum):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = set(transformers.Trainer.get_decay_parameter_names(None, model))
    groups = [
        {"params": [p for n, p in named if n in decayed], "weight_decay": SETTINGS["weight_decay"]},
        {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=SETTINGS["lr"], betas=(0.9, 0.999), eps=1e-8)
    schedule = transformers.get_cosine_schedule_with_warmup(
        opt, SETTINGS["warmup"], SETTINGS["total"]
    )
    metrics = []
    for batch in batches:
        opt.zero_grad()
        items = float(batch["loss_mask"].sum())
        total = 0.0
        for j in range(grad_accum):
            mb = {k: torch.tensor(v[j::grad_accum]) for k, v in batch.items()}
            logits = model(input_ids=mb["tokens"].long()).logits
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), mb["targets"].long().flatten(), reduction="none"
            )
            loss = (ce * mb["loss_mask"].flatten()).sum() / items
            loss.backward()
            total += float(loss)
        norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in named], SETTINGS["clip"]))
        metrics.append((total, norm, opt.param_groups[0]["lr"]))
        opt.step()
        schedule.step()
    return metrics


def _jax_steps(cfg, params, batches, trainable, grad_accum):
    opt = steps.make_optimizer(
        name="adamw", learning_rate=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"],
        warmup_steps=SETTINGS["warmup"], total_steps=SETTINGS["total"],
        max_grad_norm=SETTINGS["clip"],
    )  # fmt: skip
    state = steps.init_train_state(cfg, params, opt, ONE, trainable=trainable)
    step = steps.make_train_step(
        cfg, sft_loss, opt, ONE, trainable=trainable, grad_accum=grad_accum
    )
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append((float(m["loss"]), float(m["grad_norm"]), float(m["learning_rate"])))
    return state, metrics


def _assert_same_steps(ours, theirs):
    for (loss, norm, lr), (t_loss, t_norm, t_lr) in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(loss, t_loss, rtol=1e-5)
        np.testing.assert_allclose(norm, t_norm, rtol=1e-5)
        np.testing.assert_allclose(lr, t_lr, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("family, grad_accum", [("qwen3", 2), ("gemma2", 1)])
def test_full_fine_tuning_matches_torch(family, grad_accum, tmp_path):
    original = hf_tiny.build(family, seed=6)
    original.save_pretrained(tmp_path / "hf")
    cfg, params = models.load_hf(tmp_path / "hf")
    batches = _batches(np.random.default_rng(0))
    state, ours = _jax_steps(cfg, {"base": params, "lora": None}, batches, "full", grad_accum)
    theirs = _torch_steps(original.train(), batches, grad_accum)
    _assert_same_steps(ours, theirs)
    models.save_hf(cfg, state.params["base"], tmp_path / "trained")
    trained = safetensors.numpy.load_file(tmp_path / "trained" / "model.safetensors")
    reference = {k: v.detach().numpy() for k, v in original.state_dict().items()}
    for name, value in trained.items():
        # AdamW's first steps move every weight by about the learning rate, rounding included
        np.testing.assert_allclose(value, reference[name], rtol=0, atol=3e-5, err_msg=name)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_matches_peft(use_rslora, tmp_path):
    original = hf_tiny.build("llama", seed=7)
    original.save_pretrained(tmp_path / "hf")
    cfg, params = models.load_hf(tmp_path / "hf")
    lora_params = lora.init(cfg, params, rank=4, alpha=16, key=jax.random.key(3),
                            use_rslora=use_rslora)  # fmt: skip
    # B = 0 at init: a first step moves only B. Start from a non-zero B so both factors train.
    noise = np.random.default_rng(2)
    lora_params = jax.tree.map(lambda x: x + 0.05 * noise.normal(size=x.shape), lora_params)
    lora.save_peft(cfg, lora_params, tmp_path / "adapter", base_model_name_or_path=tmp_path / "hf")
    model = peft.PeftModel.from_pretrained(original, tmp_path / "adapter", is_trainable=True)
    batches = _batches(np.random.default_rng(1))
    state, ours = _jax_steps(cfg, {"base": params, "lora": lora_params}, batches, "lora", 2)
    theirs = _torch_steps(model.train(), batches, 2)
    _assert_same_steps(ours, theirs)
    lora.save_peft(cfg, state.params["lora"], tmp_path / "trained")
    trained = safetensors.numpy.load_file(tmp_path / "trained" / "adapter_model.safetensors")
    start = safetensors.numpy.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    reference = {
        k.replace(".default", ""): v.detach().numpy()
        for k, v in model.state_dict().items()
        if "lora_" in k
    }
    assert set(trained) == set(reference)
    for name, value in trained.items():
        assert np.abs(value - start[name]).max() > 1e-3, name  # both factors trained
        np.testing.assert_allclose(value, reference[name], rtol=0, atol=2e-5, err_msg=name)
