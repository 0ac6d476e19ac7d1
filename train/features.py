"""Backbone features for frozen-backbone students, computed once and cached as stores.

A frozen student's backbones are named with the encoder registry's spec strings, so their features are
computed by the same stage-1 job that fills teacher caches (resumable, chunked, verified) and reused by
every later run and ablation. When the backbones are the teachers of the run's cache, the teacher cache
itself is reused and nothing is computed at all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from teacher_cache.errors import StoreError
from teacher_cache.store import Store


@dataclass
class FeatureSet:
    images: np.ndarray  # [N_img, D_i] float32 (unit-norm backbone features)
    texts: np.ndarray  # [N_txt, D_t]
    store: str  # the store they came from
    computed: bool  # True when this call ran the backbones


def feature_store_path(feature_cache: str | Path, fingerprint: str, image_spec: str, text_spec: str) -> Path:
    tag = hashlib.sha1(f"{image_spec}+{text_spec}".encode()).hexdigest()[:10]
    return Path(feature_cache) / f"{fingerprint[:16]}-{tag}"


def _specs_match(store: Store, image_spec: str, text_spec: str) -> bool:
    t = store.teachers
    return t.get("image", {}).get("spec") == image_spec and t.get("text", {}).get("spec") == text_spec


def _from_store(store: Store, fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
    image_rows, caption_rows = store.rows_for(fingerprint, "dataset")
    return store.load("images")[image_rows], store.load("texts")[caption_rows]


def frozen_features(annotations: str, split: str, fingerprint: str, image_spec: str, text_spec: str,
                    feature_cache: str | Path, *, fmt: str = "auto", image_root: str | None = None,
                    reuse: list[Store] | None = None, device: str = "auto", progress: bool = True,
                    workers: int = 2) -> FeatureSet:
    """Features of every image and caption of a dataset (``annotations`` at ``split``) by the two backbones.

    Order: a store in ``reuse`` whose encoders are the backbones and which holds the dataset (no compute);
    an earlier feature store for the same dataset and backbones; otherwise the backbones run once now.
    """
    for store in reuse or []:
        if store.complete and _specs_match(store, image_spec, text_spec):
            try:
                images, texts = _from_store(store, fingerprint)
            except Exception:
                continue
            return FeatureSet(images, texts, str(store.path), computed=False)
    store, computed = feature_store(annotations, split, fingerprint, image_spec, text_spec, feature_cache, fmt=fmt,
                                    image_root=image_root, device=device, progress=progress, workers=workers)
    images, texts = _from_store(store, fingerprint)
    return FeatureSet(images, texts, str(store.path), computed=computed)


def feature_store(annotations: str, split: str, fingerprint: str, image_spec: str, text_spec: str,
                  feature_cache: str | Path, *, fmt: str = "auto", image_root: str | None = None,
                  device: str = "auto", progress: bool = True, workers: int = 2,
                  chunk_rows: int = 4096) -> tuple[Store, bool]:
    """The complete store of the two encoders' features of a dataset in ``feature_cache``, built now unless an
    earlier run built it; returns (store, whether this call computed it)."""
    path = feature_store_path(feature_cache, fingerprint, image_spec, text_spec)
    if (path / "zarr.json").is_file():
        try:
            store = Store.open(path)
        except StoreError:
            store = None  # another rank is creating it right now: join its build below
        if store is not None and store.complete and _specs_match(store, image_spec, text_spec):
            return store, False
    # deferred import: only this path runs backbones (the registry's encoders)
    from pipeline.build import BuildConfig, build_store

    # building a backbone draws its initial weights from the global RNG before loading the real ones: fork it, so
    # that a run whose features had to be computed starts from the same student as one that found them cached
    with torch.random.fork_rng(devices=[]):
        build_store(BuildConfig(annotations=annotations, out=str(path), format=fmt, image_root=image_root,
                                split=split, text_teacher=text_spec, image_teacher=image_spec, neighbors=0,
                                device=device, progress=progress, workers=workers, chunk_rows=chunk_rows))
    if dist.is_available() and dist.is_initialized():
        # under torchrun every rank embeds a share, but only rank 0 finishes the store: wait for its mark
        dist.barrier()
    return Store.open(path, require_complete=True), True
