"""One process of the 2-process HF load/save run in tests/models/test_hf_multiprocess.py.

  python hf_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT CHECKPOINT OUT_DIR

Each process owns 2 CPU devices of a (data=1, fsdp=2, tensor=2) mesh spanning both processes.
It loads CHECKPOINT onto the mesh (reading only its own shards), computes logits of fixed token
ids, and saves the params to OUT_DIR/saved; process 0 writes the logits to OUT_DIR/logits.npy.
Then it places a fixed LoRA adapter on the mesh, exports it (OUT_DIR/adapter, PEFT format) and
saves the merged weights with the checkpoint's other files (OUT_DIR/merged).
"""

from __future__ import annotations

import os
import sys

import numpy as np


def token_ids() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 160, (2, 16)).astype(np.int32)


def lora_adapter(cfg, params):
    """A fixed LoRA adapter whose B factors are not zero (so merging changes the weights)."""
    import jax

    from jaxpost import lora

    adapter = lora.init(cfg, params, rank=4, alpha=8, key=jax.random.key(3))
    rng = np.random.default_rng(5)
    return jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.normal(size=x.shape), adapter)


def main(argv: list[str]) -> None:
    pid, n, port, checkpoint, out = argv
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxpost import lora, models, sharding

    sharding.initialize_distributed(f"127.0.0.1:{port}", int(n), int(pid))
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2)
    cfg, params = models.load_hf(checkpoint, mesh=mesh)
    q = params["layers"]["attn"]["q"]["kernel"]
    assert not q.is_fully_addressable and len(q.addressable_shards) == 2
    ids = token_ids()
    tokens = jax.make_array_from_callback(
        ids.shape, NamedSharding(mesh, PartitionSpec()), lambda index: ids[index]
    )
    with sharding.use_mesh(mesh):
        logits = jax.jit(lambda p, t: models.forward(cfg, p, t))(params, tokens)
    logits = multihost_utils.process_allgather(logits, tiled=True)
    models.save_hf(cfg, params, os.path.join(out, "saved"), max_shard_bytes=100_000)

    # A LoRA adapter sharded over both processes: its PEFT export and the merged checkpoint.
    adapter = lora_adapter(cfg, params)
    placed = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: np.asarray(x)[index]),
        adapter,
        sharding.tree_shardings(adapter, lora.logical_axes(adapter), mesh),
    )
    assert any(not x.is_fully_addressable for x in jax.tree.leaves(placed))
    lora.save_peft(cfg, placed, os.path.join(out, "adapter"))
    with sharding.use_mesh(mesh):
        merged = jax.jit(lora.merge, static_argnums=0)(cfg, params, placed)
    models.save_hf(cfg, merged, os.path.join(out, "merged"), source=checkpoint)
    if jax.process_index() == 0:
        np.save(os.path.join(out, "logits.npy"), np.asarray(logits))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
