"""Parity of the jaxpost transformer with `transformers`, for every supported family.

Each tiny random HF model (see hf_tiny.py) is saved with `save_pretrained`, loaded with
`models.load_hf`, and compared in float32 on fresh random token ids: full logits, a padded
batch, a packed row, and 20 tokens of greedy decoding with the dense KV cache and with the
rollout engine.
"""

from __future__ import annotations

import copy
import functools

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxpost import models, rollout

# One compilation per config (op-by-op eager dispatch is far slower on CPU).
jit_forward = jax.jit(models.forward, static_argnums=0)

TOL = 1e-4


@pytest.fixture(scope="module", params=hf_tiny.FAMILIES)
def loaded(request, tmp_path_factory):
    """(family, HF model, ModelConfig, params), built once per family."""
    family = request.param
    hf_model = hf_tiny.build(family)
    path = tmp_path_factory.mktemp(family)
    hf_model.save_pretrained(path)
    cfg, params = models.load_hf(path)
    return family, hf_model, cfg, params


@functools.cache
def _forward(cfg):
    return jax.jit(
        lambda p, t, s, pos: models.forward(cfg, p, t, segment_ids=s, positions=pos),
    )


def _hf_logits(hf_model, ids, mask=None, position_ids=None) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(ids),
            attention_mask=None if mask is None else torch.tensor(mask),
            position_ids=None if position_ids is None else torch.tensor(position_ids),
        )
    return out.logits.float().numpy()


def _rng(family: str, salt: int) -> np.random.Generator:
    return np.random.default_rng([hf_tiny.FAMILIES.index(family), salt])


def test_config_mapping(loaded):
    family, hf_model, cfg, params = loaded
    assert cfg.model_type == family
    hf = hf_model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (
        hf.num_hidden_layers,
        hf.hidden_size,
        hf.vocab_size,
    )
    assert cfg.tie_embeddings == bool(hf.tie_word_embeddings)
    assert ("lm_head" in params) != cfg.tie_embeddings
    if family in ("gemma2", "gemma3_text"):
        # The window must be shorter than the test sequences for the parity to mean anything.
        assert "local" in cfg.layer_types and "global" in cfg.layer_types
        assert cfg.sliding_window < 24
    if family == "mistral":
        assert set(cfg.layer_types) == {"local"} and cfg.sliding_window == 7


def test_logits_match(loaded):
    family, hf_model, cfg, params = loaded
    ids = _rng(family, 0).integers(0, hf_tiny.VOCAB, (2, 24))
    ref = _hf_logits(hf_model, ids)
    ours = np.asarray(_forward(cfg)(params, jnp.asarray(ids, jnp.int32), None, None))
    assert ours.dtype == np.float32
    # The tolerance is meaningful only if logits are not all tiny.
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_padded_batch(loaded):
    """Left- and right-padded rows: HF attention_mask vs our segment_ids and positions."""
    family, hf_model, cfg, params = loaded
    t = 24
    ids = _rng(family, 1).integers(0, hf_tiny.VOCAB, (3, t))
    mask = np.ones((3, t), np.int64)
    mask[1, :7] = 0  # left padding
    mask[2, 15:] = 0  # right padding
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = _hf_logits(hf_model, ids, mask, positions)
    ours = np.asarray(
        _forward(cfg)(
            params,
            jnp.asarray(ids, jnp.int32),
            jnp.asarray(mask, jnp.int32),
            jnp.asarray(positions, jnp.int32),
        )
    )
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() <= TOL


def test_packed_row_equals_separate_sequences(loaded):
    """One row holding three examples gives each example's logits as if run alone (HF)."""
    family, hf_model, cfg, params = loaded
    lengths = (7, 9, 8)
    rng = _rng(family, 2)
    seqs = [rng.integers(0, hf_tiny.VOCAB, (1, n)) for n in lengths]
    row = np.concatenate(seqs, axis=1)
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    ours = np.asarray(
        _forward(cfg)(
            params,
            jnp.asarray(row, jnp.int32),
            jnp.asarray(segment_ids, jnp.int32),
            jnp.asarray(positions, jnp.int32),
        )
    )[0]
    start = 0
    for seq in seqs:
        n = seq.shape[1]
        ref = _hf_logits(hf_model, seq)[0]
        np.testing.assert_allclose(ours[start : start + n], ref, atol=TOL, rtol=0)
        start += n


@functools.cache
def _decode_fns(cfg):
    prefill = jax.jit(lambda p, t, c: models.apply(cfg, p, t, cache=c))
    step = jax.jit(lambda p, t, pos, c: models.apply(cfg, p, t, positions=pos, cache=c))
    return prefill, step


