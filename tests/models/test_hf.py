"""HF checkpoint I/O: round trips through transformers, bfloat16, sharded loading, the config
mapping (both RoPE spellings), published parameter counts, and every input error."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from jaxpost import models, sharding
from jaxpost.models import safetensors_io

# One compilation per config (op-by-op eager dispatch is far slower on CPU).
jit_forward = jax.jit(models.forward, static_argnums=0)

# Tiny model fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf_tiny.build("llama", seed=1).save_pretrained(path)
    return path


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _ids(seed: int, shape=(2, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, hf_tiny.VOCAB, shape)


# Round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_save_hf_loads_in_transformers(family, tmp_path):
    """HF -> load_hf -> save_hf (sharded) -> transformers.from_pretrained: identical logits."""
    original = hf_tiny.build(family, seed=2)
    original.save_pretrained(tmp_path / "hf")
    cfg, params = models.load_hf(tmp_path / "hf")
    models.save_hf(cfg, params, tmp_path / "ours", max_shard_bytes=60_000)
    files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert "model.safetensors.index.json" in files and len(files) > 3
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == [type(original).__name__]

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(original)
    ids = _ids(3)
    np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(original, ids))

    cfg2, params2 = models.load_hf(tmp_path / "ours")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_loads_sharded_checkpoint_written_by_transformers(llama_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    _, params = models.load_hf(tmp_path)
    _, reference = models.load_hf(llama_dir)
    jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_bfloat16_checkpoint(tmp_path):
    """bf16 safetensors load exactly (as bf16 or upcast to f32) and save back as BF16."""
    model = hf_tiny.build("qwen3", seed=4).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = models.load_hf(tmp_path / "hf", dtype="bfloat16")
    _, params32 = models.load_hf(tmp_path / "hf", dtype="float32")
    assert cfg.param_dtype == cfg.dtype == "bfloat16"
    q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
    leaf = params["layers"]["attn"]["q"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(leaf[1], np.float32), q)
    assert params32["layers"]["attn"]["q"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(params32["layers"]["attn"]["q"]["kernel"][1]), q)

    models.save_hf(cfg, params, tmp_path / "ours")
    header = safetensors_io.SafetensorsFile(tmp_path / "ours" / "model.safetensors").entries
    assert {str(e[0]) for e in header.values()} == {"bfloat16"}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert reloaded.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_sharded_load_matches_one_device(llama_dir, monkeypatch, tmp_path):
    """load_hf onto a (data=2, fsdp=2, tensor=2) mesh: leaves sharded, logits as on one device."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    reads = []
    read = safetensors_io.SafetensorsFile.read

    def recording_read(self, name, index=()):
        out = read(self, name, index)
        reads.append((name, out.shape))
        return out

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", recording_read)
    cfg, params = models.load_hf(llama_dir, mesh=mesh)
    monkeypatch.undo()
    # Streaming: each device shard reads its [out/2, in/2] block of a q_proj, layer by layer.
    q_reads = {shape for name, shape in reads if name.endswith("q_proj.weight")}
    assert q_reads == {(32, 32)}, q_reads
    _, single = models.load_hf(llama_dir)
    expected = sharding.tree_shardings(params, models.logical_axes(cfg), mesh)
    for x, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(expected))
    q = params["layers"]["attn"]["q"]["kernel"]  # [L, embed->fsdp, heads->tensor]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)
    for shard in q.addressable_shards:  # each device holds exactly its slice of the file
        np.testing.assert_array_equal(
            np.asarray(shard.data), np.asarray(single["layers"]["attn"]["q"]["kernel"])[shard.index]
        )

    ids = jnp.asarray(_ids(5, (4, 16)), jnp.int32)
    with sharding.use_mesh(mesh):
        sharded_logits = jax.jit(lambda p, t: models.forward(cfg, p, t))(params, ids)
    one = jax.jit(lambda p, t: models.forward(cfg, p, t))(single, ids)
    np.testing.assert_allclose(np.asarray(sharded_logits), np.asarray(one), atol=1e-5, rtol=0)

    # Saving sharded params gathers each tensor and writes the same checkpoint.
    models.save_hf(cfg, params, tmp_path / "from_mesh")
    _, back = models.load_hf(tmp_path / "from_mesh")
    jax.tree.map(np.testing.assert_array_equal, back, single)


@pytest.mark.parametrize("layout", ["language_model.model.", "model.language_model."])
def test_gemma3_multimodal_checkpoint_loads_its_language_model(layout, tmp_path):
    """Gemma3ForConditionalGeneration: the text model loads (either weight layout); the vision
    tower is left out; text-only logits match, and save_hf writes a Gemma3ForCausalLM."""
    model = hf_tiny.build_gemma3_multimodal(seed=6)
    model.save_pretrained(tmp_path / "mm")
    file = tmp_path / "mm" / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    assert any(k.startswith("vision_tower.") for k in tensors)
    renamed = {k.replace("language_model.model.", layout): v for k, v in tensors.items()}
    safetensors.torch.save_file(renamed, file, metadata={"format": "pt"})

    cfg, params = models.load_hf(tmp_path / "mm")
    assert cfg.model_type == "gemma3_text" and cfg.layer_types == ("local", "local", "global")
    ids = _ids(7, (2, 24))
    ours = np.asarray(jit_forward(cfg, params, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, _hf_logits(model, ids), atol=1e-4, rtol=0)

    models.save_hf(cfg, params, tmp_path / "text")
    text_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "text", attn_implementation="eager"
    )
    assert type(text_model).__name__ == "Gemma3ForCausalLM"
    np.testing.assert_allclose(_hf_logits(text_model, ids), ours, atol=1e-4, rtol=0)


