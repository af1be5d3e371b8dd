"""Checkpoint directories as they are found in the wild, read and written as transformers
does (from an audit against transformers 5.x): a tied config over a head that is not the
embedding, both a single file and an index, keys a family ignores, config classes' defaults,
and saving beside files that are not the model's."""

from __future__ import annotations

import json
import os
import warnings

import hf_tiny
import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from jaxpost import models

jit_forward = jax.jit(models.forward, static_argnums=0)


def _ids(seed: int, shape=(2, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, hf_tiny.VOCAB, shape)


def _theirs(path, ids) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _ours(path, ids) -> tuple[models.ModelConfig, np.ndarray]:
    cfg, params = models.load_hf(path)
    return cfg, np.asarray(jit_forward(cfg, params, ids))


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_tied_config_over_a_stored_head_that_differs_loads_it_untied(tmp_path):
    """transformers keeps a stored lm_head that is not the embedding (and warns) even when
    config.json says tie_word_embeddings: the head was dropped here (logits 2.3 apart)."""
    hf_tiny.build("llama", seed=3).save_pretrained(tmp_path)  # untied: lm_head stored
    _edit_config(tmp_path, tie_word_embeddings=True)
    ids = _ids(0)
    with pytest.warns(UserWarning, match="stores an lm_head.weight that differs"):
        cfg, ours = _ours(tmp_path, ids)
    assert not cfg.tie_embeddings
    np.testing.assert_allclose(ours, _theirs(tmp_path, ids), rtol=0, atol=1e-4)

    # A stored head equal to the embedding (torch exports of tied models write both) stays
    # tied, without a word.
    file = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, ours = _ours(tmp_path, ids)
    assert cfg.tie_embeddings
    np.testing.assert_allclose(ours, _theirs(tmp_path, ids), rtol=0, atol=1e-4)


def test_a_single_file_is_read_before_an_index(tmp_path):
    """A directory holding model.safetensors and a sharded index (of another model): both
    read the single file, as transformers does (the index was read here)."""
    hf_tiny.build("qwen3", seed=1).save_pretrained(tmp_path / "a")
    hf_tiny.build("qwen3", seed=2).save_pretrained(tmp_path / "b", max_shard_size="60KB")
    both = tmp_path / "a"
    for f in (tmp_path / "b").glob("model*"):
        os.rename(f, both / f.name)
    assert (both / "model.safetensors.index.json").exists()
    ids = _ids(1)
    _, ours = _ours(both, ids)
    np.testing.assert_allclose(ours, _theirs(both, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_window_keys_of_families_without_windows_are_ignored(family, tmp_path):
    """Llama and Gemma 1 models have no sliding window: layer_types / sliding_window left in
    a converted config.json are ignored by transformers, and now here (they set a window)."""
    hf_tiny.build(family, seed=4).save_pretrained(tmp_path)
    _edit_config(tmp_path, sliding_window=5, layer_types=["sliding_attention"] * 2)
    ids = _ids(2)
    cfg, ours = _ours(tmp_path, ids)
    assert cfg.layer_types is None
    np.testing.assert_allclose(ours, _theirs(tmp_path, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "family, config_class",
    [
        ("qwen3", transformers.Qwen3Config),
        ("gemma", transformers.GemmaConfig),
        ("gemma2", transformers.Gemma2Config),
        ("llama", transformers.LlamaConfig),
        ("qwen2", transformers.Qwen2Config),
    ],
)
def test_config_class_defaults_for_absent_keys(family, config_class):
    """head_dim absent: Qwen3 (128), Gemma and Gemma 2 (256) default to a fixed size, the others
    to hidden_size / num_attention_heads; Gemma 2's window defaults to 4096."""
    hf = dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=256,
    )  # fmt: skip
    ours = models.config_from_hf({"model_type": family, **hf})
    theirs = config_class(**hf)
    assert ours.head_dim == getattr(theirs, "head_dim", 64 // 4)  # Qwen2Config has none
    if family == "gemma2":
        assert ours.sliding_window == theirs.sliding_window == 4096
        assert ours.layer_types == ("local", "global")
        # Gemma 2 may carry attention biases (Mistral may not): still loaded.
        biased = models.config_from_hf({"model_type": family, **hf, "attention_bias": True})
        assert biased.qkv_bias and biased.o_bias


@pytest.fixture
def llama(tmp_path):
    hf_tiny.build("llama", seed=5).save_pretrained(tmp_path / "src")
    return models.load_hf(tmp_path / "src")


def test_saving_over_a_directory_keeps_files_that_are_not_the_model(llama, tmp_path):
    """Only the model's own weight files are replaced: an adapter or optimizer state saved
    beside it survives (every *.safetensors was dropped), and old shards the previous index
    named go."""
    cfg, params = llama
    out = tmp_path / "out"
    models.save_hf(cfg, params, out, max_shard_bytes=60_000)
    old_shards = set(
        json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()
    )
    for name in ("adapter_model.safetensors", "optimizer.safetensors", "notes.txt"):
        (out / name).write_bytes(b"keep me")
    (out / "weights-extra-00001.safetensors").write_bytes(b"x")  # a shard under another name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    first = sorted(old_shards)[0]
    os.rename(out / first, out / "weights-extra-00002.safetensors")
    index["weight_map"] = {
        k: ("weights-extra-00002.safetensors" if v == first else v)
        for k, v in index["weight_map"].items()
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index))

    models.save_hf(cfg, params, out)  # one file now
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "adapter_model.safetensors", "config.json", "model.safetensors", "notes.txt",
        "optimizer.safetensors", "weights-extra-00001.safetensors",
    ]  # fmt: skip
    assert (out / "adapter_model.safetensors").read_bytes() == b"keep me"
    _, back = models.load_hf(out)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_saving_through_a_symlink_writes_its_target(llama, tmp_path):
    cfg, params = llama
    target = tmp_path / "real"
    models.save_hf(cfg, params, target)
    (target / "tokenizer.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    bumped = jax.tree.map(lambda x: x + 1, params)
    models.save_hf(cfg, bumped, link)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "tokenizer.json").read_text() == "{}"
    _, back = models.load_hf(target)
    jax.tree.map(np.testing.assert_array_equal, back, bumped)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real", "src"]  # no leftovers


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere is not a directory"):
        models.load_hf(tmp_path / "nowhere")
