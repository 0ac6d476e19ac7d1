"""Shards that are not plain local tar files, read through a bounded local cache: a shard at a URL (``s3://``,
``gs://``, ``http(s)://``, ``hf://``), one written by a ``pipe:`` command, or a compressed one (``.tar.gz``, ``.tgz``,
``.tar.bz2``, ``.tar.xz``, ``.tar.zst``).

Such a shard is fetched whole, sequentially, once (a URL through fsspec, a command's standard output, a compressed file
through its decompressor) into the shard cache, a folder bounded in bytes (least recently used shards evicted first,
a shard being read never), and its members are then read by offset from that local copy, exactly as from a local
shard: never one request per image. :mod:`pipeline.shard_read_ahead` fetches the shards a loop will read ahead of it.

Where: ``--shard-cache DIR`` (``$CUSA_SHARD_CACHE``), else ``$CUSA_CACHE_DIR/shards``, else ``~/.cache/cusa/shards``;
how much: ``--shard-cache-gib N`` (``$CUSA_SHARD_CACHE_GIB``, default 10). Both travel as environment variables, so
DataLoader workers, torchrun ranks and the processes that scan shards use the same folder; processes share it (one
transfer per shard, whoever asks first).

A local copy is named after its shard's version (:class:`~pipeline.file_stat.FileStat`: size and ETag, generation or
modification time for a URL; the command text for ``pipe:``; size and modification time for a local compressed
file), so a shard changed at its URL is never read from the copy of the one before. A transfer is retried when the
connection drops (``teacher_cache.remote.with_retries``) and a copy enters the cache only whole: with the size its
listing gave, or, for ``pipe:`` output and decompressed streams, ending with the tar end-of-archive block.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from pipeline.errors import ImageError, ManifestError
from pipeline.file_stat import FileStat
from pipeline.manifest_table import shard_file_name
from pipeline.source_names import SHARD_CACHE_ENV, SHARD_CACHE_GIB_ENV
from pipeline.tar_index import compression_of, read_at, scan_tar
from teacher_cache.remote import (BoundedFileCache, RemoteLocation, RetryPolicy, TruncatedTransfer, default_cache_dir,
                                  download, info_mtime_ns, info_version, is_url, location_slug, one_line,
                                  redact_text, redact_url, with_retries)

DEFAULT_SHARD_CACHE_GIB = 10.0
GIB = 1 << 30
PIPE = "pipe:"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_LISTED_PROTOCOLS_SKIP = ("http", "https")  # no listings: one HEAD per shard
_STAT_THREADS = 16
_SIZE_ONLY = "size-only"  # the version of a file at a URL whose server gives no ETag nor modification time


# ---------------------------------------------------------------------------------------------- kinds of shards
def is_pipe(shard: str) -> bool:
    return shard.startswith(PIPE)


def is_remote(shard: str) -> bool:
    """A shard reached through fsspec or a command: a ``scheme://`` URL (not ``file://``) or ``pipe:CMD``."""
    return is_pipe(shard) or (is_url(shard) and not shard.lower().startswith("file://"))


def is_compressed(shard: str) -> bool:
    return shard_file_name(shard).lower().endswith(COMPRESSED_SUFFIXES)


def needs_cache(shard: str) -> bool:
    """Whether a shard is read through the shard cache (its members cannot be read in place)."""
    return is_remote(shard) or is_compressed(shard)


