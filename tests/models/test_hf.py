"""HF checkpoint I/O: round trips through transformers, bfloat16, sharded loading, the config
mapping (both RoPE spellings), published parameter counts, and every input error."""

from __future__ import annotations

import json
import shutil

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


# Config mapping ------------------------------------------------------------------------------

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 16,
    "num_hidden_layers": 42,
    "num_key_value_heads": 8,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "vocab_size": 256000,
}

# google/gemma-3-4b-it: multimodal; the text config lists only what differs from the defaults.
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}


@pytest.mark.parametrize(
    "hf_config, count",
    [(LLAMA_31_8B, 8_030_261_248), (QWEN3_8B, 8_190_735_360), (GEMMA2_9B, 9_241_705_984)],
    ids=["Llama-3.1-8B", "Qwen3-8B", "Gemma-2-9B"],
)
def test_published_parameter_counts(hf_config, count):
    cfg = models.config_from_hf(hf_config, dtype="bfloat16")
    shapes = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
    leaves = jax.tree.leaves(shapes)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    assert sum(x.size for x in leaves) == count == cfg.num_params()


def _hf_roundtrip(config: dict) -> dict:
    """What transformers itself makes of a config.json: its own to_dict after parsing it."""
    return transformers.AutoConfig.for_model(**config).to_dict()


@pytest.mark.parametrize(
    "legacy",
    [
        LLAMA_31_8B,
        QWEN3_8B,
        GEMMA2_9B,
        # Gemma 3 before transformers 5: top-level thetas, rope_scaling and a layer pattern.
        {
            **{k: v for k, v in GEMMA2_9B.items() if k != "architectures"},
            "model_type": "gemma3_text",
            "num_hidden_layers": 8,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window_pattern": 4,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
        },
        {
            **{k: v for k, v in QWEN3_8B.items() if k != "architectures"},
            "model_type": "qwen2",
            "use_sliding_window": True,
            "sliding_window": 1024,
            "max_window_layers": 30,
        },
        {**GEMMA2_9B, "model_type": "gemma", "hidden_act": "gelu", "head_dim": 128},
        GEMMA3_4B,
    ],
    ids=["llama3", "qwen3", "gemma2", "gemma3-legacy", "qwen2-sliding", "gemma-gelu", "gemma3-4b"],
)
def test_legacy_and_new_spellings_agree_with_transformers(legacy):
    """Old-style config.json and transformers 5's re-spelling of it map to the same config."""
    ours = models.config_from_hf(legacy)
    assert models.config_from_hf(_hf_roundtrip(legacy)) == ours
    assert models.config_from_hf(models.config_to_hf(ours)) == ours
    if legacy["model_type"] == "gemma3_text":
        assert ours.layer_types == ("local",) * 3 + ("global",) + ("local",) * 3 + ("global",)
        assert (ours.rope_theta, ours.rope_local_theta) == (1e6, 1e4)
        assert ours.rope_scaling == {"type": "linear", "factor": 8.0}
    if legacy["model_type"] == "qwen2":
        assert ours.layer_types == ("global",) * 30 + ("local",) * 6 and ours.qkv_bias
    if legacy["model_type"] == "gemma":
        assert ours.activation == "gelu_tanh"
    if legacy["model_type"] == "gemma3":  # the text model, with Gemma3TextConfig's defaults
        assert (ours.num_layers, ours.hidden_size, ours.num_heads, ours.head_dim) == (
            34,
            2560,
            8,
            256,
        )
        assert ours.layer_types[:6] == ("local",) * 5 + ("global",) and ours.sliding_window == 1024
        assert ours.tie_embeddings and ours.rope_scaling == {"type": "linear", "factor": 8.0}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "mistral"}, "model_type='mistral' is not supported"),
        ({"model_type": "llava", "text_config": {}}, "model_type='llava' has a text_config"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"layer_types": ["chunked_attention"] * 32}, "chunked_attention"),
    ],
)
def test_unsupported_config_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        models.config_from_hf({**LLAMA_31_8B, **change})


def test_config_to_hf_rejects_what_the_family_cannot_express():
    cfg = models.config_from_hf(LLAMA_31_8B).replace(final_logit_softcap=30.0)
    with pytest.raises(ValueError, match="final_logit_softcap=30.0"):
        models.config_to_hf(cfg)


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


def test_save_rejects_params_not_matching_config(llama_dir, tmp_path):
    cfg, params = models.load_hf(llama_dir)
    bad = {**params, "layers": {**params["layers"], "extra": {"kernel": jnp.zeros(2)}}}
    with pytest.raises(ValueError, match="params leaf layers/extra/kernel"):
        models.save_hf(cfg, bad, tmp_path / "x")
    del bad["layers"]["extra"]
    bad["final_norm"] = {"scale": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"final_norm/scale has shape \(3,\), expected \(64,\)"):
        models.save_hf(cfg, bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()
