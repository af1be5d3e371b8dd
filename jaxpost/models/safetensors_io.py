"""The safetensors format, read through a memory map and written tensor by tensor.

`safetensors.safe_open(framework="numpy")` cannot return bfloat16, so files are decoded here
(ml_dtypes supplies bfloat16): a little-endian u64 header length, a JSON header mapping each
tensor name to dtype / shape / data_offsets (relative to the end of the header), then the bytes.
Reading a slice of a tensor touches only the pages that hold it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_CODES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. `read` copies out one (slice of a) tensor."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(
                    f"{path}: corrupt or truncated safetensors file: header of {n} bytes "
                    f"but the file has {size} bytes"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        end_of_data = 0
        for name, info in header.items():
            if isinstance(info, dict) and info.get("dtype") not in _DTYPES:
                raise ValueError(
                    f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}; "
                    f"supported: {sorted(_DTYPES)}"
                )
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: corrupt header entry for tensor {name!r}: {info}") from e
            if end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(
                    f"{path}: corrupt header: tensor {name!r} of shape {shape} {info['dtype']} "
                    f"spans {end - start} bytes"
                )
            self.entries[name] = (dtype, shape, start)
            end_of_data = max(end_of_data, end)
        if self.data_start + end_of_data > size:
            raise ValueError(
                f"{path}: truncated safetensors file: the header declares "
                f"{self.data_start + end_of_data} bytes, the file has {size}"
            )

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """tensor[index] as an in-memory array in the file's dtype (only those bytes are read)."""
        dtype, shape, start = self.entries[name]
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)[index]
        # A map per read, dropped right after the copy, so pages already read do not stay
        # resident (they would count against the process like a second copy of the weights).
        mapped = np.memmap(self.path, dtype, mode="r", offset=self.data_start + start, shape=shape)
        out = np.array(mapped[index])
        del mapped  # the last reference: unmaps
        return out


def write(path: Path, tensors: list[tuple[str, Callable[[], np.ndarray], Any]]) -> None:
    """Write tensors given as (name, thunk returning the array, ShapeDtypeStruct), fetching and
    writing one at a time; the header is computed up front from the declared shapes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _, spec in tensors:
        nbytes = math.prod(spec.shape) * spec.dtype.itemsize
        code = _CODES[np.dtype(spec.dtype)]
        header[name] = {
            "dtype": code,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, thunk, spec in tensors:
            a = thunk()
            if a.shape != tuple(spec.shape) or a.dtype != spec.dtype:
                raise AssertionError(f"{name}: produced {a.shape} {a.dtype}, declared {spec}")
            f.write(a.tobytes())
