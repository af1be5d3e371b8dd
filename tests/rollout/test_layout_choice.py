"""The engine's CPU weight layout: measured once per machine and shape, stored, reused; the
static rule on near ties and in multi-process runs (`rollout.layout_choice`)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxpost import models, rollout
from jaxpost.rollout import layout_choice, weights

CFG = models.ModelConfig(
    vocab_size=160, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=12, qk_norm=True, model_type="qwen3", tie_embeddings=True,
)  # fmt: skip


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory and no in-process memory of earlier decisions."""
    monkeypatch.setenv("JAXPOST_CACHE_DIR", str(tmp_path))
    layout_choice._measured.cache_clear()
    yield tmp_path / layout_choice.CACHE_FILE
    layout_choice._measured.cache_clear()


def _timings(monkeypatch, seconds):
    calls = []

    def fake(shapes, layers, hidden, head_rows, dtype, slots):
        calls.append((layers, head_rows, slots))
        return seconds

    monkeypatch.setattr(layout_choice, "time_layouts", fake)
    return calls


def test_faster_layout_is_chosen_stored_and_reused_without_measuring(cache, monkeypatch):
    # Two slots: the static rule says [out, in]; the measurement finds [in, out] 2x faster.
    calls = _timings(monkeypatch, {False: 1.0, True: 2.0})
    assert layout_choice.static(2, CFG.dtype) is True
    assert layout_choice.measured(CFG, 2) is False
    assert calls == [(2, 160, 2)]  # every layer and the whole head of a small model
    (entry,) = json.loads(cache.read_text()).values()
    assert entry == {"decode_layout": False, "seconds [in, out]": 1.0, "seconds [out, in]": 2.0}
    # A new process (no in-process memory) reads the file instead of measuring again.
    layout_choice._measured.cache_clear()
    calls.clear()
    monkeypatch.setattr(layout_choice, "time_layouts", None)  # would fail if called
    assert layout_choice.measured(CFG, 2) is False
    # The engine's default follows the stored choice; head_copy follows the layout.
    assert weights.default_layouts(CFG, 2, True, None, None) == (False, True)
    # Other shapes are other entries.
    _timings(monkeypatch, {False: 2.0, True: 1.0})
    assert layout_choice.measured(CFG, 1) is True
    assert len(json.loads(cache.read_text())) == 2


def test_near_tie_keeps_the_static_rule(cache, monkeypatch):
    _timings(monkeypatch, {False: 1.0, True: 1.04})  # [in, out] 4% faster: within the margin
    assert layout_choice.measured(CFG, 2) is True  # static: [out, in] for more than one slot
    assert layout_choice.static(1, "bfloat16") is True
    assert layout_choice.static(1, CFG.dtype) is False
    _timings(monkeypatch, {False: 1.04, True: 1.0})
    assert layout_choice.measured(CFG, 1) is False


def test_damaged_cache_file_is_measured_again_and_rewritten(cache, monkeypatch):
    cache.write_text("{not json")
    calls = _timings(monkeypatch, {False: 3.0, True: 1.0})
    assert layout_choice.measured(CFG, 1) is True
    assert len(calls) == 1 and len(json.loads(cache.read_text())) == 1
    # A damaged entry for this very shape is measured again too.
    (key,) = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: {"decode_layout": "yes"}}))
    layout_choice._measured.cache_clear()
    assert layout_choice.measured(CFG, 1) is True and len(calls) == 2
    assert json.loads(cache.read_text())[key]["decode_layout"] is True


def test_large_models_are_measured_on_a_bounded_slice(cache, monkeypatch):
    mid = models.ModelConfig(vocab_size=128_000, hidden_size=1024, intermediate_size=2816,
                             num_layers=24, num_heads=16, num_kv_heads=4, head_dim=64)  # fmt: skip
    calls = _timings(monkeypatch, {False: 1.0, True: 1.0})
    layout_choice.measured(mid, 16)
    ((layers, head_rows, _),) = calls
    layer_bytes = sum(k * n for k, n in layout_choice.layer_shapes(mid)) * 4  # 45 MB
    half = layout_choice.PROBE_BYTES // 2
    assert layers == 2 and layers * layer_bytes <= half < (layers + 1) * layer_bytes
    assert head_rows * 1024 * 4 <= half < (head_rows + 1) * 1024 * 4
    # One layer at least, even past the budget (an 8B layer holds 872 MB in float32).
    big = dataclasses.replace(mid, hidden_size=4096, intermediate_size=14336, num_heads=32,
                              num_kv_heads=8, head_dim=128, num_layers=32)  # fmt: skip
    calls.clear()
    layout_choice.measured(big, 16)
    assert calls[0][0] == 1


def test_multi_process_runs_use_the_static_rule(cache, monkeypatch):
    _timings(monkeypatch, {False: 1.0, True: 5.0})
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert weights.default_layouts(CFG, 2, True, None, None) == (True, False)
    assert not cache.exists()


def test_measurement_times_both_layouts_and_the_engine_decodes_from_its_choice(cache):
    seconds = layout_choice.time_layouts(layout_choice.layer_shapes(CFG), 2, 48, 160, "float32",
                                         4, rounds=2)  # fmt: skip
    assert set(seconds) == {False, True} and all(0 < s < 1 for s in seconds.values())
    params = jax.jit(models.init, static_argnums=0)(CFG, jax.random.key(0))
    engine = rollout.Engine(CFG, params, slots=4, max_len=32, max_prefill_length=8, page_size=4)
    assert engine.decode_layout == layout_choice.measured(CFG, 4)
    assert (engine.params["head"] is not None) == (not engine.decode_layout)
    # Either layout decodes the same greedy tokens.
    prompts = [[1, 2, 3], [5, 7]]
    greedy = rollout.SamplingParams(max_new_tokens=6, temperature=0.0)
    outs = {}
    for layout in (False, True):
        other = rollout.Engine(CFG, params, slots=4, max_len=32, max_prefill_length=8,
                               page_size=4, decode_layout=layout)  # fmt: skip
        outs[layout] = rollout.generate(CFG, params, prompts, greedy, engine=other)
    for a, b in zip(outs[False], outs[True]):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
