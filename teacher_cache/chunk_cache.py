"""The streamed read path: teacher rows gathered from decoded row chunks, with a bounded number of bytes resident.

A store keeps each modality as compressed row chunks; reading one row decodes its whole chunk. Streaming is only
as fast as holding everything in memory when each chunk is decoded about once per epoch, so the batches must
visit chunks locally (``train.chunk_order`` builds such an epoch order) and decoded chunks must stay resident
while batches still need them. ``StreamedRows.plan`` takes the epoch's batches ahead (the trainer knows them):

- when every chunk fits the budget from its first use to its last (the chunk-local order at the window the budget
  allows), each lives in a slot of a preallocated pool for exactly that long, and a batch's rows are one gather;
- otherwise ``ChunkCache`` keeps the chunks needed soonest and drops a chunk as soon as no planned batch needs it
  (Belady's policy: the fewest decodes any cache of that size can achieve), reading the others again;
- either way a thread decodes the chunks ahead of their first use, so decoding overlaps the blocks' arithmetic.

Without a plan the cache keeps the most recently used chunks. Chunks are read by
``teacher_cache.chunk_reader.ChunkReader``, which checks each against its build's checksum.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import numpy as np

from teacher_cache.chunk_reader import ChunkReader

NEVER = math.inf  # the next use of a chunk no planned batch needs again
READ_AHEAD_CHUNKS = 2  # chunks a planned read decodes ahead of their first use, in a thread of its own


@dataclass
class CacheStats:
    """What the cache did: chunks decoded (misses), chunk reads served from memory (hits), resident bytes."""

    decoded: dict[str, int] = field(default_factory=dict)  # per source name
    hits: int = 0
    resident_bytes: int = 0
    peak_bytes: int = 0  # resident plus the chunk being read, at most

    def to_dict(self) -> dict:
        return {"decoded": dict(self.decoded), "hits": self.hits, "resident_bytes": self.resident_bytes,
                "peak_bytes": self.peak_bytes}


class ChunkCache:
    """Decoded chunks held up to ``max_bytes``, evicting the one whose next use is furthest away.

    ``fetch(key, read, next_use)`` returns the chunk, reading it on a miss, and then keeps it only if it is needed
    again (``next_use`` < NEVER) and room can be made by evicting chunks needed later than it. Callers without a
    plan pass a decreasing counter as ``next_use`` (a least-recently-used cache).
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the chunk cache's budget must be ≥ 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._chunks: dict[Hashable, tuple[np.ndarray, float]] = {}
        self.stats = CacheStats()

    def fetch(self, key: Hashable, read: Callable[[], np.ndarray], next_use: float, source: str = "",
              extra_bytes: Callable[[], int] | None = None) -> np.ndarray:
        """The chunk under ``key`` (``read()`` on a miss); ``extra_bytes()`` tells the bytes held elsewhere (decoded
        ahead), which count toward the peak."""
        held = self._chunks.get(key)
        if held is not None:
            self.stats.hits += 1
            if next_use == NEVER:
                self._drop(key)
            else:
                self._chunks[key] = (held[0], next_use)
            return held[0]
        chunk = read()
        self.stats.decoded[source] = self.stats.decoded.get(source, 0) + 1
        extra = extra_bytes() if extra_bytes is not None else 0
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.resident_bytes + chunk.nbytes + extra)
        self._place(key, chunk, next_use, False)
        return chunk

    def _place(self, key: Hashable, chunk: np.ndarray, next_use: float, resident: bool) -> None:
        if resident:
            if next_use == NEVER:
                self._drop(key)
            else:
                self._chunks[key] = (chunk, next_use)
            return
        if next_use == NEVER or chunk.nbytes > self.max_bytes:
            return
        while self.stats.resident_bytes + chunk.nbytes > self.max_bytes:
            victim = max(self._chunks, key=lambda k: self._chunks[k][1])
            if self._chunks[victim][1] <= next_use:
                return  # everything held is needed sooner than this chunk: read it again when its turn comes
            self._drop(victim)
        self._chunks[key] = (chunk, next_use)
        self.stats.resident_bytes += chunk.nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.resident_bytes)

    def _drop(self, key: Hashable) -> None:
        chunk, _ = self._chunks.pop(key)
        self.stats.resident_bytes -= chunk.nbytes

    def clear(self) -> None:
        self._chunks.clear()
        self.stats.resident_bytes = 0

    def __len__(self) -> int:
        return len(self._chunks)


