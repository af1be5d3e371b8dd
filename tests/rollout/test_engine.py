"""Engine: greedy decode and log-probs against the full-forward model, LoRA, weight swaps,
tensor-parallel decode, input validation."""

import dataclasses
import gc
import weakref

import jax
import numpy as np
import optax
import pytest

from jaxpost import lora, models, nf4, rollout, steps
from jaxpost.losses import sft_loss
from jaxpost.losses.logprobs import token_logprobs
from jaxpost.rollout import api
from jaxpost.rollout.state import prefill_batch_pieces
from jaxpost.sharding import make_mesh, tree_shardings

from tiny_models import randomized

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


def _lora(params, key, rank=4):
    """A jaxpost.lora adapter on q, v and down with random a and b, so it changes the model."""
    targets = ("layers/attn/(q|v)/kernel", "layers/mlp/down/kernel")
    return randomized(lora.init(CFG, params, rank=rank, alpha=8.0, targets=targets), key, 0.3)


@pytest.fixture(scope="module")
def params():
    # jit: one compiled program instead of many eager ops
    return jax.jit(models.init, static_argnums=0)(
        CFG, jax.random.key(np.random.SeedSequence().entropy % 2**31)
    )


REF_LEN = 64  # references pad to one length so the forward compiles once (causal: exact)


@jax.jit
def _trainer_logp(params, adapter, tokens):
    """The trainer's per-token log-probs (`token_logprobs`) of every next token."""
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    return token_logprobs(CFG, {"base": params, "lora": adapter}, batch)["logp"][0]


@jax.jit
def _forward_logits(params, adapter, tokens):
    return models.forward(CFG, params, tokens, lora=adapter)[0]


def _padded(seq):
    padded = np.zeros((1, REF_LEN), np.int32)
    padded[0, : len(seq)] = seq
    return padded


def full_forward_greedy(params, prompt, n, adapter=None):
    """Greedy decode by re-running the whole sequence each step (no cache)."""
    seq = list(prompt)
    for _ in range(n):
        logits = _forward_logits(params, adapter, _padded(seq))
        seq.append(int(np.argmax(logits[len(seq) - 1])))
    return seq[len(prompt) :]


def trainer_logprobs(params, prompt, completion, adapter=None):
    """log p(completion_i | prompt, completion_<i) from `jaxpost.losses.logprobs.token_logprobs`."""
    logp = np.asarray(_trainer_logp(params, adapter, _padded(list(prompt) + list(completion))))
    return logp[np.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)]


def _prompts(rng, count, lo=1, hi=30):
    return [list(rng.integers(0, CFG.vocab_size, rng.integers(lo, hi))) for _ in range(count)]


@pytest.mark.parametrize("pool", ["slot-regions", "free-list"])
@pytest.mark.parametrize("scan_layers", [True, False], ids=["stacked-pools", "per-layer-pools"])
def test_greedy_equals_full_forward_and_logprobs_equal_trainer(params, scan_layers, pool):
    """Both cache layouts: pools stacked [L, ...] under the layer scan (written in place in the
    carry), or one pool and one weight buffer per layer under the unrolled loop. Both pools:
    the default slot regions, whose decode attention reads them in place once the table is half
    used (and gathers before), and a free list smaller than slots x max_len (pages scattered)."""
    rng = np.random.default_rng()
    prompts = _prompts(rng, 4, hi=9) + _prompts(rng, 1, lo=20)  # short ones first, one long
    sp = rollout.SamplingParams(max_new_tokens=12, temperature=0.0)
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    num_pages = None if pool == "slot-regions" else 40
    engine = rollout.Engine(cfg, params, slots=4, max_len=64, max_prefill_length=32, page_size=4,
                            steps_per_call=3, num_pages=num_pages)  # fmt: skip
    assert engine.slot_regions == (pool == "slot-regions")
    assert isinstance(engine.init_decode_state().cache.k_pages, tuple) == (not scan_layers)
    outs = rollout.generate(cfg, params, prompts, sp, engine=engine)
    widths = {int(name.split(":")[-1]) for name in engine._jit_cache if name.startswith("gen")}
    if engine.slot_regions:  # both reads ran: gathered (width < 8) and in place (all 16)
        assert 16 in widths and min(widths) < 8 and not widths & {8, 12}
    for prompt, out in zip(prompts, outs):
        assert out.tokens == full_forward_greedy(params, prompt, 12)
        assert out.finish_reason == "length"
        np.testing.assert_allclose(
            out.logprobs, trainer_logprobs(params, prompt, out.tokens), atol=1e-5, rtol=0
        )


