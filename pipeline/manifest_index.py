"""The manifest index: a dataset source's rows written once as memory-mapped Arrow files, reused while the source is
unchanged, so a command opens millions of samples in seconds and the ranks of one node share the pages.

Where: ``--manifest-cache DIR`` (``$CUSA_MANIFEST_CACHE``), else ``$CUSA_CACHE_DIR/manifests``, else ``$XDG_CACHE_HOME/cusa/manifests``
(``~/.cache/cusa/manifests``); never next to the data, so a read-only source works. ``cusa-cache build`` also keeps a
copy inside the store it writes (``STORE/manifest/``), which later commands given that store use as it is.

Layout: ``CACHE/FAMILY/current`` names the complete version, ``CACHE/FAMILY/VERSION/`` holds ``meta.json`` and the
columns (``samples.arrow`` + ``captions.arrow`` for shards, ``images.arrow`` + ``captions.arrow`` for an annotation
file). FAMILY hashes what was read (the files' real paths and the reading options). A version is written under a
temporary name and renamed into place whole, then ``current`` is replaced atomically: a killed write is never read,
and two processes indexing at once each leave a complete version (a lock makes the second wait and reuse the first's).

An entry (a shard, or the annotation file) is reused when its name, size and modification time (ns) are the ones
recorded and it had not been modified for 2 s when it was indexed (a change within the same clock tick as the
indexing could otherwise go unseen). A shard at a URL is reused when its name, size and version (ETag, generation or
modification time, from one listing of its folder: ``pipeline.file_stat``) are the recorded ones, so an unchanged
remote source opens without fetching a shard; a ``pipe:`` shard when its command text is the same (its output is not
looked at again). A source whose shards changed scans again only the changed, added or renamed shards; the other
shards' rows are copied from the previous version. Shards that are not plain local tars are scanned on their local
copy in the shard cache (``pipeline.shard_cache``). URLs are stored with their secrets redacted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from pipeline.columns import StringColumn
from pipeline.file_stat import FileStat
from pipeline.manifest_table import Block, CaptionTable, ImageTable, Manifest, narrow_codes
from pipeline.shard_cache import is_remote, needs_cache, shard_cache
from pipeline.shard_read_ahead import ShardReadAhead
from pipeline.shard_scan import ScanRules, ShardEntry, ShardScan, SourceScan, assemble, combine, scan_shard
from pipeline.source_names import MANIFEST_CACHE_ENV
from teacher_cache.remote import redact_text

INDEX_VERSION = 1
STORE_INDEX_DIR = "manifest"
CACHE_ENV = "CUSA_CACHE_DIR"
_TRUST_SLACK_NS = 2_000_000_000
_CURRENT = "current"
_META = "meta.json"
_OLD_VERSION_S = 600  # versions other than the current one are removed once this old (readers may still map them)


def default_cache_dir() -> Path:
    """Where manifest indexes go: ``$CUSA_MANIFEST_CACHE`` (what ``--manifest-cache`` sets), else
    ``$CUSA_CACHE_DIR/manifests``, else the platform's cache folder."""
    if os.environ.get(MANIFEST_CACHE_ENV):
        return Path(os.environ[MANIFEST_CACHE_ENV])
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "manifests"
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / "Library" / "Caches" if sys.platform == "darwin"
                                                else Path.home() / ".cache")
    return Path(base) / "cusa" / "manifests"


@dataclass(frozen=True)
class IndexPlaces:
    """Where to look for an index (``extra``: read-only copies, e.g. inside a store, tried first) and where to
    write one (``cache``; when it cannot be written, the manifest is read every time)."""

    cache: Path
    extra: tuple[Path, ...] = ()

    @classmethod
    def resolve(cls, manifest_cache: str | os.PathLike | None, extra: Sequence[str | os.PathLike] = ()
                ) -> "IndexPlaces":
        cache = Path(manifest_cache) if manifest_cache else default_cache_dir()
        return cls(cache, tuple(Path(p) for p in extra))


# ---------------------------------------------------------------------------------------------- versions on disk
def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:24]


