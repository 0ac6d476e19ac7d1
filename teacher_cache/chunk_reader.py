"""Reading one modality of a store a whole stored chunk at a time, each chunk checked against its checksum.

Zarr keeps chunk *c* of ``images/emb`` as the file ``images/emb/c/<c>/0``: Blosc-compressed little-endian float16
rows, the last chunk padded to the full chunk shape (data/README.md). ``ChunkReader`` decodes those files directly
when an array has exactly the layout a build writes (60% of the time zarr's codec pipeline takes) and through zarr
otherwise. Each chunk is checked against the sha256 the build recorded for it (``attrs["checksums"]``) the first time
a process decodes it, so a byte damaged on disk after the build stops training with the chunk's name instead of
feeding it wrong soft labels; that costs about a third of the first epoch's decode time, and nothing after.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import zarr
from numcodecs import blosc

from teacher_cache.errors import RemoteError, StoreError
from teacher_cache.remote_store import CachedRemoteStore
from teacher_cache.store import Store


class ChunkReader:
    """One modality of a store, read a whole stored chunk at a time as float16 rows, each checked against its
    recorded checksum."""

    def __init__(self, store: Store, modality: str, verify: bool = True):
        self.store = store
        self.modality = modality
        self.verify = verify
        self.chunk_rows = store.chunk_rows
        self.rows = store.counts[modality]
        self.dim = store.dims[modality]
        self.n_chunks = store.n_chunks(modality)
        self._array = store.array(modality)
        self._checksums = list((store.attrs.get("checksums") or {}).get(modality) or []) if verify else []
        if verify and len(self._checksums) != self.n_chunks:
            raise StoreError(f"{store.location}: {len(self._checksums)} {modality} checksums recorded for "
                             f"{self.n_chunks} chunks; `cusa-cache verify {store.location}` tells what is wrong")
        self._direct = _plain_blosc_layout(self._array)
        self._verified: set[int] = set()

    def _decode(self, chunk: int, start: int, stop: int) -> np.ndarray:
        if self._direct is None:
            return np.ascontiguousarray(self._array[start:stop], dtype=np.float16)
        # the layout every build writes, decoded without zarr's codec pipeline (60% of a chunk's read time):
        # one file per chunk, blosc over little-endian float16, edge chunks padded to the full chunk shape
        read_file, file_rows = self._direct
        raw = read_file(self._array.metadata.encode_chunk_key((chunk, 0)))
        if raw is None:  # zarr leaves out chunks that hold only the fill value (rows of skipped images)
            return np.zeros((stop - start, self.dim), dtype=np.float16)
        rows = np.frombuffer(blosc.decompress(raw), dtype="<f2").reshape(file_rows, self.dim)
        return rows[:stop - start].astype(np.float16, copy=False)

    def chunk_bytes(self, chunk: int) -> int:
        start, stop = self.store.chunk_range(self.modality, chunk)
        return (stop - start) * self.dim * 2

    def read(self, chunk: int) -> np.ndarray:
        start, stop = self.store.chunk_range(self.modality, chunk)
        try:
            rows = self._decode(chunk, start, stop)
        except RemoteError:
            raise  # already one line naming the URL and the chunk
        except Exception as exc:  # an unreadable or undecodable chunk file
            raise StoreError(f"{self.store.location}: cannot read {self.modality} chunk {chunk} "
                             f"(rows {start}-{stop - 1}): {type(exc).__name__}: {exc}; `cusa-cache verify {self.store.location}` lists every "
                             "problem, re-running its build repairs it") from exc
        # the sha256 of the float16 bytes (store.chunk_checksum), hashed in place rather than from a copy; once per
        # chunk and process (later epochs read bytes already checked)
        if self.verify and chunk not in self._verified:
            if hashlib.sha256(memoryview(np.ascontiguousarray(rows)).cast("B")).hexdigest() == self._checksums[chunk]:
                self._verified.add(chunk)
                return rows
            raise StoreError(f"{self.store.location}: {self.modality} chunk {chunk} (rows {start}-{stop - 1}) does not "
                             "match the checksum its build recorded (damaged on disk since); re-run the store's "
                             "`cusa-cache build` command to recompute it")
        return rows


def _plain_blosc_layout(array: zarr.Array) -> tuple[Callable[[str], bytes | None], int] | None:
    """(reader of a chunk file's bytes by chunk key, None for an absent file; rows per chunk file) when ``array`` is
    stored as a build writes it: local files (or a store at a URL, whose files come through its local cache), default
    chunk keys, float16 row chunks spanning every column, bytes (little-endian) + blosc codecs and nothing else.
    None otherwise: then it is read through zarr."""
    meta = array.metadata
    try:
        bytes_codec, blosc_codec = tuple(meta.codecs)
        rows, cols = meta.chunk_grid.chunk_shape
        plain = (isinstance(bytes_codec, zarr.codecs.BytesCodec)
                 and getattr(bytes_codec.endian, "value", bytes_codec.endian) == "little"
                 and isinstance(blosc_codec, zarr.codecs.BloscCodec)
                 and meta.chunk_key_encoding.name == "default" and meta.chunk_key_encoding.separator == "/"
                 and array.dtype == np.float16 and cols == array.shape[1]
                 and not getattr(meta, "storage_transformers", ()))
        if isinstance(array.store, zarr.storage.LocalStore):
            folder = Path(array.store.root) / array.path

            def read_file(key: str) -> bytes | None:
                try:
                    return (folder / key).read_bytes()
                except FileNotFoundError:
                    return None
        elif isinstance(array.store, CachedRemoteStore):
            remote, prefix = array.store, array.path

            def read_file(key: str) -> bytes | None:
                return remote.read_key(f"{prefix}/{key}")
        else:
            return None
    except (AttributeError, TypeError, ValueError):
        return None
    return (read_file, int(rows)) if plain else None