def test_nf4_base_in_decode_layout_gives_the_model_tokens(params):
    """QLoRA's base in the engine: the MLP kernels NF4 (left quantized by the decode layout),
    the attention kernels and LM head transposed; greedy tokens equal the full forward's on the
    same quantized params, and the log-probs the trainer's."""
    quantized = jax.jit(lambda p: nf4.quantize_base(CFG, p, targets=[r"layers/mlp/.*/kernel"]))(
        params
    )
    engine = rollout.Engine(CFG, quantized, slots=2, max_len=48, max_prefill_length=16,
                            page_size=4, steps_per_call=4, decode_layout=True)  # fmt: skip
    layers = engine.params["base"]["layers"]
    layer = layers[0] if isinstance(layers, tuple) else layers
    assert nf4.KERNEL_KEY in layer["mlp"]["up"] and "kernel_t" in layer["attn"]["q"]
    prompts = _prompts(np.random.default_rng(2), 3, hi=16)
    sp = rollout.SamplingParams(max_new_tokens=8, temperature=0.0)
    outs = rollout.generate(CFG, quantized, prompts, sp, engine=engine)
    for prompt, out in zip(prompts, outs):
        assert out.tokens == full_forward_greedy(quantized, prompt, 8)
        np.testing.assert_allclose(
            out.logprobs, trainer_logprobs(quantized, prompt, out.tokens), atol=1e-5, rtol=0
        )
    # On a mesh the quantized trees are placed by their own logical axes, codes split.
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    on_mesh = rollout.generate(CFG, quantized, prompts, sp, mesh=mesh, slots=2, page_size=4)
    assert [o.tokens for o in on_mesh] == [o.tokens for o in outs]


def test_lora_sampled_logprobs_equal_trainer_and_update_params_does_not_recompile(params):
    """Temperature-1 sampling with unmerged LoRA; then a LoRA weight swap with no recompile."""
    rng = np.random.default_rng()
    prompts = _prompts(rng, 4)
    adapter = _lora(params, jax.random.key(int(rng.integers(2**31))))
    sp = rollout.SamplingParams(max_new_tokens=10, temperature=1.0, seed=int(rng.integers(1000)))
    engine = rollout.Engine(
        CFG,
        {"base": params, "lora": adapter},
        slots=4,
        max_len=64,
        max_prefill_length=32,
        page_size=4,
    )
    outs = rollout.generate(CFG, {"base": params, "lora": adapter}, prompts, sp, engine=engine)
    for prompt, out in zip(prompts, outs):
        np.testing.assert_allclose(
            out.logprobs, trainer_logprobs(params, prompt, out.tokens, adapter), atol=1e-5, rtol=0
        )
        # The LoRA matters: the base model gives these tokens different log-probs.
        assert (
            np.abs(np.asarray(out.logprobs) - trainer_logprobs(params, prompt, out.tokens)).max()
            > 1e-3
        )
    compiled = dict(engine.compilations)
    adapter2 = _lora(params, jax.random.key(int(rng.integers(2**31))))
    greedy = rollout.SamplingParams(max_new_tokens=10, temperature=0.0)
    outs2 = rollout.generate(CFG, params, prompts, greedy, lora=adapter2, engine=engine)
    for prompt, out in zip(prompts, outs2):
        assert out.tokens == full_forward_greedy(params, prompt, 10, adapter2)
        np.testing.assert_allclose(
            out.logprobs, trainer_logprobs(params, prompt, out.tokens, adapter2), atol=1e-5, rtol=0
        )
    # Greedy is a new sampler variant: one compile per page-table width the first run used
    # (same prompts and lengths, so the same widths); the weight swap itself adds none.
    assert engine.compilations["prefill"] == compiled["prefill"]
    assert engine.compilations["generate"] == 2 * compiled["generate"]
    outs3 = rollout.generate(CFG, params, prompts, greedy, lora=adapter, engine=engine)
    assert engine.compilations["generate"] == 2 * compiled["generate"]
    want3 = [full_forward_greedy(params, p, 10, adapter) for p in prompts]
    assert [o.tokens for o in outs3] == want3
    # A driver built once (an RL loop's) follows the engine's weight syncs.
    driver = rollout.Driver(engine)
    requests = [rollout.Request(p, greedy) for p in prompts]
    engine.update_params(params, lora=adapter2)
    assert [o[0].tokens for o in driver.run(requests)] == [o.tokens for o in outs2]
    engine.update_params(params, lora=adapter)
    assert [o[0].tokens for o in driver.run(requests)] == want3


