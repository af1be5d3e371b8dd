"""The offline loop alone (a toy optax step): exact resume after a crash, preemption save."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.checkpoint import Checkpointer, CheckpointError
from jaxpost.loops.offline import LoopSettings, NonFiniteLoss, Preempted, run_offline
from jaxpost.metrics import MetricsWriter
from jaxpost.preemption import PreemptionGuard

OPT = optax.adam(0.05)


class ArrayStream:
    """Shuffled batches of a fixed array; the state is (epoch, position)."""

    def __init__(self, x, y, batch, seed, crash_at=None, limit=None, nan_from=None):
        self.x, self.y, self.batch, self.seed = x, y, batch, seed
        self.epoch, self.pos, self.served, self.crash_at = 0, 0, 0, crash_at
        self.limit, self.nan_from = limit, nan_from  # batches in all; first NaN batch (1-based)

    def __next__(self):
        self.served += 1
        if self.crash_at is not None and self.served == self.crash_at:
            raise RuntimeError("simulated crash")
        if (
            self.limit is not None
            and self.epoch * len(self.x) + self.pos >= self.limit * self.batch
        ):
            raise StopIteration
        if self.nan_from is not None and self.served >= self.nan_from:
            return {"x": np.full((self.batch, self.x.shape[1]), np.nan, np.float32),
                    "y": self.y[: self.batch], "tokens": self.x[: self.batch]}  # fmt: skip
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


def _run(
    tmp, data, steps=9, crash_at=None, guard=None, log_every=1, config=None, origin=None, **stream
):
    x, y = data
    state = {"w": jnp.zeros((x.shape[1],)), "opt": OPT.init(jnp.zeros((x.shape[1],)))}
    writer = MetricsWriter(tmp, tensorboard=False, stdout=False)
    try:
        with Checkpointer(tmp / "ckpt", keep_last=2) as ckpt:
            run_offline(
                LoopSettings(
                    steps=steps, log_every=log_every, checkpoint_every=3, progress_bar=False
                ),  # fmt: skip
                train_step=_step,
                state=state,
                batches=ArrayStream(x, y, 8, seed=1, crash_at=crash_at, **stream),
                checkpointer=ckpt,
                writer=writer,
                guard=guard or PreemptionGuard(),
                config_dict=config,
                origin=origin,
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
    # A line the kill cut short is dropped too.
    with open(tmp_path / "crash" / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "split": "tr')
    resumed = _run(tmp_path / "crash", data)
    assert sorted(resumed) == list(range(1, 10))
    assert resumed == full  # bitwise: same batches, same state
    # Steps 7 (logged before the crash, after the step-6 save) is logged once, not twice.
    assert _logged_steps(tmp_path / "crash") == list(range(1, 10))


def test_a_resume_between_logs_logs_the_means_of_the_run_that_did_not_stop(tmp_path, data):
    """Checkpoints every 3 steps, logs every 4: the step-6 checkpoint carries steps 5-6, so the
    resumed run's step-8 record is the mean of steps 5-8 as in the run that did not stop (it was
    the mean of 7-8 alone)."""
    full = _run(tmp_path / "full", data, log_every=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "crash", data, crash_at=8, log_every=4)
    resumed = _run(tmp_path / "crash", data, log_every=4)
    assert sorted(resumed) == [4, 8, 9]
    assert resumed == full  # bitwise


def _logged_steps(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


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


def test_a_stop_logs_its_window_and_the_resumed_run_starts_a_new_one(tmp_path, data):
    """log_every=5, SIGTERM during step 7: the steps since the step-5 log are logged at 7 (they
    were lost), and the resumed run logs 10 as the mean of 8-10."""
    every = _run(tmp_path / "every", data, steps=10)
    with pytest.raises(Preempted, match="saved checkpoint at step 7"):
        _run(tmp_path / "pre", data, steps=10, log_every=5, guard=_Signalled(at=7))
    resumed = _run(tmp_path / "pre", data, steps=10, log_every=5)
    assert _logged_steps(tmp_path / "pre") == [5, 7, 10]
    for step, first in ((5, 1), (7, 6), (10, 8)):
        want = np.mean([every[s] for s in range(first, step + 1)])
        assert resumed[step] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("log_every", [1, 100])
def test_a_nan_loss_stops_before_anything_is_saved(tmp_path, data, log_every):
    # NaN from step 5: caught at once when every step is logged, else at the step-6 save; either
    # way nothing after step 3 is saved, so good checkpoints are not rotated out.
    with pytest.raises(NonFiniteLoss, match=r"loss=nan.*The last checkpoint is step 3") as err:
        _run(tmp_path / "nan", data, log_every=log_every, nan_from=5)
    assert err.value.step == (5 if log_every == 1 else 6)
    with Checkpointer(tmp_path / "nan" / "ckpt") as ckpt:
        assert ckpt.all_steps() == [3]


def test_a_nan_before_any_checkpoint_says_the_stage_starts_over(tmp_path, data):
    with pytest.raises(NonFiniteLoss, match="No checkpoint of this stage was saved yet") as err:
        _run(tmp_path / "nan", data, nan_from=1)
    assert "last checkpoint is step 0" not in str(err.value)


def test_a_resume_from_other_starting_weights_or_another_pipeline_is_refused(
    tmp_path, data, monkeypatch, capsys
):
    """A checkpoint trained from other starting weights (a longer earlier stage) is not
    continued; a data state the pipeline cannot take is a CheckpointError, not grain's KeyError;
    a change of compute dtype only is allowed and listed."""
    model = {"arch": "tiny", "compute_dtype": None}
    _run(tmp_path / "r", data, steps=3, config={"model": model})  # before origins were kept
    _run(tmp_path / "r", data, steps=6, origin={"weights": "a"}, config={"model": model})
    assert "predates the record of a stage's starting weights" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match=r"other starting weights .*\(weights a then, wei"):
        _run(tmp_path / "r", data, origin={"weights": "b"}, config={"model": model})
    bf16 = {"model": {**model, "compute_dtype": "bfloat16"}}
    _run(tmp_path / "r", data, origin={"weights": "a"}, config=bf16)
    assert "model.compute_dtype: None in the checkpoint, 'bfloat16'" in capsys.readouterr().out

    def foreign(self, state):
        raise KeyError("next_index")

    monkeypatch.setattr(ArrayStream, "set_state", foreign)
    with pytest.raises(CheckpointError, match="does not fit this run's data pipeline .*KeyError"):
        _run(tmp_path / "r", data, steps=12, origin={"weights": "a"}, config=bf16)


def test_the_logged_loss_is_the_mean_over_the_steps_since_the_last_log(tmp_path, data):
    """As transformers' Trainer logs it: with log_every=4 over 9 steps, the records at steps 4,
    8 and 9 hold the means of steps 1-4, 5-8 and 9 of the same run logged every step (each
    logged metric is such a mean but the learning rate and grad_norm, the logged step's)."""
    every = _run(tmp_path / "every", data)
    sparse = _run(tmp_path / "sparse", data, log_every=4)
    assert sorted(sparse) == [4, 8, 9]
    for step, first in ((4, 1), (8, 5), (9, 9)):
        want = np.mean([every[s] for s in range(first, step + 1)])
        assert sparse[step] == pytest.approx(want, rel=1e-6)
    assert sparse[4] != pytest.approx(every[4], rel=1e-3)  # not the step's own loss


def test_data_running_out_stops_saves_and_resumes(tmp_path, data):
    # 40 rows in batches of 8: one epoch is 5 batches, for a 9-step run.
    losses = _run(tmp_path / "short", data, limit=5)
    assert sorted(losses) == [1, 2, 3, 4, 5]
    with Checkpointer(tmp_path / "short" / "ckpt") as ckpt:
        assert ckpt.latest_step() == 5
    assert losses == {k: v for k, v in _run(tmp_path / "full", data).items() if k <= 5}
    # Logging every 4 steps: the step after the last log is logged when the data runs out.
    sparse = _run(tmp_path / "sparse", data, limit=5, log_every=4)
    assert _logged_steps(tmp_path / "sparse") == [4, 5]
    assert sparse[5] == pytest.approx(losses[5], rel=1e-6)


def test_resuming_with_a_changed_config_says_what_changed(tmp_path, data, capsys):
    config = {"model": {"width": 5}, "optimizer": {"learning_rate": 0.05}, "train": {"steps": 6}}
    _run(tmp_path / "run", data, steps=6, config={**config, "workdir": str(tmp_path / "run")})
    assert "config changed" not in capsys.readouterr().out
    # The work directory spelled another way (here relative) is not a change.
    longer = {**config, "train": {"steps": 9}, "optimizer": {"learning_rate": 0.01}}
    longer["workdir"] = "run"
    _run(tmp_path / "run", data, steps=9, config=longer)
    out = capsys.readouterr().out
    assert "[train] resumed from step 6" in out
    assert (
        "[train] the config changed since that checkpoint:\n"
        "  optimizer.learning_rate: 0.05 in the checkpoint, 0.01 in this config\n"
        "  train.steps: 6 in the checkpoint, 9 in this config"
    ) in out
    assert "workdir" not in out


def test_throughput_leaves_out_saving(tmp_path, data, monkeypatch):
    """tokens_per_sec of the step after a save does not count the save's time (an audit saw a
    window holding a save report 1/20 of the others)."""
    pause = 0.6
    original = Checkpointer.save

    def slow_save(self, *args, **kwargs):
        time.sleep(pause)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", slow_save)
    _run(tmp_path, data)  # saves at steps 3, 6 and 9; logs every step
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    seconds = {r["step"]: 8 * 5 / r["tokens_per_sec"] for r in records}  # 8 rows x 5 tokens
    assert seconds[4] < pause / 3 and seconds[7] < pause / 3, seconds


def test_forgetting_records_keeps_a_symlinked_file_a_symlink(tmp_path):
    target = tmp_path / "shared" / "metrics.jsonl"
    target.parent.mkdir()
    target.write_text("".join(json.dumps({"step": i, "split": "sft"}) + "\n" for i in (1, 2, 3)))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(target)
    writer = MetricsWriter(run, tensorboard=False, stdout=False)
    assert writer.forget_after(1, ("sft",)) == 2
    writer.write(2, {"loss": 1.0}, split="sft")
    writer.close()
    assert (run / "metrics.jsonl").is_symlink()
    assert [json.loads(line)["step"] for line in target.read_text().splitlines()] == [1, 2]


def test_logged_means_leave_out_steps_that_trained_no_token():
    """A step without trained tokens (all prompt, say) has no loss or gradient: its zeros stay
    out of the window means (the loss's; grad_norm's when averaged), while the token counts keep
    it."""
    from jaxpost.loops.offline import LAST_STEP_METRICS, _window_host

    def step(loss, weight, lr):
        return {
            "loss": jnp.float32(loss), "grad_norm": jnp.float32(loss / 2),
            "weight_sum": jnp.float32(weight), "tokens": jnp.float32(weight),
            "input_tokens": jnp.float32(64), "learning_rate": jnp.float32(lr),
        }  # fmt: skip

    host = _window_host(
        [step(2.0, 10, 1.0), step(0.0, 0, 2.0), step(4.0, 30, 3.0)], ("learning_rate",)
    )
    assert host["loss"] == 3.0 and host["grad_norm"] == 1.5
    assert host["tokens"] == pytest.approx(40 / 3) and host["input_tokens"] == 64
    assert host["learning_rate"] == 3.0
    assert _window_host([step(0.0, 0, 1.0)] * 2, ())["loss"] == 0.0
    # What the loop logs: the learning rate and grad_norm of the logged step, as the Trainer.
    logged = _window_host([step(2.0, 10, 1.0), step(4.0, 30, 3.0)], LAST_STEP_METRICS)
    assert logged["grad_norm"] == 2.0 and logged["learning_rate"] == 3.0
    assert logged["loss"] == 3.0
