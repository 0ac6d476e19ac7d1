"""What a retrieval evaluation ranks: the images and captions of a split, less the images that cannot be read.

A build with ``--on-bad-image skip`` keeps an all-zero row for each image it could not read and lists the image in
the store. Ranking such a row as if it were an image would put a garbage candidate in every gallery and count its
captions as misses. So validation and ``cusa-eval`` leave these images, and their captions, out of both the query
and the gallery sets, and report how many (``skipped_images``). An image is known to be unreadable when a store
involved lists it as skipped (the run's teacher cache, a frozen student's feature store), matched to the evaluated
rows by path (or by id and file name); an image-level student also finds out while decoding, where
``on_bad_image="fail"`` stops with one line naming the image and ``"skip"`` leaves it out like the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.distributed import autocast
from pipeline.errors import ImageError
from pipeline.manifest import Manifest
from pipeline.shard_read_ahead import DATALOADER_PREFETCH, ShardReadAhead, consecutive_batches
from teacher_cache.errors import StoreError
from teacher_cache.store import Store
from train.data import (ManifestImageRows, RowNames, collate_rows, load_split_rows, open_run_store, shard_layout_of,
                        store_indexes)
from train.evaluate import evaluate_embeddings, evaluate_similarity, retrieval_metrics, similarity_retrieval_metrics
from train.features import run_frozen_features, skip_reason
from train.regions import RegionData, region_data
from train.students import REGION_KINDS, parse_student_spec

BAD_IMAGE_HINT = "--on-bad-image skip leaves such images out of the evaluation"


@dataclass(frozen=True)
class SkippedImage:
    row: int  # image row within the evaluated split
    id: str
    path: str
    reason: str

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "reason": self.reason}


def skipped_by_stores(manifest: Manifest, stores: Iterable[Store]) -> dict[int, str]:
    """Rows of ``manifest`` whose image a store lists as skipped by its build -> the store's reason.

    Matched by the image path as the annotations write it, or by image id and file name (the same image listed by
    another annotation file of the same dataset).
    """
    by_path: dict[str, str] = {}
    by_id: dict[tuple[str, str], str] = {}
    for store in stores:
        for entry in store.skipped_images:
            reason = skip_reason(store, entry)
            path = str(entry.get("path", ""))
            by_path.setdefault(path, reason)
            by_id.setdefault((str(entry.get("id", "")), PurePosixPath(path).name), reason)
    if not by_path:
        return {}
    found = {}
    for row, image in enumerate(manifest.images):
        reason = by_path.get(image.path) or by_id.get((image.image_id, PurePosixPath(image.path).name))
        if reason is not None:
            found[row] = reason
    return found


def run_stores(cfg) -> list[Store]:
    """The image stores of a run with settings ``cfg``, when they travelled with the checkpoint: their lists of
    skipped images, and a frozen student's features when its backbones are their teachers."""
    stores = []
    for path in dict.fromkeys(p for p in (cfg.cache, cfg.image_cache) if p):
        try:
            stores.append(open_run_store(cfg, path, require_complete=False))
        except StoreError:
            pass  # the training cache may not travel with the checkpoint; features are then computed
    return stores


def without_images(manifest: Manifest, rows: Iterable[int]) -> tuple[Manifest, np.ndarray, np.ndarray]:
    """``manifest`` less the images ``rows`` and their captions (rows renumbered), with the kept image rows and
    kept caption rows of the original."""
    keep = np.ones(len(manifest.images), dtype=bool)
    keep[np.asarray(list(rows), dtype=np.int64)] = False
    kept_images = np.flatnonzero(keep).astype(np.int64)
    sub, kept_captions = manifest.subset(kept_images)
    return sub, kept_images, kept_captions


@dataclass
class EvaluationInputs:
    """A split to evaluate on, with what is known about it before any image is decoded."""

    manifest: Manifest
    feats: tuple[torch.Tensor, torch.Tensor] | None  # a frozen student's backbone features of every row
    known_skipped: dict[int, str]  # rows a store lists as unreadable -> reason
    names: RowNames  # how messages name its images
    backbone_passes: int  # 1 when its frozen features (or grid regions) were computed now
    regions: RegionData | None = None  # a region student's region features and caption tokens of every row