def test_lora_on_a_mesh_is_whole_on_every_device_and_decodes_as_on_one(params):
    """On a (1, 2, 2) mesh the engine keeps its own copy of the LoRA factors, whole on every
    device (`rollout.weights`: split, they would cost collectives at every decode step), and
    decode gives the single-device tokens and the trainer's log-probs; a sync of other factors
    recompiles nothing."""
    rng = np.random.default_rng()
    adapter = _lora(params, jax.random.key(int(rng.integers(2**31))))
    adapter2 = _lora(params, jax.random.key(int(rng.integers(2**31))))
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    prompts = _prompts(rng, 3)
    sp = rollout.SamplingParams(max_new_tokens=8, temperature=0.0)
    single = rollout.generate(CFG, params, prompts, sp, lora=adapter, slots=2, page_size=4)
    placed = jax.device_put(adapter, tree_shardings(adapter, lora.logical_axes(adapter), mesh))
    engine = rollout.Engine(CFG, {"base": params, "lora": placed}, slots=2, max_len=64,
                            max_prefill_length=32, page_size=4, mesh=mesh)  # fmt: skip
    got = engine.params["lora"]
    pointer = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()
    for mine, theirs in zip(jax.tree.leaves(got), jax.tree.leaves(placed.params)):
        assert mine.sharding.is_fully_replicated and len(mine.addressable_shards) == 4
        assert pointer(mine) != pointer(theirs)  # a copy, not the trainer's buffer
    outs = rollout.generate(CFG, params, prompts, sp, lora=adapter, engine=engine)
    assert [o.tokens for o in outs] == [o.tokens for o in single]
    for prompt, out in zip(prompts, outs):
        np.testing.assert_allclose(
            out.logprobs, trainer_logprobs(params, prompt, out.tokens, adapter), atol=1e-5, rtol=0
        )
    compiled = dict(engine.compilations)
    # A plain factor tree (scale 1, no kernel axes of its own) is placed the same way; the
    # generate below syncs adapter2 again as a LoraParams and decodes from that.
    engine.update_params(params, lora=adapter2.params)
    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    assert shardings(engine.params["lora"]) == shardings(got)
    outs2 = rollout.generate(CFG, params, prompts, sp, lora=adapter2, engine=engine)
    assert engine.compilations == compiled
    want2 = rollout.generate(CFG, params, prompts, sp, lora=adapter2, slots=2, page_size=4)
    assert [o.tokens for o in outs2] == [o.tokens for o in want2]


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_after_a_train_step_the_engine_decodes_or_says_to_sync(params, trainable):
    """The engine decodes from the trainer's own base arrays where it needs no copy (stacked,
    in the trained layout). A LoRA step keeps the base and the engine copied its factors, so
    it goes on decoding the adapter it was given; a full step donates the base, and decoding
    then says to sync. After `update_params(state.params)` it decodes the trained weights."""
    rng = np.random.default_rng()
    copy = lambda tree: jax.tree.map(np.array, tree)
    adapter = _lora(params, jax.random.key(int(rng.integers(2**31))))
    start = {"base": copy(params), "lora": copy(adapter) if trainable == "lora" else None}
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state = steps.init_train_state(CFG, start, optax.sgd(0.5), one, trainable=trainable)
    engine = rollout.Engine(CFG, state.params, slots=2, max_len=64, max_prefill_length=32,
                            page_size=4, decode_layout=False)  # fmt: skip
    # The base is the trainer's own: the same buffers.
    pointer = lambda x: x.unsafe_buffer_pointer()
    trainer_base = jax.tree.map(pointer, state.params["base"])
    assert jax.tree.map(pointer, engine.params["base"]) == trainer_base
    driver = rollout.Driver(engine)
    prompts = _prompts(rng, 2)
    requests = [rollout.Request(p, rollout.SamplingParams(max_new_tokens=6, temperature=0.0))
                for p in prompts]  # fmt: skip
    first = adapter if trainable == "lora" else None
    want = [full_forward_greedy(params, p, 6, first) for p in prompts]
    assert [o[0].tokens for o in driver.run(requests)] == want
    tokens = rng.integers(0, CFG.vocab_size, (2, 16)).astype(np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((2, 15), np.float32)}  # fmt: skip
    step = steps.make_train_step(CFG, sft_loss, optax.sgd(0.5), one, trainable=trainable)
    before = state.params["base"]
    state, _ = step(state, batch)
    if trainable == "lora":
        assert state.params["base"] is before  # the same arrays, not deleted
        assert [o[0].tokens for o in driver.run(requests)] == want
    else:
        with pytest.raises(RuntimeError, match=r"call engine.update_params\(state.params\)"):
            driver.run(requests)
    engine.update_params(state.params)
    base, trained = state.params["base"], state.params["lora"]
    for prompt, out in zip(prompts, driver.run(requests)):
        got = out[0]
        assert got.tokens == full_forward_greedy(base, prompt, 6, trained)
        np.testing.assert_allclose(
            got.logprobs, trainer_logprobs(base, prompt, got.tokens, trained), atol=1e-5, rtol=0
        )
    # The step moved the weights: the engine decodes the trained ones, not the first.
    moved = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
        (base, trained), (params, first)
    )  # fmt: skip
    assert max(jax.tree.leaves(moved)) > 1e-3, moved