def _write_table(path: Path, columns: dict[str, pa.Array | np.ndarray]) -> None:
    arrays = [c if isinstance(c, pa.Array) else pa.array(c) for c in columns.values()]
    batch = pa.record_batch(arrays, names=list(columns))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _read_table(path: Path) -> dict[str, pa.Array]:
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    batch = reader.get_batch(0)
    return {name: batch.column(i) for i, name in enumerate(batch.schema.names)}


def _numbers(array: pa.Array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=True)


def _load_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / _META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("index_version") == INDEX_VERSION else None


def _current_version(family: Path) -> Path | None:
    try:
        name = (family / _CURRENT).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    folder = family / name
    return folder if name and (folder / _META).is_file() else None


@contextlib.contextmanager
def _family_lock(family: Path) -> Iterator[None]:
    """One indexer per family at a time (others wait, then find its version); no lock where flock is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: two writers still each leave a complete version
        yield
        return
    fh = open(family / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _publish(family: Path, write: Callable[[Path], None]) -> Path:
    """Write a version with ``write(folder)`` under a temporary name, rename it into place, point ``current`` at it."""
    name = f"v-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
    tmp = family / f".tmp-{name}"
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        os.replace(tmp, family / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = family / f".tmp-current-{uuid.uuid4().hex[:8]}"
    pointer.write_text(name + "\n", encoding="utf-8")
    os.replace(pointer, family / _CURRENT)
    _remove_old_versions(family, keep=name)
    return family / name


def _remove_old_versions(family: Path, keep: str) -> None:
    now = time.time()
    for child in family.iterdir():
        if child.name in (keep, _CURRENT, ".lock"):
            continue
        try:
            old = now - child.stat().st_mtime > (_OLD_VERSION_S if child.name.startswith("v-") else 3600)
        except OSError:
            continue
        if old:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def _trusted(entry: dict, stat: FileStat) -> bool:
    if (entry.get("name"), entry.get("size"), entry.get("mtime_ns"), entry.get("version", "")) != \
            (stat.name, stat.size, stat.mtime_ns, stat.version):
        return False
    # a local file changed within the clock tick of its indexing keeps its mtime; a remote version names its content
    return bool(stat.version) or stat.mtime_ns + _TRUST_SLACK_NS <= int(entry.get("indexed_at_ns", 0))


def _writable(cache: Path) -> bool:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        return os.access(cache, os.W_OK)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- shard sources
@dataclass(frozen=True)
class ShardToRead:
    """One shard of a source, as the index keys it."""

    stat: FileStat
    split: str
    rules: ScanRules

    def key(self) -> tuple:
        return (self.stat.name, self.stat.size, self.stat.mtime_ns, self.split, self.rules.escaped_newlines,
                self.stat.version)


def _entry_key(entry: dict) -> tuple:
    return (entry["name"], entry["size"], entry["mtime_ns"], entry["split"], entry.get("escaped", False),
            entry.get("version", ""))


def _where(path: str) -> str:
    """A shard's place as the index records it: a local file's real path, a URL without its secrets."""
    return redact_text(path) if is_remote(path) else os.path.realpath(path)


def _options(rules: Sequence[ScanRules]) -> dict:
    r = rules[0]
    return {"image_extensions": list(r.image_extensions), "caption_key": r.caption_key,
            "caption_json_field": r.caption_json_field, "id_field": r.id_field}


def open_shards(shards: Sequence[ShardToRead], source: str, places: IndexPlaces, workers: int = 0,
                progress: bool = False) -> Manifest:
    """The manifest of a shard source, from its index when one matches, else scanning what changed."""
    options = _options([s.rules for s in shards])
    id_field = options["id_field"]
    for folder in places.extra:
        meta = _load_meta(folder)
        if meta and meta.get("kind") == "shards" and meta.get("options") == options and \
                _all_reusable(meta["entries"], shards):
            return _open_shard_version(folder, meta, shards, source, id_field)
    # a family per source (its shards' real paths), named after its options first: the families of other sources
    # read the same way are where a shard seen before (added to this source, or renamed) is found again
    prefix = _digest({"kind": "shards", "options": options})[:16]
    family_key = f"{prefix}-{_digest([_where(s.stat.path) for s in shards])[:16]}"
    if not _writable(places.cache):
        return assemble(combine(_scan_all(shards, list(range(len(shards))), workers, progress)), source, id_field)
    family = places.cache / family_key

    def index() -> Callable[[Path], None]:
        known = _ShardsSeen(places.cache, prefix, family)
        scans: list[ShardScan | None] = [None] * len(shards)
        indexed = [time.time_ns()] * len(shards)
        todo = []
        for i, shard in enumerate(shards):
            found = known.find(shard)
            if found is None:
                todo.append(i)
            else:
                scans[i], indexed[i] = found
        for i, scan in zip(todo, _scan_all(shards, todo, workers, progress)):
            scans[i] = scan
        scan = combine(scans)
        manifest = assemble(scan, source, id_field)  # refuses a source without usable samples before writing
        fingerprints = _fingerprints(manifest)
        return lambda tmp: _write_shard_version(tmp, scan, shards, options, indexed, fingerprints, source)

    return _open_or_index(family, lambda meta: _all_reusable(meta["entries"], shards),
                          lambda folder, meta: _open_shard_version(folder, meta, shards, source, id_field), index)


def _open_or_index(family: Path, reusable: Callable[[dict], bool], open_version: Callable[[Path, dict], Manifest],
                   index: Callable[[], Callable[[Path], None]]) -> Manifest:
    """The family's current version when ``reusable``, else a new one: ``index()`` (which returns the writer of its
    files) runs under the family's lock, after looking again, since another process may have written it while this
    one waited; so two commands indexing the same data at once read it once."""
    family.mkdir(parents=True, exist_ok=True)
    folder = _current_version(family)
    meta = _load_meta(folder) if folder else None
    if meta and reusable(meta):
        return open_version(folder, meta)
    with _family_lock(family):
        folder = _current_version(family)
        meta = _load_meta(folder) if folder else None
        if meta and reusable(meta):
            return open_version(folder, meta)
        folder = _publish(family, index())
    return open_version(folder, _load_meta(folder))


class _ShardsSeen:
    """Shards indexed before, by their key: in this family's current version first, then in the current versions of
    the other families read with the same options (most recent first)."""

    _MAX_FAMILIES = 32

    def __init__(self, cache: Path, prefix: str, family: Path):
        others = sorted((f for f in cache.glob(f"{prefix}-*") if f != family and f.is_dir()),
                        key=lambda f: -(f / _CURRENT).stat().st_mtime if (f / _CURRENT).exists() else 0)
        self.families = [family] + others[:self._MAX_FAMILIES]
        self.loaded: list[tuple[dict, SourceScan | None, dict[tuple, int]]] = []

    def _versions(self) -> Iterator[tuple[dict, Path]]:
        for f in self.families:
            folder = _current_version(f)
            meta = _load_meta(folder) if folder else None
            if meta:
                yield meta, folder

    def find(self, shard: ShardToRead) -> tuple[ShardScan, int] | None:
        """The shard's scan as indexed before and when it was indexed, if it is unchanged since."""
        if not self.loaded:
            for meta, folder in self._versions():
                by_key = {_entry_key(e): k for k, e in enumerate(meta["entries"])}
                self.loaded.append((meta, folder, by_key))
        for i, (meta, folder, by_key) in enumerate(self.loaded):
            k = by_key.get(shard.key())
            if k is None or not _trusted(meta["entries"][k], shard.stat):
                continue
            if not isinstance(folder, SourceScan):
                folder = _load_source_scan(folder, meta)
                self.loaded[i] = (meta, folder, by_key)
            scan = folder.shard_scan(k)
            scan.shard = shard.stat.path
            return scan, int(meta["entries"][k]["indexed_at_ns"])
        return None


