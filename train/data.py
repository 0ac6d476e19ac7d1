"""Training and evaluation data: manifests joined to store rows, epoch batches, and student inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.images import open_image
from pipeline.manifest import Manifest, read_manifest
from pipeline.shards import DEFAULT_CAPTION_KEY, ShardLayout
from teacher_cache.errors import StoreMismatch
from teacher_cache.store import Store


def load_split(path: str, split: str, fmt: str = "auto", image_root: str | None = None,
               shard_layout: ShardLayout | None = None) -> Manifest:
    """The rows of one split of an annotation file or shard source (a source without split labels is one split)."""
    return read_manifest(path, format=fmt, image_root=image_root, shard_layout=shard_layout).select_split(split)


def shard_layout_of(cfg) -> ShardLayout:
    """The webdataset sample layout a training config names (its image_key, caption_key and id_field)."""
    return ShardLayout(cfg.image_key, cfg.caption_key or DEFAULT_CAPTION_KEY, cfg.id_field)


def load_config_split(cfg, path: str, split: str) -> Manifest:
    """One split of ``path`` read the way a training config says (format, image root, shard layout)."""
    return load_split(path, split, cfg.format, cfg.image_root, shard_layout_of(cfg))


@dataclass
class TrainingPairs:
    """Every (image, caption) pair of the training manifest, joined to the rows of the teacher stores."""

    manifest: Manifest
    caption_rows: np.ndarray  # manifest caption index of each pair
    image_rows: np.ndarray  # manifest image index of each pair
    store_image_rows: dict[str, np.ndarray]  # per store path: store image row of each manifest image
    store_caption_rows: dict[str, np.ndarray]
    dropped: list[dict]  # pairs left out because their image was skipped at build time

    def __len__(self) -> int:
        return len(self.caption_rows)


def join_pairs(manifest: Manifest, stores: list[Store]) -> TrainingPairs:
    """Map the manifest onto each store's rows; refuse stores that were built from other data."""
    fp = manifest.fingerprint()
    img_map: dict[str, np.ndarray] = {}
    cap_map: dict[str, np.ndarray] = {}
    skipped: set[int] = set()
    for store in stores:
        image_rows, caption_rows = store.rows_for(fp, f"training data {manifest.source}")
        if len(image_rows) != len(manifest.images) or len(caption_rows) != len(manifest.captions):
            raise StoreMismatch(f"{store.path}: row counts differ from {manifest.source}", field="counts")
        img_map[str(store.path)] = image_rows
        cap_map[str(store.path)] = caption_rows
        bad = {int(s["row"]) for s in store.skipped_images}
        skipped |= {i for i, r in enumerate(image_rows) if int(r) in bad}
    all_image_rows = manifest.caption_image_rows()
    keep = ~np.isin(all_image_rows, list(skipped)) if skipped else np.ones(len(all_image_rows), dtype=bool)
    dropped = [{"caption_row": int(j), "image_row": int(all_image_rows[j])} for j in np.flatnonzero(~keep)]
    captions = np.flatnonzero(keep)
    return TrainingPairs(manifest, captions, all_image_rows[captions], img_map, cap_map, dropped)


def epoch_batches(n_pairs: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> list[np.ndarray]:
    """Pair indices of each batch of one epoch: a seeded permutation, identical on every rank, cut into
    global batches of ``batch_size × world_size`` of which each rank takes its own contiguous slice.

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches it would have seen.
    A final batch smaller than 2 pairs per rank is dropped (no in-batch negatives).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return cut_into_batches(torch.randperm(n_pairs, generator=g).numpy(), batch_size, rank, world_size)


def cut_into_batches(sequence: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """Consecutive global batches of ``batch_size × world_size`` from ``sequence``; this rank's contiguous slice
    of each. A final batch with fewer than 2 pairs per rank is dropped (no in-batch negatives)."""
    step = batch_size * world_size
    batches = []
    for lo in range(0, len(sequence), step):
        chunk = sequence[lo:lo + step]
        per_rank = len(chunk) // world_size
        if per_rank < 2:
            break
        batches.append(chunk[rank * per_rank:(rank + 1) * per_rank])
    return batches


class PairImages(Dataset):
    """(preprocessed image, caption text) for training pairs of an image-level student."""

    def __init__(self, manifest: Manifest, pairs_image_rows: np.ndarray, pairs_caption_rows: np.ndarray,
                 preprocess: Callable):
        self.manifest = manifest
        self.image_rows = pairs_image_rows
        self.caption_rows = pairs_caption_rows
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.caption_rows)

    def __getitem__(self, i: int):
        img = open_image(self.manifest, int(self.image_rows[i]))
        return self.preprocess(img), self.manifest.captions[int(self.caption_rows[i])].text


class ManifestImages(Dataset):
    """Preprocessed images of a manifest (evaluation): every image in row order, or the given ``rows``."""

    def __init__(self, manifest: Manifest, preprocess: Callable, rows=None):
        self.manifest = manifest
        self.preprocess = preprocess
        self.rows = None if rows is None else [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.manifest.images) if self.rows is None else len(self.rows)

    def __getitem__(self, i: int):
        return self.preprocess(open_image(self.manifest, i if self.rows is None else self.rows[i]))


def pair_loader(pairs: TrainingPairs, batches: list[np.ndarray], preprocess: Callable, tokenizer: Callable,
                workers: int) -> DataLoader:
    """DataLoader yielding (images, tokens) for the given batches of pair indices, decoded in workers."""
    dataset = PairImages(pairs.manifest, pairs.image_rows, pairs.caption_rows, preprocess)

    def collate(items):
        images = torch.stack([im for im, _ in items])
        return images, tokenizer([t for _, t in items])

    return DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], num_workers=workers,
                      collate_fn=collate, persistent_workers=False)
