"""Fetching the shards a loop will read ahead of it: a thread brings each shard (at a URL, from a ``pipe:`` command,
compressed) into the shard cache before the loop's batches reach it, so transfers overlap the work on the shards
already there.

A loop is described by its batches in the order it consumes them (the rows of each); :meth:`ShardReadAhead.follow`
wraps the loop's iterator (a DataLoader's, say) and counts what it has consumed. The thread fetches, in order of first
use, the shards of the batches in flight (the ``in_flight`` batches DataLoader workers may be reading) and then
``ahead`` more, as long as the shards the loop has not finished with fit the shard cache's bound (the loop's next
shard comes whatever its size; a shard the bound leaves out is fetched by its reader when it gets there). A fetched
shard stays pinned until the loop has consumed its first batch, so a shard fetched ahead is never evicted before it
is read. Each process (a torchrun rank, the main process of a build) plans only the batches it reads, so it fetches
only its own shards. A loop over plain local shards gets no thread at all.

A transfer that fails after its retries is raised by :meth:`follow` at the next batch (one line naming the URL and
the shard); what the loop finished before stays finished.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np

from pipeline.file_stat import FileStat
from pipeline.shard_cache import ShardCache, is_compressed, is_pipe, needs_cache, shard_cache

T = TypeVar("T")
DEFAULT_AHEAD = 2  # shards fetched beyond those the batches in flight read
DATALOADER_PREFETCH = 2  # torch's default prefetch_factor: batches each DataLoader worker reads ahead
_JOIN_S = 10.0


class ShardReadAhead:
    """``with ShardReadAhead(batches) as ahead: for item in ahead.follow(loader): ...``: ``batches`` lists, per batch
    the loop consumes, the (shard, version) pairs it reads; see the module docstring."""

    def __init__(self, batches: Sequence[Sequence[tuple[str, FileStat | None]]], in_flight: int = 0,
                 ahead: int = DEFAULT_AHEAD, cache: ShardCache | None = None, readers: int = 0):
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        stats: dict[str, FileStat | None] = {}
        for i, batch in enumerate(batches):
            for shard, stat in batch:
                if not needs_cache(shard):
                    continue
                first.setdefault(shard, i)
                last[shard] = i
                stats.setdefault(shard, stat)
        self.order = sorted(first, key=first.__getitem__)  # shards in order of first use
        self.first_use = np.array([first[s] for s in self.order], dtype=np.int64)
        self.last_use = np.array([last[s] for s in self.order], dtype=np.int64)
        self.stats = [stats[s] for s in self.order]
        self.in_flight = max(0, int(in_flight))
        self.ahead = max(0, int(ahead))
        # other processes reading the batches (DataLoader workers; 0: the loop's own thread), which fetch by
        # themselves the shards this thread has not brought yet: room is kept for theirs
        self.readers = max(0, int(readers))
        self.shards_per_batch = max((sum(needs_cache(shard) for shard, _ in batch) for batch in batches), default=0)
        self._largest_listed = max((st.size for st in self.stats if st is not None and st.size > 0), default=0)
        self._cache = cache
        self._consumed = 0  # batches the loop has been handed
        self._stop = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.fetched = 0
        self._local_sizes: dict[int, int] = {}  # bytes of the local copies fetched, by position in ``order``

    @classmethod
    def for_rows(cls, manifest, row_batches: Iterable[Sequence[int] | np.ndarray], in_flight: int = 0,
                 ahead: int = DEFAULT_AHEAD, readers: int = 0) -> "ShardReadAhead":
        """The read-ahead of a loop over a manifest's image rows, batch by batch (nothing to do unless its images
        are in shards read through the shard cache), read by ``readers`` DataLoader workers (0: by the loop)."""
        columns = getattr(manifest.images, "shards", None)
        if columns is None or not any(needs_cache(s) for s in columns.shards):
            return cls([], in_flight, ahead)
        names = columns.shards
        batches = []
        for rows in row_batches:
            codes = np.unique(columns.shard[np.asarray(rows, dtype=np.int64)]) if len(rows) else []
            batches.append([(names[int(c)], columns.stats.get(names[int(c)])) for c in codes])
        return cls(batches, in_flight, ahead, readers=readers)

    @property
    def active(self) -> bool:
        return bool(self.order)

    # -------------------------------------------------------------------------------- the loop's side
    def __enter__(self) -> "ShardReadAhead":
        if self.active:
            self._thread = threading.Thread(target=self._run, name="shard-read-ahead", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            # a transfer under way finishes (or fails) first; the thread then sees the stop
            self._thread.join(timeout=_JOIN_S)
            self._thread = None

    def follow(self, items: Iterable[T], read_on_arrival: bool = True) -> Iterator[T]:
        """``items`` (one per batch, in the planned order), counting each as consumed when it arrives (a DataLoader's
        batch has been read then; with ``read_on_arrival`` False, when the next one is asked for: the loop reads
        the shards of an item after receiving it); a failed transfer of the thread is raised here."""
        if not self.active:
            yield from items
            return
        for i, item in enumerate(items):
            with self._cond:
                # batch i is read (or being read): the workers now read batches up to i + in_flight
                self._consumed = i + 1 if read_on_arrival else i
                self._cond.notify_all()
            if self.error is not None:
                raise self.error
            yield item

    # -------------------------------------------------------------------------------- the thread
    def _may_fetch(self, j: int) -> bool:
        """Whether shard ``j`` may come now: it is among the shards of the batches in flight or the ``ahead`` after
        them, and the shards still to be read up to it fit the cache's bound (the loop's very next shard comes
        whatever its size; readers fetch what the bound leaves out themselves, when they reach it)."""
        horizon = self._consumed + self.in_flight  # the last batch being read now
        needed = int(np.searchsorted(self.first_use, horizon, side="right"))  # shards the batches in flight read
        if j >= needed + self.ahead:
            return False
        live = np.flatnonzero(self.last_use[:j + 1] >= self._consumed)  # shards a batch not yet consumed reads
        if len(live) <= 1:
            return True
        # room for what the readers (DataLoader workers) may be fetching on their own meanwhile: a batch's shards each
        largest = max(self._largest_listed, max(self._local_sizes.values(), default=0))
        reserve = self.readers * self.shards_per_batch * largest
        return self._bytes(live) + reserve <= self.cache.cache.max_bytes

    def _bytes(self, indexes: np.ndarray) -> int:
        """What the local copies of these shards take: their size once fetched; before, the size their listing
        gave (a plain tar), else (``pipe:``, compressed: known once read) the largest copy fetched so far."""
        largest = max(self._local_sizes.values(), default=0)
        total = 0
        for i in indexes:
            i = int(i)
            stat = self.stats[i]
            if i in self._local_sizes:
                total += self._local_sizes[i]
            elif stat is not None and stat.size >= 0 and not (is_pipe(stat.path) or is_compressed(stat.path)):
                total += stat.size
            else:
                total += max(largest, stat.size if stat is not None else 0)
        return total

    @property
    def cache(self) -> ShardCache:
        if self._cache is None:
            self._cache = shard_cache()
        return self._cache

    def _run(self) -> None:
        """Fetch the planned shards in order, each kept pinned in the cache (never evicted by this process, however
        recently other shards were read) until the loop has consumed its first batch."""
        cache = self.cache
        pins: dict[int, contextlib.AbstractContextManager] = {}
        j = 0
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._ready(j) and not self._releasable(pins) and \
                            (j < len(self.order) or pins):
                        self._cond.wait(timeout=1.0)
                    if self._stop or (j >= len(self.order) and not pins):
                        return
                    done = self._releasable(pins)
                for k in done:
                    pins.pop(k).__exit__(None, None, None)
                if j < len(self.order) and self.last_use[j] < self._consumed:
                    j += 1  # the loop has read it already (its readers fetched it)
                    continue
                if j < len(self.order) and not done:
                    pin = cache.local_copy(self.order[j], self.stats[j])
                    path = pin.__enter__()
                    pins[j] = pin
                    self._local_sizes[j] = path.stat().st_size
                    self.fetched += 1
                    j += 1
        except BaseException as exc:  # raised in the loop's thread by follow()
            self.error = exc
        finally:
            for pin in pins.values():
                pin.__exit__(None, None, None)

    def _ready(self, j: int) -> bool:
        """Whether the thread has something to do about shard ``j``: skip it (already read) or fetch it."""
        return j < len(self.order) and (self.last_use[j] < self._consumed or self._may_fetch(j))

    def _releasable(self, pins: dict) -> list[int]:
        """Pinned shards whose first batch the loop has consumed: readers have it now, and the cache's recency order
        keeps it while they read it (a pin until its last use would hold every shard of a shuffled epoch)."""
        return [k for k in pins if self.first_use[k] < self._consumed]


def consecutive_batches(rows: Sequence[int] | np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The rows of each batch a DataLoader of ``batch_size`` (no sampler) makes of a dataset over ``rows``."""
    rows = np.asarray(rows, dtype=np.int64)
    return [rows[lo:lo + batch_size] for lo in range(0, len(rows), batch_size)]
