"""Batch samplers. The teacher-neighbor sampler fills batches with clusters of pairs whose captions are
teacher neighbors, so in-batch soft labels see near neighbors (informative targets) instead of mostly
unrelated pairs, which is what random batches of a large dataset give. It reads the cached neighbor table:
no teacher runs.
"""

from __future__ import annotations

import numpy as np
import torch

from train.data import TrainingPairs, cut_into_batches


def pair_neighbor_table(pairs: TrainingPairs, text_store) -> np.ndarray:
    """[n_pairs, K] pair indices of each pair's caption neighbors (by the text teacher), -1 where none.

    Neighbors outside the training pairs (other splits, dropped pairs) are -1.
    """
    ids, _ = text_store.neighbors("texts")
    store_rows = pairs.store_caption_rows[str(text_store.path)][pairs.caption_rows]  # store caption row per pair
    pair_of_store_row = np.full(text_store.counts["texts"], -1, dtype=np.int64)
    pair_of_store_row[store_rows] = np.arange(len(store_rows))
    nbr = ids[store_rows]  # [n_pairs, K] store rows
    return np.where(nbr >= 0, pair_of_store_row[np.clip(nbr, 0, None)], -1)


def neighbor_batches(neighbors: np.ndarray, batch_size: int, seed: int, epoch: int, group: int = 8,
                     rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Pair indices of each batch of one epoch, built from teacher-neighbor groups.

    Visiting pairs in a seeded random order, each not-yet-used pair starts a group together with up to
    ``group - 1`` of its unused nearest neighbors; groups are concatenated and cut into global batches of
    ``batch_size × world_size`` (each rank takes its contiguous slice). Every pair is used exactly once per
    epoch, as with random batches, and the order depends only on (seed, epoch) so resumed runs match.
    """
    n = neighbors.shape[0]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919)
    order = torch.randperm(n, generator=g).numpy()
    used = np.zeros(n, dtype=bool)
    sequence: list[int] = []
    for p in order:
        if used[p]:
            continue
        used[p] = True
        sequence.append(int(p))
        taken = 1
        for q in neighbors[p]:
            if taken >= group:
                break
            if q >= 0 and not used[q]:
                used[q] = True
                sequence.append(int(q))
                taken += 1
    return cut_into_batches(np.asarray(sequence, dtype=np.int64), batch_size, rank, world_size)
