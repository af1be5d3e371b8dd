"""Checkpointer: round trip, retention, atomicity, restore onto another mesh, clear errors."""

import asyncio
import os
import shutil
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxpost import sharding
from jaxpost.checkpoint import Checkpointer, CheckpointError
from jaxpost.checksums import is_prng_key
from jaxpost.preemption import PreemptionGuard


def _state(seed: int, hidden: int = 16, rank: int = 4):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "step": jnp.int32(seed),
        "params": {
            "base": {"w": jax.random.normal(k[0], (hidden, 8))},
            "lora": {"a": jax.random.normal(k[1], (hidden, rank)), "b": jnp.zeros((rank, 8))},
        },
        "opt_state": {"mu": jax.random.normal(k[2], (hidden, rank))},
        "rng": k[3],
    }


def _assert_tree_equal(a, b):
    plain = lambda x: jax.random.key_data(x) if is_prng_key(x) else x
    a, b = jax.tree.map(plain, a), jax.tree.map(plain, b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _abstract(tree, sharding_fn=lambda x: None):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), tree
    )


def _restore(path, abstract_state, **kwargs):
    with Checkpointer(path) as ckpt:  # closed on an error too
        return ckpt.restore(abstract_state, **kwargs)


def test_round_trip_with_data_state_and_config(tmp_path):
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        seed = int(np.random.default_rng().integers(1 << 20))
        state = _state(seed)
        data_state = os.urandom(37)  # Grain iterator states are bytes
        ckpt.save(7, state, data_state=data_state, config={"model": {"hidden": 16}}, extra={"x": 1})
    out = _restore(tmp_path, _abstract(state))
    assert out.step == 7 and out.data_state == data_state and out.extra == {"x": 1}
    assert out.config == {"model": {"hidden": 16}}
    _assert_tree_equal(out.state, state)
    # The restored key generates exactly what the original key generates.
    np.testing.assert_array_equal(
        jax.random.uniform(out.state["rng"], (5,)), jax.random.uniform(state["rng"], (5,))
    )


def test_keep_last_and_keep_every(tmp_path):
    with Checkpointer(tmp_path, keep_last=2, keep_every=4) as ckpt:
        state = _state(0, hidden=4)
        for step in range(1, 11):
            ckpt.save(step, state)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [4, 8, 9, 10]


def test_half_written_checkpoint_is_ignored(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        state = _state(1, hidden=4)
        ckpt.save(2, state, wait=True)
    # What an interrupted async save leaves behind: the temporary directory, never renamed.
    partial = tmp_path / "3.orbax-checkpoint-tmp-1234"
    shutil.copytree(tmp_path / "2", partial)
    (partial / "state" / "manifest.ocdbt").unlink()
    with Checkpointer(tmp_path) as again:
        assert again.latest_step() == 2
        assert again.all_steps() == [2]
        _assert_tree_equal(again.restore(_abstract(state)).state, state)


def test_restore_on_a_different_mesh(tmp_path):
    state = _state(3, hidden=16)
    single = jax.devices()[0]
    state = jax.device_put(state, single)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, wait=True)
    mesh = sharding.make_mesh(data=2, fsdp=4)

    def spec(x):
        # Shard dim 0 over fsdp when it divides, else replicate.
        if x.ndim and x.shape[0] % 4 == 0:
            return NamedSharding(mesh, PartitionSpec("fsdp"))
        return NamedSharding(mesh, PartitionSpec())

    out = _restore(tmp_path, _abstract(state, spec)).state
    w = out["params"]["base"]["w"]
    assert w.sharding == NamedSharding(mesh, PartitionSpec("fsdp"))
    assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape == (4, 8)
    _assert_tree_equal(out, state)


def test_other_lora_shape_names_the_leaves(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, _state(0, rank=4), wait=True)
    with pytest.raises(CheckpointError) as info:
        _restore(tmp_path, _abstract(_state(0, rank=8)))
    msg = str(info.value)
    assert "params/lora/a: checkpoint has shape [16, 4] float32, this run expects [16, 8]" in msg
    assert "params/lora/b" in msg


