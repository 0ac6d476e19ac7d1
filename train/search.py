"""Search a collection with a trained student: its embeddings computed once, cached next to the run, in FAISS.

A collection is an annotation file (anything ``read_manifest`` reads: images and their captions) or a folder of
images (searched recursively; it has no captions). Its retrieval (cross-modal) embeddings are cached in
``RUN/search-cache/<checkpoint>-<collection fingerprint>/`` with one FAISS inner-product index per modality. The
cache entry records the collection's fingerprint and the model's identity (a hash of its spec and weights), so a
changed collection or a retrained run is embedded again, never served stale rows.

Ranks follow ``cusa-eval``'s rule: a result's rank is 1 + the number of results strictly more similar, so tied
results share a rank, and the ground truth of a caption "hits at 1" exactly when ``cusa-eval`` counts a t2i R@1 hit.
Tied results are listed by collection row.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.manifest import Manifest
from pipeline.shards import ShardLayout, is_shard_source
from teacher_cache.remote import redact_text
from train.data import load_split
from train.evaluation_set import run_stores, skipped_by_stores
from train.model import TrainedModel

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SEARCH_CACHE_DIR = "search-cache"
_CACHE_FORMAT = 1
_FOLDER_FINGERPRINT_VERSION = "cusa-image-folder-v1"
_ANNOTATION_FINGERPRINT_VERSION = "cusa-search-annotations-v1"


# ---------------------------------------------------------------------------------------------- collections
@dataclass
class Collection:
    """Images (and, from an annotation file, captions) in a fixed row order, with a fingerprint of what they are."""

    source: str
    kind: str  # "annotations" | "image-folder"
    image_paths: list[Path]
    image_ids: list[str]
    captions: list[str] = field(default_factory=list)
    caption_image_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    fingerprint: str = ""
    manifest: Manifest | None = None  # annotation collections: images are read through the manifest
    # images left out, each {image_id, path, reason}: a folder's files that could not be decoded, the images of an
    # annotation collection that the run's stores list as skipped by their build
    skipped: list[dict] = field(default_factory=list)
    manifest_rows: np.ndarray | None = None  # the manifest rows of the images (None: every row, in order)

    def describe(self) -> dict[str, Any]:
        return {"source": redact_text(self.source), "kind": self.kind, "images": len(self.image_ids),
                "captions": len(self.captions), "fingerprint": self.fingerprint, "skipped": self.skipped}

    def without_unreadable(self, skipped: list[dict]) -> "Collection":
        """The collection less the images ``skipped`` lists (by image id) and their captions, which ``skipped`` of
        the result lists too (the fingerprint stays: it says which collection was asked for)."""
        listed = {s["image_id"] for s in self.skipped}
        skipped = self.skipped + [s for s in skipped if s["image_id"] not in listed]
        gone = {s["image_id"] for s in skipped}
        keep = np.array([i for i, image_id in enumerate(self.image_ids) if image_id not in gone], dtype=np.int64)
        new_row = np.full(len(self.image_ids), -1, dtype=np.int64)
        new_row[keep] = np.arange(len(keep))
        kept_captions = np.flatnonzero(new_row[self.caption_image_rows] >= 0)
        rows = None
        if self.manifest is not None:
            rows = keep if self.manifest_rows is None else self.manifest_rows[keep]
        return Collection(self.source, self.kind, [self.image_paths[i] for i in keep],
                          [self.image_ids[i] for i in keep], [self.captions[j] for j in kept_captions],
                          new_row[self.caption_image_rows[kept_captions]], self.fingerprint, self.manifest,
                          skipped, rows)

    def without_images_skipped_by(self, stores: list) -> "Collection":
        """An annotation collection less the images that a store among ``stores`` (a run's teacher caches) lists as
        skipped by its build, as evaluation leaves them out; an image folder as it is."""
        if self.manifest is None:
            return self
        known = skipped_by_stores(self.manifest, stores)
        position = {int(r): i for i, r in enumerate(self.manifest_rows if self.manifest_rows is not None
                                                     else range(len(self.image_ids)))}
        found = [{"image_id": self.image_ids[position[r]], "path": str(self.image_paths[position[r]]),
                  "reason": reason} for r, reason in sorted(known.items()) if r in position]
        return self.without_unreadable(found) if found else self


def read_collection(source: str | os.PathLike, split: str = "all", fmt: str = "auto",
                    image_root: str | None = None, shard_layout: ShardLayout | None = None) -> Collection:
    """An image folder, or one split ("all": every image) of an annotation file or shard source."""
    path = Path(source)
    if path.is_dir() and not is_shard_source(path):  # (a CLIP_benchmark webdataset folder is a shard source)
        return _image_folder(path)
    manifest = load_split(str(source), split, fmt, image_root, shard_layout)
    digest = hashlib.sha256(_ANNOTATION_FINGERPRINT_VERSION.encode())
    # the manifest's fingerprint covers ids, paths, captions and splits; the root says which files those paths are
    digest.update(f"\n{manifest.fingerprint()}\n{os.path.abspath(manifest.image_root)}".encode())
    return Collection(str(source), "annotations",
                      [Path(os.path.abspath(manifest.image_path(r))) for r in range(len(manifest.images))],
                      [im.image_id for im in manifest.images], manifest.caption_texts(),
                      manifest.caption_image_rows(), digest.hexdigest(), manifest)


def _image_folder(root: Path) -> Collection:
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
    digest = hashlib.sha256(f"{_FOLDER_FINGERPRINT_VERSION}\n{os.path.abspath(root)}".encode())
    ids = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        st = p.stat()
        # a changed, added or removed file changes the fingerprint; stat is cheap next to decoding the images
        digest.update(f"\n{rel}\t{st.st_size}\t{st.st_mtime_ns}".encode())
        ids.append(rel)
    return Collection(str(root), "image-folder", [Path(os.path.abspath(p)) for p in files], ids,
                      fingerprint=digest.hexdigest())


def run_labels(runs: list[str]) -> list[str]:
    """Short names for runs: the folder name (or folder/file of a checkpoint), full paths when those clash."""
    def short(run: str) -> str:
        p = Path(run)
        return p.name if p.is_dir() else f"{p.parent.name}/{p.name}"
    labels = [short(r) for r in runs]
    return labels if len(set(labels)) == len(labels) else list(runs)


# ---------------------------------------------------------------------------------------------- cached index
@dataclass
class CollectionIndex:
    """A collection's embeddings by one model and their FAISS indexes (texts ones absent for an image folder)."""

    collection: Collection
    images: np.ndarray  # float32 [N_img, D], L2-normalised cross embeddings
    texts: np.ndarray | None  # float32 [N_txt, D]
    image_index: Any
    text_index: Any
    cached: bool  # True when the embeddings came from the cache (nothing was embedded)
    folder: Path


def cache_folder(model: TrainedModel, collection: Collection, cache_root: str | os.PathLike | None = None) -> Path:
    """Where ``model``'s embeddings of ``collection`` are cached: in ``cache_root`` (default: ``search-cache`` beside
    the checkpoint), one entry per checkpoint file and collection (a retrained checkpoint replaces its entry)."""
    root = Path(cache_root) if cache_root is not None else model.checkpoint.parent / SEARCH_CACHE_DIR
    return root / f"{model.checkpoint.parent.name}-{model.checkpoint.stem}-{collection.fingerprint[:16]}"


def collection_index(model: TrainedModel, collection: Collection, factory: str = "Flat", progress: bool = True,
                     cache_root: str | os.PathLike | None = None) -> CollectionIndex:
    """The collection's embeddings and indexes: read from the cache when the entry matches this collection and
    this model, otherwise embedded now and cached. The metadata file is written after the arrays it describes, so
    an interrupted write is never read as complete; indexes of another factory are rebuilt from the embeddings."""
    from teacher_cache.neighbors import empty_index

    for rows in (len(collection.image_ids), len(collection.captions)):
        if rows:
            empty_index(factory, model.dim, rows)  # a factory that cannot work is refused before any embedding
    # the images the run's stores list as unreadable are never embedded, as evaluation never ranks them
    collection = collection.without_images_skipped_by(run_stores(model.config))
    folder = cache_folder(model, collection, cache_root)
    meta_path = folder / "meta.json"
    has_texts = bool(collection.captions)
    meta = _read_meta(meta_path)
    images = texts = None
    if meta and meta.get("format") == _CACHE_FORMAT and meta.get("collection") == collection.fingerprint \
            and meta.get("model") == model.identity:
        if meta.get("skipped"):
            collection = collection.without_unreadable(meta["skipped"])
        images = _load_rows(folder / "images.npy", len(collection.image_ids), model.dim)
        texts = _load_rows(folder / "texts.npy", len(collection.captions), model.dim) if has_texts else None
    cached = images is not None and (texts is not None or not has_texts)
    if not cached:
        if meta_path.exists():
            meta_path.unlink()  # from another model or collection: the entry is being replaced
        folder.mkdir(parents=True, exist_ok=True)
        images, collection = _embed_images(model, collection, progress)
        _save_rows(folder / "images.npy", images)
        texts = model.encode_texts(collection.captions, progress=progress) if has_texts else None
        if texts is not None:
            _save_rows(folder / "texts.npy", texts)
        # the embeddings are recorded at once (indexes to follow), so no later failure costs them
        meta = {"format": _CACHE_FORMAT, "collection": collection.fingerprint, "model": model.identity,
                "checkpoint": str(model.checkpoint), "model_spec": model.spec, "factory": None, "search_params": {},
                **{k: v for k, v in collection.describe().items() if k != "fingerprint"}}
        _atomic_write(meta_path, json.dumps(meta, indent=2).encode())
    indexes = None
    if meta.get("factory") == factory:
        try:
            indexes = _read_indexes(folder, has_texts, meta)
        except (OSError, RuntimeError):
            pass  # an index file went missing or is damaged: rebuilt below from the embeddings
    if indexes is None:
        if meta.get("factory") is not None:
            meta["factory"] = None  # until every index file of the new factory is written
            _atomic_write(meta_path, json.dumps(meta, indent=2).encode())
        meta.update(_write_indexes(folder, images, texts, factory))
        _atomic_write(meta_path, json.dumps(meta, indent=2).encode())
        indexes = _read_indexes(folder, has_texts, meta)
    return CollectionIndex(collection, images, texts, *indexes, cached, folder)


def _embed_images(model: TrainedModel, collection: Collection, progress: bool) -> tuple[np.ndarray, Collection]:
    """The collection's image embeddings, and the collection they are of (a folder's unreadable files left out)."""
    if collection.manifest is not None:
        # through the manifest, as training and cusa-eval read its images
        emb = model.embedder.manifest_images(collection.manifest, collection.manifest_rows, embedding="cross",
                                             progress=progress)
        return np.ascontiguousarray(emb.numpy(), dtype=np.float32), collection
    emb, _, errors = model.embedder.images_skipping_unreadable(collection.image_paths, "cross", progress)
    if errors:
        collection = collection.without_unreadable(
            [{"image_id": collection.image_ids[i], "path": str(collection.image_paths[i]), "reason": reason}
             for i, reason in sorted(errors.items())])
    return np.ascontiguousarray(emb.numpy(), dtype=np.float32), collection


def _write_indexes(folder: Path, images: np.ndarray, texts: np.ndarray | None, factory: str) -> dict:
    from teacher_cache.neighbors import build_index, save_index

    meta: dict[str, Any] = {"factory": factory, "search_params": {}}
    for name, emb in (("images", images), ("texts", texts)):
        if emb is None:
            continue
        index, _, applied = build_index(emb, factory, k=min(100, len(emb)))
        save_index(index, folder / f"{name}.faiss")
        meta["search_params"][name] = applied
    return meta


def _read_indexes(folder: Path, has_texts: bool, meta: dict):
    import faiss

    from teacher_cache.neighbors import load_index

    out = []
    for name in ("images", "texts"):
        if name == "texts" and not has_texts:
            out.append(None)
            continue
        index = load_index(folder / f"{name}.faiss")
        params = meta.get("search_params", {}).get(name)
        if params:
            faiss.ParameterSpace().set_index_parameters(index, params)
        out.append(index)
    return tuple(out)


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_rows(path: Path, n: int, dim: int) -> np.ndarray | None:
    try:
        rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if rows.shape != (n, dim) or rows.dtype != np.float32:
        return None
    return rows


def _save_rows(path: Path, rows: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(rows, dtype=np.float32), allow_pickle=False)
    os.replace(tmp, path)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- search
def ranked(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k (rows, scores, ranks) of each query: rows by descending score, ties by row; rank = 1 + the number of
    results strictly more similar (tied results share a rank)."""
    from teacher_cache.neighbors import search

    k = min(k, index.ntotal)
    rows, scores = search(index, queries, k)
    valid = rows >= 0  # an approximate index may find fewer than k
    scores = np.where(valid, scores, -np.inf)
    order = np.lexsort((np.where(valid, rows, np.iinfo(np.int64).max), -scores), axis=1)
    rows = np.take_along_axis(rows, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    ranks = 1 + (scores[:, None, :] > scores[:, :, None]).sum(axis=2)
    return rows, scores, ranks


def search_texts(ci: CollectionIndex, model: TrainedModel, queries: list[str], k: int,
                 progress: bool = False) -> list[list[dict]]:
    """Images of the collection for each text query, best first."""
    q = model.encode_texts(queries, progress=progress)
    return _image_results(ci, *ranked(ci.image_index, q, k))


def search_image(ci: CollectionIndex, model: TrainedModel, images: list[str], k: int) -> list[list[dict]]:
    """For each query image: the collection's captions (annotation collections) or images (image folders)."""
    q = model.encode_images(images)
    if ci.text_index is None:
        return _image_results(ci, *ranked(ci.image_index, q, k))
    rows, scores, ranks = ranked(ci.text_index, q, k)
    col = ci.collection
    out = []
    for qrows, qscores, qranks in zip(rows, scores, ranks):
        results = []
        for row, score, rank in zip(qrows, qscores, qranks):
            if row < 0:
                continue
            image_row = int(col.caption_image_rows[row])
            results.append({"rank": int(rank), "score": float(score), "path": str(col.image_paths[image_row]),
                            "image_id": col.image_ids[image_row], "caption": col.captions[row],
                            "caption_row": int(row), "image_row": image_row})
        out.append(results)
    return out


def _image_results(ci: CollectionIndex, rows: np.ndarray, scores: np.ndarray, ranks: np.ndarray) -> list[list[dict]]:
    col = ci.collection
    return [[{"rank": int(rank), "score": float(score), "path": str(col.image_paths[row]),
              "image_id": col.image_ids[row], "image_row": int(row)}
             for row, score, rank in zip(qrows, qscores, qranks) if row >= 0]
            for qrows, qscores, qranks in zip(rows, scores, ranks)]


def read_query_file(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, query) for every non-blank line of a UTF-8 text file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{p}: cannot read the query file ({e.strerror or e})") from None
    queries = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not queries:
        raise ValueError(f"{p}: no queries (expected one query a line)")
    return queries