def _all_reusable(entries: list[dict], shards: Sequence[ShardToRead]) -> bool:
    return len(entries) == len(shards) and all(
        _entry_key(e) == s.key() and _trusted(e, s.stat) for e, s in zip(entries, shards))


def _scan_job(args: tuple[FileStat, str, ScanRules]) -> ShardScan:
    stat, split, rules = args
    if not needs_cache(stat.path):
        return scan_shard(stat.path, split, rules)
    with shard_cache().local_copy(stat.path, stat) as local:  # fetched (or decompressed) whole, then scanned
        return scan_shard(stat.path, split, rules, local=str(local))


def _scan_all(shards: Sequence[ShardToRead], todo: list[int], workers: int, progress: bool) -> list[ShardScan]:
    jobs = [(shards[i].stat, shards[i].split, shards[i].rules) for i in todo]
    out: list[ShardScan] = []
    # shown only when indexing takes a while (delay): a quick read prints nothing
    with tqdm(total=len(jobs), desc="indexing shards", unit="shard", disable=not progress or not jobs,
              dynamic_ncols=True, leave=False, delay=2) as bar:
        if workers > 1 and len(jobs) > 1:
            # each process fetches the shards it scans: as many transfers at once as processes
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("fork")) as pool:
                for scan in pool.map(_scan_job, jobs, chunksize=1):
                    out.append(scan)
                    bar.update(1)
        else:
            # shards to fetch come ahead of the scan, in a thread: the next one arrives while this one is scanned
            with ShardReadAhead([[(job[0].path, job[0])] for job in jobs]) as ahead:
                for job in ahead.follow(jobs, read_on_arrival=False):
                    out.append(_scan_job(job))
                    bar.update(1)
    return out


