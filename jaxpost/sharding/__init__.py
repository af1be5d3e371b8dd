"""Device meshes, logical-axis sharding rules and multi-process runs: `jaxpost.sharding`.

- `mesh`: one device mesh with axes (data, fsdp, tensor), the logical-axis rules onto it, the
  shardings of weights, activations and batches.
- `processes`: `jax.distributed` from a config or the environment, host-side collectives, and
  global batches assembled from each process's own rows.
"""

from jaxpost.sharding.mesh import (
    DEFAULT_RULES,
    MESH_AXES,
    REFIT_AXES,
    Rules,
    active_mesh,
    batch_mesh_axes,
    batch_rows_problem,
    batch_sharding,
    check_batch_rows,
    check_rules,
    constrain,
    logical_to_sharding,
    logical_to_spec,
    make_mesh,
    replicated,
    tree_shardings,
    use_mesh,
    warn_replicated,
    weight_spec,
)
from jaxpost.sharding.processes import (
    ENV_COORDINATOR,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    agree_across_processes,
    gather_across_processes,
    global_batch,
    initialize_distributed,
)

__all__ = [
    "DEFAULT_RULES",
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "MESH_AXES",
    "REFIT_AXES",
    "Rules",
    "active_mesh",
    "agree_across_processes",
    "batch_mesh_axes",
    "batch_rows_problem",
    "batch_sharding",
    "check_batch_rows",
    "check_rules",
    "constrain",
    "gather_across_processes",
    "global_batch",
    "initialize_distributed",
    "logical_to_sharding",
    "logical_to_spec",
    "make_mesh",
    "replicated",
    "tree_shardings",
    "use_mesh",
    "warn_replicated",
    "weight_spec",
]