def shown(shard: str) -> str:
    """A shard as messages name it (secrets in URLs, also inside a ``pipe:`` command, redacted)."""
    return redact_text(shard) if is_pipe(shard) else redact_url(shard)


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ShardCacheSettings:
    """Where local copies of shards go (``directory``; None: ``$CUSA_CACHE_DIR/shards``, else
    ``~/.cache/cusa/shards``) and how many GiB the folder may hold in all."""

    directory: str | None = None
    max_gib: float = DEFAULT_SHARD_CACHE_GIB

    @classmethod
    def from_env(cls) -> "ShardCacheSettings":
        """The settings ``--shard-cache`` / ``--shard-cache-gib`` put in the environment (defaults otherwise)."""
        raw = os.environ.get(SHARD_CACHE_GIB_ENV, "").strip()
        try:
            gib = float(raw) if raw else DEFAULT_SHARD_CACHE_GIB
        except ValueError:
            raise ManifestError(f"${SHARD_CACHE_GIB_ENV}={raw!r}: expected a number of GiB, e.g. 20") from None
        if not gib > 0:
            raise ManifestError(f"${SHARD_CACHE_GIB_ENV}={raw!r}: the shard cache's size must be > 0 GiB")
        # the folder resolved now ($CUSA_CACHE_DIR included), so that settings name one folder wherever they go
        return cls(os.environ.get(SHARD_CACHE_ENV) or str(default_cache_dir("shards")), gib)

    @property
    def root(self) -> Path:
        return Path(self.directory).expanduser() if self.directory else default_cache_dir("shards")

    @property
    def max_bytes(self) -> int:
        return int(self.max_gib * GIB)


# ---------------------------------------------------------------------------------------------- the cache
class PipeFailed(ConnectionError):
    """A ``pipe:`` command ended with a non-zero status: retried as a dropped connection would be (the commands are
    network clients: curl, aws s3 cp, gsutil cat)."""


