"""LoRA: exactness at init, merge vs the partitioned forward, sharding names, and interop with HF
PEFT in both directions (adapters made by jaxpost loaded by peft onto the transformers model, and
adapters made by peft loaded by jaxpost), checked on logits; plus every input error."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from jaxpost import lora, models, nf4, rollout, sharding

from tiny_models import randomized, tiny_config

VOCAB = 128
CFG = tiny_config(vocab_size=VOCAB)


# One jitted forward for the whole file: calls with equal shapes and LoRA layout share a compile.
forward = jax.jit(models.forward, static_argnums=0)


def _tokens(seed: int, shape=(2, 12)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


@pytest.fixture(scope="module")
def params():
    return jax.jit(models.init, static_argnums=0)(CFG, jax.random.key(0))


# Partition, init and merge -------------------------------------------------------------------


# Token shapes: few rows (LoRA added to the base product, as in decode) and more than
# matmul.LORA_MERGE_MIN_ROWS (one product with the merged kernel, as in a train step).
SHAPES = [(2, 12), (3, 100)]


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_init_equals_base_exactly(params, use_rslora, shape):
    lp = lora.init(CFG, params, rank=4, alpha=8, key=jax.random.key(1), use_rslora=use_rslora)
    tokens = _tokens(1, shape)
    base = forward(CFG, params, tokens)
    adapted = forward(CFG, params, tokens, lora=lp)
    assert float(jnp.max(jnp.abs(adapted - base))) == 0.0
    # A random with PEFT's kaiming-uniform bound 1/sqrt(fan_in), B zero.
    q = lp.params["layers"]["attn"]["q"]
    assert q["a"].shape == (2, 32, 4) and q["b"].shape == (2, 4, 32)
    assert float(jnp.max(jnp.abs(q["a"]))) <= 1 / np.sqrt(32)
    assert float(jnp.std(q["a"])) > 0.5 / np.sqrt(3 * 32)
    assert not jnp.any(q["b"])
    assert lp.scale == pytest.approx(8 / 2 if use_rslora else 8 / 4)


def test_default_targets_and_trainable_leaves(params):
    lp = lora.init(CFG, params, rank=4, alpha=8)
    assert lp.modules == (
        ("attn", "k"),
        ("attn", "o"),
        ("attn", "q"),
        ("attn", "v"),
        ("mlp", "down"),
        ("mlp", "gate"),
        ("mlp", "up"),
    )
    # Only the factors are pytree leaves, so grads / optimizer state cover nothing else.
    assert len(jax.tree.leaves(lp)) == 14
    grads = jax.grad(lambda lp_: jnp.sum(forward(CFG, params, _tokens(2), lora=lp_)))(lp)
    assert jax.tree.structure(grads) == jax.tree.structure(lp)
    # With B = 0 only B receives gradient, in every targeted module.
    for block, module in lp.modules:
        assert float(jnp.max(jnp.abs(grads.params["layers"][block][module]["b"]))) > 0


def test_custom_targets(params):
    lp = lora.init(CFG, params, rank=2, targets=[r"layers/attn/(q|v)/kernel", r".*/down/.*"])
    assert lp.modules == (("attn", "q"), ("attn", "v"), ("mlp", "down"))
    lp = randomized(lp, jax.random.key(3), 0.05)
    merged = jax.jit(lora.merge, static_argnums=0)(CFG, params, lp)
    for block, module in (("attn", "k"), ("mlp", "up")):
        np.testing.assert_array_equal(
            merged["layers"][block][module]["kernel"], params["layers"][block][module]["kernel"]
        )
    # One string is one regex (as PEFT's target_modules), not a sequence of characters.
    one = lora.init(CFG, params, rank=2, targets=r"layers/attn/(q|v)/kernel")
    assert one.modules == (("attn", "q"), ("attn", "v"))
    for bad in ([], [""], [3]):
        with pytest.raises(ValueError, match="expected a regex or a non-empty sequence"):
            lora.init(CFG, params, rank=2, targets=bad)


def test_init_on_abstract_params():
    abstract = jax.eval_shape(lambda: models.init(CFG, jax.random.key(0)))
    lp = jax.eval_shape(lambda p: lora.init(CFG, p, rank=3), abstract)
    assert isinstance(lp, lora.LoraParams)
    assert lp.params["layers"]["mlp"]["down"]["a"].shape == (2, 64, 3)
    assert lp.params["layers"]["mlp"]["down"]["b"].shape == (2, 3, 32)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_merge_equals_partitioned_forward(params, use_rslora, shape):
    lp = randomized(
        lora.init(CFG, params, rank=4, alpha=8, use_rslora=use_rslora), jax.random.key(4), 0.05
    )
    tokens = _tokens(5, shape)
    partitioned = forward(CFG, params, tokens, lora=lp)
    merged = jax.jit(lora.merge, static_argnums=0)(CFG, params, lp)
    plain = forward(CFG, merged, tokens)
    assert float(jnp.max(jnp.abs(plain - forward(CFG, params, tokens)))) > 1e-2
    np.testing.assert_allclose(plain, partitioned, atol=1e-5, rtol=0)
    # merge is W + scale * A @ B, checked in float64 on one kernel.
    f = lp.params["layers"]["mlp"]["gate"]
    want = np.asarray(params["layers"]["mlp"]["gate"]["kernel"], np.float64) + lp.scale * np.einsum(
        "lir,lro->lio", np.asarray(f["a"], np.float64), np.asarray(f["b"], np.float64)
    )
    np.testing.assert_allclose(merged["layers"]["mlp"]["gate"]["kernel"], want, atol=1e-6)
    unmerged = jax.jit(lora.unmerge, static_argnums=0)(CFG, merged, lp)
    for x, y in zip(jax.tree.leaves(unmerged), jax.tree.leaves(params)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_merged_kernel_path_has_the_unmerged_gradients(params, monkeypatch):
    """A train step's LoRA linears multiply by w + s a b (`matmul.lora_dot`); the loss and the
    factors' gradients equal those of the unmerged form, x w + s (x a) b."""
    lp = randomized(lora.init(CFG, params, rank=4, alpha=8), jax.random.key(6), 0.05)
    tokens = _tokens(7, (3, 100))

    def loss(lp_):
        logits = models.forward(CFG, params, tokens, lora=lp_)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    merged_loss, merged = jax.jit(jax.value_and_grad(loss))(lp)
    monkeypatch.setattr(models.matmul, "LORA_MERGE_MIN_ROWS", 10**9)  # a fresh jit retraces
    plain_loss, plain = jax.jit(jax.value_and_grad(loss))(lp)
    assert float(merged_loss) == pytest.approx(float(plain_loss), rel=1e-6)
    for m, p in zip(jax.tree.leaves(merged), jax.tree.leaves(plain)):
        scale = float(jnp.max(jnp.abs(p)))
        assert scale > 0
        np.testing.assert_allclose(m, p, atol=1e-5 * scale, rtol=0)


