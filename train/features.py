"""Backbone features for frozen-backbone students, computed once and cached as stores.

A frozen student's backbones are named with the encoder registry's spec strings, so their features are
computed by the same stage-1 job that fills teacher caches (resumable, chunked, verified) and reused by
every later run and ablation. When the backbones are the teachers of the run's cache, the teacher cache
itself is reused and nothing is computed at all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.manifest import Manifest
from pipeline.shards import ShardLayout
from teacher_cache.errors import StoreError
from teacher_cache.remote import default_cache_dir, is_url, location_slug
from teacher_cache.store import Store
from train.students import parse_student_spec


@dataclass
class FeatureSet:
    images: np.ndarray  # [N_img, D_i] float32 (unit-norm backbone features)
    texts: np.ndarray  # [N_txt, D_t]
    store: str  # the store they came from
    computed: bool  # True when this call ran the backbones
    skipped: dict[int, str] = field(default_factory=dict)  # dataset image rows the store's build could not read


def default_feature_cache(cache: str) -> str:
    """Where a frozen student's backbone features are cached by default: ``CACHE-features`` next to the teacher
    cache, one store per dataset (split) and pair of backbones; for a cache at a URL, a local folder named after it
    in cusa's cache folder (``$CUSA_CACHE_DIR/features``, else ``~/.cache/cusa/features``)."""
    if is_url(cache):
        return str(default_cache_dir("features") / location_slug(cache))
    p = Path(cache)
    return str(p.with_name(p.name + "-features"))


def feature_store_path(feature_cache: str | Path, fingerprint: str, image_spec: str, text_spec: str) -> Path:
    tag = hashlib.sha1(f"{image_spec}+{text_spec}".encode()).hexdigest()[:10]
    return Path(feature_cache) / f"{fingerprint[:16]}-{tag}"


def _specs_match(store: Store, image_spec: str, text_spec: str) -> bool:
    t = store.teachers
    return t.get("image", {}).get("spec") == image_spec and t.get("text", {}).get("spec") == text_spec


def skip_reason(store: Store, entry: dict) -> str:
    """Why a store's build skipped an image (an entry of its skipped_images), without repeating the file name."""
    reason = str(entry.get("reason", "unreadable"))
    _, found, tail = reason.partition(f"(image row {entry.get('row')}): ")
    return f"skipped by the build of {store.path} (store row {entry.get('row')}): {tail if found else reason}"


def store_skipped_rows(store: Store, image_rows: np.ndarray) -> dict[int, str]:
    """Dataset rows whose store row (``image_rows[dataset row]``) the store's build skipped -> reason."""
    bad = {int(s["row"]): skip_reason(store, s) for s in store.skipped_images}
    return {i: bad[int(r)] for i, r in enumerate(image_rows) if int(r) in bad}


def _from_store(store: Store, manifest: Manifest, computed: bool) -> FeatureSet:
    image_rows, caption_rows = store.rows_of(manifest, "dataset")
    return FeatureSet(store.load("images")[image_rows], store.load("texts")[caption_rows], str(store.path), computed,
                      store_skipped_rows(store, image_rows))


def frozen_features(annotations: str, split: str, manifest: Manifest, image_spec: str, text_spec: str,
                    feature_cache: str | Path, *, fmt: str = "auto", image_root: str | None = None,
                    reuse: list[Store] | None = None, device: str = "auto", progress: bool = True,
                    workers: int = 2, shard_layout: ShardLayout | None = None, on_bad_image: str = "fail"
                    ) -> FeatureSet:
    """Features of every image and caption of a dataset (``annotations`` at ``split``) by the two backbones.

    Order: a store in ``reuse`` whose encoders are the backbones and which holds the dataset (no compute);
    an earlier feature store for the same dataset and backbones; otherwise the backbones run once now, leaving
    unreadable images out as all-zero rows (listed in ``skipped``) when ``on_bad_image`` is "skip".
    """
    for store in reuse or []:
        if store.complete and _specs_match(store, image_spec, text_spec):
            try:
                return _from_store(store, manifest, computed=False)
            except Exception:
                continue
    store, computed = feature_store(annotations, split, manifest, image_spec, text_spec, feature_cache, fmt=fmt,
                                    image_root=image_root, device=device, progress=progress, workers=workers,
                                    shard_layout=shard_layout, on_bad_image=on_bad_image)
    return _from_store(store, manifest, computed=computed)


