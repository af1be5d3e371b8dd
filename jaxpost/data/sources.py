"""Random-access record sources: JSONL, Parquet, ArrayRecord and in-memory lists.

Every source has `name`, `len()`, `source[i] -> raw record` (cheap, lazy) and
`source.decode(raw) -> dict`, which raises `MalformedRow` when the record is not a JSON object.
`source.where(i)` names record i for error messages ("train.jsonl row 7"); rows count from 1
(for JSONL, the line number). Sources are plain `grain` random-access data sources, so
`grain.MapDataset.source(src)` reads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any


class MalformedRow(ValueError):
    """A record that cannot be used: invalid JSON, a missing field or a field of the wrong type."""


class DataError(ValueError):
    """A dataset-level problem: empty dataset, unknown file type, too-long example under 'error'."""


def _decode_json(raw: bytes) -> dict:
    try:
        # Without its line break: a row cut short is reported at its end, not as column 1 of
        # a second line.
        row = json.loads(raw.rstrip(b"\r\n"))
    except json.JSONDecodeError as e:
        raise MalformedRow(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise MalformedRow(f"invalid UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(row, dict):
        raise MalformedRow(f"expected a JSON object, got {type(row).__name__}")
    return row


class JsonlSource:
    """One JSON object per line; blank lines are ignored. The file is indexed once (line
    offsets) and records are read with `os.pread`, so memory does not grow with the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        offsets, lengths, lines = [], [], []
        pos = 0
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(pos)
                    lengths.append(len(line))
                    lines.append(lineno)
                pos += len(line)
        self._offsets, self._lengths, self._lines = offsets, lengths, lines
        self._fd = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> bytes:
        if self._fd is None:  # opened lazily, so a pickled copy (a worker process) reopens it
            self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, self._lengths[i], self._offsets[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def where(self, i: int) -> str:
        return f"{self.name} row {self._lines[i]}"

    def decode(self, raw: bytes) -> dict:
        return _decode_json(raw)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, rows={len(self)})"


class ListSource:
    """In-memory rows (dicts); `name` labels them in error messages."""

    def __init__(self, rows: Sequence[Any], name: str = "<memory>"):
        self._rows = rows
        self.name = name

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> Any:
        return self._rows[i]

    def where(self, i: int) -> str:
        return f"{self.name} row {i + 1}"

    def decode(self, raw: Any) -> dict:
        if not isinstance(raw, dict):
            raise MalformedRow(f"expected a dict, got {type(raw).__name__}")
        return raw

    def __repr__(self) -> str:
        return f"ListSource({self.name!r}, rows={len(self)})"


class ParquetSource(ListSource):
    """A Parquet file read with pyarrow; rows are materialised lazily one at a time."""

    def __init__(self, path: str | os.PathLike):
        import pyarrow.parquet as pq

        self.path = os.fspath(path)
        self._table = pq.read_table(self.path)
        super().__init__(self._table, os.path.basename(self.path))

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, i: int) -> dict:
        return self._table.slice(i, 1).to_pylist()[0]


class ArrayRecordSource:
    """ArrayRecord file(s) whose records are UTF-8 JSON objects (grain's ArrayRecord reader)."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        from grain.sources import ArrayRecordDataSource

        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.path = ",".join(os.fspath(p) for p in paths)
        self.name = ",".join(os.path.basename(os.fspath(p)) for p in paths)
        self._src = ArrayRecordDataSource([os.fspath(p) for p in paths])

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> bytes:
        return self._src[i]

    def where(self, i: int) -> str:
        return f"{self.name} record {i + 1}"

    def decode(self, raw: bytes) -> dict:
        return _decode_json(raw)


_BY_SUFFIX = {
    ".jsonl": JsonlSource,
    ".json": JsonlSource,
    ".parquet": ParquetSource,
    ".array_record": ArrayRecordSource,
    ".arrayrecord": ArrayRecordSource,
}


def open_source(data: str | os.PathLike | Sequence[dict]) -> Any:
    """A path (by suffix: .jsonl/.json, .parquet, .array_record) or a list of dict rows."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        suffix = next((s for s in _BY_SUFFIX if path.endswith(s)), None)
        if suffix is None:
            raise DataError(
                f"cannot tell the format of {path!r} from its suffix; expected one of "
                f"{sorted(_BY_SUFFIX)}"
            )
        if not os.path.exists(path):
            raise DataError(f"data file {path!r} does not exist")
        return _BY_SUFFIX[suffix](path)
    if hasattr(data, "where") and hasattr(data, "decode"):
        return data  # already a source
    return ListSource(list(data))
