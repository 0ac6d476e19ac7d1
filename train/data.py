"""Training and evaluation data: manifests joined to store rows, epoch batches, and student inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.errors import ImageError
from pipeline.images import open_image
from pipeline.manifest import Manifest, read_manifest
from pipeline.manifest_index import STORE_INDEX_DIR
from pipeline.shard_read_ahead import DATALOADER_PREFETCH, ShardReadAhead
from pipeline.shards import DEFAULT_CAPTION_KEY, ShardLayout
from teacher_cache.errors import StoreMismatch
from teacher_cache.remote import is_url
from teacher_cache.remote_store import StoreCacheSettings, open_store
from teacher_cache.store import Store


def load_split(path: str, split: str, fmt: str = "auto", image_root: str | None = None,
               shard_layout: ShardLayout | None = None, indexes: Sequence[Path] = (), workers: int = 0,
               progress: bool = False) -> Manifest:
    """The rows of one split of an annotation file or shard source (a source without split labels is one split);
    ``indexes``: manifest index copies to try first (those kept in the stores at hand)."""
    return read_manifest(path, format=fmt, image_root=image_root, shard_layout=shard_layout, indexes=indexes,
                         workers=workers, progress=progress).select_split(split)


def shard_layout_of(cfg) -> ShardLayout:
    """The webdataset sample layout a training config names (its image_key, caption_key and id_field)."""
    return ShardLayout(cfg.image_key, cfg.caption_key or DEFAULT_CAPTION_KEY, cfg.id_field)


def store_indexes(cfg) -> list[Path]:
    """The manifest index copies kept in a training config's stores (``STORE/manifest``, see
    pipeline.manifest_index)."""
    return [Path(p) / STORE_INDEX_DIR for p in (cfg.cache, cfg.image_cache, cfg.text_cache) if p and not is_url(p)]


def load_config_split(cfg, path: str, split: str, progress: bool = False) -> Manifest:
    """One split of ``path`` read the way a training config says (format, image root, shard layout), opened from the
    manifest index of its stores when they hold the same data."""
    return load_split(path, split, cfg.format, cfg.image_root, shard_layout_of(cfg), store_indexes(cfg), cfg.workers,
                      progress)


def load_split_rows(path: str, split: str, fmt: str = "auto", image_root: str | None = None,
                    shard_layout: ShardLayout | None = None, indexes: Sequence[Path] = ()
                    ) -> tuple[Manifest, np.ndarray]:
    """One split of an annotation file or shard source and, for each of its images, the image's row in the whole
    source."""
    manifest = read_manifest(path, format=fmt, image_root=image_root, shard_layout=shard_layout, indexes=indexes)
    return manifest.select_split(split), manifest.image_rows_of_split(split)


@dataclass(frozen=True)
class RowNames:
    """How a message names an image of a split: by its row in a store or in the annotation file (not its row within
    the split, which the user cannot look up)."""

    rows: np.ndarray  # split image row -> row in ``where``
    where: str  # "store caches/coco" or "data/coco/dataset_coco.json"

    def __call__(self, row: int) -> str:
        kind = "store row" if self.where.startswith("store ") else "image row"
        return f"{kind} {int(self.rows[row])} of {self.where.removeprefix('store ')}"


class BadImage(NamedTuple):
    """An image that could not be read, returned by a dataset in place of raising: an exception raised inside a
    DataLoader worker reaches the main process as "Caught ImageError in DataLoader worker process 0" with its cause
    buried in a traceback, so the failure travels as data and the main process raises (or skips) it."""

    row: int
    message: str


def read_image(manifest: Manifest, row: int, preprocess: Callable, names: RowNames | None = None):
    """Image ``row`` of ``manifest`` preprocessed, or a BadImage naming the file (or shard member), its store or
    annotation row (without ``names``: its row in ``manifest``) and the reason."""
    try:
        return preprocess(open_image(manifest, row))
    except ImageError as exc:
        message = str(exc)
        if names is not None:
            message = message.replace(f"(image row {row})", f"({names(row)})", 1)
        return BadImage(int(row), message)


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


def open_run_store(cfg, location: str, require_complete: bool = True) -> Store:
    """A store a run's config names (``cache``, ``image_cache``, ``text_cache``): a folder, or a URL read through the
    run's local store cache (``store_cache``, ``store_cache_gib``)."""
    return open_store(location, require_complete=require_complete,
                      local_cache=StoreCacheSettings(cfg.store_cache, cfg.store_cache_gib))


def join_pairs(manifest: Manifest, stores: list[Store]) -> TrainingPairs:
    """Map the manifest onto each store's rows; refuse stores that were built from other data."""
    img_map: dict[str, np.ndarray] = {}
    cap_map: dict[str, np.ndarray] = {}
    skipped: set[int] = set()
    for store in stores:
        image_rows, caption_rows = store.rows_of(manifest, f"training data {manifest.source}")
        if len(image_rows) != len(manifest.images) or len(caption_rows) != len(manifest.captions):
            raise StoreMismatch(f"{store.location}: row counts differ from {manifest.source}", field="counts")
        img_map[str(store.path)] = image_rows
        cap_map[str(store.path)] = caption_rows
        bad = [int(s["row"]) for s in store.skipped_images]
        if bad:
            skipped |= set(np.flatnonzero(np.isin(image_rows, bad)).tolist())
    all_image_rows = manifest.caption_image_rows()
    keep = ~np.isin(all_image_rows, list(skipped)) if skipped else np.ones(len(all_image_rows), dtype=bool)
    dropped = [{"caption_row": int(j), "image_row": int(all_image_rows[j])} for j in np.flatnonzero(~keep)]
    captions = np.flatnonzero(keep)
    return TrainingPairs(manifest, captions, all_image_rows[captions], img_map, cap_map, dropped)