def test_dropout_acts_only_with_an_rng(params):
    lp = randomized(lora.init(CFG, params, rank=4, alpha=8, dropout=0.5), jax.random.key(6), 0.3)
    tokens = _tokens(7)
    no_dropout = dataclasses.replace(lp, dropout=0.0)
    det = forward(CFG, params, tokens, lora=lp)
    np.testing.assert_array_equal(det, forward(CFG, params, tokens, lora=no_dropout))
    logits, _ = models.apply(CFG, params, tokens, lora=lp, dropout_rng=jax.random.key(0))
    assert float(jnp.max(jnp.abs(logits - det))) > 1e-3


def test_partition_and_sharding_names(params):
    lp = lora.init(CFG, params, rank=4, alpha=8)
    base, again = lora.split(lora.combine(params, lp))
    assert base is params and again is lp
    axes = lora.logical_axes(lp)
    assert axes.params["layers"]["attn"]["k"] == {
        "a": ("layers", "embed", "lora_rank"),
        "b": ("layers", "lora_rank", "kv_heads"),
    }
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = sharding.tree_shardings(lp, axes, mesh)
    placed = jax.device_put(randomized(lp, jax.random.key(8), 0.05), shardings)
    spec = placed.params["layers"]["mlp"]["up"]["b"].sharding.spec
    assert tuple(spec) == (None, "fsdp", "tensor")
    tokens = _tokens(9)
    np.testing.assert_allclose(
        forward(CFG, params, tokens, lora=placed),
        forward(CFG, params, tokens, lora=randomized(lp, jax.random.key(8), 0.05)),
        atol=1e-5,
    )