def _fingerprints(manifest: Manifest) -> dict[str, str]:
    out = {"": manifest.fingerprint()}
    for split in manifest.splits():
        if split:
            out[split] = manifest.select_split(split).fingerprint()
    return out


def _write_shard_version(folder: Path, scan: SourceScan, shards: Sequence[ShardToRead], options: dict,
                         indexed_at: list[int], fingerprints: dict[str, str], source: str) -> None:
    samples = {"key": scan.keys.array, "ext": scan.ext.astype(np.uint16), "offset": scan.offset, "size": scan.size}
    if scan.ids is not None:
        samples["id"] = scan.ids.array
    _write_table(folder / "samples.arrow", samples)
    _write_table(folder / "captions.arrow", {"text": scan.texts.array, "sample": scan.caption_sample})
    entries = [{"name": s.stat.name, "path": redact_text(s.stat.path), "size": s.stat.size,
                "mtime_ns": s.stat.mtime_ns, "version": s.stat.version, "indexed_at_ns": int(t), "split": s.split,
                "escaped": s.rules.escaped_newlines,
                "samples": list(e.samples), "captions": list(e.captions), "digest": e.digest,
                "skipped": [{**r, "shard": redact_text(str(r.get("shard", "")))} for r in e.skipped],
                "missing": {str(k): v for k, v in e.missing.items()}}
               for s, e, t in zip(shards, scan.entries, indexed_at)]
    meta = {"index_version": INDEX_VERSION, "kind": "shards", "options": options, "source": redact_text(source),
            "ext_table": scan.ext_table, "with_ids": scan.ids is not None, "entries": entries,
            "counts": {"samples": len(scan.offset), "captions": len(scan.caption_sample)},
            "fingerprints": fingerprints}
    (folder / _META).write_text(json.dumps(meta) + "\n", encoding="utf-8")


def _load_source_scan(folder: Path, meta: dict, shards: Sequence[ShardToRead] | None = None) -> SourceScan:
    samples = _read_table(folder / "samples.arrow")
    captions = _read_table(folder / "captions.arrow")
    paths = [s.stat.path for s in shards] if shards is not None else [e["path"] for e in meta["entries"]]
    entries = [ShardEntry(path, e["split"], tuple(e["samples"]), tuple(e["captions"]), e["digest"], e["skipped"],
                          {int(k): v for k, v in e["missing"].items()})
               for path, e in zip(paths, meta["entries"])]
    ext = _numbers(samples["ext"])
    return SourceScan(entries, StringColumn(samples["key"]), narrow_codes(ext, len(meta["ext_table"])),
                      meta["ext_table"], _numbers(samples["offset"]), _numbers(samples["size"]),
                      StringColumn(samples["id"]) if "id" in samples else None, StringColumn(captions["text"]),
                      _numbers(captions["sample"]))


