"""Reaching files by URL: fsspec locations, bounded retries, secret-free URLs and a bounded local file cache.

Every URL (``s3://``, ``gs://``, ``https://``, ``hf://``, ...) is reached through fsspec, whose optional packages bring
the protocols: ``pip install 'cusa[s3]'`` (s3fs), ``'cusa[gcs]'`` (gcsfs), ``'cusa[hf]'`` (huggingface_hub). Credentials
come from where those packages look (AWS_* variables and ~/.aws, Google's application default credentials, HF_TOKEN),
never from a command-line flag; a custom S3 endpoint is set the same way (``AWS_ENDPOINT_URL`` or
``FSSPEC_S3_ENDPOINT_URL``). The pieces here know nothing of stores, so any reader of remote files uses them:

- :class:`RemoteLocation` — a URL as an fsspec filesystem and a root, with the URL of each file below it;
- :func:`with_retries` — a transfer retried with backoff when the connection failed, then one error line naming the
  URL; a missing file (404) or refused access (403) fails at once, naming what was expected;
- :func:`redact_url` / :func:`redact_text` — URLs with their secrets (user info, signed-query values) masked, for
  everything printed or stored;
- :func:`download` — one file into a local path, its size checked (a truncated transfer is retried, never kept);
- :class:`BoundedFileCache` — downloaded files under a folder up to a byte bound, least recently used evicted first,
  files in use never evicted, one transfer per file however many threads and processes want it;
- :func:`info_version` / :func:`info_mtime_ns` — what identifies a version of a file from its fsspec listing entry.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from teacher_cache.errors import RemoteError

try:
    import fcntl
except ImportError:  # not POSIX: no locks between processes (see BoundedFileCache)
    fcntl = None

T = TypeVar("T")

CACHE_DIR_ENV = "CUSA_CACHE_DIR"
REDACTED = "REDACTED"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://[^\s'\"<>)\]]+")
# query keys whose values are credentials: signed URLs (S3, GCS, Azure SAS) and plain token parameters
_SECRET_KEYS = {"x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
                "x-goog-credential", "sig", "signature", "token", "access_token", "auth", "key", "api_key", "apikey",
                "password", "secret", "se", "sv", "code"}
_SECRET_WORDS = ("signature", "token", "secret", "password", "credential")
# the packages that bring each protocol, for the message when one is missing
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "hf": "hf"}
# read-only protocols: a push to one of these is refused before any transfer
READ_ONLY_PROTOCOLS = ("http", "https")


def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (two or more letters, so a Windows drive is a path)."""
    return isinstance(location, str) and bool(_URL.match(location))


def redact_url(url: str) -> str:
    """``url`` with its secrets masked: user info (``user:pass@``) and the values of signed-query keys
    (X-Amz-Signature, sig, token, ...). A plain path, or a URL without secrets, comes back unchanged."""
    if not is_url(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/@]*@", f"//{REDACTED}@", url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret(k) for k, _ in pairs):
            query = "&".join(f"{quote(k, safe='-_.~')}={REDACTED if _is_secret(k) else quote(v, safe='-_.~/:')}"
                             for k, v in pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URL in it redacted."""
    def redact(match: re.Match) -> str:
        url = match.group(0)
        bare = url.rstrip(".,:;")  # punctuation after a URL ("URL: not found") is the sentence's
        return redact_url(bare) + url[len(bare):]

    return _URL_IN_TEXT.sub(redact, text)


def _is_secret(key: str) -> bool:
    low = key.lower()
    return low in _SECRET_KEYS or any(word in low for word in _SECRET_WORDS)


def default_cache_dir(kind: str) -> Path:
    """Where cusa keeps local copies of remote files of one ``kind`` ("stores", "shards", "features"):
    ``$CUSA_CACHE_DIR/KIND``, else the platform cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``) ``/cusa/KIND``."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root).expanduser() / kind
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cusa" / kind


def location_slug(url: str) -> str:
    """A folder name for a URL: its last path part (readable) and a hash of the URL without its secrets (unique)."""
    clean = redact_url(url).rstrip("/")
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", clean.split("?", 1)[0].rsplit("/", 1)[-1])[:40] or "root"
    return f"{tail}-{hashlib.sha256(clean.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------- retries
@dataclass(frozen=True)
class RetryPolicy:
    """A transfer is tried ``attempts`` times, waiting ``first_delay`` seconds after the first failure and
    ``factor`` times longer after each next one (at most ``max_delay``)."""

    attempts: int = 4
    first_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 8.0

    def delays(self) -> Iterator[float]:
        delay = self.first_delay
        for _ in range(self.attempts - 1):
            yield min(delay, self.max_delay)
            delay *= self.factor


