"""The teacher cache on disk: a Zarr v3 store of L2-normalised teacher embeddings.

The layout is documented in data/README.md. Rows are the join key: row i of ``images/emb`` is image i of
the manifest the store was built from, row j of ``texts/emb`` is caption j. A build writes every row chunk
followed by a small progress marker (so an interrupted build resumes chunk by chunk), then the neighbor
tables, then the per-chunk checksums into the attributes, and the completion mark last.

Finishing a store re-reads every chunk against the checksum taken when it was written, and records a digest of each
identity-bearing attribute and the size of every data file. Opening a complete store for use
(``require_complete=True``) re-checks those digests, sizes and the array shapes, which costs a few file stats and
no data reads; ``teacher_cache.verify`` re-reads every chunk.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import zarr

from teacher_cache.errors import StoreError, StoreMismatch

FORMAT_VERSION = 1
MODALITIES = ("images", "texts")
DEFAULT_CHUNK_ROWS = 2048
_PROGRESS_DIR = "_progress"
_FAISS_DIR = "faiss"
_LOCK_FILE = "_build.lock"
_STRING_CHUNK_ROWS = 1 << 16  # ids, paths, splits, captions: rows per chunk
_MANIFEST_DIR = "manifest"  # a copy of the source's manifest index (pipeline.manifest_index): not store data
# Attributes that say what the rows are; their digests, recorded when a build finishes, expose later edits.
DIGESTED_ATTRS = ("format_version", "fingerprint", "split_fingerprints", "teachers", "counts", "dims", "chunk_rows",
                  "checksums", "skipped_images", "neighbors", "files", "caption_notes")
_DIGESTS = "attrs_digests"


def _compressor() -> zarr.codecs.BloscCodec:
    # Blosc (numcodecs) with byte shuffle suits float16 rows; zstd keeps it small without slowing reads.
    return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def chunk_checksum(rows: np.ndarray) -> str:
    """sha256 of the float16 bytes of a row chunk, exactly as stored."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.float16).tobytes()).hexdigest()


def neighbor_checksums(ids: np.ndarray, sims: np.ndarray) -> dict[str, str]:
    """sha256 of a neighbor table's int64 ids and float32 similarities, as its build records them."""
    return {"ids": hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest(),
            "sims": hashlib.sha256(np.ascontiguousarray(sims, dtype=np.float32).tobytes()).hexdigest()}