def test_an_engine_without_a_mesh_takes_weights_laid_out_over_one_without_recompiling(params):
    """A trainer's weights on a (2, 2, 2) mesh, synced into an engine built without a mesh:
    the engine moves them to its device, so decoding compiles nothing new and gives the same
    tokens."""
    rng = np.random.default_rng()
    adapter = _lora(params, jax.random.key(int(rng.integers(2**31))))
    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    spread = jax.device_put(params, tree_shardings(params, models.logical_axes(CFG), mesh))
    spread_lora = jax.device_put(adapter, tree_shardings(adapter, lora.logical_axes(adapter), mesh))
    engine = rollout.Engine(CFG, params, lora=adapter, slots=2, max_len=64,
                            max_prefill_length=32, page_size=4)  # fmt: skip
    prompts = _prompts(rng, 3)
    sp = rollout.SamplingParams(max_new_tokens=6, temperature=0.0)
    first = [
        o.tokens for o in rollout.generate(CFG, params, prompts, sp, lora=adapter, engine=engine)
    ]
    compiled = dict(engine.compilations)
    again = rollout.generate(CFG, spread, prompts, sp, lora=spread_lora, engine=engine)
    assert [o.tokens for o in again] == first
    assert engine.compilations == compiled
    device = jax.local_devices()[0]
    for x in jax.tree.leaves((engine.params["base"], engine.params["lora"])):
        assert x.devices() == {device}


def test_lora_greedy_with_per_layer_pools_and_weights(params):
    """Unrolled layers: base and LoRA unstacked to one buffer per layer, same greedy tokens."""
    rng = np.random.default_rng()
    adapter = _lora(params, jax.random.key(int(rng.integers(2**31))))
    cfg = dataclasses.replace(CFG, scan_layers=False)
    prompts = _prompts(rng, 3)
    sp = rollout.SamplingParams(max_new_tokens=8, temperature=0.0)
    engine = rollout.Engine(cfg, {"base": params, "lora": adapter}, slots=2, max_len=64,
                            max_prefill_length=32, page_size=4)  # fmt: skip
    assert isinstance(engine.params["base"]["layers"], tuple)
    assert isinstance(engine.params["lora"]["layers"], tuple)
    outs = rollout.generate(cfg, {"base": params, "lora": adapter}, prompts, sp, engine=engine)
    for prompt, out in zip(prompts, outs):
        assert out.tokens == full_forward_greedy(params, prompt, 8, adapter)
    # The engine's own loaded weights back (per-layer trees here) are taken as they are.
    again = rollout.generate(cfg, engine.params, prompts, sp, engine=engine)
    assert [o.tokens for o in again] == [o.tokens for o in outs]


def test_generate_reuses_a_cached_engine_at_least_as_large(params):
    """An RL loop whose prompt lengths vary: a smaller call reuses the larger cached engine
    (no new engine: its pools and compiled programs serve it) and gets the model's tokens."""
    api._ENGINES.clear()
    rng = np.random.default_rng()
    sp = rollout.SamplingParams(max_new_tokens=6, temperature=0.0)
    long_prompts = _prompts(rng, 2, lo=40, hi=50)
    rollout.generate(CFG, params, long_prompts, sp, slots=2, page_size=4)
    (engine,) = api._ENGINES.values()
    for length in (3, 12, 20):
        prompts = _prompts(rng, 2, lo=length, hi=length + 1)
        outs = rollout.generate(CFG, params, prompts, sp, slots=2, page_size=4)
        assert list(api._ENGINES.values()) == [engine]
        for prompt, out in zip(prompts, outs):
            assert out.tokens == full_forward_greedy(params, prompt, 6)
    # A call needing a larger engine than any cached one builds it.
    rollout.generate(CFG, params, long_prompts, dataclasses.replace(sp, max_new_tokens=40),
                     slots=2, page_size=4)  # fmt: skip
    assert len(api._ENGINES) == 2
    # clear_cache lets them go (weights, KV pages, compiled steps): nothing else holds them.
    ref = weakref.ref(engine)
    del engine
    rollout.clear_cache()
    gc.collect()
    assert not api._ENGINES and ref() is None