def test_init_errors(params):
    with pytest.raises(ValueError, match=r"'layers/attn/qq/kernel' matches no layer kernel"):
        lora.init(CFG, params, targets=["layers/attn/qq/kernel"])
    with pytest.raises(ValueError, match="embedder/embedding' matches no layer kernel"):
        lora.init(CFG, params, targets=["embedder/embedding"])
    with pytest.raises(ValueError, match="not a valid regex"):
        lora.init(CFG, params, targets=["layers/attn/(q"])
    with pytest.raises(ValueError, match="rank=0"):
        lora.init(CFG, params, rank=0)
    with pytest.raises(ValueError, match="dropout=1.0"):
        lora.init(CFG, params, dropout=1.0)
    with pytest.raises(ValueError, match="alpha=0"):
        lora.init(CFG, params, alpha=0)
    wrong = jax.eval_shape(
        lambda: models.init(CFG.replace(intermediate_size=48), jax.random.key(0))
    )
    with pytest.raises(ValueError, match=r"layers/mlp/down/kernel has shape \(2, 48, 32\)"):
        lora.init(CFG, wrong)
    with pytest.raises(ValueError, match="keys \\['base', 'lora'\\]"):
        lora.split(params)


# PEFT interop --------------------------------------------------------------------------------


def _hf_model(
    family: str, seed: int, intermediate: int = 96, qwen3_head_dim: int = 24
) -> transformers.PreTrainedModel:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    if family == "llama":
        config = transformers.LlamaConfig(**common)
    else:
        # head_dim != hidden / heads (by default)
        config = transformers.Qwen3Config(**common, head_dim=qwen3_head_dim)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.08 * torch.randn_like(p))
    return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def hf_pair(request, tmp_path_factory):
    """(family, HF model dir, jaxpost cfg, params) with identical weights."""
    path = tmp_path_factory.mktemp(request.param)
    _hf_model(request.param, seed=1).save_pretrained(path)
    cfg, params = models.load_hf(path)
    return request.param, path, cfg, params


