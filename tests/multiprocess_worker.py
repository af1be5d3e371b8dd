"""One process of the 2-process `jax.distributed` SFT run in tests/test_multiprocess.py.

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES OUT_JSON

Each process owns LOCAL_DEVICES CPU devices and feeds only its own rows of every global batch;
cross-process collectives go through gloo. Process 0 writes the per-step losses to OUT_JSON.
The same `run` with one process is the test's reference, so nothing here may import JAX at
module level (the device count must be set first).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

STEPS = 5
BATCH, LENGTH, VOCAB = 8, 16, 96


def batches(steps: int = STEPS) -> list[dict]:
    """Fixed global batches: random tokens, prompt masks of varying length, some padding."""
    rng = np.random.default_rng(1234)
    out = []
    for _ in range(steps):
        tokens = rng.integers(1, VOCAB, (BATCH, LENGTH)).astype(np.int32)
        mask = np.ones((BATCH, LENGTH), np.float32)
        for row, start in enumerate(rng.integers(0, LENGTH // 2, BATCH)):
            mask[row, :start] = 0.0
        mask[:, -1] = 0.0
        out.append({"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": mask})
    return out


def _full_state(cfg, opt, mesh, **kwargs):
    """A freshly initialised full fine-tuning train state of model `cfg` on `mesh`."""
    from jaxpost import models, steps

    init = lambda key: {"base": models.init(cfg, key), "lora": None}
    return steps.init_train_state(cfg, init, opt, mesh, trainable="full", **kwargs)


def run(mesh_shape: tuple[int, int, int], devices=None) -> list[float]:
    """Full SFT, AdamW, STEPS steps on `mesh_shape` (data, fsdp, tensor); the losses."""
    import jax

    from jaxpost import sharding, steps
    from jaxpost.losses import sft_loss

    from tiny_models import tiny_config  # tests/: sys.path[0] as a script, conftest.py else

    cfg = tiny_config(vocab_size=VOCAB, model_type="qwen3", qk_norm=True)
    mesh = sharding.make_mesh(*mesh_shape, devices=devices)
    opt = steps.make_optimizer(name="adamw", learning_rate=3e-3, warmup_steps=2, total_steps=5)
    state = _full_state(cfg, opt, mesh, rng=jax.random.key(7))
    train_step = steps.make_train_step(cfg, sft_loss, opt, mesh, trainable="full", grad_accum=2)
    rows = BATCH // jax.process_count()
    lo = jax.process_index() * rows
    losses = []
    for batch in batches():
        local = {k: v[lo : lo + rows] for k, v in batch.items()}
        state, metrics = train_step(state, local)
        losses.append(float(jax.device_get(metrics["loss"])))
    return losses


def evaluate_split(mesh_shape: tuple[int, int, int], devices=None, **overrides) -> dict:
    """The CLI's evaluation (`data_setup.eval_batches` + `offline.evaluate`) of a tiny random
    model on EVAL_ROWS held-out arithmetic rows, unpacked, global batch 4: with two processes
    the rows split 7 / 6, so process 1 runs out of rows one batch before process 0.
    -> the eval metrics, the batches this process evaluated and its loss tokens."""

    from jaxpost import config, sharding, steps
    from jaxpost.loops import data_setup, offline
    from jaxpost.losses import sft_loss

    from tiny_models import tiny_config

    cfg = config.defaults()
    cfg.data.task, cfg.data.num_eval_examples = "arithmetic", EVAL_ROWS
    cfg.data.packing, cfg.data.max_length = False, 64
    for key, value in overrides.items():
        section, name = key.split(".")
        cfg[section][name] = value
    task, tokenizer = data_setup.task_and_tokenizer(cfg)
    make = data_setup.eval_batches(cfg, task, tokenizer, batch_size=4)
    model = tiny_config(vocab_size=tokenizer.vocab_size)
    mesh = sharding.make_mesh(*mesh_shape, devices=devices)
    opt = steps.make_optimizer(name="sgd", learning_rate=1e-3, total_steps=1)
    state = _full_state(model, opt, mesh)
    eval_step = steps.make_eval_step(model, sft_loss, mesh, trainable="full")
    batches = list(make())
    metrics = offline.evaluate(eval_step, state, batches)
    return {
        "metrics": metrics,
        "batches": len(batches),
        "local_tokens": float(sum(b["loss_mask"].sum() for b in batches)),
    }


EVAL_ROWS = 13


def agreements() -> dict:
    """What `sharding.agree_across_processes` and the helpers built on it return here."""
    import jax

    from jaxpost import sharding
    from jaxpost.preemption import PreemptionGuard
    from jaxpost.rollout import state

    pid = jax.process_index()
    guard = PreemptionGuard()
    guard.requested = "SIGTERM" if pid == 1 else None  # only process 1 was signalled
    return {
        "min": sharding.agree_across_processes(10 + pid, "min"),
        "max": sharding.agree_across_processes(10 + pid, "max"),
        "any": bool(sharding.agree_across_processes(pid == 1, "any")),
        "first": sharding.agree_across_processes(np.array([pid, 7 * pid + 1]), "first").tolist(),
        "should_stop": guard.should_stop(),
        "fresh_seeds": state.fresh_seeds(3),
    }


def process_checks(ckpt_dir: str) -> dict:
    """What the run-level guards do here: every process's data state in a checkpoint, texts
    gathered across processes, batch axes shared by the processes and configs that differ."""
    import jax

    from jaxpost import config, sharding, train
    from jaxpost.checkpoint import Checkpointer

    pid = jax.process_index()
    everywhere = sharding.replicated(sharding.make_mesh(2, jax.device_count() // 2, 1))
    state = {"w": jax.device_put(np.arange(4.0, dtype=np.float32), everywhere)}
    with Checkpointer(ckpt_dir, async_save=False) as ckpt:
        ckpt.save(3, state, data_state={"process": pid, "next_index": 72 + pid})
    with Checkpointer(ckpt_dir) as ckpt:
        restored = ckpt.restore({"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=everywhere)})
    replicated_rows = sharding.make_mesh(1, 1, jax.device_count())
    try:
        sharding.global_batch({"tokens": np.zeros((2, 4), np.int32)}, replicated_rows)
        shared = "accepted"
    except ValueError as e:
        shared = str(e)
    cfg = config.defaults()
    cfg.optimizer.learning_rate = 1e-3 if pid == 0 else 5e-2
    cfg.mesh.process_id = pid  # differs by design: not compared
    try:
        train._check_same_config(cfg)
        differ = "accepted"
    except config.ConfigError as e:
        differ = str(e)
    return {
        "data_state": restored.data_state,
        "gathered": sharding.gather_across_processes("x" * (3 + 5 * pid)),
        "shared_rows": shared,
        "different_configs": differ,
    }


def main(argv: list[str]) -> None:
    pid, n, port, local_devices, out = argv
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(local_devices)}"
    import jax

    from jaxpost import sharding

    sharding.initialize_distributed(f"127.0.0.1:{port}", int(n), int(pid))
    assert jax.process_count() == int(n), jax.process_count()
    losses = run((2, jax.device_count() // 2, 1))
    evaluation = evaluate_split((2, jax.device_count() // 2, 1))
    with open(f"{out}.{jax.process_index()}", "w") as f:
        json.dump(
            {
                "losses": losses,
                "devices": jax.device_count(),
                "eval": evaluation,
                "agree": agreements(),
                "checks": process_checks(f"{out}.ckpt"),
            },
            f,
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
