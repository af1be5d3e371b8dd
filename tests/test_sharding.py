"""Mesh construction, logical-axis specs, multi-process initialisation and global batches."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpost import sharding


def test_make_mesh_and_errors():
    mesh = sharding.make_mesh(2, -1, 2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="at most one may be -1"):
        sharding.make_mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="has 16 devices"):
        sharding.make_mesh(4, 2, 2)
    # (a ZeroDivisionError, and "has -8 devices", before)
    for sizes, named in (((0, -1, 1), "'data': 0"), ((-2, 4, 1), "'data': -2")):
        with pytest.raises(ValueError, match=f"mesh sizes {{{named}}}: each size is a positive"):
            sharding.make_mesh(*sizes)
    assert dict(sharding.make_mesh(np.int64(2), -1, np.int32(2)).shape)["fsdp"] == 2


def test_rules_are_checked_where_they_enter():
    """A misspelt or missing rule was ignored (the array laid out by the default, or a KeyError
    only on the TPU kernels' path) and a dict failed to unpack (audit 33)."""
    mesh = sharding.make_mesh(2, 2, 2)
    rules = dict(sharding.DEFAULT_RULES)
    with pytest.raises(ValueError, match="rules must be a sequence of .logical name, mesh axes"):
        sharding.tree_shardings({}, {}, mesh, rules)
    typo = (*sharding.DEFAULT_RULES, ("mpl", "tensor"))
    with pytest.raises(ValueError, match="'mpl' .did you mean 'mlp'"):
        with sharding.use_mesh(mesh, typo):
            pass
    missing = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "act_heads")
    with pytest.raises(ValueError, match=r"no rule for \['act_heads'\]"):
        sharding.tree_shardings({}, {}, mesh, missing)
    sharding.check_rules(tuple(list(r) for r in sharding.DEFAULT_RULES))  # lists are pairs too
    # Appended to override a default, a second rule would be ignored: the first one is used.
    with pytest.raises(ValueError, match=r"\['lora_rank'\] have more than one rule"):
        sharding.check_rules((*sharding.DEFAULT_RULES, ("lora_rank", None)))


def test_logical_spec_drops_non_dividing_axes():
    mesh = sharding.make_mesh(2, 2, 2)
    assert sharding.logical_to_spec((8, 16), ("batch", "length"), mesh) == P(("data", "fsdp"), None)
    # One KV head cannot split over tensor=2; 6 rows split over data only.
    assert sharding.logical_to_spec((32, 1), ("embed", "kv_heads"), mesh) == P("fsdp", None)
    assert sharding.logical_to_spec((6, 4), ("batch", None), mesh) == P("data", None)
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.logical_to_spec((4,), ("nonsense",), mesh)
    typo = (("embed", "fsdpp"),)
    with pytest.raises(ValueError, match="names mesh axis 'fsdpp', but the mesh has axes"):
        sharding.logical_to_spec((4,), ("embed",), mesh, typo)
    foreign = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    with pytest.raises(ValueError, match=r"mesh axis 'fsdp', but the mesh has axes \('data'"):
        sharding.logical_to_spec((4,), ("embed",), foreign)


def test_weight_spec_moves_fsdp_to_a_dimension_it_divides():
    mesh = sharding.make_mesh(1, 8, 1)
    # embed 12 does not divide over fsdp=8: the weight is split along heads instead of whole.
    assert sharding.weight_spec((2, 12, 64), ("layers", "embed", "heads"), mesh) == P(
        None, None, "fsdp"
    )
    assert sharding.weight_spec((2, 64, 12), ("layers", "embed", "heads"), mesh) == P(
        None, "fsdp", None
    )
    # Neither dimension divides: replicated; a dimension named by no rule never takes it.
    assert sharding.weight_spec((12, 12), ("embed", "heads"), mesh) == P(None, None)
    assert sharding.weight_spec((12, 64), ("embed", "head_dim"), mesh) == P(None, None)
    # Beside the tensor axis on the same dimension when both divide it.
    mesh = sharding.make_mesh(1, 4, 2)
    assert sharding.weight_spec((6, 64), ("embed", "mlp"), mesh) == P(None, ("tensor", "fsdp"))
    # Activations keep logical_to_spec's rule: a batch axis is never moved.
    assert sharding.logical_to_spec((6, 64), ("embed", "mlp"), mesh) == P(None, "tensor")


