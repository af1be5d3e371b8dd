"""A 2-process `jax.distributed` run on 127.0.0.1 (gloo collectives) trains like one device."""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("multiprocess_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_match_one_device(tmp_path, launch):
    out = tmp_path / "losses.json"
    launch(WORKER, lambda pid, port: [pid, 2, port, 2, out])
    result = json.loads(out.read_text())
    assert result["devices"] == 4  # 2 processes x 2 CPU devices, one global mesh (2, 2, 1)

    reference = _worker_module().run((1, 1, 1), devices=jax.devices()[:1])
    got = np.asarray(result["losses"])
    np.testing.assert_allclose(got, reference, rtol=1e-5)