def test_tensor_parallel_decode_gives_the_same_tokens(params):
    rng = np.random.default_rng()
    prompts = _prompts(rng, 6)
    sp = rollout.SamplingParams(max_new_tokens=8, temperature=0.0)
    mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
    sharded = rollout.generate(CFG, params, prompts, sp, slots=4, page_size=4, mesh=mesh)
    single = rollout.generate(CFG, params, prompts, sp, slots=4, page_size=4)
    assert [o.tokens for o in sharded] == [o.tokens for o in single]
    # A second call with the same sizes reuses the cached engine: nothing recompiles.
    engine = next(reversed(api._ENGINES.values()))
    before = dict(engine.compilations)
    again = rollout.generate(CFG, params, prompts, sp, slots=4, page_size=4)
    assert [o.tokens for o in again] == [o.tokens for o in single]
    assert engine.compilations == before
    # Another order batches the prefills differently; the completions do not change.
    swapped = rollout.generate(CFG, params, prompts[::-1], sp, slots=4, page_size=4)
    assert [o.tokens for o in swapped] == [o.tokens for o in single][::-1]
    for decode_layout in (True, False):  # the CPU default is measured (`rollout.layout_choice`)
        engine = rollout.Engine(CFG, params, slots=4, max_len=64, max_prefill_length=32,
                                mesh=mesh, decode_layout=decode_layout)  # fmt: skip
        state = engine.init_decode_state()
        # The pages really are split over the tensor axis (one KV head per device).
        assert state.cache.k_pages.sharding.spec[1] == "tensor"
        # Either layout keeps the weights' split: q [embed, heads] or, transposed, [heads, embed],
        # heads on tensor.
        heads, embed = CFG.num_heads * CFG.head_dim, CFG.hidden_size
        q = engine.params["base"]["layers"]["attn"]["q"]["kernel_t" if decode_layout else "kernel"]
        shape, axis = ((heads, embed), 1) if decode_layout else ((embed, heads), 2)
        assert q.shape == (CFG.num_layers, *shape)
        assert q.sharding.spec[axis] == "tensor"
        assert len({s.device for s in q.addressable_shards}) == 2
        out = rollout.generate(CFG, params, prompts, sp, engine=engine)
        assert [o.tokens for o in out] == [o.tokens for o in single]


def test_decode_on_a_3_axis_mesh_reshards_nothing_by_replication(params, capfd):
    """On data=2, fsdp=2, tensor=2 XLA partitions prefill and decode without its last resort,
    replicating a tensor to reshard it (it did so for the few rows a decode step looks up in
    the split embedding table; it reports each case on stderr), and the tokens are one
    device's."""
    rng = np.random.default_rng()
    prompts = _prompts(rng, 4)
    sp = rollout.SamplingParams(max_new_tokens=6, temperature=0.0)
    single = rollout.generate(CFG, params, prompts, sp, slots=4, page_size=4)
    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    capfd.readouterr()
    sharded = rollout.generate(CFG, params, prompts, sp, slots=4, page_size=4, mesh=mesh)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    assert [o.tokens for o in sharded] == [o.tokens for o in single]


