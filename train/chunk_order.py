"""A chunk-local epoch order: the batches of a streamed run visit the store's row chunks a few at a time.

The teacher store keeps rows in compressed chunks (``--chunk-rows``), and a row costs the decode of its whole
chunk. Random batches of a large dataset touch most chunks every step; this order touches a window of W chunks
at a time, as webdataset does with shards and a shuffle buffer:

1. every training pair belongs to one *unit*: the stored chunk of its image or of its caption, whichever
   modality has fewer chunks among the pairs (images, in the usual five-captions-an-image layout). A unit's
   pairs then also cover a contiguous run of the other modality's chunks, because a manifest keeps each
   image's captions together. When the training data are webdataset shards, a unit is a shard: its samples are
   one contiguous range of store rows (``pipeline.shards.shard_row_ranges``), so a window reads a few shards'
   image members and the few chunks holding their teacher rows, and nothing else;
2. the epoch shuffles the order of the units, splits them into windows of (at most) W, and shuffles the pairs of
   each window together, dealing the captions of one image into successive rounds (an image's captions would
   otherwise meet in one batch far more often than in a shuffle of the whole dataset when a window is only a few
   batches long);
3. the concatenated sequence is cut into global batches exactly as random batches are (``cut_into_batches``:
   under DDP each rank takes its contiguous slice of every global batch).

So each chunk is decoded about once an epoch while at most about W units of decoded chunks are resident, and the
order depends only on (seed, epoch, W) and the store layout: a resumed run sees the batches it would have seen.
With W covering every unit the order *is* the full shuffle (``epoch_batches``), batch for batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from train.data import TrainingPairs, cut_into_batches, epoch_batches


@dataclass(frozen=True)
class ChunkUnits:
    """Which unit (stored chunk) each training pair belongs to, and what a unit costs in decoded bytes."""

    unit_of_pair: np.ndarray  # int64 [n_pairs], 0..n_units-1 in store order
    modality: str  # "images" | "texts": the modality whose chunks define the units; "shards": the data's shards
    unit_bytes: np.ndarray  # int64 [n_units]: decoded float16 bytes of the chunks a unit's pairs read
    chunks_read: dict[str, int]  # per modality: the stored chunks holding rows of the training pairs

    @property
    def n_units(self) -> int:
        return len(self.unit_bytes)

    @property
    def name(self) -> str:
        """What a unit is, for messages: "image chunks", "caption chunks" or "shards"."""
        return {"images": "image chunks", "texts": "caption chunks"}.get(self.modality, self.modality)

    def window_for(self, budget_bytes: int, reserved_bytes: int = 0) -> int:
        """The largest W whose units fit the budget (less ``reserved_bytes``, e.g. chunks decoded ahead) with room
        for the next window's first chunks.

        Sized on the largest units, with a quarter kept free: at a window's end the last batches still read its
        chunks while the next window's arrive.
        """
        largest = np.sort(self.unit_bytes)[::-1]
        fits = np.flatnonzero(np.cumsum(largest) * 1.25 <= budget_bytes - reserved_bytes)
        return int(fits[-1] + 1) if len(fits) else 0


def pair_units(pairs: TrainingPairs, image_store, text_store) -> ChunkUnits:
    """Units of the training pairs in ``image_store``/``text_store``: their shards when the training data are
    webdataset shards, else stored chunks (see the module docstring)."""
    return row_units(pairs.store_image_rows[str(image_store.path)][pairs.image_rows],
                     pairs.store_caption_rows[str(text_store.path)][pairs.caption_rows], image_store, text_store,
                     shard_of_pair(pairs))


def shard_of_pair(pairs: TrainingPairs) -> np.ndarray | None:
    """The shard (numbered in shard order) of each training pair when the data are webdataset shards, else None."""
    of_caption = pairs.manifest.shard_of_caption()
    return None if of_caption is None else of_caption[pairs.caption_rows]


def row_units(image_rows: np.ndarray, caption_rows: np.ndarray, image_store, text_store,
              unit_of_pair: np.ndarray | None = None) -> ChunkUnits:
    """Units of pairs given by their store rows (pair i is (image_rows[i], caption_rows[i])): the stored chunks of
    one modality, or the units ``unit_of_pair`` names (shards), each costing the chunks of both modalities its
    pairs read."""
    rows = {"images": np.asarray(image_rows, dtype=np.int64), "texts": np.asarray(caption_rows, dtype=np.int64)}
    stores = {"images": image_store, "texts": text_store}
    chunk = {m: rows[m] // stores[m].chunk_rows for m in rows}
    counts = {m: len(np.unique(chunk[m])) for m in chunk}
    row_bytes = {m: 2 * stores[m].dims[m] for m in stores}

    def chunk_bytes(m: str, c: np.ndarray) -> np.ndarray:
        n = stores[m].counts[m]
        return (np.minimum((c + 1) * stores[m].chunk_rows, n) - c * stores[m].chunk_rows) * row_bytes[m]

    def touched_bytes(units: np.ndarray, n_units: int, m: str) -> np.ndarray:
        """Per unit, the bytes of the distinct chunks of ``m`` its pairs read."""
        width = int(chunk[m].max()) + 1
        touched = np.unique(units * width + chunk[m])
        out = np.zeros(n_units, dtype=np.int64)
        np.add.at(out, touched // width, chunk_bytes(m, touched % width))
        return out

    if unit_of_pair is not None:
        # renumber 0..n-1 in the order the units first hold a pair
        _, first, inverse = np.unique(np.asarray(unit_of_pair), return_index=True, return_inverse=True)
        unit_of_pair = np.argsort(np.argsort(first))[inverse].astype(np.int64)
        n_units = int(unit_of_pair.max()) + 1 if len(unit_of_pair) else 0
        unit_bytes = touched_bytes(unit_of_pair, n_units, "images") + touched_bytes(unit_of_pair, n_units, "texts")
        return ChunkUnits(unit_of_pair, "shards", unit_bytes, counts)
    unit_mod = "images" if counts["images"] <= counts["texts"] else "texts"
    other = "texts" if unit_mod == "images" else "images"
    # renumber the units 0..n-1 in store order (a split's pairs may skip chunks of other splits)
    unit_chunks, unit_of_pair = np.unique(chunk[unit_mod], return_inverse=True)
    unit_of_pair = unit_of_pair.astype(np.int64)
    unit_bytes = chunk_bytes(unit_mod, unit_chunks).astype(np.int64) + touched_bytes(unit_of_pair, len(unit_chunks),
                                                                                     other)
    return ChunkUnits(unit_of_pair, unit_mod, unit_bytes, counts)


def chunk_local_batches(unit_of_pair: np.ndarray, batch_size: int, seed: int, epoch: int, window: int,
                        rank: int = 0, world_size: int = 1,
                        image_of_pair: np.ndarray | None = None) -> list[np.ndarray]:
    """Pair indices of each batch of one epoch in the chunk-local order (see the module docstring).

    The units are shuffled and split into ceil(n_units / ``window``) windows of (nearly) equal size; each window's
    pairs are shuffled together. With ``image_of_pair`` (the image of each pair), a window's captions of one image
    are dealt into successive rounds, a random one of each image's captions per round: a window only a few batches
    long would otherwise put an image's captions into one batch far more often than the full shuffle does (on the
    demo, with the pairs of 1 of 4 chunks in a window, this cost CUSA 22 points of rsum, and 10 with the rounds).
    A window covering every unit gives ``epoch_batches`` exactly.
    """
    n_units = int(unit_of_pair.max()) + 1 if len(unit_of_pair) else 0
    if window < 1:
        raise ValueError(f"the shuffle window must hold at least one chunk, got {window}")
    if window >= n_units:
        return epoch_batches(len(unit_of_pair), batch_size, seed, epoch, rank, world_size)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 104_729)
    unit_order = torch.randperm(n_units, generator=g).numpy()
    by_unit = np.argsort(unit_of_pair, kind="stable")
    bounds = np.searchsorted(unit_of_pair[by_unit], np.arange(n_units + 1))
    parts = []
    for units in np.array_split(unit_order, -(-n_units // window)):
        members = np.concatenate([by_unit[bounds[u]:bounds[u + 1]] for u in units])
        members = members[torch.randperm(len(members), generator=g).numpy()]
        if image_of_pair is not None:
            members = _in_rounds(members, np.asarray(image_of_pair)[members])
        parts.append(members)
    return cut_into_batches(np.concatenate(parts), batch_size, rank, world_size)


def _in_rounds(members: np.ndarray, images: np.ndarray) -> np.ndarray:
    """``members`` (shuffled) reordered into rounds: round k holds the k-th pair of every image that has one, in the
    shuffled order, so each image comes at most once a round and which of its captions comes when is random."""
    by_image = np.argsort(images, kind="stable")
    sorted_images = images[by_image]
    starts = np.flatnonzero(np.r_[True, sorted_images[1:] != sorted_images[:-1]])
    rank_sorted = np.arange(len(members)) - np.repeat(starts, np.diff(np.r_[starts, len(members)]))
    rank = np.empty_like(rank_sorted)
    rank[by_image] = rank_sorted
    return members[np.argsort(rank, kind="stable")]