def test_global_batch_places_rows_on_the_batch_axes():
    rng = np.random.default_rng()
    mesh = sharding.make_mesh(2, 2, 2)
    local = {
        "tokens": rng.integers(0, 100, (8, 5)).astype(np.int32),
        "loss_mask": rng.random((8, 5)).astype(np.float32),
    }
    out = sharding.global_batch(local, mesh)
    for name, x in out.items():
        np.testing.assert_array_equal(np.asarray(x), local[name])
        assert x.sharding.spec == P(("data", "fsdp"), None)
        for shard in x.addressable_shards:
            np.testing.assert_array_equal(shard.data, local[name][shard.index])
            assert shard.data.shape == (2, 5)
    with pytest.raises(ValueError, match="'tokens' with local shape \\(6, 5\\)"):
        sharding.global_batch({"tokens": local["tokens"][:6]}, mesh)


@pytest.fixture
def no_dist_env(monkeypatch):
    for var in (sharding.ENV_COORDINATOR, sharding.ENV_NUM_PROCESSES, sharding.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda k, v: updates.append((k, v)))
    return calls, updates


def test_initialize_distributed_sources(no_dist_env, monkeypatch):
    calls, updates = no_dist_env
    assert sharding.initialize_distributed() is False  # nothing configured: one process
    assert sharding.initialize_distributed(config={"num_processes": 1}) is False
    assert calls == []

    assert sharding.initialize_distributed(
        config={"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    )
    assert calls[-1]["coordinator_address"] == "10.0.0.1:1234"
    assert (calls[-1]["num_processes"], calls[-1]["process_id"]) == (4, 3)
    assert updates[-1] == ("jax_cpu_collectives_implementation", "gloo")

    monkeypatch.setenv(sharding.ENV_COORDINATOR, "127.0.0.1:999")
    monkeypatch.setenv(sharding.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(sharding.ENV_PROCESS_ID, "1")
    assert sharding.initialize_distributed(process_id=0)  # arguments win over the environment
    assert calls[-1]["coordinator_address"] == "127.0.0.1:999"
    assert (calls[-1]["num_processes"], calls[-1]["process_id"]) == (2, 0)


def test_initialize_distributed_errors(no_dist_env, monkeypatch):
    with pytest.raises(ValueError, match="half configured"):
        sharding.initialize_distributed(num_processes=2)
    with pytest.raises(ValueError, match="out of range"):
        sharding.initialize_distributed("127.0.0.1:1", 2, 2)
    monkeypatch.setenv(sharding.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        sharding.initialize_distributed()
    assert no_dist_env[0] == []


def test_agree_across_processes_one_process_and_bad_mode():
    # One process: the value itself (the 2-process behaviour is in tests/test_multiprocess.py).
    assert sharding.agree_across_processes(5, "min") == 5
    seeds = np.array([3, 4])
    assert sharding.agree_across_processes(seeds, "first") is seeds
    with pytest.raises(ValueError, match="how='sum'"):
        sharding.agree_across_processes(1, "sum")


def test_batch_rows_must_split_over_the_batch_axes_and_whole_weights_are_reported():
    mesh = sharding.make_mesh(2, 2, 2)
    sharding.check_batch_rows(8, mesh)
    with pytest.raises(ValueError, match=r"6 rows does not split .*data=2 x fsdp=2 = 4"):
        sharding.check_batch_rows(6, mesh)
    tree = {"ok": jax.ShapeDtypeStruct((64, 1 << 18), np.float32),
            "whole": jax.ShapeDtypeStruct((3, (1 << 20) + 1), np.float32)}  # fmt: skip
    axes = {"ok": ("embed", "mlp"), "whole": ("embed", "mlp")}
    shardings = sharding.tree_shardings(tree, axes, mesh)
    with pytest.warns(UserWarning, match=r"1 weight arrays \(0.01 GiB\) are held whole"):
        assert sharding.warn_replicated(tree, shardings, mesh, min_bytes=1 << 20) == ["whole"]


def test_distributed_settings_that_cannot_work_are_named():
    """In a fresh process (initialising jax.distributed is process-wide): an address without a
    port, and a multi-process run with nothing configured where JAX detects no cluster."""
    code = (
        "from jaxpost import sharding\n"
        "for kwargs in ({'coordinator_address': '127.0.0.1', 'num_processes': 2, "
        "'process_id': 0}, {'detect_cluster': True}):\n"
        "    try:\n"
        "        sharding.initialize_distributed(**kwargs)\n"
        "    except ValueError as e:\n"
        "        print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    lines = out.stdout.splitlines()
    assert lines[0] == "coordinator_address='127.0.0.1'; expected host:port, e.g. 10.0.0.2:1234"
    assert lines[1].startswith("a multi-process run needs a coordinator: JAX detected no cluster")
    assert not sharding.initialize_distributed()  # nothing configured: one process, no-op