def _move_factors(model: peft.PeftModel, seed: int, scale: float) -> None:
    """Every LoRA factor of `model` moved by Gaussian noise, as training would; eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(scale * torch.randn_like(p))
    model.eval()


def _peft_model(path, adapter_dir) -> peft.PeftModel:
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    return peft.PeftModel.from_pretrained(base.eval(), adapter_dir).eval()


def test_jaxpost_adapter_loads_in_peft(hf_pair, tmp_path):
    family, path, cfg, params = hf_pair
    rslora = family == "qwen3"
    targets = None if family == "llama" else [r"layers/attn/(q|k|o)/kernel", r"layers/mlp/up/.*"]
    lp = lora.init(cfg, params, rank=4, alpha=8, targets=targets, use_rslora=rslora)
    lp = randomized(lp, jax.random.key(10), 0.05)
    lora.save_peft(cfg, lp, tmp_path / "adapter", base_model_name_or_path=str(path))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"] is rslora
    assert set(config["target_modules"]) == (
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        if family == "llama"
        else {"q_proj", "k_proj", "o_proj", "up_proj"}
    )

    model = _peft_model(path, tmp_path / "adapter")
    tokens = _tokens(11, (2, 16))
    ours = np.asarray(forward(cfg, params, tokens, lora=lp))
    theirs = _hf_logits(model, tokens)
    base = np.asarray(forward(cfg, params, tokens))
    assert np.max(np.abs(ours - base)) > 1e-2  # the adapter matters
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    # Round trip: the same tree, the same static metadata, bit for bit.
    again = lora.load_peft(cfg, tmp_path / "adapter")
    assert again.base_model_name_or_path == str(path)
    again = dataclasses.replace(again, base_model_name_or_path=None)
    assert jax.tree.structure(again) == jax.tree.structure(lp)
    for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(lp)):
        np.testing.assert_array_equal(x, y)

    # Merged weights exported through the HF saver equal peft's adapted model.
    lora.save_merged_hf(cfg, params, lp, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager"
    ).eval()
    np.testing.assert_allclose(_hf_logits(merged, tokens), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_qlora_adapter_fits_the_bitsandbytes_4bit_base(family, tmp_path):
    """QLoRA's interop: a jaxpost adapter on its NF4 base gives the logits PEFT gives on
    transformers' bitsandbytes 4-bit base (NF4, double quantization, blocks of 64), because
    both round every weight alike (`nf4.KERNEL_KEY`). bitsandbytes' CPU kernel needs every
    input and output width a multiple of 64 (and holds the block maxima in bfloat16, hence a
    small gap)."""
    path = tmp_path / "hf"
    _hf_model(family, seed=2, intermediate=128, qwen3_head_dim=32).save_pretrained(path)
    cfg, params = models.load_hf(path)
    qparams = nf4.quantize_base(cfg, params)
    lp = randomized(lora.init(cfg, qparams, rank=4, alpha=8), jax.random.key(12), 0.05)
    lora.save_peft(cfg, lp, tmp_path / "adapter", base_model_name_or_path=str(path))
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, attn_implementation="eager", device_map="cpu"
    )
    model = peft.PeftModel.from_pretrained(base.eval(), tmp_path / "adapter").eval()
    tokens = _tokens(13, (2, 16))
    theirs = _hf_logits(model, tokens)
    ours = np.asarray(forward(cfg, qparams, tokens, lora=lp))
    # What NF4 rounding moves the logits by (the same adapter on the float base), against
    # what is left between the two 4-bit bases.
    rounding = np.max(np.abs(ours - np.asarray(forward(cfg, params, tokens, lora=lp))))
    gap = np.max(np.abs(ours - theirs))
    print(
        f"{family}: NF4 rounding moves logits up to {rounding:.3g}; jaxpost vs PEFT+bnb {gap:.3g}"
    )
    assert rounding > 0.1
    assert gap < 0.05 * rounding


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj", "down_proj"], "all-linear"])
def test_peft_adapter_loads_in_jaxpost(hf_pair, tmp_path, target_modules):
    family, path, cfg, params = hf_pair
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    config = peft.LoraConfig(
        r=3,
        lora_alpha=5,
        target_modules=target_modules,
        lora_dropout=0.1,
        use_rslora=family == "qwen3",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(base, config)
    _move_factors(model, seed=12, scale=0.1)
    model.save_pretrained(tmp_path / "adapter")

    # PEFT saves factors in the model's dtype; a bfloat16 adapter reads as its float32 values.
    tensors = safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    bf16 = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    safetensors.torch.save_file(bf16, tmp_path / "adapter" / "adapter_model.safetensors")
    lp_bf16 = lora.load_peft(cfg, tmp_path / "adapter")
    a = lp_bf16.params["layers"]["attn"]["q"]["a"]
    want = bf16["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].float().numpy()
    np.testing.assert_array_equal(a[1], want.T)
    safetensors.torch.save_file(tensors, tmp_path / "adapter" / "adapter_model.safetensors")

    lp = lora.load_peft(cfg, tmp_path / "adapter")
    assert lp.rank == 3 and lp.alpha == 5 and lp.dropout == pytest.approx(0.1)
    want_modules = 3 if isinstance(target_modules, list) else 7
    assert len(lp.modules) == want_modules
    tokens = _tokens(13, (2, 16))
    np.testing.assert_allclose(
        forward(cfg, params, tokens, lora=lp), _hf_logits(model, tokens), atol=1e-4, rtol=0
    )


def test_multimodal_gemma3_adapters_apply_in_both_directions(tmp_path):
    """jaxpost trains a Gemma3ForConditionalGeneration's language model: its adapter must name
    the layers where that model keeps them (model.language_model.layers), and target them only
    there, or peft drops every factor with a warning and adapts the vision tower instead; and a
    peft adapter made on that model loads into jaxpost."""
    from models import hf_tiny

    path = tmp_path / "gemma3"
    hf_tiny.build_gemma3_multimodal(seed=0).save_pretrained(path)
    cfg, params = models.load_hf(path)
    tokens = _tokens(15, (2, 16)) % (hf_tiny.VOCAB - 3)  # no image tokens
    base = lambda: transformers.Gemma3ForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager"
    ).eval()  # fmt: skip

    lp = randomized(lora.init(cfg, params, rank=4, alpha=8), jax.random.key(16), 0.05)
    lora.save_peft(cfg, lp, tmp_path / "ours", base_model_name_or_path=path)
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    adapted = [n for n, _ in theirs.named_parameters() if "lora_B" in n]
    assert len(adapted) == 7 * cfg.num_layers
    assert all(".language_model.layers." in n for n in adapted), adapted[:3]
    ours = forward(cfg, params, tokens, lora=lp)
    assert np.max(np.abs(ours - forward(cfg, params, tokens))) > 0.1  # the adapter matters
    np.testing.assert_allclose(ours, _hf_logits(theirs, tokens), atol=1e-4, rtol=0)

    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)",
        init_lora_weights=False,  # B random too
        task_type="CAUSAL_LM",
    )
    made = peft.get_peft_model(base(), config).eval()
    made.save_pretrained(tmp_path / "peft")
    back = lora.load_peft(cfg, tmp_path / "peft")
    assert len(back.modules) == 3
    np.testing.assert_allclose(
        forward(cfg, params, tokens, lora=back), _hf_logits(made, tokens), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapters_whose_base_peft_changes_are_refused_and_their_converted_form_loads(
    hf_pair, tmp_path, init
):
    """PiSSA / OLoRA: peft takes the initial factors out of the base when it loads such an
    adapter, so the factors alone on the unchanged base give another model (logits 1.4-1.8
    apart, audit 32). Refused, naming peft's conversion; the converted adapter matches."""
    family, path, cfg, params = hf_pair
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    config = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init
    )
    model = peft.get_peft_model(base, config)
    model.save_pretrained(tmp_path / "initial")
    _move_factors(model, seed=17, scale=0.05)
    model.save_pretrained(tmp_path / "trained")
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}'.*weight_conversion"):
        lora.load_peft(cfg, tmp_path / "trained")
    model.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    tokens = _tokens(18, (2, 16))
    lp = lora.load_peft(cfg, tmp_path / "converted")
    np.testing.assert_allclose(
        forward(cfg, params, tokens, lora=lp), _hf_logits(model, tokens), atol=1e-4, rtol=0
    )


