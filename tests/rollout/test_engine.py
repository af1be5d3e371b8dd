"""Engine: greedy decode and log-probs against the full-forward model, LoRA, weight swaps,
tensor-parallel decode, input validation."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from jaxpost import models, rollout
from jaxpost.sharding import make_mesh

CFG = models.ModelConfig(
    vocab_size=160,
    hidden_size=48,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=12,
    qk_norm=True,
    model_type="qwen3",
)


@dataclasses.dataclass
class LoRA:
    params: dict
    scale: float


def _lora_tree(key, rank=4):
    """A LoRA tree over q, v and down with non-zero b, so it changes the model."""
    shapes = {
        ("attn", "q"): (CFG.hidden_size, CFG.num_heads * CFG.head_dim),
        ("attn", "v"): (CFG.hidden_size, CFG.num_kv_heads * CFG.head_dim),
        ("mlp", "down"): (CFG.intermediate_size, CFG.hidden_size),
    }
    tree: dict = {"layers": {"attn": {}, "mlp": {}}}
    for i, ((group, name), (din, dout)) in enumerate(shapes.items()):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        tree["layers"][group][name] = {
            "a": jax.random.normal(ka, (CFG.num_layers, din, rank)) * 0.3,
            "b": jax.random.normal(kb, (CFG.num_layers, rank, dout)) * 0.3,
        }
    return tree


@pytest.fixture(scope="module")
def params():
    # jit: one compiled program instead of many eager ops
    return jax.jit(models.init, static_argnums=0)(
        CFG, jax.random.key(np.random.SeedSequence().entropy % 2**31)
    )


REF_LEN = 64  # references pad to one length so the forward compiles once (causal: exact)


@functools.partial(jax.jit, static_argnames="scale")
def _ref_logp(params, tokens, tree, scale):
    lora = None if tree is None else LoRA(tree, scale)
    return jax.nn.log_softmax(models.forward(CFG, params, tokens, lora=lora)[0], axis=-1)


def _ref_logprobs(params, seq, lora):
    padded = np.zeros((1, REF_LEN), np.int32)
    padded[0, : len(seq)] = seq
    if lora is None:
        return np.asarray(_ref_logp(params, padded, None, 1.0))
    return np.asarray(_ref_logp(params, padded, lora.params, lora.scale))


def full_forward_greedy(params, prompt, n, lora=None):
    """Greedy decode by re-running the whole sequence each step (no cache)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(_ref_logprobs(params, seq, lora)[len(seq) - 1])))
    return seq[len(prompt) :]


def trainer_logprobs(params, prompt, completion, lora=None):
    """The trainer's log-probs of `completion` given `prompt`: log_softmax of the full forward."""
    logp = _ref_logprobs(params, list(prompt) + list(completion), lora)
    pos = np.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logp[pos, np.asarray(completion)]


def _prompts(rng, count, lo=1, hi=30):
    return [list(rng.integers(0, CFG.vocab_size, rng.integers(lo, hi))) for _ in range(count)]


def test_greedy_equals_full_forward_and_logprobs_equal_trainer(params):
    rng = np.random.default_rng()
    prompts = _prompts(rng, 5)
    sp = rollout.SamplingParams(max_new_tokens=12, temperature=0.0)
    outs = rollout.generate(CFG, params, prompts, sp, slots=4, page_size=4, steps_per_call=3)
    for prompt, out in zip(prompts, outs):
        assert out.tokens == full_forward_greedy(params, prompt, 12)
        assert out.finish_reason == "length"
        np.testing.assert_allclose(
            out.logprobs, trainer_logprobs(params, prompt, out.tokens), atol=1e-5, rtol=0
        )