def test_bad_inputs_raise_clear_errors(params):
    for t in (-0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"temperature={t} must be finite and >= 0"):
            rollout.SamplingParams(temperature=t)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"top_p=.* must be in \(0, 1\]"):
            rollout.SamplingParams(top_p=top_p)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
        rollout.SamplingParams(max_new_tokens=0)
    # Types: one eos id is accepted (as transformers' eos_token_id); a flat stop list is
    # ambiguous and refused with both readings; a missing number is named.
    assert rollout.SamplingParams(eos_token_ids=np.int64(2), stop=[[5, 6]]).eos_token_ids == (2,)
    for kwargs, message in [
        (
            dict(stop=(5, 6)),
            r"stop=\(5, 6\) is a flat list of ids; .* \[\[5, 6\]\] or \[\[5\], \[6\]\]",
        ),
        (dict(stop=["</s>"]), "holds strings"),
        (dict(temperature=None), "temperature=None must be a number"),
        (dict(eos_token_ids="2"), "eos_token_ids='2' must be a token id or a sequence of ids"),
        (dict(n=2.0), "n=2.0 must be an integer"),
        (dict(eos_token_ids=range(9)), "9 eos_token_ids; at most 8"),
    ]:
        with pytest.raises(ValueError, match=message):
            rollout.SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        rollout.generate(CFG, params, [[1, 2], []], rollout.SamplingParams(max_new_tokens=2))
    # The model's position range bounds prompt and completion (vLLM's max_model_len): a longer
    # prompt is refused, a completion reaching it ends there.
    short = CFG.replace(max_position_embeddings=24)
    with pytest.raises(ValueError, match=r"prompt 0 has 24 tokens; the longest that leaves a "
                       r"position to generate \(max_position_embeddings=24\) is 23"):  # fmt: skip
        rollout.generate(short, params, [[1] * 24])
    out = rollout.generate(short, params, [[1] * 23], rollout.SamplingParams(max_new_tokens=9))
    assert len(out[0].tokens) == 1 and out[0].finish_reason == "length"
    out = rollout.generate(short, params, [[1] * 20], rollout.SamplingParams(max_new_tokens=9))
    assert len(out[0].tokens) == 4 and out[0].finish_reason == "length"
    engine = rollout.Engine(CFG, params, slots=2, max_len=64, max_prefill_length=16)
    with pytest.raises(ValueError, match="prompt 0 has 17 tokens; the engine's max_prefill_length"):
        rollout.generate(CFG, params, [[1] * 17], engine=engine)
    with pytest.raises(ValueError, match=r"token id 999; expected ids in \[0, 160\)"):
        rollout.generate(CFG, params, [[1, 999]], engine=engine)
    with pytest.raises(ValueError, match=r"request 0: eos_token_ids \[999, -1\] are outside"):
        sp = rollout.SamplingParams(eos_token_ids=(3, 999, -1))
        rollout.generate(CFG, params, [[1, 2]], sp, engine=engine)
    with pytest.raises(TypeError, match="prompt 1 is not a flat sequence of integer token ids"):
        rollout.generate(CFG, params, [[1, 2], [1.5, 2.0]], engine=engine)
    with pytest.raises(TypeError, match="prompt 0 is int 1, not a sequence of token ids"):
        rollout.generate(CFG, params, [1, 2, 3])  # one prompt passed without its list
    with pytest.raises(TypeError, match="prompt 0 is str 'hello', not a sequence of token ids"):
        rollout.generate(CFG, params, ["hello"])
    with pytest.raises(ValueError, match="exceeds max_prefill_length=16"):
        engine.prefill(params=engine.params, padded_tokens=np.zeros(32, np.int32), true_length=3)
    ones = np.ones(16, np.int32)
    prefix = engine.prefill(params=engine.params, padded_tokens=ones, true_length=16)
    for _ in range(3):  # a conversation of 64 tokens: max_len
        prefix = engine.prefill(
            params=engine.params, existing_prefix=prefix, padded_tokens=ones, true_length=16
        )
    assert prefix.true_length == 64
    with pytest.raises(ValueError, match=r"64 tokens \+ 1 new tokens = 65 exceeds max_len=64"):
        engine.prefill(
            params=engine.params, existing_prefix=prefix, padded_tokens=ones, true_length=1
        )
    # More eos ids than a slot holds on device are refused by SamplingParams (above), before any
    # prefill; the engine keeps its own check (a parameters object built around the check is
    # refused before the slot is admitted).
    state = engine.init_decode_state()
    many_eos = rollout.SamplingParams(max_new_tokens=2)
    object.__setattr__(many_eos, "eos_token_ids", tuple(range(9)))
    with pytest.raises(ValueError, match="9 eos_token_ids; at most 8"):
        short = engine.prefill(params=engine.params, padded_tokens=ones, true_length=4)
        engine.insert(short, state, 0, sampling=many_eos)
    assert not engine.book.active.any() and engine.unreserved_pages() == engine.num_pages


def test_greedy_tokens_are_the_same_with_the_paged_kernel_forced_on(params):
    """attention_impl="pallas" routes decode through the Pallas paged-attention kernel (and the
    prefill through the flash kernel), in interpret mode on CPU: same greedy tokens."""
    rng = np.random.default_rng()
    prompts = _prompts(rng, 3, lo=3, hi=12)  # lengths cross the 4-token page boundary
    sp = rollout.SamplingParams(max_new_tokens=6, temperature=0.0)
    kwargs = dict(slots=2, page_size=4, steps_per_call=3)
    ref = rollout.generate(CFG, params, prompts, sp, **kwargs)
    kernel_cfg = CFG.replace(attention_impl="pallas")
    got = rollout.generate(kernel_cfg, params, prompts, sp, **kwargs)
    for r, g in zip(ref, got):
        assert g.tokens == r.tokens
        np.testing.assert_allclose(g.logprobs, r.logprobs, atol=1e-5, rtol=0)


