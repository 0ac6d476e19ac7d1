"""Strings held as one byte buffer plus offsets (Arrow's ``large_binary`` layout), never one Python object per row.

A manifest of millions of rows keeps its ids, paths and captions in :class:`StringColumn` s: a value is decoded when
it is asked for, a subset is gathered in C++ (``pyarrow.compute.take``), and a column read from a memory-mapped
Arrow file touches only the pages its rows live on, so the ranks of one node share them.

Text is stored as UTF-8 with ``surrogatepass``: a caption read from JSON may hold a lone surrogate (the readers keep
captions as written), and such a value comes back unchanged.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Sequence, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_ENCODING = ("utf-8", "surrogatepass")


class StringColumn(Sequence[str]):
    """An immutable sequence of strings over a ``pa.LargeBinaryArray``; ``len``, indexing and iteration as a list."""

    __slots__ = ("array", "_offsets", "_data")

    def __init__(self, array: pa.Array):
        if array.type != pa.large_binary():
            array = array.cast(pa.large_binary())
        if array.null_count:
            raise ValueError("a string column holds no nulls")
        self.array = array
        offsets, data = array.buffers()[1], array.buffers()[2]
        self._offsets = np.frombuffer(offsets, dtype=np.int64)[array.offset:array.offset + len(array) + 1]
        self._data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)

    @classmethod
    def from_strings(cls, values: Iterable[str]) -> "StringColumn":
        return cls(pa.array([v.encode(*_ENCODING) for v in values], type=pa.large_binary()))

    @classmethod
    def empty(cls) -> "StringColumn":
        return cls(pa.array([], type=pa.large_binary()))

    @classmethod
    def concat(cls, columns: Sequence["StringColumn"]) -> "StringColumn":
        if not columns:
            return cls.empty()
        if len(columns) == 1:
            return columns[0]
        return cls(pa.concat_arrays([c.array for c in columns]))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.value(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} of a column of {n}")
        return self.value(i)

    def value(self, i: int) -> str:
        """Row ``i`` (no bounds check beyond numpy's)."""
        return self.raw(i).decode(*_ENCODING)

    def raw(self, i: int) -> bytes:
        return self._data[self._offsets[i]:self._offsets[i + 1]].tobytes()

    def __iter__(self) -> Iterator[str]:
        return (self.value(i) for i in range(len(self)))

    def tolist(self) -> list[str]:
        """Every value as a Python string (small columns; large ones are read by row or by slice)."""
        data = self._data.tobytes() if len(self._data) else b""
        bounds = self._offsets.tolist()
        return [data[a:b].decode(*_ENCODING) for a, b in zip(bounds[:-1], bounds[1:])]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringColumn):
            return self.array.equals(other.array)
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(v) for v in self[:3])
        return f"StringColumn([{head}{', …' if len(self) > 3 else ''}], n={len(self)})"

    def take(self, rows: np.ndarray) -> "StringColumn":
        """The values at ``rows`` (any int array), gathered without building Python strings."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == len(self) and (len(rows) == 0 or (rows[0] == 0 and np.all(np.diff(rows) == 1))):
            return self
        return StringColumn(pc.take(self.array, pa.array(rows)))

    def slice(self, start: int, stop: int) -> "StringColumn":
        return StringColumn(self.array.slice(start, stop - start))

    def buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """(int64 offsets [n + 1], uint8 bytes): the column's own memory, read-only views."""
        return self._offsets, self._data

    def byte_lengths(self) -> np.ndarray:
        return np.diff(self._offsets)

    def hash_into(self, digest: "hashlib._Hash", start: int = 0, stop: int | None = None) -> None:
        """Feed rows [start, stop) to ``digest``: their byte lengths (int64, little-endian), then their bytes."""
        stop = len(self) if stop is None else stop
        bounds = self._offsets[start:stop + 1]
        digest.update(np.ascontiguousarray(np.diff(bounds), dtype="<i8").tobytes())
        if stop > start:
            digest.update(memoryview(self._data[bounds[0]:bounds[-1]]))


def strings_from_codes(codes: np.ndarray, labels: Sequence[str]) -> StringColumn:
    """A column of ``labels[code]`` per row (split labels, extensions), gathered in C++."""
    return StringColumn.from_strings(labels).take(np.asarray(codes, dtype=np.int64))
