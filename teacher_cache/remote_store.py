"""Stores at a URL: read-only through a bounded local cache, uploaded whole with ``push`` and copied back with ``pull``.

``open_store(path_or_url)`` is the one way every command opens a store. A URL (``s3://``, ``gs://``, ``http(s)://``,
``hf://``, see teacher_cache/remote.py) is read as a zarr store whose files come through a local
:class:`~teacher_cache.remote.BoundedFileCache`: the root document first (it must carry the completion mark: a store
still being uploaded is refused), then each file as a reader asks for it, its size checked against the size the
build recorded and each embedding chunk against its build checksum before it is kept. Dense reads fetch every chunk
once; streamed reads fetch chunks as the plan needs them, again later when the bound evicted them.

A pushed store holds the same files as the local one, plus ``_push.json`` (the list of files, so that a pull needs no
listing). ``push`` writes the root document twice: first without the completion mark, before any other file, and
with it again last, so a push stopped midway leaves a store every reader refuses as incomplete.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable

import zarr
from numcodecs import blosc
from tqdm.auto import tqdm
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from teacher_cache.errors import RemoteError, StoreError, StoreMismatch
from teacher_cache.remote import (BoundedFileCache, RemoteLocation, RetryPolicy, default_cache_dir, download,
                                  is_url, location_slug, upload)
from teacher_cache.store import FORMAT_VERSION, MODALITIES, Store, _is_temporary, _looks_like_store
from teacher_cache.verify import verify_store

GIB = 1 << 30
DEFAULT_STORE_CACHE_GIB = 10.0
ROOT_DOC = "zarr.json"
PUSH_LIST = "_push.json"  # every file a push uploaded, {relative path: bytes}: a pull reads it instead of a listing
_BUILD_ONLY = ("_build.lock",)
_CHUNK_FILE = re.compile(rf"^({'|'.join(MODALITIES)})/emb/c/(\d+)/0$")


@dataclass(frozen=True)
class StoreCacheSettings:
    """Where the files of stores read from URLs are kept (``directory``; None: ``$CUSA_CACHE_DIR/stores``, else
    ``~/.cache/cusa/stores``) and how many GiB the folder may hold in all (least recently used files go first)."""

    directory: str | None = None
    max_gib: float = DEFAULT_STORE_CACHE_GIB

    def open(self) -> BoundedFileCache:
        if not self.max_gib > 0:
            raise ValueError(f"the store cache's size must be > 0 GiB, got {self.max_gib:g}")
        root = Path(self.directory).expanduser() if self.directory else default_cache_dir("stores")
        return BoundedFileCache(root, int(self.max_gib * GIB))


# ---------------------------------------------------------------------------------------------- chunk checks
class ChunkChecks:
    """The embedding chunk files of a store (``images/emb/c/<c>/0``) and the checksums their build recorded."""

    def __init__(self, attrs: dict):
        self.chunk_rows = int(attrs.get("chunk_rows") or 1)
        self.counts = dict(attrs.get("counts") or {})
        self.dims = dict(attrs.get("dims") or {})
        self.checksums = dict(attrs.get("checksums") or {})

    def chunk_of(self, rel: str) -> tuple[str, int] | None:
        match = _CHUNK_FILE.match(rel)
        return (match.group(1), int(match.group(2))) if match else None

    def describe(self, rel: str) -> str:
        """A file as what it holds: "images chunk 3 (rows 48-63)", else its path in the store."""
        found = self.chunk_of(rel)
        if found is None:
            return rel
        modality, c = found
        start = c * self.chunk_rows
        stop = min(start + self.chunk_rows, int(self.counts.get(modality, 0)))
        return f"{modality} chunk {c} (rows {start}-{stop - 1})"

    def download(self, location: RemoteLocation, rel: str, dest: Path, size: int,
                 policy: RetryPolicy | None) -> None:
        """Copy ``rel`` to ``dest`` (see :func:`download`), then check it when it is an embedding chunk."""
        download(location, rel, dest, size=size, what=f"{self.describe(rel)}, {size} bytes", policy=policy)
        if self.chunk_of(rel) is not None:
            self.check(rel, dest.read_bytes(), location.describe(rel))

    def check(self, rel: str, data: bytes, where: str) -> None:
        """Raise RemoteError (naming ``where``) when ``rel`` is an embedding chunk whose decoded float16 rows are not
        the ones its build recorded; other files pass (their size is checked as they arrive)."""
        found = self.chunk_of(rel)
        if found is None:
            return
        modality, c = found
        sums = self.checksums.get(modality) or []
        n, dim = int(self.counts.get(modality, 0)), int(self.dims.get(modality, 0))
        start = c * self.chunk_rows
        rows = min(start + self.chunk_rows, n) - start
        try:
            raw = blosc.decompress(data)
            ok = c < len(sums) and hashlib.sha256(memoryview(raw)[:rows * dim * 2]).hexdigest() == sums[c] \
                and len(raw) >= rows * dim * 2
        except Exception:  # not a blosc frame: damaged
            ok = False
        if not ok:
            raise RemoteError(f"{where}: {self.describe(rel)} does not match the checksum its build recorded "
                              "(damaged at the URL); push the store again")


# ---------------------------------------------------------------------------------------------- reading
class RemoteStoreFiles:
    """The files of a complete store at a URL, read through a bounded local cache.

    Only the files the build recorded (``attrs["files"]``) exist; each arrives whole with the recorded size, an
    embedding chunk also with its build checksum, or the read fails with one line naming its URL. Files are cached
    under ``cache.root/<url slug>/<root document digest>/``, so a store pushed again to the same URL never mixes with
    the files of the one before.
    """

    def __init__(self, location: RemoteLocation, root_doc: bytes, attrs: dict, cache: BoundedFileCache,
                 policy: RetryPolicy | None = None):
        self.location = location
        self.root_doc = root_doc
        self.files: dict[str, int] = {str(k): int(v) for k, v in (attrs.get("files") or {}).items()}
        self.checks = ChunkChecks(attrs)
        self.cache = cache
        self.policy = policy
        self.prefix = f"{location_slug(location.url)}/{hashlib.sha256(root_doc).hexdigest()[:16]}"

    @property
    def folder(self) -> Path:
        return self.cache.root / self.prefix

    def read(self, rel: str) -> bytes | None:
        """The bytes of ``rel``; None for a file the store does not have (zarr then uses the fill value)."""
        if rel == ROOT_DOC:
            return self.root_doc
        if rel not in self.files:
            return None
        return self.cache.read(f"{self.prefix}/{rel}", lambda tmp: self._fetch(rel, tmp), self.files[rel])

    def local_file(self, rel: str) -> Path:
        """The path of ``rel`` in the local cache, downloaded first if needed."""
        with self.cache.pinned(f"{self.prefix}/{rel}", lambda tmp: self._fetch(rel, tmp), self.files.get(rel)) as p:
            return p

    def _fetch(self, rel: str, dest: Path) -> None:
        self.checks.download(self.location, rel, dest, self.files[rel], self.policy)

    def size_bytes(self) -> int:
        return sum(self.files.values()) + len(self.root_doc)


class CachedRemoteStore(zarr.abc.store.Store):
    """A read-only zarr store over :class:`RemoteStoreFiles`: what zarr asks for is read through the local cache."""

    def __init__(self, files: RemoteStoreFiles):
        super().__init__(read_only=True)
        self.files = files

    def read_key(self, key: str) -> bytes | None:
        return self.files.read(key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CachedRemoteStore) and other.files is self.files

    def __hash__(self) -> int:
        return id(self.files)

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        prototype = prototype or default_buffer_prototype()
        # transfers block: in a thread each, so that zarr's concurrent reads of many chunks overlap
        data = await asyncio.to_thread(self.files.read, key)
        if data is None:
            return None
        return prototype.buffer.from_bytes(_byte_range(data, byte_range))

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, r) for key, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        return key == ROOT_DOC or key in self.files.files

    @property
    def supports_writes(self) -> bool:
        return False

    async def set(self, key: str, value: Buffer) -> None:
        raise StoreError(f"{self.files.location.describe()}: a store at a URL is read-only")

    @property
    def supports_deletes(self) -> bool:
        return False

    async def delete(self, key: str) -> None:
        raise StoreError(f"{self.files.location.describe()}: a store at a URL is read-only")

    @property
    def supports_partial_writes(self) -> bool:
        return False

    async def set_partial_values(self, key_start_values) -> None:
        raise StoreError(f"{self.files.location.describe()}: a store at a URL is read-only")

    @property
    def supports_listing(self) -> bool:
        return True

    async def list(self) -> AsyncIterator[str]:
        for key in [ROOT_DOC, *self.files.files]:
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in [ROOT_DOC, *self.files.files]:
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/")
        seen = set()
        for key in [ROOT_DOC, *self.files.files]:
            rest = key[len(prefix) + 1:] if prefix else key
            if prefix and not key.startswith(prefix + "/"):
                continue
            head = rest.split("/", 1)[0]
            if head not in seen:
                seen.add(head)
                yield head


def _byte_range(data: bytes, byte_range: ByteRequest | None) -> bytes:
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start:byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset:]
    if isinstance(byte_range, SuffixByteRequest):
        return data[max(0, len(data) - byte_range.suffix):]
    raise TypeError(f"unexpected byte range {byte_range!r}")


def _root_attrs(doc: bytes, shown: str) -> dict:
    try:
        attrs = json.loads(doc).get("attributes")
    except (ValueError, AttributeError):
        attrs = None
    if not isinstance(attrs, dict):
        raise StoreError(f"{shown}: its zarr.json is not a zarr group document; not a cusa store")
    return attrs


def _incomplete(shown: str) -> StoreError:
    return StoreError(f"{shown}: the store at this URL is incomplete (its upload did not finish, or it was uploaded "
                      f"before its build finished); upload it again with `cusa-cache push STORE {shown}`")


def open_store(location: str | os.PathLike, *, require_complete: bool = False,
               local_cache: StoreCacheSettings | None = None, policy: RetryPolicy | None = None) -> Store:
    """The store at ``location``, a folder or a URL, opened read-only.

    A folder is ``Store.open``. A URL must hold a complete store (whatever ``require_complete`` says: only the
    completion mark vouches for its files); its files are read through the local cache ``local_cache`` describes.
    """
    if not is_url(str(location)):
        return Store.open(location, require_complete=require_complete)
    remote = RemoteLocation.open(str(location))
    shown = remote.describe()
    doc = remote.read_bytes(ROOT_DOC, "the store's root document zarr.json", policy, missing_ok=True)
    if doc is None:
        raise StoreError(f"{shown}: not a cusa store (no zarr.json at this URL); upload one with "
                         f"`cusa-cache push STORE {shown}`")
    attrs = _root_attrs(doc, shown)
    readable = attrs.get("format_version") == FORMAT_VERSION and attrs.get("complete") is True
    if attrs.get("format_version") == FORMAT_VERSION and not readable:
        raise _incomplete(shown)
    if readable and not isinstance(attrs.get("files"), dict):
        raise StoreError(f"{shown}: the store records no file list (written by an older cusa); rebuild it, then "
                         "push it again")
    # a store of another format gets no file list: opening it then only says which version it is
    files = RemoteStoreFiles(remote, doc, attrs if readable else {}, (local_cache or StoreCacheSettings()).open(),
                             policy)
    group = zarr.open_group(store=CachedRemoteStore(files), mode="r")
    return Store.from_group(files.folder, group, attrs, require_complete=require_complete, location=shown,
                            remote=files)


# ---------------------------------------------------------------------------------------------- push / pull
@dataclass
class TransferSummary:
    """What a push or pull moved."""

    store: str  # the local folder
    url: str  # redacted
    files: int
    bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return {"store": self.store, "url": self.url, "files": self.files, "bytes": self.bytes,
                "seconds": round(self.seconds, 3),
                "mib_per_s": round(self.bytes / (1 << 20) / max(self.seconds, 1e-9), 2)}


def store_files(store: Store) -> dict[str, int]:
    """{relative path: bytes} of every file a complete local store consists of, root document last, the build's
    lock and temporary files left out."""
    files = {}
    for p in sorted(store.path.rglob("*")):
        rel = p.relative_to(store.path).as_posix()
        if p.is_file() and rel != ROOT_DOC and p.name not in _BUILD_ONLY and not _is_temporary(p.name):
            files[rel] = p.stat().st_size
    files[ROOT_DOC] = (store.path / ROOT_DOC).stat().st_size
    return files


def push_store(store_dir: str | os.PathLike, url: str, *, overwrite: bool = False, progress: bool = True,
               policy: RetryPolicy | None = None, after_file: Callable[[str], None] | None = None) -> TransferSummary:
    """Upload the complete local store ``store_dir`` to ``url``; every chunk is verified against its checksum first.

    The root document goes up first without its completion mark and last with it (see the module docstring). A
    URL holding another store is refused unless ``overwrite`` (which removes it first); one holding files that are
    not a cusa store is always refused. ``after_file(rel)`` runs after each upload (a fault-injection point).
    """
    t0 = time.perf_counter()
    store = Store.open(store_dir, require_complete=True)
    report = verify_store(store)
    if not report.ok:
        raise StoreError(f"{store_dir}: not pushed, the store has problems ({report.problems[0]}); "
                         f"`cusa-cache verify {store_dir}` lists them")
    remote = RemoteLocation.open(url)
    shown = remote.describe()
    if not remote.writable:
        raise RemoteError(f"{shown}: {remote.protocol}:// is read-only; push to s3://, gs://, hf:// or a folder (and "
                          "serve that over http if you like)")
    _make_room(remote, store, overwrite, policy)
    files = store_files(store)
    root = json.loads((store.path / ROOT_DOC).read_bytes())
    pending = {**root, "attributes": {k: v for k, v in root["attributes"].items() if k != "attrs_digests"}}
    pending["attributes"]["complete"] = False
    total = sum(files.values())
    with tempfile.TemporaryDirectory(prefix="cusa-push-") as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, desc="push", disable=not progress) as bar:
        staged = Path(tmp)
        (staged / ROOT_DOC).write_text(json.dumps(pending, indent=2))
        upload(remote, staged / ROOT_DOC, ROOT_DOC, what="the root document (not yet marked complete)", policy=policy)
        for rel, size in files.items():
            if rel == ROOT_DOC:
                continue
            upload(remote, store.path / rel, rel, what=f"{rel} ({size} bytes)", policy=policy)
            bar.update(size)
            if after_file is not None:
                after_file(rel)
        (staged / PUSH_LIST).write_text(json.dumps({"files": files}, indent=1))
        upload(remote, staged / PUSH_LIST, PUSH_LIST, what="the list of pushed files", policy=policy)
        _check_uploaded(remote, files)
        upload(remote, store.path / ROOT_DOC, ROOT_DOC, what="the root document with the completion mark",
               policy=policy)
        bar.update(files[ROOT_DOC])
    return TransferSummary(str(store_dir), shown, len(files) + 1, total, time.perf_counter() - t0)


def _make_room(remote: RemoteLocation, store: Store, overwrite: bool, policy: RetryPolicy | None) -> None:
    """Refuse a URL that holds other things than this store (unless ``overwrite`` and it is a store); clear it."""
    shown = remote.describe()
    doc = remote.read_bytes(ROOT_DOC, "the root document of a store already there, if any", policy, missing_ok=True)
    if doc is not None:
        try:
            theirs = json.loads(doc).get("attributes") or {}
        except (ValueError, AttributeError):
            theirs = {}
        if "format_version" not in theirs:
            raise StoreError(f"{shown}: holds a zarr.json that is not a cusa store's; choose another URL")
        mine = store.attrs
        for key in ("fingerprint", "teachers", "counts", "dims", "chunk_rows", "format_version"):
            if theirs.get(key) != mine.get(key):
                if not overwrite:
                    raise StoreMismatch(f"{shown}: holds another store (its {key} differs); pass --overwrite to "
                                        "replace it, or choose another URL", field=key)
                _remove_all(remote)
                return
        return  # the same store (a push again, or one stopped midway): its files are uploaded again
    try:
        present = remote.fs.find(remote.root)
    except (FileNotFoundError, NotImplementedError):
        present = []
    if present:
        raise StoreError(f"{shown}: holds {len(present)} file(s) and no cusa store; choose an empty location")


def _remove_all(remote: RemoteLocation) -> None:
    try:
        remote.fs.rm(remote.root, recursive=True)
    except FileNotFoundError:
        pass


def _check_uploaded(remote: RemoteLocation, files: dict[str, int]) -> None:
    """Every uploaded file is there with its size (one listing), before the completion mark is written."""
    try:
        listing = remote.fs.find(remote.root, detail=True)
    except NotImplementedError:
        return  # a filesystem without listings: each upload already reported its own failure
    sizes = {}
    base = remote.root.rstrip("/") + "/"
    for path, info in listing.items():
        rel = path[len(base):] if path.startswith(base) else path
        sizes[rel] = info.get("size")
    for rel, size in files.items():
        if rel != ROOT_DOC and sizes.get(rel) != size:
            raise RemoteError(f"{remote.describe(rel)}: has {sizes.get(rel)} bytes after the upload, the store's file "
                              f"has {size}; the store is left unmarked (incomplete): push it again")


def pull_store(url: str, dest: str | os.PathLike, *, overwrite: bool = False, progress: bool = True,
               policy: RetryPolicy | None = None) -> TransferSummary:
    """Copy the complete store at ``url`` into the folder ``dest``: every file with its recorded size, every
    embedding chunk checked against its build checksum, the root document (the completion mark) last."""
    t0 = time.perf_counter()
    remote = RemoteLocation.open(url)
    shown = remote.describe()
    doc = remote.read_bytes(ROOT_DOC, "the store's root document zarr.json", policy, missing_ok=True)
    if doc is None:
        raise StoreError(f"{shown}: not a cusa store (no zarr.json at this URL)")
    attrs = _root_attrs(doc, shown)
    if attrs.get("format_version") != FORMAT_VERSION:
        raise StoreMismatch(f"{shown}: store format version {attrs.get('format_version')}, this cusa reads version "
                            f"{FORMAT_VERSION}", field="format_version")
    if attrs.get("complete") is not True:
        raise _incomplete(shown)
    listed = remote.read_bytes(PUSH_LIST, "the list of pushed files", policy, missing_ok=True)
    files = json.loads(listed)["files"] if listed is not None else dict(attrs.get("files") or {})
    files.pop(ROOT_DOC, None)
    out = Path(dest)
    _prepare_destination(out, overwrite)
    checks = ChunkChecks(attrs)
    total = sum(files.values()) + len(doc)
    with tqdm(total=total, unit="B", unit_scale=True, desc="pull", disable=not progress) as bar:
        for rel, size in files.items():
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            checks.download(remote, rel, tmp, int(size), policy)  # a FAISS index is not read back whole
            os.replace(tmp, target)
            bar.update(int(size))
        tmp = out / f".{ROOT_DOC}.{os.getpid()}.tmp"
        tmp.write_bytes(doc)
        os.replace(tmp, out / ROOT_DOC)
        bar.update(len(doc))
    Store.open(out, require_complete=True)  # digests, shapes and sizes, as any reader will check them
    return TransferSummary(str(out), shown, len(files) + 1, total, time.perf_counter() - t0)


def _prepare_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: exists and is not a folder; choose another destination")
    entries = list(out.iterdir()) if out.exists() else []
    if not entries:
        out.mkdir(parents=True, exist_ok=True)
        return
    if not overwrite:
        raise StoreError(f"{out}: not empty; choose an empty folder (or pass --overwrite to replace the store there)")
    if not _looks_like_store(out):
        raise StoreError(f"{out}: not empty and not a cusa store; --overwrite replaces a store, never other files")
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