def _open_shard_version(folder: Path, meta: dict, shards: Sequence[ShardToRead], source: str,
                        id_field: str | None) -> Manifest:
    scan = _load_source_scan(folder, meta, shards)
    for entry, shard in zip(scan.entries, shards):  # skipped samples name the shard where it is now
        entry.skipped = [{**s, "shard": shard.stat.path} for s in entry.skipped]
    manifest = assemble(scan, source, id_field, meta.get("fingerprints"))
    manifest.index_path = folder
    return manifest


# ---------------------------------------------------------------------------------------------- annotation files
def open_annotation_file(path: Path, options: dict, image_root: str, read: Callable[[], Manifest],
                         places: IndexPlaces) -> Manifest:
    """The manifest of an annotation file, from its index when one matches, else ``read()`` and index it."""
    stat = FileStat.of(str(path))
    for folder in places.extra:
        meta = _load_meta(folder)
        if meta and meta.get("kind") == "annotations" and meta.get("options") == options and \
                _trusted(meta["entries"][0], stat):
            return _open_annotation_version(folder, meta, str(path), image_root)
    if not _writable(places.cache):
        return read()
    family = places.cache / _digest({"kind": "annotations", "options": options, "file": os.path.realpath(path)})

    def index() -> Callable[[Path], None]:
        started = time.time_ns()
        manifest = read()
        fingerprints = _fingerprints(manifest)
        return lambda tmp: _write_annotation_version(tmp, manifest, stat, started, options, fingerprints)

    return _open_or_index(family, lambda meta: _trusted(meta["entries"][0], stat),
                          lambda folder, meta: _open_annotation_version(folder, meta, str(path), image_root), index)


def _write_annotation_version(folder: Path, manifest: Manifest, stat: FileStat, indexed_at: int, options: dict,
                              fingerprints: dict[str, str]) -> None:
    images = manifest.images
    columns = {"path": images.paths_written.array, "split": images.split_codes.astype(np.uint16)}
    if images.ids_written is not None:
        columns["id"] = images.ids_written.array
    _write_table(folder / "images.arrow", columns)
    _write_table(folder / "captions.arrow", {"text": manifest.captions.texts.array,
                                              "image_row": manifest.captions.image_rows})
    meta = {"index_version": INDEX_VERSION, "kind": "annotations", "options": options, "format": manifest.format,
            "entries": [{"name": stat.name, "path": stat.path, "size": stat.size, "mtime_ns": stat.mtime_ns,
                         "indexed_at_ns": indexed_at}],
            "split_labels": images.split_labels, "block_digest": manifest.blocks[0].digest,
            "counts": {"images": len(images), "captions": len(manifest.captions)}, "fingerprints": fingerprints}
    (folder / _META).write_text(json.dumps(meta) + "\n", encoding="utf-8")


def _open_annotation_version(folder: Path, meta: dict, source: str, image_root: str) -> Manifest:
    images = _read_table(folder / "images.arrow")
    captions = _read_table(folder / "captions.arrow")
    labels = meta["split_labels"]
    table = ImageTable(narrow_codes(_numbers(images["split"]), len(labels)), labels,
                       paths=StringColumn(images["path"]), ids=StringColumn(images["id"]) if "id" in images else None)
    texts, rows = StringColumn(captions["text"]), _numbers(captions["image_row"])
    block = Block(0, len(table), 0, len(rows), meta.get("block_digest", ""))
    manifest = Manifest(table, CaptionTable(texts, rows), source, image_root, meta["format"], blocks=[block],
                        fingerprints=meta.get("fingerprints"))
    manifest.index_path = folder
    return manifest


# ---------------------------------------------------------------------------------------------- a store's copy
def keep_copy(manifest: Manifest, store_path: str | os.PathLike) -> bool:
    """Copy the index version behind ``manifest`` into ``STORE/manifest/`` (replacing an older copy); False when the
    manifest was not opened from an index (nothing to copy)."""
    folder = getattr(manifest, "index_path", None)
    if folder is None or not Path(folder).is_dir():
        return False
    dest = Path(store_path) / STORE_INDEX_DIR
    tmp = Path(store_path) / f".tmp-{STORE_INDEX_DIR}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(folder, tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return True