# load_peft errors ----------------------------------------------------------------------------


@pytest.fixture
def adapter(params, tmp_path):
    lp = randomized(
        lora.init(CFG, params, rank=4, targets=[r"layers/attn/(q|v)/kernel"]),
        jax.random.key(14),
        0.05,
    )
    lora.save_peft(CFG, lp, tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _edit_weights(path, fn):
    tensors = safetensors.numpy.load_file(str(path / "adapter_model.safetensors"))
    fn(tensors)
    safetensors.numpy.save_file(tensors, str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"peft_type": "IA3"}, "peft_type='IA3'; expected 'LORA'"),
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern=.* is not supported"),
        ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern=.* is not supported"),
        ({"bias": "lora_only"}, "bias='lora_only' is not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save=.* is not supported"),
        ({"layers_to_transform": [0]}, "layers_to_transform=.* is not supported"),
        ({"use_bdlora": {"target_modules_bd_a": ["q_proj"]}}, "use_bdlora=.* is not supported"),
        ({"r": 0}, "rank=0"),
        ({"r": 8}, r"lora_A.weight has shape \(4, 32\), expected \(8, 32\)"),
        ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, "missing tensor .*k_proj.lora_A"),
        ({"target_modules": ["q_proj"]}, "v_proj, which target_modules=.* does not select"),
        (
            {"target_modules": r"model\.layers\.0\.self_attn\.(q|v)_proj"},
            "factors for model.layers.1.self_attn.q_proj, which target_modules=.* does not select",
        ),
    ],
)
def test_load_peft_config_errors(adapter, changes, message):
    _edit_config(adapter, **changes)
    with pytest.raises(ValueError, match=message):
        lora.load_peft(CFG, adapter)