class ShardCache:
    """Local copies of shards in a :class:`~teacher_cache.remote.BoundedFileCache`, and the versions of remote
    shards (one listing per folder, or one HEAD per shard for http).

    One per process and settings (:func:`shard_cache`): it holds the fsspec filesystems it opened and the thread
    locks of transfers in progress, which a forked process must not inherit.
    """

    def __init__(self, settings: ShardCacheSettings, policy: RetryPolicy | None = None):
        self.settings = settings
        self.cache = BoundedFileCache(settings.root, settings.max_bytes)
        self.policy = policy
        self._locations: dict[str, RemoteLocation] = {}
        self._keys: dict[FileStat, str] = {}
        self._stats: dict[str, FileStat] = {}
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------- versions
    def location(self, folder_url: str) -> RemoteLocation:
        """The fsspec location of a folder URL, opened once per process."""
        with self._lock:
            found = self._locations.get(folder_url)
        if found is None:
            found = RemoteLocation.open(folder_url)
            with self._lock:
                found = self._locations.setdefault(folder_url, found)
        return found

    def stat(self, shard: str) -> FileStat:
        """The version of one shard (remembered: a process asks its listing once)."""
        found = self._stats.get(shard)
        return found if found is not None else self.stats([shard])[0]

    def stats(self, shards: Sequence[str]) -> list[FileStat]:
        """The versions of ``shards`` now: local files by ``os.stat``; URLs from one listing of each folder (object
        stores, the Hub), or one HEAD request each (http, in threads); ``pipe:`` commands by their text."""
        out: dict[str, FileStat] = {}
        folders: dict[str, list[str]] = {}
        for shard in shards:
            if is_pipe(shard):
                out[shard] = FileStat(shard, shard_file_name(shard), -1, 0, "pipe")
            elif not is_remote(shard):
                out[shard] = FileStat.of(shard)
            else:
                folders.setdefault(_split_url(shard)[0], []).append(shard)
        for folder, members in folders.items():
            location = self.location(folder)
            listing = self._listing(location) if location.protocol not in _LISTED_PROTOCOLS_SKIP else {}
            rest = []  # not in the listing: asked one by one
            for shard in members:
                info = listing.get(_split_url(shard)[1])
                if info is None:
                    rest.append(shard)
                else:
                    out[shard] = _stat_of(shard, info)
            if rest:
                with ThreadPoolExecutor(max_workers=min(_STAT_THREADS, len(rest))) as pool:
                    for shard, stat in zip(rest, pool.map(lambda s: self._info(location, s), rest)):
                        out[shard] = stat
        self._stats.update(out)
        return [out[s] for s in shards]

    def _listing(self, location: RemoteLocation) -> dict[str, dict]:
        """{file name: info} of the files in a folder URL ({} when it cannot be listed: each file is asked alone)."""
        def ls() -> list:
            try:
                location.fs.invalidate_cache(location.root)  # a listing cached by an earlier call may be stale
                return location.fs.ls(location.root, detail=True)
            except (FileNotFoundError, NotImplementedError):
                return []

        entries = with_retries(ls, url=location.describe(), what="a folder of tar shards (a listing of it)",
                               policy=self.policy)
        return {str(e.get("name", "")).rstrip("/").rsplit("/", 1)[-1]: e for e in entries
                if isinstance(e, dict) and e.get("type", "file") == "file"}

    def _info(self, location: RemoteLocation, shard: str) -> FileStat:
        name = _split_url(shard)[1]
        info = with_retries(lambda: location.fs.info(location.path(name)), url=shown(shard),
                            what=f"the tar shard {shard_file_name(shard)}", policy=self.policy)
        return _stat_of(shard, info)

    # -------------------------------------------------------------------------------- local copies
    def key(self, stat: FileStat) -> str:
        """The cache key of a shard version: readable (the shard's name) and unique (a hash of where and which)."""
        found = self._keys.get(stat)
        if found is None:  # asked once per image read: worked out once per shard
            found = self._keys.setdefault(stat, self._key(stat))
        return found

    def _key(self, stat: FileStat) -> str:
        name = shard_file_name(stat.path)
        for suffix in COMPRESSED_SUFFIXES:
            if name.lower().endswith(suffix):
                name = name[:-len(suffix)]
                break
        name = name.removesuffix(".tar")[:60] or "shard"
        if is_pipe(stat.path):
            where, which = "pipe", stat.path
        elif is_remote(stat.path):
            where, which = location_slug(_split_url(stat.path)[0]), f"{stat.size}:{stat.version}"
        else:
            where, which = "local", f"{os.path.realpath(stat.path)}:{stat.size}:{stat.mtime_ns}"
        return f"{where}/{name}-{hashlib.sha256(which.encode()).hexdigest()[:16]}.tar"

    @contextlib.contextmanager
    def local_copy(self, shard: str, stat: FileStat | None = None) -> Iterator[Path]:
        """The local plain-tar copy of ``shard`` (its version ``stat``, looked up when None), fetched first when the
        cache does not hold it, and kept while the block runs."""
        stat = stat or self.stat(shard)
        size = stat.size if is_remote(shard) and not is_compressed(shard) and stat.size >= 0 else None
        with self.cache.pinned(self.key(stat), lambda tmp: self._fetch(shard, stat, tmp), size) as path:
            yield path

    def read(self, shard: str, offset: int, size: int, stat: FileStat | None = None) -> bytes:
        """The bytes of one member, from the shard's local copy (fetched first if needed)."""
        for _ in range(3):
            with self.local_copy(shard, stat) as path:
                try:
                    return read_at(path, offset, size, shown(shard))
                except FileNotFoundError:  # evicted by another process between its check and this read: again
                    continue
        raise ImageError(f"{shown(shard)}: its local copy was evicted from the shard cache while being read, three "
                         f"times; give the shard cache more room (--shard-cache-gib)")

    def _fetch(self, shard: str, stat: FileStat, dest: Path) -> None:
        """Bring the shard into ``dest`` as a plain tar: transferred (with retries), then decompressed if it is a
        compressed stream; ``pipe:`` output must end with the tar end-of-archive block."""
        raw = dest.with_name(dest.name + ".raw")  # a dot-name: never counted as a cached file
        try:
            if is_pipe(shard):
                with_retries(lambda: _run_pipe(shard, raw, dest), url=shown(shard),
                             what=f"the tar shard {stat.name} (the command's output)", policy=self.policy)
                return
            if is_remote(shard):
                folder, name = _split_url(shard)
                size = stat.size if stat.size >= 0 else None
                what = f"the tar shard {stat.name}" + (f", {size} bytes" if size is not None else "")
                download(self.location(folder), name, raw, size=size, what=what, policy=self.policy)
                source = raw
            else:
                source = Path(shard)
            kind = _compression(source)
            if kind:
                try:
                    _decompress(source, dest, kind)
                except (OSError, EOFError, ValueError, RuntimeError) as exc:
                    raise ManifestError(f"{shown(shard)}: cannot decompress the {kind} shard ({one_line(exc)}); is "
                                        "it damaged?") from None
            else:
                os.replace(source, dest) if source == raw else shutil.copyfile(source, dest)
        finally:
            raw.unlink(missing_ok=True)