def test_lora_sampled_logprobs_equal_trainer_and_update_params_does_not_recompile(params):
    """Temperature-1 sampling with unmerged LoRA; then a LoRA weight swap with no recompile."""
    rng = np.random.default_rng()
    prompts = _prompts(rng, 4)
    lora = LoRA(_lora_tree(jax.random.key(int(rng.integers(2**31)))), scale=2.0)
    sp = rollout.SamplingParams(max_new_tokens=10, temperature=1.0, seed=int(rng.integers(1000)))
    engine = rollout.Engine(
        CFG, {"base": params, "lora": lora}, slots=4, max_len=64, max_prefill_length=32, page_size=4
    )
    outs = rollout.generate(CFG, {"base": params, "lora": lora}, prompts, sp, engine=engine)
    for prompt, out in zip(prompts, outs):
        np.testing.assert_allclose(
            out.logprobs, trainer_logprobs(params, prompt, out.tokens, lora), atol=1e-5, rtol=0
        )
        # The LoRA matters: the base model gives these tokens different log-probs.
        assert (
            np.abs(np.asarray(out.logprobs) - trainer_logprobs(params, prompt, out.tokens)).max()
            > 1e-3
        )
    compiled = dict(engine.compilations)
    lora2 = LoRA(_lora_tree(jax.random.key(int(rng.integers(2**31)))), scale=2.0)
    greedy = rollout.SamplingParams(max_new_tokens=10, temperature=0.0)
    outs2 = rollout.generate(CFG, params, prompts, greedy, lora=lora2, engine=engine)
    for prompt, out in zip(prompts, outs2):
        assert out.tokens == full_forward_greedy(params, prompt, 10, lora2)
        np.testing.assert_allclose(
            out.logprobs, trainer_logprobs(params, prompt, out.tokens, lora2), atol=1e-5, rtol=0
        )
    # Greedy is a new sampler variant (one compile); the weight swap itself adds none.
    assert engine.compilations["prefill"] == compiled["prefill"]
    assert engine.compilations["generate"] == compiled["generate"] + 1
    outs3 = rollout.generate(CFG, params, prompts, greedy, lora=lora, engine=engine)
    assert engine.compilations["generate"] == compiled["generate"] + 1
    assert [o.tokens for o in outs3] == [full_forward_greedy(params, p, 10, lora) for p in prompts]


def test_tensor_parallel_decode_gives_the_same_tokens(params):
    rng = np.random.default_rng()
    prompts = _prompts(rng, 6)
    sp = rollout.SamplingParams(max_new_tokens=8, temperature=0.0)
    mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
    sharded = rollout.generate(CFG, params, prompts, sp, slots=4, page_size=4, mesh=mesh)
    single = rollout.generate(CFG, params, prompts, sp, slots=4, page_size=4)
    assert [o.tokens for o in sharded] == [o.tokens for o in single]
    engine = rollout.Engine(CFG, params, slots=4, max_len=64, max_prefill_length=32, mesh=mesh)
    state = engine.init_decode_state()
    # The pages really are split over the tensor axis (one KV head per device).
    assert state.cache.k_pages.sharding.spec[1] == "tensor"
    q = engine.params["base"]["layers"]["attn"]["q"]["kernel"]
    assert len({s.device for s in q.addressable_shards}) == 2


def test_bad_inputs_raise_clear_errors(params):
    with pytest.raises(ValueError, match="temperature=-0.5 must be >= 0"):
        rollout.SamplingParams(temperature=-0.5)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"top_p=.* must be in \(0, 1\]"):
            rollout.SamplingParams(top_p=top_p)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
        rollout.SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        rollout.generate(CFG, params, [[1, 2], []], rollout.SamplingParams(max_new_tokens=2))
    engine = rollout.Engine(CFG, params, slots=2, max_len=64, max_prefill_length=16)
    with pytest.raises(ValueError, match="prompt 0 has 17 tokens; the engine's max_prefill_length"):
        rollout.generate(CFG, params, [[1] * 17], engine=engine)
    with pytest.raises(ValueError, match=r"token id 999; expected ids in \[0, 160\)"):
        rollout.generate(CFG, params, [[1, 999]], engine=engine)
    with pytest.raises(ValueError, match="exceeds max_prefill_length=16"):
        engine.prefill(params=engine.params, padded_tokens=np.zeros(32, np.int32), true_length=3)