def _hf_greedy(hf_model, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """transformers' greedy `generate`: the new tokens [B, new_tokens]."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor(prompts),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, prompts.shape[1] :].numpy()


def greedy(cfg, params, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy decoding with a DenseKVCache: prefill the prompts, then one token per step."""
    b, p = prompts.shape
    prefill, step = _decode_fns(cfg)
    cache = models.DenseKVCache.create(cfg, b, p + new_tokens)
    logits, cache = prefill(params, jnp.asarray(prompts, jnp.int32), cache)
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = [tok]
    for i in range(new_tokens - 1):
        pos = jnp.full((b, 1), p + i, jnp.int32)
        logits, cache = step(params, tok[:, None], pos, cache)
        tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out.append(tok)
    return np.stack([np.asarray(t) for t in out], axis=1)


def test_greedy_generation_matches_generate(loaded):
    family, hf_model, cfg, params = loaded
    prompts = _rng(family, 3).integers(0, hf_tiny.VOCAB, (2, 6))
    ref = _hf_greedy(hf_model, prompts, 20)
    assert ref.shape == (2, 20)
    ours = greedy(cfg, params, prompts, 20)
    np.testing.assert_array_equal(ours, ref)
    # The rollout engine (paged cache, its own decode step) too: 20 tokens past 6-token prompts
    # cross the sliding windows (5 and 7), so its window masking is exercised as well.
    completions = rollout.generate(
        cfg, params, prompts.tolist(), rollout.SamplingParams(temperature=0.0, max_new_tokens=20)
    )
    np.testing.assert_array_equal(np.stack([c.tokens for c in completions]), ref)


# Switches each family's parity depends on: dropping one must break the match, which shows the
# inputs above exercise it (e.g. the window is shorter than the sequence, the caps are reached).
_SWITCHES = {
    "llama": [dict(rope_scaling=None)],
    "mistral": [dict(layer_types=None, sliding_window=None)],
    "qwen2": [dict(qkv_bias=False)],
    "qwen3": [dict(qk_norm=False)],
    "gemma": [dict(embed_scale=False), dict(activation="silu")],
    "gemma2": [
        dict(layer_types=None, sliding_window=None),
        dict(attn_logit_softcap=None),
        dict(final_logit_softcap=None),
        dict(query_pre_attn_scalar=None),
    ],
    "gemma3_text": [
        dict(layer_types=None, sliding_window=None),
        dict(rope_local_theta=None),
        dict(rope_scaling=None),
        dict(qk_norm=False),
    ],
}


def test_each_family_switch_changes_logits(loaded):
    family, hf_model, cfg, params = loaded
    ids = _rng(family, 4).integers(0, hf_tiny.VOCAB, (1, 24))
    ref = _hf_logits(hf_model, ids)
    for change in _SWITCHES[family]:
        # Parameters a switch turns off (biases, q/k norms) are simply unused.
        other = cfg.replace(**change)
        diff = np.abs(
            np.asarray(jit_forward(other, params, jnp.asarray(ids, jnp.int32))) - ref
        ).max()
        assert diff > 100 * TOL, (change, diff)


def test_bfloat16_as_accurate_as_transformers(loaded, tmp_path):
    """A bf16 checkpoint loaded in bf16 is as close to the float32 logits as transformers' own
    bf16 run is (bf16 rounding differs between the two, so they cannot agree exactly)."""
    family, hf_model, _, _ = loaded
    ids = _rng(family, 5).integers(0, hf_tiny.VOCAB, (2, 24))
    ref32 = _hf_logits(hf_model, ids)
    hf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
    hf16.save_pretrained(tmp_path)
    cfg, params = models.load_hf(tmp_path, dtype="bfloat16")
    ours = np.asarray(jit_forward(cfg, params, jnp.asarray(ids, jnp.int32)))
    theirs_err = np.abs(_hf_logits(hf16, ids) - ref32).max()
    ours_err = np.abs(ours - ref32).max()
    assert 0 < ours_err <= 1.5 * theirs_err, (ours_err, theirs_err)


@pytest.mark.parametrize(
    "yarn",
    [
        {"factor": 4.0, "original_max_position_embeddings": 8},
        # DeepSeek style: mscale / mscale_all_dim, no truncation, other betas.
        {"factor": 8.0, "original_max_position_embeddings": 6, "mscale": 1.0,
         "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    ],
)  # fmt: skip
def test_yarn_rope_scaling_matches_transformers(yarn, tmp_path):
    """Qwen3 with YaRN (the long-context setting Qwen documents): frequencies and attention
    factor as transformers computes them, for the forward, greedy decoding and the engine."""
    config = hf_tiny.hf_config("qwen3")
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10_000.0, **yarn}
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf_model = hf_tiny.randomize(hf_model, gemma=False)
    hf_model.save_pretrained(tmp_path)
    cfg, params = models.load_hf(tmp_path)
    assert cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["attention_factor"] != 1.0
    ids = _rng("qwen3", 7).integers(0, hf_tiny.VOCAB, (2, 24))
    ref = _hf_logits(hf_model, ids)
    ours = np.asarray(jit_forward(cfg, params, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    plain = np.asarray(jit_forward(cfg.replace(rope_scaling=None), params, jnp.asarray(ids)))
    assert np.abs(plain - ref).max() > 100 * TOL  # YaRN changes these logits
    prompts = ids[:, :6]
    want = _hf_greedy(hf_model, prompts, 12)
    completions = rollout.generate(
        cfg, params, prompts.tolist(), rollout.SamplingParams(temperature=0.0, max_new_tokens=12)
    )
    np.testing.assert_array_equal(np.stack([c.tokens for c in completions]), want)
    assert models.config_from_hf(models.config_to_hf(cfg)).rope_scaling == cfg.rope_scaling