def _run_pipe(shard: str, raw: Path, dest: Path) -> None:
    """One try of a ``pipe:`` command: its standard output into ``raw``, then (decompressed if need be) into
    ``dest``; a non-zero status, and output that does not end as a tar does, are failures worth another try."""
    command = shard[len(PIPE):]
    with open(raw, "wb") as out:
        proc = subprocess.run(command, shell=True, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise PipeFailed(f"exit status {proc.returncode}" + (f": {said[-1][:160]}" if said else ""))
    kind = _compression(raw)
    if kind:
        try:
            _decompress(raw, dest, kind)
        except (OSError, EOFError, ValueError) as exc:
            raise TruncatedTransfer(f"the {kind} output cannot be decompressed ({one_line(exc)})") from None
    else:
        os.replace(raw, dest)
    if not _ends_as_a_tar(dest):
        raise TruncatedTransfer("the output does not end with a tar's end-of-archive block (cut short?)")


def _ends_as_a_tar(path: Path) -> bool:
    try:
        members = scan_tar(str(path))
    except ManifestError:
        return False
    return members.ended


def _compression(path: Path) -> str:
    with open(path, "rb") as fh:
        return compression_of(fh.read(8))


def _decompress(source: Path, dest: Path, kind: str) -> None:
    openers: dict[str, Callable] = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise ManifestError(f"{source}: a zstd-compressed shard needs the zstandard package (pip install "
                                "zstandard)") from None
        with open(source, "rb") as fin, open(dest, "wb") as fout:
            zstandard.ZstdDecompressor().copy_stream(fin, fout)
        return
    with openers[kind](source, "rb") as fin, open(dest, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def _split_url(url: str) -> tuple[str, str]:
    """(the folder URL, the file name) of a file URL; a query string (a token) stays with the folder, so every file
    below it carries it."""
    base, sep, query = url.partition("?")
    folder, _, name = base.rstrip("/").rpartition("/")
    return (f"{folder}?{query}" if sep else folder), name


def _stat_of(shard: str, info: dict) -> FileStat:
    size = info.get("size")
    version = info_version(info) or _SIZE_ONLY
    return FileStat(shard, shard_file_name(shard), int(size) if isinstance(size, int) else -1, info_mtime_ns(info),
                    version)


# ---------------------------------------------------------------------------------------------- one per process
_BY_PROCESS: dict[tuple[int, ShardCacheSettings], ShardCache] = {}


def shard_cache(settings: ShardCacheSettings | None = None) -> ShardCache:
    """This process's shard cache for ``settings`` (default: from the environment). Kept per process id: a
    DataLoader worker forked while a transfer ran must not inherit its locks, nor the parent's network sessions.

    A forked process leaves the parent's instances alone, never dropping them: closing the copy of a network
    session in the child unregisters its sockets from the event-loop polling the parent shares with it, and the
    parent's transfer in progress then waits forever."""
    settings = settings or ShardCacheSettings.from_env()
    key = (os.getpid(), settings)
    found = _BY_PROCESS.get(key)
    if found is None:  # no lock around this (a lock held at a fork would stay held in the child): setdefault decides
        found = _BY_PROCESS.setdefault(key, ShardCache(settings))
    return found


def read_cached_member(shard: str, offset: int, size: int, stat: FileStat | None = None) -> bytes:
    """One member of a shard read through this process's shard cache; a failed transfer is a RemoteError (one
    line naming the URL and the shard), never an unreadable image."""
    return shard_cache().read(shard, offset, size, stat)