def test_load_peft_rejects_a_layer_subset(adapter):
    """PEFT can adapt some layers only; stacked jaxpost factors cover every layer."""
    _edit_config(adapter, target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj")
    _edit_weights(adapter, lambda t: [t.pop(k) for k in list(t) if ".layers.1." in k])
    with pytest.raises(ValueError, match="layers.1.self_attn.q_proj.lora_A.*every layer"):
        lora.load_peft(CFG, adapter)


def test_load_peft_weight_errors(adapter, tmp_path_factory):
    def drop(t):
        del t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]

    _edit_weights(adapter, drop)
    with pytest.raises(ValueError, match=r"missing tensor .*layers.1.self_attn.v_proj.lora_B"):
        lora.load_peft(CFG, adapter)

    def add(t):
        t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] = np.zeros((16, 4))
        t["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 32), np.float32)

    _edit_weights(adapter, add)
    with pytest.raises(ValueError, match=r"unexpected tensor 'base_model.model.lm_head.lora_A"):
        lora.load_peft(CFG, adapter)

    def layer3(t):
        del t["base_model.model.lm_head.lora_A.weight"]
        t["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"] = np.zeros((4, 32))

    _edit_weights(adapter, layer3)
    with pytest.raises(ValueError, match=r"factors for layer 3 and the model has 2 layers"):
        lora.load_peft(CFG, adapter)

    def wrong_out(t):
        del t["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"]
        t["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] = np.zeros((8, 4))

    _edit_weights(adapter, wrong_out)
    with pytest.raises(ValueError, match=r"v_proj.lora_B.weight has shape \(8, 4\), expected"):
        lora.load_peft(CFG, adapter)

    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        lora.load_peft(CFG, empty)


def test_load_peft_file_errors_say_what_the_directory_holds(adapter, tmp_path):
    named = tmp_path / "named"
    (named / "mine").mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / f).rename(named / "mine" / f)
    with pytest.raises(FileNotFoundError, match=r"named adapters in \['mine'\]"):
        lora.load_peft(CFG, named)
    assert lora.load_peft(CFG, named / "mine").rank == 4

    pickled = named / "mine"
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="adapter_model.bin .*safe_serialization=True"):
        lora.load_peft(CFG, pickled)
    (pickled / "adapter_model.bin").rename(pickled / "adapter_model.safetensors")

    (pickled / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"mine/adapter_config.json is not valid JSON"):
        lora.load_peft(CFG, pickled)