def evaluation_inputs(cfg, annotations: str, split: str, stores: list[Store], device: str, progress: bool,
                      on_bad_image: str, vocab=None) -> EvaluationInputs:
    """Load ``split`` of ``annotations`` for evaluation by a student trained with ``cfg``: the images its stores
    list as skipped and, for a frozen student, its backbone features (from a store that holds them, or computed
    once into the feature cache; an image a store already skipped is skipped there too); for a region student, its
    regions and the captions' tokens by its vocabulary ``vocab``."""
    manifest, file_rows = load_split_rows(annotations, split, cfg.format, cfg.image_root, shard_layout_of(cfg),
                                          store_indexes(cfg))
    known = skipped_by_stores(manifest, stores)
    names = RowNames(file_rows, str(annotations))
    for store in stores:
        try:
            names = RowNames(store.rows_of(manifest)[0], f"store {store.location}")
            break
        except Exception:  # a store of other data: name the annotation file's rows
            continue
    feats, passes, regions = None, 0, None
    kind = parse_student_spec(cfg.student).kind
    if kind in REGION_KINDS:
        regions = region_data(cfg, annotations, split, manifest, vocab, progress, "skip" if known else on_bad_image)
        for row, reason in regions.features.skipped.items():
            known.setdefault(row, reason)
        passes = int(regions.features.computed)
    elif kind == "frozen":
        fs = run_frozen_features(cfg, annotations, split, manifest, stores, device, progress,
                                 "skip" if known else on_bad_image)
        for row, reason in fs.skipped.items():
            known.setdefault(row, reason)
        feats = (torch.from_numpy(fs.images).to(device), torch.from_numpy(fs.texts).to(device))
        passes = int(fs.computed)
    return EvaluationInputs(manifest, feats, known, names, passes, regions)


@dataclass
class RetrievalEvaluation:
    metrics: dict  # evaluate_embeddings' {"all": ..., "coco_1k"?: ...}
    images: int  # images ranked
    captions: int  # captions ranked
    skipped: list[SkippedImage]
    kept_images: np.ndarray | None = None  # the rows of the evaluated manifest that were ranked
    kept_captions: np.ndarray | None = None
    caption_image_rows: np.ndarray | None = None  # each ranked caption's image, among the ranked images
    image_emb: torch.Tensor | None = None  # a dual encoder's embeddings of them
    text_emb: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # a region student's scores [images, captions]

    def similarity(self) -> torch.Tensor:
        """The image × caption similarity matrix that was ranked (float32, CPU): a dual encoder's cosines or a region
        student's pair scores."""
        if self.scores is None:
            self.scores = (self.image_emb.float() @ self.text_emb.float().T).cpu()
        return self.scores


@torch.no_grad()
def _embed_images(student, manifest: Manifest, rows: np.ndarray, device: str, batch_size: int, workers: int,
                  on_bad_image: str, names: RowNames | None, uni: bool
                  ) -> tuple[np.ndarray, torch.Tensor | None, dict[int, str]]:
    """Embeddings of the images ``rows`` that could be read, those rows, and the unreadable ones -> message."""
    encode = student.encode_images_uni if uni else student.encode_images
    dataset = ManifestImageRows(manifest, student.preprocess_val, rows, names)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_rows)
    read, parts, bad = [], [], {}
    ahead = ShardReadAhead.for_rows(manifest, consecutive_batches(dataset.rows, batch_size),
                                    in_flight=workers * DATALOADER_PREFETCH, readers=workers)
    with autocast(device), ahead:
        for batch_rows, images, failures in ahead.follow(loader):
            for failure in failures:
                if on_bad_image == "fail":
                    raise ImageError(f"{failure.message} ({BAD_IMAGE_HINT})")
                bad[failure.row] = failure.message
            if batch_rows:
                read.extend(batch_rows)
                parts.append(encode(images.to(device)).float())
    return np.asarray(read, dtype=np.int64), (torch.cat(parts) if parts else None), bad