def attrs_digest(value) -> str:
    """sha256 of an attribute value's canonical JSON (sorted keys, fixed separators, ASCII escapes)."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _atomic_write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RemoteFiles(Protocol):
    """Where the files of a store at a URL come from (teacher_cache.remote_store.RemoteStoreFiles)."""

    def local_file(self, rel: str) -> Path: ...

    def size_bytes(self) -> int: ...


@dataclass
class StoreLayout:
    """Everything a store records about its rows, independent of any model code."""

    fingerprint: str
    split_fingerprints: dict[str, str]
    image_ids: Sequence[str]
    image_paths: Sequence[str]
    image_splits: Sequence[str]
    captions: Sequence[str]
    caption_image_rows: np.ndarray
    teachers: dict[str, dict]  # {"image": identity, "text": identity}
    dims: dict[str, int]  # {"images": D_i, "texts": D_t}
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    source: str = ""
    skipped_samples: list[dict] = field(default_factory=list)  # shard samples left out of the rows: {shard, key, reason}
    fingerprint_format: int = 2  # how the dataset's fingerprints were computed (1: before per-shard digests)

    @property
    def counts(self) -> dict[str, int]:
        return {"images": len(self.image_ids), "texts": len(self.captions)}


@dataclass
class ChunkProgress:
    """What the store already holds: finished chunk indices per modality, with their checksums."""

    done: dict[str, dict[int, dict]] = field(default_factory=lambda: {m: {} for m in MODALITIES})


class Store:
    """A teacher cache: open with :meth:`open` (read) or :meth:`create_or_resume` (build)."""

    def __init__(self, path: Path, group: zarr.Group, writable: bool, *, location: str | None = None,
                 remote: "RemoteFiles | None" = None):
        self.path = Path(path)  # a store at a URL: the local folder its cached files are kept in
        self.location = location or str(self.path)  # how messages name the store: its folder, or its URL redacted
        self.remote = remote
        self._group = group
        self._writable = writable
        self._cache: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, require_complete: bool = False) -> "Store":
        """A store folder, read-only. ``require_complete``: refuse an unfinished build or a damaged store (a few file
        stats, no data reads). A store at a URL is opened by ``teacher_cache.remote_store.open_store``."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: not a cusa store (no zarr.json); build one with `cusa-cache build`")
        try:
            group = zarr.open_group(str(path), mode="r")
            attrs = dict(group.attrs)
        except Exception as exc:  # a damaged root document
            raise StoreError(f"{path}: cannot read the store's root attributes ({exc})") from exc
        return cls.from_group(path, group, attrs, require_complete=require_complete)

    @classmethod
    def from_group(cls, path: Path, group: zarr.Group, attrs: dict, *, require_complete: bool = False,
                   location: str | None = None, remote: "RemoteFiles | None" = None) -> "Store":
        """A read-only store over an open zarr group whose root attributes are ``attrs``, checked as :meth:`open`
        says. ``location`` names it in messages (a URL, redacted); ``remote`` brings its files when they are not
        in ``path`` (a local cache folder of a store at a URL)."""
        name = location or str(path)
        if "format_version" not in attrs:
            raise StoreError(f"{name}: not a cusa store (no format_version attribute)")
        version = attrs["format_version"]
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            hint = ("it was written by a newer cusa: upgrade cusa to read it" if newer else
                    "rebuild it with this cusa: `cusa-cache build ... --overwrite` (same annotations and teachers)")
            raise StoreMismatch(
                f"{name}: store format version {version}, this cusa reads version {FORMAT_VERSION}; {hint}",
                field="format_version",
            )
        _check_attr_types(name, attrs)
        store = cls(path, group, writable=False, location=location, remote=remote)
        if require_complete:
            if not store.complete:
                raise StoreError(
                    f"{name}: the store is incomplete (the build was interrupted); "
                    "re-run the same `cusa-cache build` command to finish it"
                )
            problems = store.integrity_problems()
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise StoreError(f"{name}: damaged store refused: {problems[0]}{more}; "
                                 f"`cusa-cache verify {name}` lists every problem")
        return store

    @classmethod
    def create_or_resume(cls, path: str | os.PathLike, layout: StoreLayout, *, overwrite: bool = False) -> "Store":
        """Create a new store for ``layout``, or reopen a matching one to resume its build.

        A store built from another manifest, teacher or format version is refused (naming the field that
        differs) unless ``overwrite`` is set, in which case it is deleted first. A non-empty folder that is not a
        store is always refused: ``overwrite`` never deletes files it did not write.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path}: exists and is not a folder; choose another --out")
        ours = {_LOCK_FILE}
        entries = [p for p in path.iterdir() if p.name not in ours] if path.exists() else []
        if entries and not _looks_like_store(path):
            # --overwrite replaces a store, never a folder of other files that was named by mistake
            raise StoreError(f"{path}: exists and is not a cusa store; choose another --out or an empty folder")
        if entries and overwrite:
            for entry in entries:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            entries = []
        if entries:
            if (path / _PROGRESS_DIR).is_dir() and "format_version" not in _root_attrs(path):
                # killed while creating the empty layout: nothing was computed yet, so start again
                return cls._create(path, layout)
            existing = cls.open(path)
            existing.check_matches(layout)
            group = zarr.open_group(str(path), mode="r+")
            return cls(path, group, writable=True)
        return cls._create(path, layout)

    @classmethod
    def _create(cls, path: Path, layout: StoreLayout) -> "Store":
        path.mkdir(parents=True, exist_ok=True)
        (path / _PROGRESS_DIR).mkdir(exist_ok=True)  # first: marks the folder as a store being created
        for entry in path.iterdir():
            if entry.name not in (_LOCK_FILE, _PROGRESS_DIR):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        group = zarr.open_group(str(path), mode="a")
        n_img, n_txt = len(layout.image_ids), len(layout.captions)
        cr = layout.chunk_rows
        group.create_array("images/emb", shape=(n_img, layout.dims["images"]), dtype="float16",
                           chunks=(min(cr, max(n_img, 1)), layout.dims["images"]), compressors=_compressor(),
                           fill_value=0)
        group.create_array("texts/emb", shape=(n_txt, layout.dims["texts"]), dtype="float16",
                           chunks=(min(cr, max(n_txt, 1)), layout.dims["texts"]), compressors=_compressor(),
                           fill_value=0)
        for name, values in (
            ("images/ids", layout.image_ids),
            ("images/paths", layout.image_paths),
            ("images/split", layout.image_splits),
            ("texts/captions", layout.captions),
        ):
            n = len(values)
            step = _STRING_CHUNK_ROWS
            arr = group.create_array(name, shape=(n,), dtype=str, chunks=(max(min(n, step), 1),))
            for lo in range(0, n, step):  # a slice at a time: the values may be a lazy column of millions
                arr[lo:min(lo + step, n)] = np.array(values[lo:lo + step], dtype=object)
        rows = group.create_array("texts/image_row", shape=(n_txt,), dtype="int64", chunks=(max(n_txt, 1),))
        if n_txt:
            rows[:] = np.asarray(layout.caption_image_rows, dtype=np.int64)
        (path / _PROGRESS_DIR / "images").mkdir(parents=True, exist_ok=True)
        (path / _PROGRESS_DIR / "texts").mkdir(parents=True, exist_ok=True)
        # The root attributes are written last so a half-created store is recognisably not a store yet, and in one
        # atomic write: zarr's attrs.update() writes zarr.json once per key, and a kill between two leaves half a set.
        group.attrs.put({
            "cusa_store": True,
            "format_version": FORMAT_VERSION,
            "fingerprint": layout.fingerprint,
            "split_fingerprints": layout.split_fingerprints,
            "fingerprint_format": layout.fingerprint_format,
            "teachers": layout.teachers,
            "counts": layout.counts,
            "dims": layout.dims,
            "chunk_rows": cr,
            "source": layout.source,
            "skipped_samples": layout.skipped_samples,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "complete": False,
        })
        return cls(path, group, writable=True)

    # ------------------------------------------------------------------ identity
    @property
    def attrs(self) -> dict:
        return dict(self._group.attrs)

    @property
    def fingerprint(self) -> str:
        return self._group.attrs["fingerprint"]

    @property
    def split_fingerprints(self) -> dict[str, str]:
        return dict(self._group.attrs.get("split_fingerprints", {}))

    @property
    def teachers(self) -> dict[str, dict]:
        return dict(self._group.attrs["teachers"])

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._group.attrs["counts"])

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._group.attrs["dims"])

    @property
    def chunk_rows(self) -> int:
        return int(self._group.attrs["chunk_rows"])

    @property
    def complete(self) -> bool:
        return bool(self._group.attrs.get("complete", False))

    def check_fingerprint(self, fingerprint: str) -> None:
        """Refuse to resume into a store built from another manifest (checked before any teacher is loaded)."""
        if self.fingerprint != fingerprint:
            raise StoreMismatch(
                f"{self.location}: built from another manifest (fingerprint {self.fingerprint[:12]}…, this one "
                f"{fingerprint[:12]}…); pass --overwrite to rebuild or choose another --out",
                field="fingerprint",
            )

    def check_matches(self, layout: StoreLayout) -> None:
        """Refuse to resume into a store that another manifest or teacher built; name the field."""
        self.check_fingerprint(layout.fingerprint)
        for role in ("image", "text"):
            mine, theirs = self.teachers.get(role), layout.teachers.get(role)
            if mine != theirs:
                diff = _first_difference(mine or {}, theirs or {})
                raise StoreMismatch(
                    f"{self.path}: built with another {role} teacher (teachers.{role} {diff}); pass --overwrite "
                    "to rebuild or choose another --out",
                    field=f"teachers.{role}",
                )
        for key, stored, wanted in (("counts", self.counts, layout.counts), ("dims", self.dims, layout.dims)):
            if stored != wanted:
                raise StoreMismatch(
                    f"{self.path}: the store's {key} {stored} differ from this build's {wanted} (its attributes were "
                    "edited?); pass --overwrite to rebuild or choose another --out",
                    field=key,
                )
        if self.chunk_rows != layout.chunk_rows:
            raise StoreMismatch(
                f"{self.path}: built with --chunk-rows {self.chunk_rows}, not {layout.chunk_rows}; "
                "resume with the same value or pass --overwrite",
                field="chunk_rows",
            )

    @property
    def fingerprint_format(self) -> int:
        """How this store's dataset fingerprints were computed: 2, or 1 for stores built before per-shard digests."""
        return int(self._group.attrs.get("fingerprint_format", 1))

    def rows_of(self, manifest, what: str = "dataset") -> tuple[np.ndarray, np.ndarray]:
        """Store rows (images, captions) of ``manifest`` (anything with ``fingerprint(version)``), as
        :meth:`rows_for`; a store with format-1 fingerprints is matched by the manifest's format-1 fingerprint (a
        pass over its rows: ``cusa-cache upgrade`` rewrites the store's so later commands skip it)."""
        try:
            return self.rows_for(manifest.fingerprint(), what)
        except StoreMismatch:
            if self.fingerprint_format >= 2:
                raise
            legacy = manifest.fingerprint(1)
            if legacy != self.fingerprint and legacy not in self.split_fingerprints.values():
                raise
            return self.rows_for(legacy, what)

    def rows_for(self, fingerprint: str, what: str = "dataset") -> tuple[np.ndarray, np.ndarray]:
        """Store rows (images, captions) of the dataset with ``fingerprint``: the whole store or one split.

        Raises StoreMismatch naming the field when the dataset is neither.
        """
        if fingerprint == self.fingerprint:
            return np.arange(self.counts["images"]), np.arange(self.counts["texts"])
        for split, fp in self.split_fingerprints.items():
            if fp == fingerprint:
                splits = self.image_splits
                image_rows = np.flatnonzero(splits == split)
                keep = np.isin(self.caption_image_rows, image_rows)
                return image_rows, np.flatnonzero(keep)
        raise StoreMismatch(
            f"{self.location}: the {what} (fingerprint {fingerprint[:12]}…) is not the manifest this store was built "
            f"from ({self.fingerprint[:12]}…) nor one of its splits ({', '.join(self.split_fingerprints) or 'none'}); "
            "build a store for it with `cusa-cache build`",
            field="fingerprint",
        )

    # ------------------------------------------------------------------ row metadata
    def _strings(self, name: str) -> np.ndarray:
        if name not in self._cache:
            # zarr hands back numpy's variable-width StringDType; plain fixed-width str arrays compare and index
            # the same everywhere numpy is used
            self._cache[name] = np.array(self._group[name][:].tolist(), dtype=str)
        return self._cache[name]

    @property
    def image_ids(self) -> np.ndarray:
        return self._strings("images/ids")

    @property
    def image_paths(self) -> np.ndarray:
        return self._strings("images/paths")

    @property
    def image_splits(self) -> np.ndarray:
        return self._strings("images/split")

    @property
    def captions(self) -> np.ndarray:
        return self._strings("texts/captions")

    @property
    def caption_image_rows(self) -> np.ndarray:
        if "texts/image_row" not in self._cache:
            self._cache["texts/image_row"] = np.asarray(self._group["texts/image_row"][:], dtype=np.int64)
        return self._cache["texts/image_row"]

    @property
    def skipped_images(self) -> list[dict]:
        return list(self._group.attrs.get("skipped_images", []))

    @property
    def skipped_samples(self) -> list[dict]:
        """Samples of a shard source the build left out ({shard, key, reason}): they have no rows."""
        return list(self._group.attrs.get("skipped_samples", []))

    # ------------------------------------------------------------------ embeddings
    def array(self, modality: str) -> zarr.Array:
        _check_modality(modality)
        return self._group[f"{modality}/emb"]

    def load(self, modality: str) -> np.ndarray:
        """The whole modality as float32 in memory (COCO's 600K captions × 768 dims ≈ 1.8 GB)."""
        key = f"{modality}/emb:f32"
        if key not in self._cache:
            self._cache[key] = np.asarray(self.array(modality)[:], dtype=np.float32)
        return self._cache[key]

    def rows(self, modality: str, index: np.ndarray) -> np.ndarray:
        """float32 rows by index, read through the row chunks that hold them (no full load)."""
        index = np.asarray(index, dtype=np.int64)
        arr = self.array(modality)
        if index.size == 0:
            return np.zeros((0, arr.shape[1]), dtype=np.float32)
        return np.asarray(arr.get_orthogonal_selection((index, slice(None))), dtype=np.float32)

    def n_chunks(self, modality: str) -> int:
        n = self.counts[modality]
        return (n + self.chunk_rows - 1) // self.chunk_rows

    def chunk_range(self, modality: str, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.counts[modality])

    def iter_chunks(self, modality: str) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows) per stored chunk, in order: the streaming read path."""
        arr = self.array(modality)
        for c in range(self.n_chunks(modality)):
            start, stop = self.chunk_range(modality, c)
            yield start, np.asarray(arr[start:stop], dtype=np.float32)

    # ------------------------------------------------------------------ build-side writes
    def progress(self) -> ChunkProgress:
        """Finished chunks per modality, read from their markers."""
        prog = ChunkProgress()
        for modality in MODALITIES:
            folder = self.path / _PROGRESS_DIR / modality
            if not folder.is_dir():
                if self.complete:
                    # a finished store without its markers (read from a URL, pulled without them): every chunk is
                    # done, with the checksum the build recorded
                    sums = (self.attrs.get("checksums") or {}).get(modality) or []
                    prog.done[modality] = {c: {"chunk": c, "checksum": s, "bad_rows": []} for c, s in enumerate(sums)}
                continue
            for marker in folder.glob("*.json"):
                try:
                    payload = json.loads(marker.read_text())
                except (OSError, json.JSONDecodeError):
                    continue  # a marker torn by a kill counts as not written: the chunk is redone
                prog.done[modality][int(payload["chunk"])] = payload
        return prog

    def write_chunk(self, modality: str, chunk: int, emb: np.ndarray, bad_rows: list[dict] | None = None,
                    rank: int = 0, before_marker: Callable[[], None] | None = None) -> None:
        """Write one finished row chunk (L2-normalised float rows) and then its progress marker.

        ``rank`` (the torch.distributed rank that computed the chunk) is kept in the marker, so a sharded build
        can be audited afterwards. ``before_marker`` runs between the two writes (a fault-injection point).
        """
        self._require_writable()
        start, stop = self.chunk_range(modality, chunk)
        if emb.shape != (stop - start, self.dims[modality]):
            raise StoreError(
                f"{self.path}: chunk {chunk} of {modality} expects shape {(stop - start, self.dims[modality])}, "
                f"got {emb.shape}"
            )
        rows16 = np.ascontiguousarray(emb, dtype=np.float16)
        self.array(modality)[start:stop] = rows16
        if before_marker is not None:
            before_marker()
        _atomic_write_json(
            self.path / _PROGRESS_DIR / modality / f"{chunk:08d}.json",
            {"chunk": chunk, "start": start, "stop": stop, "checksum": chunk_checksum(rows16),
             "bad_rows": bad_rows or [], "rank": int(rank)},
        )

    def neighbors_marker(self, modality: str) -> dict | None:
        marker = self.path / _PROGRESS_DIR / f"neighbors_{modality}.json"
        try:
            return json.loads(marker.read_text())
        except FileNotFoundError:
            # a finished store without its markers: the table the build recorded
            return (self._group.attrs.get("neighbors") or {}).get(modality) if self.remote is not None else None
        except (OSError, json.JSONDecodeError):
            return None

    def write_neighbors(self, modality: str, ids: np.ndarray, sims: np.ndarray, index_bytes_writer=None,
                        before_marker: Callable[[], None] | None = None, **info) -> None:
        """Store the k-NN table (and the saved FAISS index, through ``index_bytes_writer(path)``).

        The old marker goes first: a table half replaced by a killed build must not pass for the old one.
        ``before_marker`` runs after the table and index are written (a fault-injection point).
        """
        self._require_writable()
        (self.path / _PROGRESS_DIR / f"neighbors_{modality}.json").unlink(missing_ok=True)
        n, k = ids.shape
        base = f"neighbors/{modality}"
        rows_per_chunk = max(1, min(n, 65536))
        for name, values, dtype in (("ids", ids, "int64"), ("sims", sims, "float32")):
            arr = self._group.create_array(f"{base}/{name}", shape=(n, k), dtype=dtype,
                                           chunks=(rows_per_chunk, k), compressors=_compressor(), overwrite=True)
            arr[:] = np.asarray(values, dtype=dtype)
        if index_bytes_writer is not None:
            (self.path / _FAISS_DIR).mkdir(exist_ok=True)
            index_bytes_writer(self.path / _FAISS_DIR / f"{modality}.index")
        if before_marker is not None:
            before_marker()
        checksums = neighbor_checksums(ids, sims)
        _atomic_write_json(self.path / _PROGRESS_DIR / f"neighbors_{modality}.json",
                           {"modality": modality, "k": int(k), **info, "checksums": checksums})

    def finalize(self, summary: dict, caption_notes: dict | None = None) -> None:
        """Re-read every chunk against its marker's checksum, then write checksums, attribute digests, data file
        sizes and the completion mark in one atomic update of the root document.

        A chunk whose bytes changed since it was written (a damaged file, an edit) loses its marker and the build
        stops, so that re-running it recomputes just that chunk. ``caption_notes`` records what the build did to
        the caption texts (how many the text teacher truncated, how many had odd characters replaced).
        """
        self._require_writable()
        prog = self.progress()
        checksums = {}
        skipped: list[dict] = []
        for modality in MODALITIES:
            n = self.n_chunks(modality)
            missing = [c for c in range(n) if c not in prog.done[modality]]
            if missing:
                raise StoreError(f"{self.path}: cannot finish, {modality} chunks {missing[:5]} are not written")
            checksums[modality] = [prog.done[modality][c]["checksum"] for c in range(n)]
            for c in range(n):
                skipped.extend(prog.done[modality][c].get("bad_rows", []))
        changed = self.changed_since_written()
        if changed:
            self.forget(changed)
            raise StoreError(f"{self.path}: {', '.join(changed[:5])} changed on disk after being written (damaged "
                             "or edited); re-run the same `cusa-cache build` command to recompute it")
        attrs = dict(self._group.attrs)
        attrs.update({
            "checksums": checksums,
            "skipped_images": skipped,
            "neighbors": {m: self.neighbors_marker(m) for m in MODALITIES},
            "files": self._data_files(),
            "caption_notes": caption_notes or {},
            "build": summary,
            "completed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        attrs[_DIGESTS] = {key: attrs_digest(attrs.get(key)) for key in DIGESTED_ATTRS}
        attrs["complete"] = True
        self._group.attrs.put(attrs)  # one atomic replace of zarr.json: the mark and what it vouches for together

    def rewrite_fingerprints(self, fingerprint: str, split_fingerprints: dict[str, str], fingerprint_format: int
                             ) -> None:
        """Record the dataset's fingerprints in another format (same rows, no embedding touched), with the attribute
        digests that vouch for them, in one atomic update of the root document."""
        if not self.complete:
            raise StoreError(f"{self.path}: the store is incomplete; finish its build before upgrading it")
        if set(split_fingerprints) != set(self.split_fingerprints):
            raise StoreError(f"{self.path}: splits {sorted(split_fingerprints)} are not the store's "
                             f"{sorted(self.split_fingerprints)}")
        group = zarr.open_group(str(self.path), mode="r+")
        attrs = dict(group.attrs)
        attrs.update({"fingerprint": fingerprint, "split_fingerprints": split_fingerprints,
                      "fingerprint_format": int(fingerprint_format)})
        if _DIGESTS in attrs:
            attrs[_DIGESTS] = {key: attrs_digest(attrs.get(key)) for key in DIGESTED_ATTRS}
        group.attrs.put(attrs)
        self._group = zarr.open_group(str(self.path), mode="r")

    def changed_since_written(self) -> list[str]:
        """Finished parts whose bytes no longer match the checksum taken when they were written: embedding chunks
        ("images chunk 3") and neighbor tables ("neighbors images"). Reads every finished chunk."""
        changed = []
        prog = self.progress()
        for modality in MODALITIES:
            arr = self.array(modality)
            for c, marker in sorted(prog.done[modality].items()):
                start, stop = self.chunk_range(modality, c)
                try:
                    ok = chunk_checksum(arr[start:stop]) == marker.get("checksum")
                except Exception:  # an undecodable chunk file
                    ok = False
                if not ok:
                    changed.append(f"{modality} chunk {c}")
        for modality in MODALITIES:
            marker = self.neighbors_marker(modality)
            if marker is None:
                continue
            try:
                ids, sims = (self._group[f"neighbors/{modality}/{name}"][:] for name in ("ids", "sims"))
                ok = marker.get("checksums") == neighbor_checksums(ids, sims)
            except Exception:  # missing or undecodable
                ok = False
            # the saved index is part of the table: in a finished store, it must still be the file the build wrote
            recorded = (self.attrs.get("files") or {}).get(f"{_FAISS_DIR}/{modality}.index") if self.complete else None
            index = self.index_path(modality)
            if recorded is not None and (not index.is_file() or index.stat().st_size != recorded):
                ok = False
            if not ok:
                changed.append(f"neighbors {modality}")
        return changed

    def forget(self, parts: list[str]) -> None:
        """Drop the markers of parts named by :meth:`changed_since_written`, so the build computes them again."""
        self._require_writable()
        for part in parts:
            words = part.split()
            if words[0] == "neighbors":
                marker = self.path / _PROGRESS_DIR / f"neighbors_{words[1]}.json"
            else:
                marker = self.path / _PROGRESS_DIR / words[0] / f"{int(words[2]):08d}.json"
            marker.unlink(missing_ok=True)

    def _data_files(self) -> dict[str, int]:
        """Size of every file a reader depends on, relative to the store; build-only files are left out, and the
        temporary files of writes a killed build left half done are removed."""
        files = {}
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if not p.is_file() or rel == "zarr.json" or rel.startswith((f"{_PROGRESS_DIR}/", f"{_MANIFEST_DIR}/")) \
                    or rel == _LOCK_FILE:
                continue
            if _is_temporary(p.name):
                p.unlink(missing_ok=True)
                continue
            files[rel] = p.stat().st_size
        return files

    def mark_incomplete(self) -> None:
        """Withdraw the completion mark (and the digests that went with it) before changing a finished store."""
        self._require_writable()
        attrs = dict(self._group.attrs)
        attrs.pop(_DIGESTS, None)
        attrs["complete"] = False
        self._group.attrs.put(attrs)

    # ------------------------------------------------------------------ integrity
    def integrity_problems(self) -> list[str]:
        """Cheap checks of a complete store (no data reads): attribute digests, array shapes against counts and
        dims, checksum counts, and every data file present with the size recorded when the build finished."""
        attrs = self.attrs
        problems: list[str] = []
        recorded = attrs.get(_DIGESTS)
        if not isinstance(recorded, dict):
            return ["attributes: no integrity digests recorded (written by an older cusa, or removed); re-run the "
                    "same `cusa-cache build` command to record them"]
        for key in DIGESTED_ATTRS:
            if recorded.get(key) != attrs_digest(attrs.get(key)):
                problems.append(f"attributes: {key!r} differs from what the build recorded (edited after the build)")
        try:
            problems += self._shape_problems(attrs)
        except Exception as exc:  # attributes too damaged to even compare
            problems.append(f"attributes: cannot compare with the arrays ({type(exc).__name__}: {exc})")
        if self.remote is None:  # a store at a URL has each file's size checked as it is downloaded
            problems += self._file_problems(attrs.get("files") or {})
        return problems

    def _shape_problems(self, attrs: dict) -> list[str]:
        problems = []
        counts, dims = attrs["counts"], attrs["dims"]
        expected = {
            "images/emb": (counts["images"], dims["images"]),
            "texts/emb": (counts["texts"], dims["texts"]),
            "images/ids": (counts["images"],),
            "images/paths": (counts["images"],),
            "images/split": (counts["images"],),
            "texts/captions": (counts["texts"],),
            "texts/image_row": (counts["texts"],),
        }
        for modality, info in (attrs.get("neighbors") or {}).items():
            if info:
                for name in ("ids", "sims"):
                    expected[f"neighbors/{modality}/{name}"] = (counts[modality], info["k"])
        for name, shape in expected.items():
            try:
                actual = tuple(self._group[name].shape)
            except KeyError:
                problems.append(f"{name}: array missing")
                continue
            if actual != tuple(shape):
                problems.append(f"{name}: shape {actual} does not match the attributes' {tuple(shape)}")
        for modality in MODALITIES:
            got = len((attrs.get("checksums") or {}).get(modality) or [])
            if got != self.n_chunks(modality):
                problems.append(f"{modality}: {got} checksums recorded for {self.n_chunks(modality)} chunks")
        return problems

    def _file_problems(self, files: dict[str, int]) -> list[str]:
        problems = []
        for rel, size in files.items():
            try:
                actual = (self.path / rel).stat().st_size
            except FileNotFoundError:
                problems.append(f"{self._describe_file(rel)}: file {rel} is missing")
                continue
            if actual != size:
                problems.append(f"{self._describe_file(rel)}: file {rel} has {actual} bytes, the build wrote {size} "
                                "(truncated or replaced)")
        return problems

    def _describe_file(self, rel: str) -> str:
        """A data file as the rows it holds: 'images chunk 2 (rows 32-41)' for an embedding chunk."""
        parts = rel.split("/")
        if len(parts) == 5 and parts[0] in MODALITIES and parts[1:3] == ["emb", "c"] and parts[3].isdigit():
            c = int(parts[3])
            start, stop = self.chunk_range(parts[0], c)
            return f"{parts[0]} chunk {c} (rows {start}-{stop - 1})"
        return rel.rsplit("/c/", 1)[0] if "/c/" in rel else rel

    def _require_writable(self) -> None:
        if not self._writable:
            raise StoreError(f"{self.path}: opened read-only")

    # ------------------------------------------------------------------ neighbors
    def has_neighbors(self, modality: str) -> bool:
        return self.neighbors_marker(modality) is not None or "neighbors" in self._group.attrs and \
            bool((self._group.attrs.get("neighbors") or {}).get(modality))

    def neighbors(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [N, K], sims float32 [N, K]) from the teacher k-NN table, self excluded."""
        _check_modality(modality)
        key = f"neighbors/{modality}"
        if key not in self._cache:
            try:
                ids = np.asarray(self._group[f"{key}/ids"][:], dtype=np.int64)
                sims = np.asarray(self._group[f"{key}/sims"][:], dtype=np.float32)
            except KeyError as exc:
                raise StoreError(f"{self.location}: has no {modality} neighbor table; rebuild with --neighbors "
                                 "K") from exc
            if self.remote is not None:
                # tables read from a URL are checked once against the build's checksums (embedding chunks are
                # checked one by one as they are downloaded)
                recorded = (self.neighbors_marker(modality) or {}).get("checksums")
                if recorded and recorded != neighbor_checksums(ids, sims):
                    raise StoreError(f"{self.location}: the {modality} neighbor table does not match the checksums "
                                     "its build recorded (damaged at the URL); push the store again")
            self._cache[key] = (ids, sims)
        return self._cache[key]

    def index_path(self, modality: str) -> Path:
        """The saved FAISS index of ``modality`` (a store at a URL: downloaded into its local cache first, when the
        build saved one)."""
        rel = f"{_FAISS_DIR}/{modality}.index"
        if self.remote is not None and rel in (self.attrs.get("files") or {}):
            return self.remote.local_file(rel)
        return self.path / rel

    # ------------------------------------------------------------------ size
    def size_bytes(self) -> int:
        if self.remote is not None:
            return self.remote.size_bytes()
        # the lock of a running build and the copy of the data's manifest index are not part of the store
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file() and p.name != _LOCK_FILE
                   and not p.relative_to(self.path).as_posix().startswith(f"{_MANIFEST_DIR}/"))


