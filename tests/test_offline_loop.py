"""The offline loop alone (a toy optax step): exact resume after a crash, preemption save."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.checkpoint import Checkpointer, PreemptionGuard
from jaxpost.loops.offline import LoopSettings, Preempted, run_offline
from jaxpost.metrics import MetricsWriter

OPT = optax.adam(0.05)


class ArrayStream:
    """Shuffled batches of a fixed array; the state is (epoch, position)."""

    def __init__(self, x, y, batch, seed, crash_at=None):
        self.x, self.y, self.batch, self.seed = x, y, batch, seed
        self.epoch, self.pos, self.served, self.crash_at = 0, 0, 0, crash_at

    def __next__(self):
        self.served += 1
        if self.crash_at is not None and self.served == self.crash_at:
            raise RuntimeError("simulated crash")
        order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.x))
        idx = order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        if self.pos + self.batch > len(self.x):
            self.epoch, self.pos = self.epoch + 1, 0
        return {"x": self.x[idx], "y": self.y[idx], "tokens": self.x[idx]}

    def get_state(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]


@jax.jit
def _step(state, batch):
    def loss_fn(w):
        return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(state["w"])
    updates, opt = OPT.update(g, state["opt"], state["w"])
    return {"w": optax.apply_updates(state["w"], updates), "opt": opt}, {"loss": loss}


def _run(tmp, data, steps=9, crash_at=None, guard=None):
    x, y = data
    state = {"w": jnp.zeros((x.shape[1],)), "opt": OPT.init(jnp.zeros((x.shape[1],)))}
    writer = MetricsWriter(tmp, tensorboard=False, stdout=False)
    try:
        with Checkpointer(tmp / "ckpt", keep_last=2) as ckpt:
            run_offline(
                LoopSettings(steps=steps, log_every=1, checkpoint_every=3, progress_bar=False),
                train_step=_step,
                state=state,
                batches=ArrayStream(x, y, 8, seed=1, crash_at=crash_at),
                checkpointer=ckpt,
                writer=writer,
                guard=guard or PreemptionGuard(),
            )
    finally:
        writer.close()
    losses = {}
    for line in (tmp / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        losses[rec["step"]] = rec["loss"]  # a resumed run's records replace the earlier ones
    return losses


@pytest.fixture
def data():
    rng = np.random.default_rng()
    x = rng.normal(size=(40, 5)).astype(np.float32)
    return x, (x @ rng.normal(size=5) + 0.1 * rng.normal(size=40)).astype(np.float32)


def test_resume_after_crash_reproduces_losses(tmp_path, data):
    full = _run(tmp_path / "full", data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "crash", data, crash_at=8)  # dies during step 8, after the step-6 save
    resumed = _run(tmp_path / "crash", data)
    assert sorted(resumed) == list(range(1, 10))
    assert resumed == full  # bitwise: same batches, same state


class _Signalled(PreemptionGuard):
    def __init__(self, at):
        super().__init__()
        self.at, self.polls = at, 0

    def should_stop(self):
        self.polls += 1
        if self.polls == self.at:
            self.requested = "SIGTERM"
        return self.requested is not None


def test_preemption_saves_then_resumes_exactly(tmp_path, data):
    full = _run(tmp_path / "full", data)
    with pytest.raises(Preempted, match="SIGTERM received: saved checkpoint at step 4"):
        _run(tmp_path / "pre", data, guard=_Signalled(at=4))
    with Checkpointer(tmp_path / "pre" / "ckpt") as ckpt:
        assert ckpt.latest_step() == 4
    assert _run(tmp_path / "pre", data) == full