def test_prefill_batch_pieces_pad_at_most_a_quarter_of_a_call():
    """Every count of prompts up to the slots is covered exactly, by calls whose rows (a power
    of two, at most slots) are at most a quarter padding."""
    for slots in (1, 4, 6, 16):
        for count in range(1, slots + 1):
            pieces = prefill_batch_pieces(count, slots)
            assert sum(pieces) == count and all(p >= 1 for p in pieces)
            for p in pieces:
                rows = min(1 << (p - 1).bit_length(), slots)
                assert rows - p <= rows // 4, (slots, count, pieces)
    assert prefill_batch_pieces(9, 16) == [8, 1] and prefill_batch_pieces(10, 16) == [8, 2]
    assert prefill_batch_pieces(3, 16) == [3] and prefill_batch_pieces(12, 16) == [12]


def test_prefill_many_equals_one_prompt_at_a_time(params):
    """Batched prefill (the driver's path) gives each prompt the prefix of a lone prefill.
    Five prompts go as calls of 4 and 1 rows (8 rows would be 3 of padding)."""
    rng = np.random.default_rng()
    engine = rollout.Engine(CFG, params, slots=8, max_len=64, max_prefill_length=32, page_size=4)
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (3, 17, 9, 5, 12)]
    many = engine.prefill_many(params=engine.params, prompts=prompts)
    assert [p.k.shape[0] for p in many] == [4, 4, 4, 4, 1]
    assert [int(p.row) for p in many] == [0, 1, 2, 3, 0]
    for prompt, got in zip(prompts, many):
        padded = np.zeros(32, np.int32)
        padded[: len(prompt)] = prompt
        alone = engine.prefill(params=engine.params, padded_tokens=padded, true_length=len(prompt))
        n, r = len(prompt), int(got.row)
        assert got.true_length == n and int(got.length) == n and int(alone.row) == 0
        np.testing.assert_allclose(got.hidden[r], alone.hidden[0], atol=1e-5)
        np.testing.assert_allclose(got.k[r, :, :n], alone.k[0, :, :n], atol=1e-5)
        np.testing.assert_allclose(got.v[r, :, :n], alone.v[0, :, :n], atol=1e-5)
    with pytest.raises(ValueError, match="9 prompts in one prefill; at most slots=8"):
        engine.prefill_many(params=engine.params, prompts=[[1]] * 9)
    with pytest.raises(ValueError, match=r"prompt lengths must be in \[1, max_prefill_length=32\]"):
        engine.prefill_many(params=engine.params, prompts=[[1], []])


HEADS = {  # name: (decode_layout, head_copy)
    "decode-layout": (True, False),
    "head-copy": (False, True),
    "embedding-transpose": (False, False),
}


@pytest.mark.parametrize("head", HEADS)
def test_tied_embedding_heads_give_the_model_tokens_and_logprobs(head):
    """Tied embeddings: the decode layout's [V, D] embedding times dot_t (the CPU default), a
    materialized [D, V] head, or the model's own transposed embedding, each against the full
    forward and the trainer's log-probs."""
    decode_layout, head_copy = HEADS[head]
    cfg = dataclasses.replace(CFG, tie_embeddings=True)
    params = jax.jit(models.init, static_argnums=0)(cfg, jax.random.key(3))
    engine = rollout.Engine(cfg, params, slots=2, max_len=48, max_prefill_length=16, page_size=4,
                            steps_per_call=4, decode_layout=decode_layout,
                            head_copy=head_copy)  # fmt: skip
    assert (engine.params["head"] is not None) == head_copy

    head_t = engine.params["base"].get("lm_head", {}).get("kernel_t")
    assert (head_t is not None) == decode_layout
    if decode_layout:  # the embedding itself, not a copy
        assert head_t is engine.params["base"]["embedder"]["embedding"]
    prompts = _prompts(np.random.default_rng(1), 3, hi=16)
    outs = rollout.generate(
        cfg, params, prompts, rollout.SamplingParams(max_new_tokens=10, temperature=0.0),
        engine=engine,
    )  # fmt: skip
    forward = jax.jit(lambda p, t: models.forward(cfg, p, t)[0])
    logp = jax.jit(
        lambda p, t: token_logprobs(
            cfg, {"base": p, "lora": None}, {"tokens": t[:, :-1], "targets": t[:, 1:]}
        )["logp"][0]
    )
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        for _ in range(10):
            seq.append(int(np.argmax(forward(params, _padded(seq))[len(seq) - 1])))
        assert out.tokens == seq[len(prompt) :]
        ref = np.asarray(logp(params, _padded(seq)))[len(prompt) - 1 : len(seq) - 1]
        np.testing.assert_allclose(out.logprobs, ref, atol=1e-5, rtol=0)
    # A weight sync compiles nothing, whatever the head (the copy's transpose once recompiled).
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: (
            compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
        )
    )
    for _ in range(2):
        jax.block_until_ready(engine.update_params(params))
    assert compiles == [], f"update_params compiled: {compiles}"
    if head != "embedding-transpose":  # tensor-parallel: the head split over the vocabulary
        mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
        sharded = rollout.Engine(cfg, params, slots=2, max_len=48, max_prefill_length=16,
                                 page_size=4, steps_per_call=4, mesh=mesh,
                                 decode_layout=decode_layout, head_copy=head_copy)  # fmt: skip
        if head_copy:
            assert sharded.params["head"].sharding.spec[1] == "tensor"
        else:
            assert sharded.params["base"]["lm_head"]["kernel_t"].sharding.spec[0] == "tensor"
        again = rollout.generate(
            cfg, params, prompts, rollout.SamplingParams(max_new_tokens=10, temperature=0.0),
            engine=sharded,
        )  # fmt: skip
        assert [o.tokens for o in again] == [o.tokens for o in outs]


