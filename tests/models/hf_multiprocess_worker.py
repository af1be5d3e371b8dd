"""One process of the 2-process HF load/save run in tests/models/test_hf_multiprocess.py.

  python hf_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT CHECKPOINT OUT_DIR

Each process owns 2 CPU devices of a (data=1, fsdp=2, tensor=2) mesh spanning both processes.
It loads CHECKPOINT onto the mesh (reading only its own shards), computes logits of fixed token
ids, and saves the params to OUT_DIR/saved; process 0 writes the logits to OUT_DIR/logits.npy.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def token_ids() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 160, (2, 16)).astype(np.int32)


def main(argv: list[str]) -> None:
    pid, n, port, checkpoint, out = argv
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxpost import models, sharding

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
    if jax.process_index() == 0:
        np.save(os.path.join(out, "logits.npy"), np.asarray(logits))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
