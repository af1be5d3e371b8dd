"""The safetensors reader and writer against the `safetensors` library itself."""

from __future__ import annotations

import json
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch

from jaxpost.models import safetensors_io

TORCH_DTYPES = {
    torch.float32: np.float32,
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.float16: np.float16,
    torch.int32: np.int32,
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
}


def _random_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(TORCH_DTYPES):
        shape = (3 + i, 5, 2) if i % 2 else (7, 4)
        out[f"t{i}"] = (torch.randn(shape, generator=g) * 10).to(dtype)
    out["scalar"] = torch.tensor(1.5)
    return out


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn):
        return t.float().numpy().astype(TORCH_DTYPES[t.dtype])
    return t.numpy()


def test_reads_library_files_including_slices(tmp_path):
    tensors = _random_tensors(0)
    safetensors.torch.save_file(tensors, tmp_path / "a.safetensors")
    f = safetensors_io.SafetensorsFile(tmp_path / "a.safetensors")
    assert set(f.entries) == set(tensors)
    for name, t in tensors.items():
        want = _as_numpy(t)
        got = f.read(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
        if t.ndim >= 2:
            index = (slice(1, 3), slice(None, None, 2))
            np.testing.assert_array_equal(
                f.read(name, index).astype(np.float32), want[index].astype(np.float32)
            )


def test_written_files_load_in_the_library(tmp_path):
    arrays = {k: _as_numpy(t) for k, t in _random_tensors(1).items()}
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    safetensors_io.write(
        tmp_path / "b.safetensors", [(k, lambda a=a: a, spec(a)) for k, a in arrays.items()]
    )
    back = safetensors.torch.load_file(tmp_path / "b.safetensors")
    assert set(back) == set(arrays)
    for name, a in arrays.items():
        np.testing.assert_array_equal(
            _as_numpy(back[name]).astype(np.float32), a.astype(np.float32)
        )
        assert _as_numpy(back[name]).dtype == a.dtype


def test_unsupported_dtype_is_named(tmp_path):
    header = json.dumps({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "c.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ValueError, match="'x' has dtype 'C64'"):
        safetensors_io.SafetensorsFile(tmp_path / "c.safetensors")


def test_inconsistent_offsets_are_corrupt(tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "d.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ValueError, match=r"d.safetensors: corrupt header: tensor 'x'"):
        safetensors_io.SafetensorsFile(tmp_path / "d.safetensors")