class _ReadAhead:
    """A thread that decodes chunks in the order a plan first needs them, at most ``depth`` ahead of their use.

    Chunks arrive through one queue in plan order; ``take(key)`` returns a chunk's decoded rows, setting aside the
    chunks that arrive before it (another source's chunks of the same batch), and raises the error of a chunk the
    thread could not read as soon as it arrives. ``held_bytes`` counts the chunks decoded and not yet taken.
    """

    def __init__(self, order: list[tuple[str, int]], readers: dict[str, ChunkReader], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._arrived: dict[tuple[str, int], object] = {}
        self._stop = threading.Event()
        self._bytes_lock = threading.Lock()
        self.held_bytes = 0
        self.peak_held_bytes = 0
        self._thread = threading.Thread(target=self._work, args=(order, readers), daemon=True)
        self._thread.start()

    def _work(self, order: list[tuple[str, int]], readers: dict[str, ChunkReader]) -> None:
        for key in order:
            try:
                item: object = readers[key[0]].read(key[1])
            except Exception as exc:  # raised in the consumer, when it needs this chunk
                item = exc
            if isinstance(item, np.ndarray):
                with self._bytes_lock:
                    self.held_bytes += item.nbytes
                    self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
            while not self._stop.is_set():
                try:
                    self._queue.put((key, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or not isinstance(item, np.ndarray):
                return

    def take(self, key: tuple[str, int]) -> np.ndarray:
        while key not in self._arrived:
            got, item = self._queue.get()
            if isinstance(item, BaseException):
                raise item  # the thread stopped at a chunk it could not read: the store is damaged
            self._arrived[got] = item
        item = self._arrived.pop(key)
        with self._bytes_lock:
            self.held_bytes -= item.nbytes
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()


class _Intervals:
    """A plan whose chunks all fit the budget at once from their first use to their last: each stays decoded in a
    slot of one preallocated pool per source over exactly that interval, and a batch's rows are a single gather
    from the pool. What a chunk-local order gives, at a fraction of the per-batch cost of the general cache."""

    def __init__(self, readers: dict[str, ChunkReader], starts: list[dict[str, list[int]]],
                 ends: list[dict[str, list[int]]], slots: dict[str, int]):
        self.readers = readers
        self.starts, self.ends = starts, ends
        self.pool = {name: np.empty((slots[name], r.chunk_rows, r.dim), dtype=np.float16)
                     for name, r in readers.items()}
        self.slot_of = {name: np.full(r.n_chunks, -1, dtype=np.int64) for name, r in readers.items()}
        self.free = {name: list(range(slots[name] - 1, -1, -1)) for name in readers}
        self.slot_bytes = {name: r.chunk_rows * r.dim * 2 for name, r in readers.items()}
        self.used = {name: 0 for name in readers}

    @property
    def bytes(self) -> int:
        return sum(pool.nbytes for pool in self.pool.values())

    @property
    def resident_bytes(self) -> int:
        return sum(self.used[name] * self.slot_bytes[name] for name in self.used)

    def rows(self, name: str, t: int, index: np.ndarray, read: Callable[[str, int], np.ndarray]) -> np.ndarray:
        reader, pool, slot_of = self.readers[name], self.pool[name], self.slot_of[name]
        for c in self.starts[t].get(name, ()):
            rows = read(name, c)
            slot = self.free[name].pop()
            pool[slot, :len(rows)] = rows
            slot_of[c] = slot
            self.used[name] += 1
        chunks = index // reader.chunk_rows
        slots = slot_of[chunks]
        if len(slots) and slots.min() < 0:
            c = int(chunks[np.argmin(slots)])
            raise RuntimeError(f"{name} chunk {c} read at batch {t} outside the announced plan")
        out = pool[slots, index - chunks * reader.chunk_rows]
        for c in self.ends[t].get(name, ()):
            self.free[name].append(int(slot_of[c]))
            slot_of[c] = -1
            self.used[name] -= 1
        return out


class StreamedRows:
    """Rows of several store modalities through decoded chunks held within one byte budget.

    ``rows(name, index)`` gathers float16 rows by store row. ``plan(batches)`` announces the row indices of the
    batches to come (a list of ``{name: rows}``); ``rows`` must then be called for them in that order, once per
    batch and source, and a reader thread decodes each chunk for its first use up to ``read_ahead`` chunks early,
    so that decoding overlaps the blocks' arithmetic. When every chunk fits the budget from its first use to its
    last (a chunk-local order with the window the budget allows), chunks live in preallocated slots for exactly
    that long; otherwise a ``ChunkCache`` keeps the ones needed soonest (and reads the others again). Without a plan
    the cache keeps the most recently used. ``max_bytes`` bounds the decoded chunks held, those decoded ahead
    included (plus, at most, one chunk read again while in use). Thread-safe.
    """

    def __init__(self, readers: dict[str, ChunkReader], max_bytes: int, read_ahead: int = READ_AHEAD_CHUNKS):
        self.readers = readers
        self.read_ahead = read_ahead
        largest = max((r.chunk_bytes(0) for r in readers.values() if r.n_chunks), default=0)
        self.cache = ChunkCache(max(0, int(max_bytes) - read_ahead * largest))
        self._lock = threading.Lock()
        self._uses: dict[tuple[str, int], deque] | None = None  # planned batch positions of every chunk
        self._intervals: _Intervals | None = None
        self._position: dict[str, int] = {}
        self._clock = 0
        self._ahead: _ReadAhead | None = None
        self._taken: set[tuple[str, int]] = set()  # chunks the read-ahead thread has delivered

    def plan(self, batches: Sequence[dict[str, np.ndarray]]) -> None:
        self.end_plan()
        uses: dict[tuple[str, int], deque] = {}
        first_use_order: list[tuple[str, int]] = []
        for t, batch in enumerate(batches):
            for name, index in batch.items():
                for c in np.unique(np.asarray(index, dtype=np.int64) // self.readers[name].chunk_rows).tolist():
                    key = (name, c)
                    if key not in uses:
                        uses[key] = deque()
                        first_use_order.append(key)
                    uses[key].append(t)
        intervals = self._intervals_if_they_fit(uses, len(batches))
        with self._lock:
            self._uses = None if intervals is not None else uses
            self._intervals = intervals
            self._position = {name: 0 for name in self.readers}
            self._taken = set()
            if self.read_ahead > 0 and first_use_order:
                self._ahead = _ReadAhead(first_use_order, self.readers, self.read_ahead)
            if intervals is not None:
                self.cache.stats.peak_bytes = max(self.cache.stats.peak_bytes, intervals.bytes)

    def _intervals_if_they_fit(self, uses: dict[tuple[str, int], deque], n_batches: int) -> _Intervals | None:
        """The interval schedule of ``uses`` when its pools fit the cache's budget, else None."""
        starts: list[dict[str, list[int]]] = [{} for _ in range(n_batches)]
        ends: list[dict[str, list[int]]] = [{} for _ in range(n_batches)]
        for (name, c), times in uses.items():
            starts[times[0]].setdefault(name, []).append(c)
            ends[times[-1]].setdefault(name, []).append(c)
        slots = {}
        for name in self.readers:
            live = peak = 0
            for t in range(n_batches):
                live += len(starts[t].get(name, ()))
                peak = max(peak, live)
                live -= len(ends[t].get(name, ()))
            slots[name] = peak
        need = sum(slots[name] * r.chunk_rows * r.dim * 2 for name, r in self.readers.items())
        if need > self.cache.max_bytes:
            return None
        for step in starts:
            for chunks in step.values():
                chunks.sort()  # the read-ahead thread delivers a batch's chunks in ascending order
        return _Intervals(self.readers, starts, ends, slots)

    def end_plan(self) -> None:
        """Back to least-recently-used caching, dropping what a plan kept and stopping its reader thread."""
        with self._lock:
            if self._ahead is not None:
                self._ahead.close()
                self.cache.stats.peak_bytes = max(
                    self.cache.stats.peak_bytes,
                    (self._intervals.bytes if self._intervals is not None else 0) + self._ahead.peak_held_bytes)
                self._ahead = None
            self._uses = None
            self._intervals = None
            self.cache.clear()

    def _held_ahead(self) -> int:
        return self._ahead.held_bytes if self._ahead is not None else 0

    def _read(self, name: str, c: int) -> np.ndarray:
        key = (name, c)
        if self._ahead is not None and key not in self._taken:
            self._taken.add(key)
            return self._ahead.take(key)
        return self.readers[name].read(c)  # read again: the cache had to let it go

    def _decoded(self, name: str, c: int) -> np.ndarray:
        self.cache.stats.decoded[name] = self.cache.stats.decoded.get(name, 0) + 1
        return self._read(name, c)

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        reader = self.readers[name]
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= reader.rows):
            bad = index[(index < 0) | (index >= reader.rows)][0]
            raise IndexError(f"{reader.store.location}: {reader.modality} row {bad} out of range "
                             f"(0..{reader.rows - 1})")
        if self._intervals is not None:
            with self._lock:
                t = self._position[name]
                self._position[name] = t + 1
                return self._intervals.rows(name, t, index, self._decoded)
        chunks = index // reader.chunk_rows
        # one pass over the batch's chunks in order, then one gather: rows sorted by chunk are contiguous runs
        by_chunk = np.argsort(chunks, kind="stable")
        sorted_chunks = chunks[by_chunk]
        change = np.flatnonzero(sorted_chunks[1:] != sorted_chunks[:-1]) + 1
        starts = [0, *change.tolist()] if len(index) else []
        ends = [*change.tolist(), len(index)]
        local = index[by_chunk] - sorted_chunks * reader.chunk_rows
        segments = [(int(sorted_chunks[lo]), lo, hi) for lo, hi in zip(starts, ends)]
        pieces: list = [None] * len(segments)
        with self._lock:
            if self._uses is not None:
                t = self._position[name]
                self._position[name] = t + 1
                next_uses = []
                for c, _, _ in segments:
                    planned = self._uses.get((name, c))
                    if not planned or planned[0] != t:
                        raise RuntimeError(f"{name} chunk {c} read at batch {t} outside the announced plan")
                    planned.popleft()
                    next_uses.append(planned[0] if planned else NEVER)
                # chunks no later batch needs first, then those needed furthest ahead: each is let go as soon as its
                # rows are copied, which makes room for the chunks this batch reads for the first time
                visit = sorted(range(len(segments)), key=lambda j: -next_uses[j])
            else:
                next_uses = []
                for _ in segments:
                    self._clock += 1
                    next_uses.append(-self._clock)  # least recently used goes first
                visit = range(len(segments))
            for j in visit:
                c, lo, hi = segments[j]
                chunk = self.cache.fetch((name, c), lambda c=c: self._read(name, c), next_uses[j], name,
                                         self._held_ahead)
                pieces[j] = chunk[local[lo:hi]]
        out = np.empty((len(index), reader.dim), dtype=np.float16)
        if pieces:
            out[by_chunk] = np.concatenate(pieces)
        return out

    @property
    def schedule(self) -> str:
        """How the current plan holds chunks: "slots" (each from its first use to its last), "cache" (the ones
        needed soonest), or "unplanned" (the most recently used)."""
        return "slots" if self._intervals is not None else "cache" if self._uses is not None else "unplanned"

    @property
    def resident_bytes(self) -> int:
        if self._intervals is not None:
            return self._intervals.resident_bytes
        return self.cache.stats.resident_bytes

    @property
    def peak_bytes(self) -> int:
        return self.cache.stats.peak_bytes