class BuildLock:
    """One build per store: a lock file holding the owner's host and pid.

    The file is also locked (a POSIX record lock) while the build runs, which the kernel drops when the process
    dies and which forked children (DataLoader workers) do not inherit: a lock file that is not locked and whose
    recorded process is gone (or unknown) is taken over, and two builds racing to take over the same stale lock
    cannot both win. A POSIX lock ends when its process closes any descriptor of the file, so the holder reads and
    writes the file only through the descriptor it locked.
    """

    def __init__(self, store_path: Path):
        self.path = Path(store_path) / _LOCK_FILE
        self.held = False
        self._fd: int | None = None
        self._made_folder = False

    def acquire(self) -> None:
        self._made_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                self._refuse(self._holder())
            try:
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    raise FileNotFoundError  # released and removed while we waited: lock the file now there
            except FileNotFoundError:
                os.close(fd)
                continue
            holder = _parse_holder(os.pread(fd, 65536, 0))
            if holder and not self._is_stale(holder):
                os.close(fd)
                self._refuse(holder)
            me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            self._fd = fd
            self.held = True
            return
        raise StoreError(f"{self.path}: could not take the build lock")

    def _refuse(self, holder: dict | None) -> None:
        who = f"host {holder.get('host')}, pid {holder.get('pid')}" if holder else "holder not yet recorded"
        raise StoreError(
            f"{self.path.parent}: another build is running on this store ({who}); wait for it or stop it "
            f"(if it is gone, remove {self.path})"
        )

    def _holder(self) -> dict | None:
        try:
            return _parse_holder(self.path.read_bytes())
        except OSError:
            return None

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # cannot see another host's processes: assume alive
        try:
            pid = int(holder.get("pid", -1))
        except (TypeError, ValueError):
            return True
        if pid <= 0 or pid == os.getpid():
            return True  # nonsense, or this very process (the pid of a dead owner reused)
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, OverflowError):
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held and self._fd is not None:
            self.path.unlink(missing_ok=True)  # removed while still locked, so no one locks a file about to vanish
            os.close(self._fd)
            self._fd = None
            self.held = False
            if self._made_folder:
                try:
                    self.path.parent.rmdir()  # a build that failed before writing anything leaves no empty folder
                except OSError:
                    pass

    def __enter__(self) -> "BuildLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _is_temporary(name: str) -> bool:
    """A write in progress: zarr's "<name>.<uuid>.partial", ours and save_index's ".<name>...tmp..." files."""
    return name.endswith(".partial") or (name.startswith(".") and ".tmp" in name)


