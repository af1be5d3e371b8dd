"""A 2-process `jax.distributed` run on 127.0.0.1 (gloo collectives) trains like one device."""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("multiprocess_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_match_one_device(tmp_path, launch):
    out = tmp_path / "result.json"
    launch(WORKER, lambda pid, port: [pid, 2, port, 2, out])
    results = [json.loads((tmp_path / f"result.json.{pid}").read_text()) for pid in (0, 1)]
    assert results[0]["devices"] == 4  # 2 processes x 2 CPU devices, one global mesh (2, 2, 1)

    worker = _worker_module()
    reference = worker.run((1, 1, 1), devices=jax.devices()[:1])
    got = np.asarray(results[0]["losses"])
    np.testing.assert_allclose(got, reference, rtol=1e-5)

    # Evaluation reads every held-out row once: 13 rows split 7 / 6, so process 1 runs out a
    # batch early and fills in a weightless one (same number of collective eval calls), and
    # the global means equal one process's over all 13 rows.
    one = worker.evaluate_split((1, 1, 1), devices=jax.devices()[:1])
    evals = [r["eval"] for r in results]
    assert [e["batches"] for e in evals] == [4, 4]
    assert sum(e["local_tokens"] for e in evals) == one["local_tokens"]
    assert evals[0]["local_tokens"] > evals[1]["local_tokens"] > 0
    for e in evals:
        assert e["metrics"]["tokens"] == one["metrics"]["tokens"] == one["local_tokens"]
        assert e["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-5)

    # Host-side agreement: reductions see both processes, "first" is process 0's value, one
    # process's preemption signal stops both, and fresh rollout seeds are process 0's draw.
    agree = [r["agree"] for r in results]
    assert agree[0] == agree[1]
    assert (agree[0]["min"], agree[0]["max"], agree[0]["any"]) == (10, 11, True)
    assert agree[0]["first"] == [0, 1] and agree[0]["should_stop"] is True
    assert len(set(agree[0]["fresh_seeds"])) == 3

    # Each process's data position is kept and comes back to it; a run with another process
    # count cannot take it over. Texts gather in process order; batch axes that replicate the
    # rows over the processes and configs that differ are refused on every process.
    checks = [r["checks"] for r in results]
    for pid, c in enumerate(checks):
        assert c["data_state"] == {"process": pid, "next_index": 72 + pid}
        assert c["gathered"] == ["xxx", "x" * 8]
        assert (
            "split the batch into 1 block(s), which 2 processes must not share"
            in (c["shared_rows"])
        )
        assert c["different_configs"] == (
            "the processes of this run have different configs:\n"
            "  config.optimizer.learning_rate: 0.001 on process 0, 0.05 on 1"
        )
    from jaxpost.checkpoint import Checkpointer, CheckpointError

    with (
        Checkpointer(f"{out}.ckpt") as ckpt,
        pytest.raises(CheckpointError, match=r"written by 2 process\(es\) and this run has 1"),
    ):
        ckpt.restore({"w": jax.ShapeDtypeStruct((4,), np.float32)})