class TruncatedTransfer(ConnectionError):
    """A transfer ended with fewer (or more) bytes than the file holds: retried like a dropped connection."""


def failure_kind(exc: BaseException) -> str:
    """How a failed transfer is treated: "missing" (404), "denied" (401/403), "transient" (connection dropped or
    refused, timeout, truncated, 5xx: worth retrying) or "fatal"."""
    chain = []
    while exc is not None and all(exc is not e for e in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    # an HTTP status anywhere in the chain decides first: fsspec's http reports a 403 as FileNotFoundError from it
    for link in chain:
        status = getattr(link, "status", None) or getattr(link, "status_code", None)
        if isinstance(status, int) and status in (401, 403):
            return "denied"
    for i, link in enumerate(chain):
        kind = _own_kind(link)
        if kind == "missing" and isinstance(link, FileNotFoundError) and i + 1 < len(chain):
            # fsspec's http turns any failure of its HEAD-then-GET probe into FileNotFoundError: a cause that is a
            # network failure (a dropped pooled connection, a timeout) is worth retrying, not a missing file
            cause = _own_kind(chain[i + 1])
            kind = cause if cause == "transient" else kind
        if kind is not None:
            return kind
    return "fatal"


def _own_kind(exc: BaseException) -> str | None:
    if type(exc).__name__ == "OfflineModeIsEnabled":  # huggingface_hub told not to connect: no use trying again
        return "fatal"
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, PermissionError):
        return "denied"
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    if isinstance(status, int):
        if status == 404:
            return "missing"
        if status in (401, 403):
            return "denied"
        if status in (408, 429) or status >= 500:
            return "transient"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return "transient"
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE, errno.ETIMEDOUT):
        return "transient"
    # the network errors of the libraries under fsspec, named so that none of them has to be installed
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if module.startswith(("aiohttp", "botocore", "urllib3", "requests", "fsspec", "asyncio", "http.client")) and any(
            word in name for word in ("Connect", "Connection", "Disconnected", "Timeout", "Payload", "IncompleteRead",
                                      "ResponseStreaming", "ProtocolError", "RemoteProtocol", "ReadError")):
        return "transient"
    return None