def test_other_model_config_names_the_fields(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        state = _state(0)
        ckpt.save(
            5, state, config={"model": {"arch": {"hidden_size": 64, "num_layers": 2}}}, wait=True
        )
    with pytest.raises(CheckpointError, match="model.arch.hidden_size: 64 in the checkpoint, 32"):
        _restore(
            tmp_path, _abstract(state), model_config={"arch": {"hidden_size": 32, "num_layers": 2}}
        )
    # Mixed precision on or off changes how the model computes, not its weights: allowed.
    arch = {"hidden_size": 64, "num_layers": 2}
    restored = _restore(
        tmp_path, _abstract(state), model_config={"arch": arch, "compute_dtype": "bfloat16"}
    )
    assert int(restored.state["step"]) == 0


def test_another_optimizer_is_named_as_the_likely_cause(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, _state(0), wait=True)
    other = _state(0)
    mu = other["opt_state"]["mu"]
    other["opt_state"] = {"mu": mu, **{f"nu{i}": mu for i in range(10)}}  # past the 8 listed
    with pytest.raises(CheckpointError, match=r"\(another optimizer\?\):\n  opt_state/nu0") as e:
        _restore(tmp_path, _abstract(other))
    assert "... and 2 more" in str(e.value)


def test_a_failed_save_is_one_clear_error_and_keeps_the_saved_steps(tmp_path, monkeypatch):
    """A full disk: Orbax's error (TensorStore's, with a bound-method repr on its end) becomes a
    CheckpointError naming the directory and the cause; the steps saved before stay."""
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(4, _state(0))
        full = ValueError(
            f'RESOURCE_EXHAUSTED: Error writing "w/0" in {"x" * 400}: No space left on device '
            "[os_error_code='28'] [See full TensorStore details: <bound method x of y>]\nmore"
        )
        fail = {"with": full}
        monkeypatch.setattr(
            ckpt._manager, "save", lambda *a, **k: (_ for _ in ()).throw(fail["with"])
        )
        with pytest.raises(CheckpointError) as info:
            ckpt.save(8, _state(1))
        fail["with"] = TypeError("Object of type set is not JSON serializable")
        with pytest.raises(CheckpointError) as other:
            ckpt.save(8, _state(1))
    msg = str(info.value)
    assert f"saving a checkpoint in {tmp_path} failed (ValueError: No space left" in msg
    assert "TensorStore details" not in msg and "more" not in msg and "free space" in msg
    assert "not JSON serializable" in str(other.value) and "free space" not in str(other.value)
    _assert_tree_equal(_restore(tmp_path, _abstract(_state(0))).state, _state(0))  # step 4 intact


def test_missing_leaf_is_named(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        state = _state(0)
        ckpt.save(1, state, wait=True)
    bigger = {**state, "extra": jnp.zeros(3)}
    with pytest.raises(CheckpointError, match="extra: expected by this run, absent"):
        _restore(tmp_path, _abstract(bigger))


def test_corrupt_arrays_are_a_clear_error(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        state = _state(0)
        ckpt.save(4, state, wait=True)
    for f in (tmp_path / "4" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"4 is corrupt or incomplete: its arrays"):
        _restore(tmp_path, _abstract(state))


def test_a_failed_restore_leaves_no_reads_behind():
    """Orbax closes its restore loop at the first failed read. The loop it gets inside
    draining_orbax_loops cancels and finishes the other reads first, so none of them prints a
    traceback after the error (run here through Orbax's own run_sync, as a restore runs)."""
    from orbax.checkpoint._src import asyncio_utils

    from jaxpost.orbax_loops import draining_orbax_loops

    reports, started, cancelled, loops = [], [], [], []

    async def read(i):
        started.append(i)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    async def restore():
        loop = asyncio.get_running_loop()
        loops.append(loop)
        loop.set_exception_handler(lambda _, context: reports.append(context["message"]))
        for i in range(3):
            loop.create_task(read(i))
        loop.create_task(asyncio.sleep(60))  # never runs before the failure
        await asyncio.sleep(0)
        raise ValueError("corrupt")

    with draining_orbax_loops(), pytest.raises(ValueError, match="corrupt"):
        asyncio_utils.run_sync(restore())  # a fresh loop, closed by Orbax after the failure
    (loop,) = loops
    assert loop.is_closed() and started == sorted(cancelled) == [0, 1, 2]
    assert asyncio.all_tasks(loop) == set()
    # A result TensorStore delivers from its thread after the close is dropped, not raised.
    thread = threading.Thread(target=loop.call_soon_threadsafe, args=(print, "late"))
    thread.start(), thread.join()
    assert reports == []


async def _running_loop():
    return asyncio.get_running_loop()


def test_checkpointers_give_orbax_draining_loops_and_leave_other_loops_alone(tmp_path):
    """An open Checkpointer makes the loops Orbax creates (its restores, its background saves'
    threads) draining ones; user code's loops and each thread's current loop are untouched.
    Holders may overlap and close in any order; the ordinary policy comes back after the last."""
    from orbax.checkpoint._src import asyncio_utils

    from jaxpost.orbax_loops import _DrainingEventLoop

    def orbax_loop_type():
        return type(asyncio_utils.run_sync(_running_loop()))

    def user_loop_type():
        loop = asyncio.new_event_loop()
        loop.close()
        return type(loop)

    ordinary = user_loop_type()
    assert orbax_loop_type() is ordinary is not _DrainingEventLoop
    mine = asyncio.new_event_loop()
    asyncio.set_event_loop(mine)
    try:
        first = Checkpointer(tmp_path / "a")
        second = Checkpointer(tmp_path / "b")
        assert asyncio.get_event_loop() is mine  # the thread's current loop is still the user's
        # (Orbax's own run_sync clears it, with or without jaxpost: set it again after.)
        assert orbax_loop_type() is _DrainingEventLoop and user_loop_type() is ordinary
        found = []
        thread = threading.Thread(target=lambda: found.append(orbax_loop_type()))
        thread.start(), thread.join()
        assert found == [_DrainingEventLoop]  # a background thread's Orbax loop too
        first.close()
        assert orbax_loop_type() is _DrainingEventLoop  # the second is still open
        first.close()  # closing twice releases once
        assert orbax_loop_type() is _DrainingEventLoop
        asyncio.set_event_loop(mine)
        second.close()
        assert asyncio.get_event_loop() is mine and orbax_loop_type() is ordinary
    finally:
        asyncio.set_event_loop(None)
        mine.close()


def test_a_flipped_bit_is_caught_by_the_checksums(tmp_path):
    """A bit flipped in an array file (here in the middle of its zstd stream) is read back by
    Orbax without complaint, as different values; the checksums saved in the metadata catch it
    and name the array."""
    state = {**_state(0), "big": jax.random.normal(jax.random.key(1), (4096,))}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(4, state, wait=True)
    files = [f for f in (tmp_path / "4" / "state").rglob("*") if f.parent.name == "d"]
    target = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with ocp.StandardCheckpointer() as plain:  # Orbax alone: no error, other numbers
        silent = plain.restore(tmp_path / "4" / "state")
    assert not np.array_equal(silent["big"], state["big"])
    with pytest.raises(
        CheckpointError, match=r"4 is corrupt: 1 array\(s\) read back differ .*\(big\)"
    ):
        _restore(tmp_path, _abstract(state))


def test_checksums_see_every_bit_and_position_not_the_layout():
    from jaxpost.checksums import checksums

    rng = np.random.default_rng(0)
    leaves = {
        "f32": rng.normal(size=(6, 10)).astype(np.float32),
        "bf16": rng.normal(size=(6, 10)).astype(jnp.bfloat16),
        "u8": rng.integers(0, 255, (6, 10)).astype(np.uint8),
        "i32": np.int32(7),
        "bool": rng.random((6, 10)) > 0.5,
    }
    base = checksums(leaves)
    for name, x in leaves.items():
        flat = np.array(x).reshape(-1)
        for i, bit in ((0, 0), (flat.size - 1, 8 * flat.itemsize - 1)):
            if flat.dtype == bool:
                changed = flat.copy()
                changed[i] = ~changed[i]
            else:
                words = flat.view(f"u{flat.itemsize}").copy()
                words[i] ^= np.array(1 << bit).astype(words.dtype)
                changed = words.view(flat.dtype)
            got = checksums({**leaves, name: changed.reshape(np.shape(x))})
            assert got[name] != base[name], (name, i, bit)
            assert {k: v for k, v in got.items() if k != name} == {
                k: v for k, v in base.items() if k != name
            }
    swapped = leaves["f32"].copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    assert checksums({**leaves, "f32": swapped})["f32"] != base["f32"]
    # The same values laid out over 8 devices give the same sums (restore onto another mesh).
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
    sharded = jax.device_put(np.zeros((6, 8), np.float32) + leaves["f32"][:, :8], spec)
    assert checksums(sharded) == checksums(leaves["f32"][:, :8])


def test_corrupt_metadata_is_a_clear_error(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        state = _state(0)
        ckpt.save(4, state, wait=True)
    (tmp_path / "4" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match="its metadata cannot be read .*; move that step"):
        _restore(tmp_path, _abstract(state))


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found in"):
        _restore(tmp_path / "empty", {})


def test_preemption_guard_turns_sigterm_into_a_flag():
    with PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested == "SIGTERM" and guard.should_stop()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_each_process_data_state_and_checkpoints_from_before_them():
    from jaxpost.checkpoint import _own_data_state

    assert _own_data_state({"data_states": [{"next_index": 7}]}, "ck") == {"next_index": 7}
    # Written before per-process states (one state, process 0's): still read.
    assert _own_data_state({"data_state": {"next_index": 5}}, "ck") == {"next_index": 5}
    assert _own_data_state({"data_states": [None, None]}, "ck") is None  # no data position
    with pytest.raises(CheckpointError, match=r"ck was written by 2 process\(es\) and this run"):
        _own_data_state({"data_states": [{"i": 1}, {"i": 2}]}, "ck")


def test_a_failing_close_does_not_hide_the_error_in_flight(tmp_path, monkeypatch):
    """Closing after another error (a preemption, a NaN) finishes the pending save; if that fails
    too, the first error still propagates (its exit code is the run's)."""
    ckpt = Checkpointer(tmp_path)

    def broken():
        raise ValueError("No space left on device")

    monkeypatch.setattr(ckpt._manager, "wait_until_finished", broken)
    with pytest.raises(KeyboardInterrupt):
        with ckpt:
            raise KeyboardInterrupt
    with pytest.raises(CheckpointError, match="No space left on device"):
        with ckpt:
            pass


def test_a_save_failed_on_another_process_stops_this_one_too(tmp_path, monkeypatch):
    """Under several processes `check_for_errors` is a collective: a save counts as done once
    every process's is, and a failure anywhere raises on every process at that step, none left
    waiting in the next step's collectives. The other process is stood in for by the host
    collective's answers (here: all done, one failed)."""
    import time

    asked = []

    def agree(value, how):
        asked.append((value, how))
        return {"min": True, "any": True}[how]

    with Checkpointer(tmp_path / "c") as c:
        c.check_for_errors()  # no save in flight: nothing to ask the other processes yet
        c.save(1, {"w": jnp.arange(4.0)})
        deadline = time.monotonic() + 60
        while c._manager.is_saving_in_progress() and time.monotonic() < deadline:
            time.sleep(0.01)
        monkeypatch.setattr(sharding, "agree_across_processes", agree)
        with pytest.raises(CheckpointError, match="failed on another process"):
            c.check_for_errors()
        assert asked == [(True, "min"), (False, "any")]  # this process's own save succeeded
        monkeypatch.undo()
    assert c.latest_step() == 1
