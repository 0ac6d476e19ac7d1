"""Stage 2's read path: teacher similarity blocks for a training batch, straight from the cache.

A batch is B (image, caption) rows. ``SoftLabelSource.block(image_rows, caption_rows)`` returns
T_ii [B, B] = cos(teacher(img_r), teacher(img_s)) and T_tt [B, B] likewise for captions, as float32
tensors without gradient. No teacher model is involved: the rows were embedded once by ``cusa-cache build``.

Modes:
- ``dense``: one matmul of the B cached rows. Rows come from the modality held in memory (moved to the
  GPU once on CUDA), or, with ``stream=True``, from decoded row chunks of the store held up to
  ``max_memory_bytes`` (``teacher_cache.chunk_cache``), read by a prefetching thread that runs ahead of
  the training loop. Streaming is as fast as memory when batches visit chunks locally
  (``train.chunk_order``); given random batches it decodes most chunks for every batch.
- ``sparse``: only the pairs listed in each row's cached top-K teacher neighbors keep their similarity
  (and a row always sees itself and rows of the same item at similarity 1); every other pair is -inf,
  i.e. zero probability after the teacher softmax. Needs only the neighbor table, not the embeddings.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from teacher_cache.chunk_cache import READ_AHEAD_CHUNKS, StreamedRows
from teacher_cache.chunk_reader import ChunkReader
from teacher_cache.errors import StoreError
from teacher_cache.store import MODALITIES, Store

SOFT_LABEL_MODES = ("dense", "sparse")
DEFAULT_STREAM_BYTES = 1 << 30  # decoded chunks a streamed source keeps unless told otherwise


@dataclass
class _Modality:
    store: Store
    name: str  # "images" | "texts"
    emb: torch.Tensor | None = None  # [N, D] float16, in memory when not streaming
    nbr_ids: torch.Tensor | None = None  # [N, K] int64 for sparse mode
    nbr_sims: torch.Tensor | None = None


class SoftLabelSource:
    """Teacher similarity blocks for batches of store rows (see the module docstring)."""

    def __init__(self, image_store: Store, text_store: Store | None = None, *, mode: str = "dense",
                 k: int | None = None, stream: bool = False, device: str | torch.device = "cpu",
                 prefetch: int = 4, max_memory_bytes: int | None = None):
        if mode not in SOFT_LABEL_MODES:
            raise ValueError(f"soft-label mode must be one of {SOFT_LABEL_MODES}, got {mode!r}")
        text_store = text_store or image_store
        for store in {id(image_store): image_store, id(text_store): text_store}.values():
            if not store.complete:
                raise StoreError(f"{store.location}: the store is incomplete; re-run its `cusa-cache build` to "
                                 "finish it")
        self.mode = mode
        self.stream = stream
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.k = k
        self._mods = {"images": _Modality(image_store, "images"), "texts": _Modality(text_store, "texts")}
        self._streamed: StreamedRows | None = None
        self.schedules: list[str] = []  # streamed: how each planned sequence held its chunks (StreamedRows.schedule)
        if mode == "dense" and stream:
            budget = DEFAULT_STREAM_BYTES if max_memory_bytes is None else int(max_memory_bytes)
            self._streamed = StreamedRows({m.name: ChunkReader(m.store, m.name) for m in self._mods.values()},
                                          budget)
        for mod in self._mods.values():
            if mode == "sparse":
                ids, sims = mod.store.neighbors(mod.name)
                kk = ids.shape[1] if k is None else k
                if kk < 1:
                    raise ValueError(f"sparse soft labels need K ≥ 1 neighbors per row, got K={kk}")
                if kk > ids.shape[1]:
                    raise StoreError(f"{mod.store.location}: sparse soft labels with K={kk}, but the {mod.name} "
                                     f"neighbor table keeps {ids.shape[1]}; rebuild with "
                                     f"`cusa-cache build --neighbors {kk}`")
                mod.nbr_ids = torch.from_numpy(np.ascontiguousarray(ids[:, :kk])).to(self.device)
                mod.nbr_sims = torch.from_numpy(np.ascontiguousarray(sims[:, :kk])).to(self.device)
            elif not stream:
                # read the stored float16 rows as they are: Store.load would also keep a float32 copy resident
                emb = np.asarray(mod.store.array(mod.name)[:], dtype=np.float16)
                mod.emb = torch.from_numpy(emb).to(self.device)

    # ------------------------------------------------------------------ blocks
    def rows(self, modality: str, index: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Cached teacher rows (float32, on the source's device) by store row."""
        mod = self._mods[modality]
        index_np = _as_numpy(index)
        if mod.emb is not None:
            # index_select, not emb[index]: the same rows, gathered without advanced indexing's overhead (a tenth of
            # the time on a CPU)
            return mod.emb.index_select(0, torch.as_tensor(index_np, device=self.device)).float()
        return torch.from_numpy(self._streamed.rows(modality, index_np)).to(self.device).float()

    def block(self, image_rows, caption_rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(T_ii, T_tt): B×B teacher similarities of the batch's images and captions."""
        return self._block("images", image_rows), self._block("texts", caption_rows)

    def _block(self, modality: str, rows) -> torch.Tensor:
        if self.mode == "sparse":
            return self._sparse_block(modality, rows)
        emb = self.rows(modality, rows)
        return _cosine_block(emb)

    def _sparse_block(self, modality: str, rows) -> torch.Tensor:
        mod = self._mods[modality]
        r = torch.as_tensor(_as_numpy(rows), device=self.device)
        nbr = mod.nbr_ids[r]  # [B, K]
        sims = mod.nbr_sims[r]
        hit = nbr[:, :, None] == r[None, None, :]  # [B, K, B]: column s is row r's k-th neighbor
        values = torch.where(hit, sims[:, :, None], torch.full_like(sims[:, :, None], -torch.inf)).amax(dim=1)
        same = r[:, None] == r[None, :]  # the row itself and repeats of the same item
        values = torch.where(same, torch.ones_like(values), values)
        return values.float()

    def blocks(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Blocks for a known sequence of batches, computed ``prefetch`` batches ahead in a thread.

        This is how streamed mode hides the store's read latency behind the training step. A streamed source
        plans its chunk cache on the whole sequence first, so each chunk stays decoded exactly as long as a later
        batch of the sequence needs it.
        """
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = object()
        failure: list[BaseException] = []
        if self._streamed is not None and self.mode == "dense":
            batches = [(_as_numpy(i), _as_numpy(c)) for i, c in batches]
            self._streamed.plan([{"images": i, "texts": c} for i, c in batches])
            self.schedules.append(self._streamed.schedule)

        def work():
            try:
                for image_rows, caption_rows in batches:
                    q.put(self.block(image_rows, caption_rows))
            except BaseException as exc:  # surfaced in the consumer
                failure.append(exc)
            finally:
                if self._streamed is not None:
                    self._streamed.end_plan()
                q.put(stop)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while True:
            item = q.get()
            if item is stop:
                break
            yield item
        thread.join()
        if failure:
            raise failure[0]

    def memory_bytes(self) -> int:
        """Bytes this source keeps resident for its teacher rows or neighbor tables (streamed: decoded chunks now)."""
        total = self._streamed.resident_bytes if self._streamed is not None else 0
        for mod in self._mods.values():
            for t in (mod.emb, mod.nbr_ids, mod.nbr_sims):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def peak_memory_bytes(self) -> int:
        """The most bytes of teacher rows this source has held (streamed: decoded chunks, plus the one being read)."""
        if self._streamed is None:
            return self.memory_bytes()
        return self._streamed.peak_bytes

    def chunk_stats(self) -> dict | None:
        """Streamed sources: chunks decoded per modality, reads served from memory, resident and peak bytes."""
        if self._streamed is None:
            return None
        return {**self._streamed.cache.stats.to_dict(),
                "chunks": {m: self._streamed.readers[m].n_chunks for m in MODALITIES},
                "schedules": {s: self.schedules.count(s) for s in sorted(set(self.schedules))}}


def dense_bytes(image_store: Store, text_store: Store | None = None) -> int:
    """Bytes a dense source holds: every float16 teacher row of both modalities."""
    text_store = text_store or image_store
    return 2 * (image_store.counts["images"] * image_store.dims["images"]
                + text_store.counts["texts"] * text_store.dims["texts"])


def _cosine_block(emb: torch.Tensor) -> torch.Tensor:
    # rows are stored unit-norm in float16; renormalise in float32 so the diagonal is exactly 1
    emb = torch.nn.functional.normalize(emb.float(), dim=1)
    return emb @ emb.T


def _as_numpy(index) -> np.ndarray:
    if isinstance(index, torch.Tensor):
        return index.detach().cpu().numpy().astype(np.int64)
    return np.asarray(index, dtype=np.int64)


def read_ahead_bytes(image_store: Store, text_store: Store | None = None) -> int:
    """Bytes a streamed source sets aside for chunks decoded ahead of their use (the rest of its budget caches)."""
    text_store = text_store or image_store
    largest = max(2 * min(s.chunk_rows, max(s.counts[m], 1)) * s.dims[m]
                  for s, m in ((image_store, "images"), (text_store, "texts")))
    return READ_AHEAD_CHUNKS * largest