def drop_images(pairs: TrainingPairs, image_rows) -> TrainingPairs:
    """``pairs`` less the pairs of the given manifest image rows (images another store could not read)."""
    bad = np.isin(pairs.image_rows, np.asarray(list(image_rows), dtype=np.int64))
    if not bad.any():
        return pairs
    dropped = pairs.dropped + [{"caption_row": int(c), "image_row": int(i)}
                               for c, i in zip(pairs.caption_rows[bad], pairs.image_rows[bad])]
    return TrainingPairs(pairs.manifest, pairs.caption_rows[~bad], pairs.image_rows[~bad], pairs.store_image_rows,
                         pairs.store_caption_rows, dropped)


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
    """(preprocessed image or BadImage, caption text) for training pairs of an image-level student.

    With ``sample_seed`` set, the random augmentation of pair i draws from a generator seeded by (sample_seed, i):
    an epoch's augmentations then depend neither on the DataLoader's worker count nor on where the epoch started,
    which a resume from a mid-epoch checkpoint needs to see the batches an uninterrupted run saw.
    """

    def __init__(self, manifest: Manifest, pairs_image_rows: np.ndarray, pairs_caption_rows: np.ndarray,
                 preprocess: Callable, names: RowNames | None = None, sample_seed: int | None = None):
        self.manifest = manifest
        self.image_rows = pairs_image_rows
        self.caption_rows = pairs_caption_rows
        self.preprocess = preprocess
        self.names = names
        self.sample_seed = sample_seed

    def __len__(self) -> int:
        return len(self.caption_rows)

    def __getitem__(self, i: int):
        row = int(self.image_rows[i])
        text = self.manifest.captions.text(int(self.caption_rows[i]))
        if self.sample_seed is None:
            return read_image(self.manifest, row, self.preprocess, self.names), text
        with torch.random.fork_rng(devices=[]):  # the process's own random state is left as it was
            torch.manual_seed((self.sample_seed * 1_000_033 + i) % 2**63)
            return read_image(self.manifest, row, self.preprocess, self.names), text


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


class ManifestImageRows(Dataset):
    """(row, preprocessed image or BadImage) of the given image rows of a manifest (evaluation: an unreadable image
    reaches the main process as data, batched by ``collate_rows``)."""

    def __init__(self, manifest: Manifest, preprocess: Callable, rows: np.ndarray | None = None,
                 names: RowNames | None = None):
        self.manifest = manifest
        self.preprocess = preprocess
        self.rows = np.arange(len(manifest.images)) if rows is None else np.asarray(rows)
        self.names = names

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        return row, read_image(self.manifest, row, self.preprocess, self.names)


def collate_rows(items) -> tuple[list[int], torch.Tensor | None, list[BadImage]]:
    """ManifestImageRows items -> (rows read, their images stacked, the images that could not be read)."""
    rows = [r for r, im in items if not isinstance(im, BadImage)]
    bad = [im for _, im in items if isinstance(im, BadImage)]
    images = torch.stack([im for _, im in items if not isinstance(im, BadImage)]) if rows else None
    return rows, images, bad


def pair_loader(pairs: TrainingPairs, batches: list[np.ndarray], preprocess: Callable, tokenizer: Callable,
                workers: int, names: RowNames | None = None, sample_seed: int | None = None):
    """(images, tokens) for the given batches of pair indices, decoded in DataLoader workers. An image that cannot
    be read stops training with one line naming it (the store read it when it was built, so the file changed).

    ``sample_seed`` (e.g. one per run and epoch) fixes every pair's augmentation (see ``PairImages``), and the
    loader then takes its own seed from it rather than from the process's random state."""
    dataset = PairImages(pairs.manifest, pairs.image_rows, pairs.caption_rows, preprocess, names, sample_seed)

    def collate(items):
        bad = [im for im, _ in items if isinstance(im, BadImage)]
        if bad:
            return bad[0]
        images = torch.stack([im for im, _ in items])
        return images, tokenizer([t for _, t in items])

    generator = torch.Generator().manual_seed(sample_seed % 2**63) if sample_seed is not None else None
    loader = DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], num_workers=workers,
                        collate_fn=collate, persistent_workers=False, generator=generator)
    # the shards of this rank's batches (at URLs, pipe:, compressed) come into the shard cache ahead of its workers:
    # under the chunk-local order, a window's shards, then the next window's
    with ShardReadAhead.for_rows(pairs.manifest, [pairs.image_rows[b] for b in batches],
                                 in_flight=workers * DATALOADER_PREFETCH, readers=workers) as ahead:
        for batch in ahead.follow(loader):
            if isinstance(batch, BadImage):
                raise ImageError(f"{batch.message}; the cache read this image when it was built, so the file has "
                                 "changed since: restore it, or rebuild the cache with --on-bad-image skip --overwrite")
            yield batch