@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
def test_existing_prefix_continues_a_prompt(params, with_lora):
    """JetStream's existing_prefix: prefill a, then b on top of a's prefix (a lone prefill, or
    row 1 of a batched one); decoding from it equals the full forward on a + b, log-probs equal
    the trainer's. a + b is longer than max_prefill_length: prompts can be prefilled in chunks."""
    rng = np.random.default_rng()
    adapter = _lora(params, jax.random.key(5)) if with_lora else None
    engine = rollout.Engine(CFG, params, lora=adapter, slots=2, max_len=64,
                            max_prefill_length=16, page_size=4, steps_per_call=3)  # fmt: skip
    p = engine.params
    a, b, other = (list(rng.integers(0, CFG.vocab_size, n)) for n in (11, 9, 5))
    b_padded = np.zeros(16, np.int32)
    b_padded[: len(b)] = b
    a_padded = np.zeros(16, np.int32)
    a_padded[: len(a)] = a
    starts = [
        engine.prefill(params=p, padded_tokens=a_padded, true_length=len(a)),
        engine.prefill_many(params=p, prompts=[other, a])[1],
    ]
    want = full_forward_greedy(params, a + b, 9, adapter)
    for start in starts:
        prefix = engine.prefill(
            params=p, existing_prefix=start, padded_tokens=b_padded, true_length=len(b)
        )
        assert prefix.true_length == len(a) + len(b)
        state = engine.init_decode_state()
        state = engine.insert(
            prefix, state, 1, sampling=rollout.SamplingParams(max_new_tokens=9, temperature=0.0)
        )
        tokens, logprobs = [], []
        for _ in range(3):
            state, result = engine.generate(p, state)
            r = result.to_numpy()
            tokens += list(r["tokens"][1][r["valid"][1]])
            logprobs += list(r["logprobs"][1][r["valid"][1]])
        assert tokens == want
        np.testing.assert_allclose(
            logprobs, trainer_logprobs(params, a + b, tokens, adapter), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("pool", ["slot-regions", "free-list"])
def test_continued_prefix_padded_past_max_len_keeps_its_last_page(params, pool):
    """A continued prefix is padded to a power of two (here 64 positions for 45 tokens), past
    max_len = 48: inserting it must not write that padding over its real keys in the last page
    (positions 44-45 share page 11 with the clipped padding positions 48-63)."""
    rng = np.random.default_rng()
    num_pages = None if pool == "slot-regions" else 2 * 12 + 1
    engine = rollout.Engine(CFG, params, slots=2, max_len=48, max_prefill_length=32, page_size=4,
                            steps_per_call=3, num_pages=num_pages)  # fmt: skip
    p = engine.params
    a, b = (list(rng.integers(0, CFG.vocab_size, n)) for n in (30, 15))
    start = engine.prefill(params=p, padded_tokens=np.array(a + [0] * 2), true_length=30)
    prefix = engine.prefill(
        params=p, existing_prefix=start, padded_tokens=np.array(b + [0]), true_length=15
    )
    assert prefix.k.shape[2] == 64 and prefix.true_length == 45
    state = engine.insert(
        prefix,
        engine.init_decode_state(),
        1,
        sampling=rollout.SamplingParams(max_new_tokens=3, temperature=0.0),
    )
    state, result = engine.generate(p, state)
    r = result.to_numpy()
    tokens = list(r["tokens"][1][r["valid"][1]])
    assert tokens == full_forward_greedy(params, a + b, 3)
    np.testing.assert_allclose(
        r["logprobs"][1][r["valid"][1]], trainer_logprobs(params, a + b, tokens), atol=1e-5, rtol=0
    )
