"""MetricsWriter: the JSONL records and TensorBoard runs of a run that is resumed after dying
past its last checkpoint, read back with TensorBoard's own event reader."""

from __future__ import annotations

import json
import time

from tensorboard.backend.event_processing import event_accumulator

from jaxpost.metrics import MetricsWriter


def _scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    acc = event_accumulator.EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_a_resumed_split_logs_each_step_once_in_jsonl_and_tensorboard(tmp_path):
    first = MetricsWriter(tmp_path, stdout=False)
    for step in range(1, 7):  # two stages with overlapping steps, then an eval
        first.write(step, {"loss": 10.0 + step}, split="pretrain")
        first.write(step, {"loss": 1.0 + step, "grad_norm": 0.5}, split="sft")
    first.write(3, {"loss": 2.5}, split="sft_eval")
    first.write(6, {"loss": 2.6}, split="sft_eval")
    first.close()  # the attempt dies after step 6; its last checkpoint is step 3

    second = MetricsWriter(tmp_path, stdout=False)
    assert second.forget_after(3, ("sft", "sft_eval")) == 4  # sft 4, 5, 6 and eval 6
    for step in (4, 5):
        second.write(step, {"loss": 100.0 + step, "grad_norm": 0.25}, split="sft")
    second.close()

    tb = tmp_path / "tensorboard"
    assert sorted(p.name for p in tb.iterdir()) == ["pretrain", "sft", "sft_eval"]
    assert _scalars(tb / "sft", "loss") == [(1, 2.0), (2, 3.0), (3, 4.0), (4, 104.0), (5, 105.0)]
    assert [s for s, _ in _scalars(tb / "sft", "grad_norm")] == [1, 2, 3, 4, 5]
    assert _scalars(tb / "sft_eval", "loss") == [(3, 2.5)]
    assert _scalars(tb / "pretrain", "loss") == [(s, 10.0 + s) for s in range(1, 7)]  # untouched
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sft = [(r["step"], r["loss"]) for r in records if r["split"] == "sft"]
    assert sft == [(1, 2.0), (2, 3.0), (3, 4.0), (4, 104.0), (5, 105.0)]


def test_a_writer_already_open_for_a_split_is_reopened_to_purge(tmp_path):
    """forget_after on a split this writer has logged to (a stage re-run in one process)."""
    writer = MetricsWriter(tmp_path, stdout=False)
    for step in range(1, 5):
        writer.write(step, {"loss": float(step)}, split="sft")
    writer.forget_after(2, ["sft"])
    writer.write(3, {"loss": 30.0}, split="sft")
    writer.close()
    assert _scalars(tmp_path / "tensorboard" / "sft", "loss") == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_each_jsonl_record_carries_the_wall_time_it_was_written(tmp_path):
    lines = []
    writer = MetricsWriter(tmp_path, tensorboard=True, echo=lines.append)
    before = time.time()
    writer.write(1, {"loss": 2.0}, split="sft")
    time.sleep(0.05)
    writer.write(2, {"loss": 1.0}, split="sft")
    after = time.time()
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    times = [r["wall_time"] for r in records]
    assert before - 1e-3 <= times[0] and times[0] + 0.04 < times[1] <= after + 1e-3
    # A record field, not a metric: neither on the console nor a TensorBoard tag.
    assert lines == ["[sft] step 1: loss=2", "[sft] step 2: loss=1"]
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard" / "sft"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["loss"]