@torch.no_grad()
def evaluate_retrieval(student, manifest: Manifest, device: str, batch_size: int, workers: int, *,
                       feats: tuple[torch.Tensor, torch.Tensor] | None = None,
                       known_skipped: dict[int, str] | None = None, on_bad_image: str = "fail",
                       names: RowNames | None = None, uni: bool = False, coco_1k: bool = True,
                       regions: RegionData | None = None, progress: bool = False) -> RetrievalEvaluation:
    """Recalls of ``student`` on ``manifest`` with unreadable images and their captions left out of the ranking.

    ``feats``: a frozen student's backbone features of every image and caption of ``manifest`` (an all-zero image
    row is an image its feature store could not read); ``known_skipped``: rows already known to be unreadable;
    ``coco_1k``: also the COCO 1K 5-fold table when the split has 5000 images; ``regions``: a region student's
    inputs, whose every image is scored against every caption (the same rankings, from the score matrix).
    """
    student.eval()
    skip = dict(known_skipped or {})
    if regions is not None:
        if uni:
            raise ValueError("a region student ranks by pair scores; it has no uni-modal caption-to-image ranking")
        sub, kept_images, kept_captions = without_images(manifest, skip)
        if not len(kept_images):
            raise ValueError(f"{manifest.source}: no readable image left to evaluate ({len(skip)} skipped)")
        with autocast(device):
            scores = student.similarity(regions.features, regions.captions, device, regions.image_chunk,
                                        regions.caption_chunk, progress, kept_images, kept_captions)
        rows = sub.caption_image_rows()
        metrics = (evaluate_similarity(scores, rows) if coco_1k
                   else {"all": similarity_retrieval_metrics(scores, rows)})
        return RetrievalEvaluation(metrics, len(sub.images), len(sub.captions), _skipped(manifest, skip),
                                   kept_images, kept_captions, rows, scores=scores)
    if feats is not None:
        img_f, txt_f = feats
        zero = torch.nonzero(img_f.float().norm(dim=1) == 0).flatten().tolist()
        for row in zero:
            skip.setdefault(int(row), "no backbone features (an all-zero row: the image was not read)")
    candidates = np.array([r for r in range(len(manifest.images)) if r not in skip], dtype=np.int64)
    if feats is None:
        read, image_emb, bad = _embed_images(student, manifest, candidates, device, batch_size, workers,
                                             on_bad_image, names, uni)
        skip.update(bad)
    sub, kept_images, kept_captions = without_images(manifest, skip)
    if not len(kept_images):
        raise ValueError(f"{manifest.source}: no readable image left to evaluate ({len(skip)} skipped)")
    encode_img = student.encode_images_uni if uni else student.encode_images
    encode_txt = student.encode_texts_uni if uni else student.encode_texts
    with autocast(device):
        if feats is not None:
            image_index = torch.as_tensor(kept_images, device=img_f.device)
            image_emb = torch.cat([encode_img(img_f[image_index[i:i + batch_size]]).float()
                                   for i in range(0, len(image_index), batch_size)])
            cap_rows = torch.as_tensor(kept_captions, device=txt_f.device)
            text_emb = torch.cat([encode_txt(txt_f[cap_rows[i:i + batch_size]]).float()
                                  for i in range(0, len(cap_rows), batch_size)])
        else:
            assert np.array_equal(read, kept_images)  # the loader keeps row order
            texts = [c.text for c in sub.captions]
            text_emb = torch.cat([encode_txt(student.tokenize(texts[i:i + batch_size]).to(device)).float()
                                  for i in range(0, len(texts), batch_size)])
    rows = sub.caption_image_rows()
    metrics = (evaluate_embeddings(image_emb, text_emb, rows) if coco_1k
               else {"all": retrieval_metrics(image_emb, text_emb, rows)})
    return RetrievalEvaluation(metrics, len(sub.images), len(sub.captions), _skipped(manifest, skip), kept_images,
                               kept_captions, rows, image_emb, text_emb)


def _skipped(manifest: Manifest, skip: dict[int, str]) -> list[SkippedImage]:
    return [SkippedImage(r, manifest.images[r].image_id, manifest.images[r].path, skip[r]) for r in sorted(skip)]
