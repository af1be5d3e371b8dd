"""JetStream interop (extra `jetstream`): the jaxpost driver over JetStream's own TestEngine, and
JetStream's own orchestrator serving the jaxpost engine."""

import asyncio
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import models, rollout

from tiny_models import tiny_config

pytest.importorskip("jetstream", reason="needs the `jetstream` extra (google-jetstream==0.2.2)")

from jetstream.core import orchestrator  # noqa: E402
from jetstream.core.proto import jetstream_pb2  # noqa: E402
from jetstream.engine import mock_engine  # noqa: E402

from jaxpost.rollout.jetstream_adapter import JetStreamEngine  # noqa: E402

# Importing the orchestrator sets the root logger to DEBUG with a stdout handler; undo that so
# the test log stays readable and nothing writes to pytest's closed stdout at exit.
logging.getLogger().handlers[:] = [
    h for h in logging.getLogger().handlers if getattr(h, "stream", None) is not sys.stdout
]
logging.getLogger().setLevel(logging.WARNING)

CFG = tiny_config()
BOS = 1


def mock_expected(prompt, weight, steps):
    """TestEngine's documented rule: token_t = w * sum(prompt) + sum(previous tokens) / w, in
    float32 and truncated to int32 when returned."""
    base = np.float32(weight) * np.float32(sum(prompt))
    history, out = [], []
    for _ in range(steps):
        value = base + np.float32(sum(history, np.float32(0))) / np.float32(weight)
        history.append(np.float32(value))
        out.append(int(np.float32(value).astype(np.int32)))
    return out


class _SmallOnes:
    """jax.numpy, except that jnp.ones((4096, 4096)) is 8x8."""

    def __getattr__(self, name):
        return getattr(jnp, name)

    @staticmethod
    def ones(shape, *args, **kwargs):
        return jnp.ones((8, 8) if tuple(shape) == (4096, 4096) else shape, *args, **kwargs)


def test_jaxpost_driver_over_jetstream_test_engine(monkeypatch):
    # TestEngine builds a (1, 1, 1) mesh over *all* devices; the suite simulates 8.
    with monkeypatch.context() as m:
        one_device = jax.devices()[:1]
        m.setattr(jax, "devices", lambda *args: one_device)
        engine = mock_engine.TestEngine(batch_size=2, cache_length=32, weight=2.0)
    # Every TestEngine call multiplies two 4096x4096 matrices of ones to simulate model time
    # (137 GFLOP, minutes on this CPU) and adds mean - mean = 0 of the result. Shrinking those
    # matrices leaves every token unchanged.
    monkeypatch.setattr(mock_engine, "jnp", _SmallOnes())
    driver = rollout.Driver(engine, engine.load_params())
    prompts = [[2, 65, 66], [2, 70], [2, 10, 20, 30]]  # <BOS> 'A' 'B' as in JetStream's tests
    sps = [rollout.SamplingParams(max_new_tokens=n, temperature=0.0) for n in (3, 4, 2)]
    outs = driver.run([rollout.Request(p, s) for p, s in zip(prompts, sps)])
    # JetStream's test_mock_engine: prefill [2, 65, 66] with weight 2 then three generate steps
    # give 266, 399, 598 ('Ċ', 'Ə', 'ɖ').
    assert outs[0][0].tokens == [266, 399, 598]
    for prompt, sp, out in zip(prompts, sps, outs):
        assert out[0].tokens == mock_expected(prompt, 2.0, sp.max_new_tokens)
        assert out[0].finish_reason == "length"


async def _decode(client, token_ids, max_tokens):
    request = jetstream_pb2.DecodeRequest(
        token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=token_ids),
        max_tokens=max_tokens,
    )
    tokens = []
    async for response in client.Decode(request):
        tokens.extend(response.stream_content.samples[0].token_ids)
    return tokens


def test_jetstream_orchestrator_serves_jaxpost_engine():
    rng = np.random.default_rng()
    params = jax.jit(models.init, static_argnums=0)(CFG, jax.random.key(int(rng.integers(2**31))))
    engine = rollout.Engine(
        CFG, params, slots=2, max_len=48, max_prefill_length=16, page_size=4, steps_per_call=1
    )
    adapter = JetStreamEngine(engine, bos_id=BOS)
    driver = orchestrator.Driver(
        prefill_engines=[adapter],
        generate_engines=[adapter],
        prefill_params=[adapter.load_params()],
        generate_params=[adapter.load_params()],
        interleaved_mode=True,
    )
    client = orchestrator.LLMOrchestrator(driver=driver)
    prompts = [list(rng.integers(2, CFG.vocab_size, n)) for n in (3, 9, 5)]
    max_tokens = [6, 4, 7]

    async def serve_all():
        try:
            return await asyncio.gather(
                *(_decode(client, p, m) for p, m in zip(prompts, max_tokens))
            )
        finally:
            # Stop while this event loop still runs: the detokenize thread closes each request's
            # channel through the loop (call_soon_threadsafe) after the last token has been
            # streamed; on a closed loop that raises, and JetThread then SIGKILLs the process.
            await asyncio.to_thread(driver.stop)

    try:
        served = asyncio.run(asyncio.wait_for(serve_all(), timeout=120))
    finally:
        driver.stop()  # already stopped unless the event loop itself failed
    # The orchestrator prepends BOS; the jaxpost driver gets the same token sequence.
    ours = rollout.generate(
        CFG,
        params,
        [[BOS, *p] for p in prompts],
        [rollout.SamplingParams(max_new_tokens=m, temperature=0.0) for m in max_tokens],
    )
    assert served == [o.tokens for o in ours]
    assert [len(s) for s in served] == max_tokens


def test_adapter_refuses_a_short_pool_and_samples_each_request_on_its_own():
    params = jax.jit(models.init, static_argnums=0)(CFG, jax.random.key(4))
    sizes = dict(slots=2, max_len=48, max_prefill_length=16, page_size=4, steps_per_call=1)
    # The orchestrator inserts without asking for pages: a pool short of 2 x 12 pages is refused.
    short = rollout.Engine(CFG, params, num_pages=12, **sizes)
    with pytest.raises(ValueError, match=r"needs room for every slot at max_len \(2 x 12 = 24\)"):
        JetStreamEngine(short, bos_id=BOS)
    engine = rollout.Engine(CFG, params, **sizes)
    sampled = rollout.SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    adapter = JetStreamEngine(engine, bos_id=BOS, sampling=sampled)
    p = adapter.load_params()
    padded = np.zeros(16, np.int32)
    padded[:5] = [BOS, 5, 6, 7, 8]
    state = adapter.init_decode_state()
    for slot in (0, 1):  # the same prompt twice, as two JetStream requests
        prefix = adapter.prefill(params=p, padded_tokens=padded, true_length=5)
        state = adapter.insert(prefix, state, slot)
    tokens = {0: [], 1: []}
    for _ in range(8):
        state, result = adapter.generate(p, state)
        for slot in tokens:
            tokens[slot].append(int(result.get_result_at_slot(slot).tokens[0, 0]))
    assert tokens[0] != tokens[1]  # one seed for both: each insert draws its own sample
