"""The loops' greedy decoder (periodic task evaluation) against recomputing the whole sequence
every step: right-padded prompts of several lengths over several batches, with and without a
LoRA adapter, and the cut after eos."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import lora, models
from jaxpost.loops.evaluation import greedy_generate

from tiny_models import randomized, tiny_config

CFG = tiny_config(vocab_size=96, qk_norm=True)
NEW = 8


@functools.partial(jax.jit, static_argnums=0)
def _next_token(cfg, params, adapter, seq, length):
    """Greedy next token after seq[0, :length], the whole sequence recomputed (no cache);
    positions past `length` are causal padding that earlier positions never see."""
    logits = models.forward(cfg, params, seq, lora=adapter)
    return jnp.argmax(logits[0, length - 1])


def _reference(params, adapter, prompt):
    seq = np.zeros((1, len(prompt) + NEW), np.int32)
    seq[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + NEW):
        seq[0, t] = int(_next_token(CFG, params, adapter, seq, t))
    return seq[0, len(prompt) :].tolist()


def test_greedy_generate_equals_recomputing_every_step_with_and_without_lora():
    params = jax.jit(models.init, static_argnums=0)(CFG, jax.random.key(3))
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(1, CFG.vocab_size, n)) for n in (3, 7, 5, 1, 6)]
    random_adapter = randomized(lora.init(CFG, params, rank=4, alpha=8.0), jax.random.key(5), 0.3)
    for adapter in (None, random_adapter):
        # batch_size 2: three batches, the last filled up to the compiled shape.
        got = greedy_generate(CFG, params, prompts, NEW, lora=adapter, batch_size=2)
        want = [_reference(params, adapter, p) for p in prompts]
        assert got == want
    # eos: each completion is cut after its first eos, and only then.
    eos = want[1][2]
    cut = greedy_generate(CFG, params, prompts, NEW, lora=adapter, eos_id=eos, batch_size=2)
    for c, w in zip(cut, want):
        assert c == (w[: w.index(eos) + 1] if eos in w else w)
    assert len(cut[1]) <= 3