def test_load_peft_takes_lora_config_defaults_for_absent_entries(adapter):
    """peft's LoraConfig defaults (r=8, lora_alpha=8) for entries a hand-written config omits."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert lora.load_peft(CFG, adapter).alpha == 8.0


def test_save_peft_rejects_mismatched_factors(params, tmp_path):
    lp = lora.init(CFG, params, rank=4)
    bad = jax.tree.map(lambda x: x[:, :, :3] if x.shape[-1] == 4 else x, lp)
    with pytest.raises(ValueError, match=r"factor a has shape \(2, 32, 3\), expected"):
        lora.save_peft(CFG, bad, tmp_path)
    other = CFG.replace(hidden_size=48)
    with pytest.raises(ValueError, match="expected"):
        lora.save_peft(other, lp, tmp_path)


def test_an_adapter_for_another_model_is_a_clear_error_everywhere(params, tmp_path):
    """forward, merge, save_peft and the rollout engine name the mismatched factor instead of
    failing inside a scan or a broadcast; a dict that is no adapter is named too."""
    bigger = CFG.replace(num_layers=3, hidden_size=48)
    other = lora.init(bigger, models.init(bigger, jax.random.key(0)), rank=2)
    tokens = _tokens(0)
    mismatch = r"layers/attn/k/kernel factor a has shape \(3, 48, 2\), expected \(2, 32, 2\)"
    calls = {
        "forward": lambda a: forward(CFG, params, tokens, lora=a),
        "merge": lambda a: lora.merge(CFG, params, a),
        "save_peft": lambda a: lora.save_peft(CFG, a, tmp_path / "adapter"),
        "generate": lambda a: rollout.generate(
            CFG, params, [[1, 2]], rollout.SamplingParams(max_new_tokens=2), lora=a
        ),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=mismatch):
            call(other)
    for name in ("merge", "save_peft"):
        with pytest.raises(TypeError, match="expected a jaxpost.lora.LoraParams.*got dict"):
            calls[name]({"q": 1})
    for name in ("forward", "generate"):  # these also take a plain factor tree (scale 1)
        with pytest.raises(ValueError, match=r"LoRA factors must be \{'layers'"):
            calls[name]({"q": 1})
    assert not (tmp_path / "adapter").exists()  # nothing half-written


def test_lora_factors_split_over_fsdp(params):
    """Under fsdp=8 each device holds an eighth of every factor (Adam's moments take their
    factor's sharding: tests/test_steps.py::test_mesh_of_8_devices_matches_one_device): the
    factor of a pair without an embed side was replicated whole (the adapter split 1.65x over
    8 devices, audit 33). Rank 4 does not divide by 8: that factor's other side takes fsdp."""
    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    for rank in (8, 4):
        lp = lora.init(CFG, params, rank=rank, alpha=8)
        shardings = sharding.tree_shardings(lp, lora.logical_axes(lp), mesh)
        placed = jax.device_put(lp, shardings)
        for leaf in jax.tree.leaves(placed):
            per_device = {s.data.size for s in leaf.addressable_shards}
            assert per_device == {leaf.size // 8}, (rank, leaf.shape, leaf.sharding.spec)


def test_an_adapter_for_a_gemma3_hub_id_warns_that_its_layout_is_unchecked(params, tmp_path):
    """A hub id cannot be looked at offline: a multimodal Gemma 3 would need other layer names
    (test_multimodal_gemma3_adapters_apply_in_both_directions), so the export says so."""
    cfg = CFG.replace(model_type="gemma3_text")
    lp = lora.init(cfg, params, rank=4, alpha=8)
    with pytest.warns(UserWarning, match="google/gemma-3-4b-it is not a local model directory"):
        lora.save_peft(cfg, lp, tmp_path / "a", base_model_name_or_path="google/gemma-3-4b-it")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                        "up_proj", "v_proj"]  # fmt: skip


def test_forward_takes_partitioned_params(params):
    lp = randomized(lora.init(CFG, params, rank=4, alpha=8), jax.random.key(3), 0.05)
    tokens = _tokens(2)
    want = forward(CFG, params, tokens, lora=lp)
    got = forward(CFG, lora.combine(params, lp), tokens)
    assert float(jnp.max(jnp.abs(got - want))) == 0.0
    with pytest.raises(ValueError, match="pass lora= in one place"):
        forward(CFG, lora.combine(params, lp), tokens, lora=lp)