def _parse_holder(data: bytes) -> dict | None:
    try:
        holder = json.loads(data)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _looks_like_store(path: Path) -> bool:
    """A cusa store, or one whose creation was interrupted (the progress folder is made first)."""
    return (path / _PROGRESS_DIR).is_dir() or "format_version" in _root_attrs(path)


def _root_attrs(path: Path) -> dict:
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {}) or {}
    except (OSError, json.JSONDecodeError):
        return {}


def _check_attr_types(path: str | Path, attrs: dict) -> None:
    """Refuse root attributes of the wrong shape (hand-edited) with a message instead of a crash later."""
    def count_map(value) -> bool:
        return isinstance(value, dict) and all(
            isinstance(value.get(m), int) and not isinstance(value.get(m), bool) and value.get(m) >= 0
            for m in MODALITIES)

    checks = {
        "fingerprint": lambda v: isinstance(v, str),
        "teachers": lambda v: isinstance(v, dict) and all(isinstance(v.get(r), dict) for r in ("image", "text")),
        "counts": count_map,
        "dims": count_map,
        "chunk_rows": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    }
    for key, ok in checks.items():
        if not ok(attrs.get(key)):
            raise StoreError(f"{path}: attribute {key!r} is missing or malformed ({attrs.get(key)!r:.80}); "
                             "the store's zarr.json was edited or damaged, rebuild it with --overwrite")


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")


def _first_difference(a: dict, b: dict) -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: stored {a.get(key)!r}, requested {b.get(key)!r}"
    return "identity differs"