def one_line(exc: BaseException) -> str:
    """The first line of an exception, secrets redacted, short enough for an error line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = redact_text(lines[0]) if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def with_retries(action: Callable[[], T], *, url: str, what: str, policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep, missing: str | None = None) -> T:
    """``action()``, tried again after a transient failure (:func:`failure_kind`) as ``policy`` says.

    Every failure ends in a :class:`RemoteError` of one line naming ``url`` (redacted here) and ``what`` was
    expected there: at once for a missing file or refused access (``missing`` replaces "not found, expected WHAT
    there"), after the last attempt otherwise.
    """
    policy = policy or RetryPolicy()
    shown = redact_url(url)
    delays = policy.delays()
    t0 = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return action()
        except RemoteError:
            raise
        except Exception as exc:  # classified below: only a transient failure is tried again
            kind = failure_kind(exc)
            if kind == "missing":
                raise RemoteError(f"{shown}: {missing or f'not found, expected {what} there'}") from None
            if kind == "denied":
                raise RemoteError(f"{shown}: access denied (expected {what}); check the credentials "
                                  "(AWS_* variables or ~/.aws, Google application credentials, HF_TOKEN; never a "
                                  "flag) and that they may read this location") from None
            delay = next(delays, None) if kind == "transient" else None
            if delay is None:
                tries = f" after {attempt} tries over {time.monotonic() - t0:.1f} s" if attempt > 1 else ""
                raise RemoteError(f"{shown}: cannot transfer {what}{tries} ({one_line(exc)}); check the "
                                  "connection and run the command again") from None
            sleep(delay)


# ---------------------------------------------------------------------------------------------- locations
@dataclass
class RemoteLocation:
    """A URL as an fsspec filesystem and the root path every file below it is named from.

    ``url`` keeps what was given (secrets included) and is handed only to fsspec; :meth:`describe` gives the
    redacted URL of a file for messages. An http(s) URL's query string (a token) is carried by every file's URL.
    """

    url: str
    fs: Any
    root: str
    query: str = ""
    protocol: str = ""

    @classmethod
    def open(cls, url: str, **storage_options) -> "RemoteLocation":
        protocol = url.split("://", 1)[0].lower()
        try:
            import fsspec

            base, query = (url.split("?", 1) + [""])[:2] if protocol in READ_ONLY_PROTOCOLS else (url, "")
            options = {**_single_attempt_options(protocol, fsspec.config.conf), **storage_options}
            # a fresh filesystem each time: fsspec would otherwise reuse one made for an earlier endpoint
            fs, root = fsspec.core.url_to_fs(base, skip_instance_cache=True, **options)
            if protocol in ("s3", "s3a"):
                fs.retries = 1  # s3fs's own retry loop, around botocore's (see _single_attempt_options)
        except ImportError as exc:
            extra = _EXTRAS.get(protocol)
            hint = f"pip install 'cusa[{extra}]'" if extra else f"install the fsspec package for {protocol}://"
            raise RemoteError(f"{redact_url(url)}: reading {protocol}:// URLs needs a package that is not installed "
                              f"({one_line(exc)}); {hint}") from None
        except ValueError as exc:
            raise RemoteError(f"{redact_url(url)}: not a URL fsspec can open ({one_line(exc)})") from None
        return cls(url=url, fs=fs, root=str(root).rstrip("/"), query=query, protocol=protocol)

    @property
    def writable(self) -> bool:
        return self.protocol not in READ_ONLY_PROTOCOLS

    def path(self, rel: str = "") -> str:
        """The filesystem path (http: the URL) of ``rel`` below the root."""
        p = f"{self.root}/{rel}" if rel else self.root
        return f"{p}?{self.query}" if self.query else p

    def describe(self, rel: str = "") -> str:
        """The redacted URL of ``rel`` below the root, for messages."""
        base = self.url.split("?", 1)[0].rstrip("/") if self.query else self.url.rstrip("/")
        full = f"{base}/{rel}" if rel else base
        return redact_url(f"{full}?{self.query}" if self.query else full)

    def read_bytes(self, rel: str, what: str, policy: RetryPolicy | None = None,
                   missing_ok: bool = False) -> bytes | None:
        """The whole file ``rel`` (small files: metadata), with retries; None when it is absent and ``missing_ok``."""
        def read() -> bytes | None:
            try:
                return self.fs.cat_file(self.path(rel))
            except FileNotFoundError:
                if missing_ok:
                    return None
                raise
        return with_retries(read, url=self.describe(rel), what=what, policy=policy)


def _single_attempt_options(protocol: str, conf: dict) -> dict:
    """Storage options that leave retrying to :func:`with_retries`: botocore's retries inside s3fs's inside ours made a
    dead endpoint take 35 s to report. A user's own fsspec configuration of them is kept."""
    if protocol in ("s3", "s3a") and "config_kwargs" not in (conf.get(protocol) or {}):
        return {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
    return {}


def download(location: RemoteLocation, rel: str, dest: Path, *, size: int | None, what: str,
             policy: RetryPolicy | None = None) -> None:
    """Copy ``rel`` below ``location`` to ``dest`` (overwritten), retrying dropped connections; a transfer whose
    byte count differs from ``size`` is a :class:`TruncatedTransfer` (retried, and never left as a good file)."""
    def attempt() -> None:
        location.fs.get_file(location.path(rel), str(dest))
        got = dest.stat().st_size
        if size is not None and got != size:
            dest.unlink(missing_ok=True)
            raise TruncatedTransfer(f"received {got} of {size} bytes")

    try:
        with_retries(attempt, url=location.describe(rel), what=what, policy=policy)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def upload(location: RemoteLocation, source: Path, rel: str, *, what: str, policy: RetryPolicy | None = None) -> None:
    """Copy the local file ``source`` to ``rel`` below ``location``, retrying dropped connections."""
    target = location.path(rel)
    if _is_local(location.fs):  # object stores have no folders to make; a local destination does
        location.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    with_retries(lambda: location.fs.put_file(str(source), target), url=location.describe(rel), what=what,
                 policy=policy, missing="the bucket or folder does not exist (create it first)")


def _is_local(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


# ---------------------------------------------------------------------------------------------- file versions
# fields of an fsspec listing entry that change whenever the file's content does, the first present deciding: ETags
# (S3, HTTP, GCS), generations (GCS), blob ids (Hugging Face), content digests; else a modification time. One field
# only, so that a listing and a single file's info (which may carry more fields) agree.
_VERSION_FIELDS = ("ETag", "etag", "generation", "blob_id", "md5Hash", "Content-MD5", "Digest")
_MTIME_FIELDS = ("LastModified", "Last-Modified", "last_modified", "updated", "mtime", "modified")


def info_version(info: dict) -> str:
    """What identifies the content of a file from its fsspec ``info``/listing entry: its ETag, generation, blob id or
    digest, else its modification time, whichever the protocol gives first ("" when it gives none: only the size is
    known)."""
    for name in _VERSION_FIELDS:
        value = info.get(name)
        if value not in (None, "") and not isinstance(value, dict):
            return f"{name.lower()}={str(value).removeprefix('W/').strip(chr(34))}"
    lfs = info.get("lfs")
    if isinstance(lfs, dict) and lfs.get("sha256"):
        return f"sha256={lfs['sha256']}"
    mtime = info_mtime_ns(info)
    return f"mtime={mtime}" if mtime else ""


def info_mtime_ns(info: dict) -> int:
    """A file's modification time in ns from its fsspec ``info`` (0 when it has none)."""
    import datetime
    from email.utils import parsedate_to_datetime

    for name in _MTIME_FIELDS:
        value = info.get(name)
        try:
            if isinstance(value, datetime.datetime):
                return int(value.timestamp() * 1e9)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return int(value * 1e9) if value < 1e12 else int(value)
            if isinstance(value, str) and value:
                try:
                    return int(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
                except ValueError:
                    return int(parsedate_to_datetime(value).timestamp() * 1e9)
        except (TypeError, ValueError, OverflowError):
            continue
    return 0


# ---------------------------------------------------------------------------------------------- local cache
@dataclass
class FileCacheStats:
    """What a :class:`BoundedFileCache` did in this process."""

    hits: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    evicted: int = 0

    def to_dict(self) -> dict:
        return {"hits": self.hits, "fetched": self.fetched, "fetched_bytes": self.fetched_bytes,
                "evicted": self.evicted}


@dataclass
class BoundedFileCache:
    """Files under ``root`` kept up to ``max_bytes`` in all, the least recently used evicted first.

    ``with cache.pinned(key, fetch, size) as path:`` gives the local file of ``key`` (a relative path), calling
    ``fetch(tmp_path)`` to bring it when it is absent or has another size than ``size``; the fetched file is moved
    into place only whole (so a transfer cut short never counts as cached) and stays while pinned. Other processes
    may share the folder: the bound counts every file in it, use is recorded as the file's modification time, and a
    lock file per key (``.locks/``, where ``flock`` exists) makes a process wait for the transfer another one has
    begun rather than start its own. A file larger than the bound is still delivered (and evicted as soon as it is
    released). Names starting with a dot (locks, transfers in progress) are not cached files.
    """

    root: Path
    max_bytes: int
    stats: FileCacheStats = field(default_factory=FileCacheStats)

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"a file cache's bound must be ≥ 0 bytes, got {self.max_bytes}")
        self.root = Path(self.root)
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._pins: Counter = Counter()
        self._over = False  # files in use kept the folder over its bound at the last eviction

    def path(self, key: str) -> Path:
        return self.root / key

    @contextlib.contextmanager
    def pinned(self, key: str, fetch: Callable[[Path], None], size: int | None = None) -> Iterator[Path]:
        with self._lock:
            self._pins[key] += 1
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        in_use = self._flock(".pins", key, shared=True)  # other processes see the file in use: never evicted
        try:
            with key_lock:  # one transfer per file, however many threads want it
                path = self.path(key)
                if _has_size(path, size):
                    self.stats.hits += 1
                    _touch(path)
                else:
                    with self._process_lock(key):  # ... and however many processes
                        if _has_size(path, size):  # brought by another process meanwhile
                            self.stats.hits += 1
                            _touch(path)
                        else:
                            with self._reserved(size):  # room first: transfers in progress count too
                                self._fetch(path, fetch, size)
                            if not size:  # no room was made ahead (size unknown): make it now
                                self._evict_over_bound(keep=key)
            yield path
        finally:
            _unlock(in_use)
            with self._lock:
                self._pins[key] -= 1
                if self._pins[key] <= 0:
                    del self._pins[key]
            if self._over or self.max_bytes == 0 or (size or 0) > self.max_bytes:
                self._evict_over_bound(keep=None)  # files in use held the folder over its bound: back within it

    @contextlib.contextmanager
    def _process_lock(self, key: str) -> Iterator[None]:
        """``key``'s transfer lock, held by one process (one thread) at a time."""
        held = self._flock(".locks", key, shared=False)
        try:
            yield
        finally:
            _unlock(held)

    def _flock(self, kind: str, key: str, shared: bool, wait: bool = True, name: str | None = None):
        """An flock on ``key``'s lock file in ``kind`` (``.locks``: transfers, ``.pins``: files in use), one of 1024
        per kind so their number stays bounded (two keys sharing one only wait for each other, rarely), or on the
        file ``name``; None where
        flock does not exist (not POSIX: each process then knows only its own transfers and pins) or, without
        ``wait``, when another process holds a conflicting lock."""
        if fcntl is None:
            return None
        folder = self.root / kind
        folder.mkdir(parents=True, exist_ok=True)
        name = name or f"{int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 1024:04d}"
        fh = open(folder / name, "a+")
        try:
            fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.close()
            return None
        except BaseException:
            fh.close()
            raise
        return fh

    @contextlib.contextmanager
    def _reserved(self, size: int | None) -> Iterator[None]:
        """Room for a transfer of ``size`` bytes: files evicted until the cached files, the transfers other
        processes have under way (``.reserved/SIZE-PID-ID``) and this one fit the bound, decided under one lock for
        the whole folder so that two transfers starting together both count; the reservation lasts the transfer."""
        if not size:
            yield
            return
        folder = self.root / ".reserved"
        folder.mkdir(parents=True, exist_ok=True)
        mark = folder / f"{size}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        room = self._flock(".locks", "", shared=False, name="room")  # not a key's: this thread may hold that
        try:
            self._evict_over_bound(keep=None, incoming=size)
            mark.touch()
        finally:
            _unlock(room)
        try:
            yield
        finally:
            mark.unlink(missing_ok=True)

    def _reserved_bytes(self) -> int:
        """Bytes of the transfers under way in live processes (a killed process's reservations are removed)."""
        total = 0
        try:
            marks = list((self.root / ".reserved").iterdir())
        except FileNotFoundError:
            return 0
        for mark in marks:
            try:
                size, pid = (int(x) for x in mark.name.split("-")[:2])
            except ValueError:
                continue
            if pid != os.getpid() and not _alive(pid):
                mark.unlink(missing_ok=True)
                continue
            total += size
        return total

    def read(self, key: str, fetch: Callable[[Path], None], size: int | None = None) -> bytes:
        """The bytes of ``key``, brought by ``fetch`` when absent (see :meth:`pinned`)."""
        with self.pinned(key, fetch, size) as path:
            return path.read_bytes()

    def _fetch(self, path: Path, fetch: Callable[[Path], None], size: int | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
        try:
            fetch(tmp)
            got = tmp.stat().st_size
            if size is not None and got != size:
                raise TruncatedTransfer(f"{path.name}: received {got} of {size} bytes")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.stats.fetched += 1
        self.stats.fetched_bytes += path.stat().st_size

    def usage(self) -> dict[str, tuple[int, float]]:
        """{key: (bytes, last use)} of every cached file (transfers in progress left out)."""
        out = {}
        if not self.root.is_dir():
            return out
        for folder, folders, names in os.walk(self.root):
            folders[:] = [f for f in folders if not f.startswith(".")]
            for name in names:
                if name.startswith(".") or name.endswith(".partial"):
                    continue
                p = Path(folder) / name
                try:
                    st = p.stat()
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
                out[p.relative_to(self.root).as_posix()] = (st.st_size, st.st_mtime)
        return out

    def size_bytes(self) -> int:
        return sum(size for size, _ in self.usage().values())

    def _evict_over_bound(self, keep: str | None, incoming: int = 0) -> None:
        """Remove the least recently used files not in use until the cached files, and ``incoming`` bytes about to
        arrive, fit the bound."""
        with self._lock:
            usage = self.usage()
            total = sum(size for size, _ in usage.values()) + self._reserved_bytes() + incoming
            for key, (size, _) in sorted(usage.items(), key=lambda item: item[1][1]):
                if total <= self.max_bytes:
                    break
                if key == keep or self._pins.get(key):
                    continue
                free = self._flock(".pins", key, shared=False, wait=False)
                if free is None and fcntl is not None:
                    continue  # in use in another process
                try:
                    self.path(key).unlink()
                except FileNotFoundError:
                    pass
                finally:
                    _unlock(free)
                total -= size
                self.stats.evicted += 1
            self._over = total > self.max_bytes


def _has_size(path: Path, size: int | None) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return size is None or st.st_size == size


def _unlock(fh) -> None:
    if fh is not None:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except FileNotFoundError:
        pass