def feature_store(annotations: str, split: str, manifest: Manifest, image_spec: str, text_spec: str,
                  feature_cache: str | Path, *, fmt: str = "auto", image_root: str | None = None,
                  device: str = "auto", progress: bool = True, workers: int = 2,
                  shard_layout: ShardLayout | None = None, on_bad_image: str = "fail",
                  chunk_rows: int = 4096) -> tuple[Store, bool]:
    """The complete store of the two encoders' features of a dataset in ``feature_cache``, built now unless an
    earlier run built it; returns (store, whether this call computed it)."""
    path = feature_store_path(feature_cache, manifest.fingerprint(), image_spec, text_spec)
    for candidate in (path, *_earlier_format_paths(feature_cache, manifest, image_spec, text_spec, path)):
        if (candidate / "zarr.json").is_file():
            try:
                store = Store.open(candidate)
            except StoreError:
                store = None  # another rank is creating it right now: join its build below
            if store is not None and store.complete and _specs_match(store, image_spec, text_spec):
                return store, False
    # deferred import: only this path runs backbones (the registry's encoders)
    from pipeline.build import BuildConfig, build_store

    layout = shard_layout or ShardLayout()
    # building a backbone draws from torch's global RNG (initial weights, DataLoader seeds): fork it, so that a run
    # whose features had to be computed trains alike to one that found them cached
    with torch.random.fork_rng(devices=[]):
        build_store(BuildConfig(annotations=annotations, out=str(path), format=fmt, image_root=image_root,
                                split=split, text_teacher=text_spec, image_teacher=image_spec, neighbors=0,
                                device=device, progress=progress, workers=workers, chunk_rows=chunk_rows,
                                image_key=layout.image_key, caption_key=layout.caption_key, id_field=layout.id_field,
                                on_bad_image=on_bad_image))
    if dist.is_available() and dist.is_initialized():
        # under torchrun every rank embeds a share, but only rank 0 finishes the store: wait for its mark
        dist.barrier()
    return Store.open(path, require_complete=True), True


def _earlier_format_paths(feature_cache: str | Path, manifest: Manifest, image_spec: str, text_spec: str,
                          path: Path) -> list[Path]:
    """Where a feature store built before fingerprint format 2 would be (looked for only when the cache holds stores
    of these encoders other than ``path``: the format-1 fingerprint is a pass over every row)."""
    tag = path.name.rsplit("-", 1)[1]
    if not any(p != path for p in Path(feature_cache).glob(f"*-{tag}")):
        return []
    return [feature_store_path(feature_cache, manifest.fingerprint(1), image_spec, text_spec)]


def run_frozen_features(cfg, annotations: str, split: str, manifest: Manifest, stores: list[Store], device: str,
                        progress: bool, on_bad_image: str = "fail") -> FeatureSet:
    """The features of a dataset for the frozen student of a run's TrainConfig ``cfg``, in its feature cache."""
    from train.data import shard_layout_of

    spec = parse_student_spec(cfg.student)
    # computing features draws from torch's global RNG (a DataLoader seeds its workers from it): isolated, so a run
    # trains alike (dropout) whether its features were cached already or are computed now
    with torch.random.fork_rng(devices=[]):
        return frozen_features(annotations, split, manifest, spec.image_spec, spec.text_spec,
                               cfg.frozen.feature_cache or default_feature_cache(cfg.cache), fmt=cfg.format,
                               image_root=cfg.image_root, reuse=stores, device=device, progress=progress,
                               workers=cfg.workers, shard_layout=shard_layout_of(cfg), on_bad_image=on_bad_image)
