"""HF checkpoints under `jax.distributed`: 2 processes x 2 CPU devices load a checkpoint onto one
mesh, compute the single-device logits, and save a checkpoint equal to the one loaded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import hf_multiprocess_worker
import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import models

# One compilation per config (op-by-op eager dispatch is far slower on CPU).
jit_forward = jax.jit(models.forward, static_argnums=0)

WORKER = Path(__file__).with_name("hf_multiprocess_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_load_and_save(tmp_path):
    checkpoint = tmp_path / "hf"
    hf_tiny.build("llama", seed=8).save_pretrained(checkpoint)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(pid), "2", port, str(checkpoint), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {pid} exited with {p.returncode}:\n{log[-3000:]}"

    cfg, params = models.load_hf(checkpoint)
    ids = jnp.asarray(hf_multiprocess_worker.token_ids())
    want = np.asarray(jit_forward(cfg, params, ids))
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want, atol=1e-5, rtol=0)
    cfg2, saved = models.load_hf(tmp_path / "saved")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, saved, params)