# Bad checkpoints -----------------------------------------------------------------------------


@pytest.fixture
def broken(llama_dir, tmp_path):
    """A private copy of the tiny llama checkpoint to damage."""
    path = tmp_path / "ckpt"
    shutil.copytree(llama_dir, path)
    return path


def _rewrite(path, edit):
    file = path / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    edit(tensors)
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        models.load_hf(broken)


def test_missing_weights_file(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        models.load_hf(broken)


def test_missing_tensor(broken):
    _rewrite(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    expected = r"missing tensor 'model.layers.1.mlp.up_proj.weight' \(expected shape \(128, 64\)\)"
    with pytest.raises(ValueError, match=expected):
        models.load_hf(broken)


def test_unexpected_tensor(broken):
    _rewrite(broken, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(3, 4)}))
    expected = r"unexpected tensor 'model.layers.2.mlp.up_proj.weight' of shape \(3, 4\)"
    with pytest.raises(ValueError, match=expected):
        models.load_hf(broken)


def test_shape_mismatch(broken):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(broken, lambda t: t.update({name: torch.zeros(16, 64)}))
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(16, 64\), expected \(32, 64\)"):
        models.load_hf(broken)


def test_truncated_file(broken):
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated safetensors file"):
        models.load_hf(broken)


@pytest.mark.parametrize("garbage", [b"\xff" * 8, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"])
def test_corrupt_header(broken, garbage):
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(garbage + data[len(garbage) :])
    with pytest.raises(ValueError, match=r"model.safetensors: corrupt"):
        models.load_hf(broken)


def test_index_pointing_to_missing_file(broken, llama_dir):
    cfg, params = models.load_hf(llama_dir)
    models.save_hf(cfg, params, broken, max_shard_bytes=60_000)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (broken / lost).unlink()
    with pytest.raises(FileNotFoundError, match=lost):
        models.load_hf(broken)


# Saving --------------------------------------------------------------------------------------


def test_failed_save_keeps_the_old_checkpoint(broken, llama_dir, monkeypatch):
    cfg, params = models.load_hf(llama_dir)
    (broken / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in broken.iterdir()}

    def fail(path, tensors):
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "write", fail)
    with pytest.raises(OSError, match="disk full"):
        models.save_hf(cfg, params, broken)
    assert {p.name: p.read_bytes() for p in broken.iterdir()} == before
    assert sorted(p.name for p in broken.parent.iterdir()) == ["ckpt"]  # no temp dir left
    monkeypatch.undo()

    bumped = jax.tree.map(lambda x: x + 1, params)
    models.save_hf(cfg, bumped, broken)
    assert (broken / "tokenizer.json").read_text() == "{}"  # other files carried over
    _, back = models.load_hf(broken)
    jax.tree.map(np.testing.assert_array_equal, back, bumped)
    assert sorted(p.name for p in broken.parent.iterdir()) == ["ckpt"]


def test_save_with_source_keeps_tokenizer_generation_config_and_token_ids(tmp_path):
    original = hf_tiny.build("qwen3", seed=4)
    original.config.update({"bos_token_id": 5, "eos_token_id": [7, 9], "pad_token_id": 3})
    original.generation_config.update(eos_token_id=[7, 9], pad_token_id=3, max_new_tokens=17)
    original.save_pretrained(tmp_path / "hf")
    source = tmp_path / "hf"
    (source / "tokenizer.json").write_text('{"model": "tiny"}')
    (source / "chat_template.jinja").write_text("{{ messages }}")
    (source / "pytorch_model.bin").write_bytes(b"stale weights")  # never copied
    (source / ".cache").mkdir()
    cfg, params = models.load_hf(source)

    models.save_hf(cfg, params, tmp_path / "plain")
    assert "eos_token_id" not in json.loads((tmp_path / "plain" / "config.json").read_text())

    models.save_hf(cfg, params, tmp_path / "out", source=source)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json",
    ]  # fmt: skip
    written = json.loads((out / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (
        5, [7, 9], 3,
    )  # fmt: skip
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == [7, 9] and generation.max_new_tokens == 17
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    assert reloaded.config.eos_token_id == [7, 9] and reloaded.config.pad_token_id == 3
    ids = _ids(5)
    np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(original, ids))
    with pytest.raises(FileNotFoundError, match="not an HF checkpoint directory"):
        models.save_hf(cfg, params, tmp_path / "x", source=tmp_path / "nowhere")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("where", ["top level", "absent"])
def test_llama3_pretraining_context_as_the_transformers_model_uses_it(tmp_path, where):
    """transformers' model takes a top-level original_max_position_embeddings (Phi-3 /
    DeepSeek-V3 configs keep it there) over the RoPE dict's, and max_position_embeddings when
    neither has one; jaxpost's logits follow (the dict's 16 against 128 moves them by ~1)."""
    hf_tiny.build("llama", seed=6).save_pretrained(tmp_path)
    entries = json.loads((tmp_path / "config.json").read_text())
    if where == "top level":
        entries["original_max_position_embeddings"] = 128
    else:
        del entries["rope_parameters"]["original_max_position_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(entries))
    cfg, params = models.load_hf(tmp_path)
    assert cfg.rope_scaling["original_max_position_embeddings"] == (
        128 if where == "top level" else entries["max_position_embeddings"]
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    ids = _ids(7, (1, 48))
    ours = np.asarray(models.forward(cfg, params, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, _hf_logits(theirs, ids), atol=2e-5)


def test_save_with_source_keeps_the_config_entries_the_model_does_not_change(tmp_path):
    source = tmp_path / "hf"
    hf_tiny.build("llama", seed=6).save_pretrained(source)
    entries = json.loads((source / "config.json").read_text())
    entries.update(
        initializer_range=0.123, use_cache=False, pretraining_tp=1, my_lab_note="run 7",
        rope_scaling={"rope_type": "linear", "factor": 2.0}, transformers_version="4.0.0",
    )  # fmt: skip
    (source / "config.json").write_text(json.dumps(entries))
    cfg, params = models.load_hf(source)
    assert cfg.rope_scaling["factor"] == 2.0

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left out of the same model's config
        models.save_hf(cfg, params, tmp_path / "same", source=source)
    written = json.loads((tmp_path / "same" / "config.json").read_text())
    assert (written["initializer_range"], written["use_cache"], written["pretraining_tp"]) == (
        0.123, False, 1,
    )  # fmt: skip
    assert written["my_lab_note"] == "run 7" and "transformers_version" not in written
    assert models.load_hf(tmp_path / "same")[0] == cfg

    # A fine-tuned config without the scaling: the source's rope_scaling would bring it back.
    plain = dataclasses.replace(cfg, rope_scaling=None)
    with pytest.warns(UserWarning, match="left out because the saved model differs there: rope_s"):
        models.save_hf(plain, params, tmp_path / "plain", source=source)
    written = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "rope_scaling" not in written and written["initializer_range"] == 0.123
    assert models.load_hf(tmp_path / "plain")[0] == plain
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert reloaded.config.initializer_range == 0.123 and reloaded.config.use_cache is False


def test_save_with_a_multimodal_gemma3_source_keeps_its_text_config_entries(tmp_path):
    text_only = tmp_path / "text"
    hf_tiny.build("gemma3_text", seed=2).save_pretrained(text_only)
    cfg, params = models.load_hf(text_only)
    text = json.loads((text_only / "config.json").read_text())
    source = tmp_path / "multimodal"
    source.mkdir()
    wrapped = {
        "model_type": "gemma3", "text_config": {**text, "initializer_range": 0.05},
        "vision_config": {"hidden_size": 8}, "eos_token_id": [1, 106], "image_token_index": 9,
    }  # fmt: skip
    (source / "config.json").write_text(json.dumps(wrapped))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models.save_hf(cfg, params, tmp_path / "out", source=source)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "gemma3_text" and written["initializer_range"] == 0.05
    assert written["eos_token_id"] == [1, 106]
    assert not {"text_config", "vision_config", "image_token_index"} & set(written)
    assert models.load_hf(tmp_path / "out")[0] == cfg

    # Another family saved with this source: its token ids only, and a warning.
    hf_tiny.build("qwen3", seed=1).save_pretrained(tmp_path / "qwen3")
    other_cfg, other_params = models.load_hf(tmp_path / "qwen3")
    with pytest.warns(UserWarning, match="is a 'gemma3_text' config and the saved model a 'qwen3'"):
        models.save_hf(other_cfg, other_params, tmp_path / "mixed", source=source)
    written = json.loads((tmp_path / "mixed" / "config.json").read_text())
    assert written["eos_token_id"] == [1, 106] and "query_pre_attn_scalar" not in written
    assert "initializer_range" not in written


def test_save_rejects_params_not_matching_config(llama_dir, tmp_path):
    cfg, params = models.load_hf(llama_dir)
    bad = {**params, "layers": {**params["layers"], "extra": {"kernel": jnp.zeros(2)}}}
    with pytest.raises(ValueError, match="params leaf layers/extra/kernel"):
        models.save_hf(cfg, bad, tmp_path / "x")
    del bad["layers"]["extra"]
    bad["final_norm"] = {"scale": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"final_norm/scale has shape \(3,\), expected \(64,\)"):
        models.save_hf(cfg, bad, tmp_path / "x")
    with pytest.raises(ValueError, match=r"params are partitioned .*save lora.merge\(cfg, base"):
        models.save_hf(cfg, {"base": params, "lora": None}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
