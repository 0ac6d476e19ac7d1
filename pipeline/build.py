"""Stage 1: run every image and caption of a manifest through its teacher, once, into a store.

The job is resumable chunk by chunk (finished chunks carry a marker and are never recomputed), can be
split over torchrun ranks (each takes a contiguous share of the unfinished chunks of one store), and
overlaps image decoding (DataLoader workers) with the teacher's forward pass.

Tests stop a build at a chosen point through ``CUSA_FAULT_AT`` (pipeline/faults.py).
"""

from __future__ import annotations

import errno
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline.captions import TeacherCaptions, teacher_captions
from pipeline.distributed import DistContext, init_distributed, resolve_device, shutdown_distributed, split_evenly
from pipeline.errors import CusaError, ImageError
from pipeline.faults import FaultInjector
from pipeline.images import open_image
from pipeline.manifest import FINGERPRINT_VERSION, Manifest, read_manifest
from pipeline.manifest_index import keep_copy
from pipeline.shard_read_ahead import ShardReadAhead
from pipeline.shard_scan import describe_skipped
from pipeline.shards import DEFAULT_CAPTION_KEY, ShardLayout
from pipeline.teachers.base import Encoder
from pipeline.teachers.registry import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER, build_encoder
from teacher_cache.errors import StoreError
from teacher_cache.neighbors import build_neighbor_table, save_index
from teacher_cache.remote import redact_text
from teacher_cache.store import DEFAULT_CHUNK_ROWS, MODALITIES, BuildLock, Store, StoreLayout

ON_BAD_IMAGE = ("fail", "skip")
@dataclass
class BuildConfig:
    annotations: str
    out: str
    format: str = "auto"
    image_root: str | None = None
    split: str = "all"
    text_teacher: str = DEFAULT_TEXT_TEACHER
    image_teacher: str = DEFAULT_IMAGE_TEACHER
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    neighbors: int = 32
    index: str = "Flat"
    on_bad_image: str = "fail"
    overwrite: bool = False
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    progress: bool = True
    csv_image_column: str = "image"
    csv_caption_column: str = "caption"
    csv_id_column: str | None = None
    image_key: str | None = None  # webdataset shards: image member extension(s) [default: jpg;jpeg;png;webp]
    caption_key: str = DEFAULT_CAPTION_KEY  # webdataset shards: caption member extension, or json:FIELD
    id_field: str | None = None  # webdataset shards: json field holding the image id [default: the sample key]
    manifest_cache: str | None = None  # where the source's manifest index goes [default: see pipeline.manifest_index]

    def shard_layout(self) -> ShardLayout:
        return ShardLayout(self.image_key, self.caption_key, self.id_field)


@dataclass
class ModalityStats:
    rows: int = 0  # rows embedded by this run, all ranks together (resumed rows are not counted)
    seconds: float = 0.0  # wall time until every rank had written its share
    skipped_chunks: int = 0  # chunks already finished by an earlier run

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BuildSummary:
    store: str
    counts: dict
    dims: dict
    teachers: dict
    fingerprint: str
    complete: bool
    images: dict = field(default_factory=dict)
    texts: dict = field(default_factory=dict)
    neighbors: dict = field(default_factory=dict)
    skipped_images: list = field(default_factory=list)
    skipped_samples: list = field(default_factory=list)  # shard samples left out by --on-bad-image skip
    caption_notes: dict = field(default_factory=dict)
    size_bytes: int = 0
    seconds: float = 0.0
    world_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def caption_notes(encoder: Encoder, texts: Sequence[str], cleaned_rows: list[int]) -> dict:
    """What happened to the caption texts on their way into the teacher: rows whose odd characters were replaced,
    and rows longer than the teacher reads (it truncates them), when its tokenizer can tell."""
    notes: dict = {"cleaned": len(cleaned_rows), "cleaned_rows": cleaned_rows[:20]}
    limit = encoder.identity().get("max_seq_length")
    tokenizer = getattr(getattr(encoder, "model", None), "tokenizer", None)
    if not limit or tokenizer is None:
        return notes
    lengths = []
    # the tokenizer warns on every over-long text; counting them is the point here
    log = logging.getLogger("transformers.tokenization_utils_base")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        for lo in range(0, len(texts), 4096):
            batch = tokenizer(texts[lo:lo + 4096], add_special_tokens=True, truncation=False,
                              return_attention_mask=False, return_token_type_ids=False)
            lengths.extend(len(ids) for ids in batch["input_ids"])
    finally:
        log.setLevel(level)
    long_rows = [row for row, n in enumerate(lengths) if n > limit]
    notes.update({"max_tokens": int(limit), "truncated": len(long_rows), "truncated_rows": long_rows[:20],
                  "longest_tokens": int(max(lengths, default=0))})
    return notes


def manifest_layout(manifest: Manifest, image_encoder: Encoder, text_encoder: Encoder, chunk_rows: int,
                    fingerprint_format: int = FINGERPRINT_VERSION) -> StoreLayout:
    """What the store records about a manifest and its teachers (no embeddings yet); ``fingerprint_format`` 1 only to
    resume a build begun before fingerprint format 2."""
    split_fps = {s: manifest.select_split(s).fingerprint(fingerprint_format) for s in manifest.splits() if s}
    return StoreLayout(
        fingerprint=manifest.fingerprint(fingerprint_format),
        fingerprint_format=fingerprint_format,
        split_fingerprints=split_fps,
        image_ids=manifest.images.ids(),
        image_paths=manifest.images.paths(),
        image_splits=manifest.images.splits(),
        captions=TeacherCaptions(manifest.captions.texts),
        caption_image_rows=manifest.caption_image_rows(),
        teachers={"image": image_encoder.identity(), "text": text_encoder.identity()},
        dims={"images": int(image_encoder.dim), "texts": int(text_encoder.dim)},
        chunk_rows=chunk_rows,
        source=redact_text(str(manifest.source)),  # a URL's token never lands in the store
        skipped_samples=[{k: redact_text(str(s[k])) for k in ("shard", "key", "reason")}
                         for s in manifest.skipped_samples],
    )


def normalize_rows(emb: np.ndarray, what: str) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if not np.isfinite(emb).all() or (norms == 0).any():
        bad = np.flatnonzero((~np.isfinite(emb).all(axis=1)) | (norms[:, 0] == 0))
        raise CusaError(f"the teacher returned zero or non-finite embeddings for {what} rows {bad[:5].tolist()}")
    return emb / norms


class _ImageRows(Dataset):
    """Decodes and preprocesses image rows in DataLoader workers; a bad file becomes an error record."""

    def __init__(self, manifest: Manifest, preprocess: Callable):
        self.manifest = manifest
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.manifest.images)

    def __getitem__(self, row: int):
        try:
            img = open_image(self.manifest, row)
            return row, self.preprocess(img), None
        except ImageError as exc:
            return row, None, str(exc)


def _collate(items):
    rows = [r for r, _, _ in items]
    tensors = [t for _, t, _ in items if t is not None]
    errors = {r: e for r, _, e in items if e is not None}
    batch = torch.stack(tensors) if tensors else None
    return rows, batch, errors


def _chunk_batches(store: Store, modality: str, chunks: list[int], batch_size: int) -> list[list[int]]:
    """Row batches that never cross a chunk boundary, so each chunk can be written as soon as it is done."""
    batches = []
    for c in chunks:
        start, stop = store.chunk_range(modality, c)
        for lo in range(start, stop, batch_size):
            batches.append(list(range(lo, min(lo + batch_size, stop))))
    return batches


def _embed_images(store: Store, manifest: Manifest, encoder: Encoder, chunks: list[int], cfg: BuildConfig,
                  show: bool, rank: int, faults: FaultInjector) -> None:
    if not chunks:
        return
    total = sum(store.chunk_range("images", c)[1] - store.chunk_range("images", c)[0] for c in chunks)
    needs_pixels = getattr(encoder, "needs_pixels", True)
    row_batches = _chunk_batches(store, "images", chunks, cfg.batch_size)
    prefetch = 4
    # shards at URLs (pipe:, compressed) this rank reads come into the shard cache ahead of its workers
    ahead = ShardReadAhead.for_rows(manifest, row_batches if needs_pixels else [],
                                    in_flight=cfg.workers * prefetch, readers=cfg.workers)
    # closed on errors too, so an error message starts on a line of its own
    with tqdm(total=total, desc="images", unit="img", disable=not show, dynamic_ncols=True) as bar, ahead:
        if needs_pixels:
            loader = DataLoader(
                _ImageRows(manifest, encoder.preprocess),
                batch_sampler=row_batches,
                num_workers=cfg.workers,
                collate_fn=_collate,
                prefetch_factor=prefetch if cfg.workers > 0 else None,
                persistent_workers=False,
            )
            batches = ahead.follow(iter(loader))
        else:  # features looked up (by id, or by row in the shards): the batch is the embeddings themselves
            batches = (_looked_up(encoder, manifest, rows) for rows in row_batches)
        for c in chunks:
            start, stop = store.chunk_range("images", c)
            out = np.zeros((stop - start, store.dims["images"]), dtype=np.float32)
            bad_rows: list[dict] = []
            filled = 0
            while filled < stop - start:
                rows, batch, errors = next(batches)
                for row, message in errors.items():
                    if cfg.on_bad_image == "fail":
                        raise ImageError(f"{message} (use --on-bad-image skip to leave such rows out)")
                    im = manifest.images[row]
                    bad_rows.append({"row": int(row), "id": im.image_id, "path": im.path,
                                     "reason": redact_text(message)})
                good = [r for r in rows if r not in errors]
                if good:
                    emb = encoder.encode(batch) if needs_pixels else batch
                    out[np.asarray(good) - start] = normalize_rows(emb, "image")
                filled += len(rows)
                bar.update(len(rows))
                faults.at("image_batch")
            store.write_chunk("images", c, out, bad_rows=bad_rows, rank=rank,
                              before_marker=lambda: faults.at("image_chunk_data", str(store.path)))
            faults.at("image_chunk_written")


def _looked_up(encoder: Encoder, manifest: Manifest, rows: list[int]) -> tuple[list[int], np.ndarray, dict]:
    """(rows, embeddings of the readable ones, {row: message} of the others) from an encoder that runs no model: by
    image id and path, or by manifest row (an embedding a row lacks is an unreadable image, named)."""
    if not getattr(encoder, "by_row", False):
        ids = manifest.images.ids()
        return rows, encoder.encode_ids([ids[r] for r in rows], paths=[manifest.images.path(r) for r in rows]), {}
    try:
        return rows, encoder.encode_rows(np.asarray(rows)), {}
    except ImageError:  # find which rows, and keep the others
        parts, errors = [], {}
        for r in rows:
            try:
                parts.append(encoder.encode_rows(np.asarray([r])))
            except ImageError as exc:
                errors[r] = str(exc)
        dim = getattr(encoder, "dim", 0)
        return rows, np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32), errors


def _embed_texts(store: Store, manifest: Manifest, encoder: Encoder, chunks: list[int], cfg: BuildConfig,
                 show: bool, rank: int, faults: FaultInjector) -> None:
    if not chunks:
        return
    total = sum(store.chunk_range("texts", c)[1] - store.chunk_range("texts", c)[0] for c in chunks)
    with tqdm(total=total, desc="captions", unit="cap", disable=not show, dynamic_ncols=True) as bar:
        texts = TeacherCaptions(manifest.captions.texts)
        # embeddings kept in caption order (precomputed, no keys) are looked up by row rather than by text
        by_row = getattr(encoder, "by_row", False)
        for c in chunks:
            start, stop = store.chunk_range("texts", c)
            out = np.empty((stop - start, store.dims["texts"]), dtype=np.float32)
            for lo in range(start, stop, cfg.batch_size):
                hi = min(lo + cfg.batch_size, stop)
                emb = encoder.encode_rows(np.arange(lo, hi)) if by_row else encoder.encode(texts[lo:hi])
                out[lo - start:hi - start] = normalize_rows(emb, "caption")
                bar.update(hi - lo)
                faults.at("text_batch")
            store.write_chunk("texts", c, out, rank=rank,
                              before_marker=lambda: faults.at("text_chunk_data", str(store.path)))
            faults.at("text_chunk_written")


def _neighbors_current(store: Store, modality: str, k: int, factory: str) -> bool:
    marker = store.neighbors_marker(modality)
    return bool(marker) and marker.get("k_requested") == k and marker.get("factory") == factory


def _build_neighbors(store: Store, modality: str, k: int, factory: str, show: bool, faults: FaultInjector) -> dict:
    """The teacher k-NN table of one modality; rows skipped for bad images take no part."""
    if _neighbors_current(store, modality, k, factory):
        return store.neighbors_marker(modality)
    emb = store.load(modality)
    valid = np.flatnonzero(np.linalg.norm(emb, axis=1) > 0)
    n = emb.shape[0]
    k_eff = min(k, max(len(valid) - 1, 0))
    ids = np.full((n, k_eff), -1, dtype=np.int64)
    sims = np.zeros((n, k_eff), dtype=np.float32)
    t0 = time.perf_counter()
    writer = None
    if k_eff > 0:
        table = build_neighbor_table(emb[valid], k_eff, factory=factory, progress=show)
        # table ids are positions among the valid rows; -1 (an approximate index found too few) stays -1
        ids[valid] = np.where(table.ids >= 0, valid[np.maximum(table.ids, 0)], -1)
        sims[valid] = table.sims
        if len(valid) == n:
            # saved only when its ids are store rows: with skipped images they would be positions among the rest
            def writer(path: Path) -> None:  # deferred until the table is stored
                try:
                    save_index(table.index, path)
                except RuntimeError as exc:  # FAISS reports a failed write (a full disk, say) as RuntimeError
                    raise OSError(errno.EIO, f"cannot write the FAISS index ({str(exc).splitlines()[0][:120]})",
                                  str(path)) from exc
    info = {"k_requested": k, "factory": factory, "rows": int(len(valid)), "seconds": time.perf_counter() - t0}
    store.write_neighbors(modality, ids, sims, index_bytes_writer=writer,
                          before_marker=lambda: faults.at(f"neighbors_{modality}", str(store.path)), **info)
    return {"modality": modality, "k": k_eff, **info}


def _refuse_other_manifest(out: str, manifest: Manifest) -> int:
    """Refuse a store built from another manifest before loading any teacher (which can take minutes); the
    fingerprint format the build goes on with (1 for a build of this manifest begun before format 2)."""
    try:
        existing = Store.open(out)
    except StoreError:
        return FINGERPRINT_VERSION  # nothing there yet, a half-created store, or another format: create_or_resume decides
    if existing.fingerprint_format < 2 and existing.fingerprint == manifest.fingerprint(1):
        return 1
    existing.check_fingerprint(manifest.fingerprint())
    return FINGERPRINT_VERSION


def _keep_manifest_index(source: Manifest, out: str) -> None:
    """A copy of the source's manifest index inside the finished store, so commands given the store open the data
    without reading it (an accelerator only: a failed copy leaves the store as it is)."""
    try:
        keep_copy(source, out)
    except OSError as exc:
        print(f"note: {out}: the manifest index was not kept in the store ({exc.strerror or exc})", file=sys.stderr)


def _reopen_finished(store: Store, cfg: BuildConfig) -> None:
    """Re-running a finished build: parts damaged since are forgotten (and so recomputed), and the completion mark
    is withdrawn before anything is rewritten, so that the store is never complete and half-changed."""
    damaged = store.changed_since_written()
    if damaged:
        store.forget(damaged)
    progress = store.progress()
    pending = any(len(progress.done[m]) < store.n_chunks(m) for m in MODALITIES)
    stale_tables = cfg.neighbors > 0 and not all(
        _neighbors_current(store, m, cfg.neighbors, cfg.index) for m in MODALITIES)
    if pending or stale_tables:
        store.mark_incomplete()


def _run(cfg: BuildConfig, manifest: Manifest, layout: StoreLayout, image_encoder: Encoder, text_encoder: Encoder,
         ctx: DistContext, show: bool, faults: FaultInjector) -> BuildSummary:
    """The store-writing part of a build, on every rank."""
    if ctx.is_main:
        store = Store.create_or_resume(cfg.out, layout, overwrite=cfg.overwrite)
        if store.complete:
            _reopen_finished(store, cfg)
    ctx.barrier()
    if not ctx.is_main:
        store = Store.create_or_resume(cfg.out, layout)
    faults.at("store_ready")
    progress = store.progress()
    ctx.barrier()  # every rank has read the same progress before anyone writes
    stats = {}
    for modality, embed, encoder in (("images", _embed_images, image_encoder), ("texts", _embed_texts, text_encoder)):
        pending = [c for c in range(store.n_chunks(modality)) if c not in progress.done[modality]]
        mine = split_evenly(pending, ctx.rank, ctx.world_size)
        if show and 0 < len(pending) < ctx.world_size:
            # ranks take whole chunks (the unit of resumption): fewer chunks than ranks leaves some idle
            rows = store.counts[modality]
            tqdm.write(f"{modality}: {len(pending)} chunk(s) of {store.chunk_rows} rows for {ctx.world_size} ranks, "
                       f"{ctx.world_size - len(pending)} rank(s) idle; a new store built with --chunk-rows "
                       f"{-(-rows // ctx.world_size)} gives every rank a share", file=sys.stderr)
        t0 = time.perf_counter()
        embed(store, manifest, encoder, mine, cfg, show, ctx.rank, faults)
        ctx.barrier()  # the modality is done when every rank has written its share
        stats[modality] = ModalityStats(
            rows=sum(store.chunk_range(modality, c)[1] - store.chunk_range(modality, c)[0] for c in pending),
            seconds=time.perf_counter() - t0,
            skipped_chunks=store.n_chunks(modality) - len(pending),
        )
        faults.at(f"{modality}_done")
    if not ctx.is_main:
        return BuildSummary(store=str(store.path), counts=store.counts, dims=store.dims, teachers=store.teachers,
                            fingerprint=store.fingerprint, complete=False, world_size=ctx.world_size)
    neighbors = {}
    if cfg.neighbors > 0:
        for modality in MODALITIES:
            neighbors[modality] = _build_neighbors(store, modality, cfg.neighbors, cfg.index, show, faults)
    texts = TeacherCaptions(manifest.captions.texts)
    summary = BuildSummary(
        store=str(store.path), counts=store.counts, dims=store.dims, teachers=store.teachers,
        fingerprint=store.fingerprint, complete=True,
        images={**asdict(stats["images"]), "rows_per_s": stats["images"].rows_per_s},
        texts={**asdict(stats["texts"]), "rows_per_s": stats["texts"].rows_per_s},
        neighbors=neighbors, world_size=ctx.world_size, caption_notes=caption_notes(text_encoder, texts, texts.cleaned_rows()),
    )
    faults.at("before_finalize")
    store.finalize({k: v for k, v in summary.to_dict().items() if k in ("images", "texts", "world_size")},
                   caption_notes=summary.caption_notes)
    faults.at("after_finalize")
    summary.skipped_images = store.skipped_images
    summary.skipped_samples = layout.skipped_samples
    summary.size_bytes = store.size_bytes()
    return summary


def build_store(cfg: BuildConfig, image_encoder: Encoder | None = None,
                text_encoder: Encoder | None = None) -> BuildSummary:
    """Build (or resume) the store described by ``cfg``; returns the summary of this run.

    ``image_encoder``/``text_encoder``, when given, are used instead of building ``cfg``'s teacher specs (an import
    of embeddings computed elsewhere, say)."""
    if cfg.on_bad_image not in ON_BAD_IMAGE:
        raise CusaError(f"--on-bad-image must be one of {ON_BAD_IMAGE}, got {cfg.on_bad_image!r}")
    if cfg.neighbors < 0:
        raise CusaError(f"--neighbors must be ≥ 0, got {cfg.neighbors}")
    t_start = time.perf_counter()
    source = read_manifest(
        cfg.annotations, format=cfg.format, image_root=cfg.image_root, image_column=cfg.csv_image_column,
        caption_column=cfg.csv_caption_column, id_column=cfg.csv_id_column, shard_layout=cfg.shard_layout(),
        manifest_cache=cfg.manifest_cache, workers=cfg.workers, progress=cfg.progress)
    manifest = source.select_split(cfg.split)
    if not manifest.images:
        raise CusaError(f"{cfg.annotations}: no images in split {cfg.split!r}")
    if manifest.skipped_samples and cfg.on_bad_image == "fail":
        more = f" ({len(manifest.skipped_samples) - 1} more bad samples)" if len(manifest.skipped_samples) > 1 else ""
        raise CusaError(f"{describe_skipped(manifest.skipped_samples[0])}{more}; fix the shard or use "
                        "--on-bad-image skip to leave such samples out")
    fingerprint_format = _refuse_other_manifest(cfg.out, manifest) if not cfg.overwrite else FINGERPRINT_VERSION
    faults = FaultInjector.from_env()
    ctx = init_distributed("cuda" if cfg.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    lock = BuildLock(Path(cfg.out))
    try:
        if ctx.is_main:
            lock.acquire()  # before the teachers load (which can take minutes): a second build is told at once
        device = resolve_device(cfg.device, ctx)
        image_encoder = image_encoder or build_encoder(cfg.image_teacher, "image", device=device)
        text_encoder = text_encoder or build_encoder(cfg.text_teacher, "text", device=device)
        for encoder in (image_encoder, text_encoder):
            bind = getattr(encoder, "bind_manifest", None)
            if bind is not None:  # an encoder reading the data's own members learns the rows here
                bind(manifest)
        check = getattr(text_encoder, "check_captions", None)
        if check is not None:  # embeddings made elsewhere must cover these captions: said before anything is written
            check(teacher_captions(manifest.caption_texts())[0],
                  f"{cfg.annotations} (split {cfg.split})")
        layout = manifest_layout(manifest, image_encoder, text_encoder, cfg.chunk_rows, fingerprint_format)
        show = cfg.progress and ctx.is_main
        try:
            summary = _run(cfg, manifest, layout, image_encoder, text_encoder, ctx, show, faults)
            if ctx.is_main:
                _keep_manifest_index(source, cfg.out)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(cfg.out) else ""
            raise CusaError(
                f"{cfg.out}: the build stopped on a file system error: {exc.strerror or exc}{where}; the chunks "
                "already finished are kept: free space or fix permissions, then re-run the same command to resume"
            ) from exc
    finally:
        lock.release()
        shutdown_distributed(ctx)
    summary.seconds = time.perf_counter() - t_start if ctx.is_main else 0.0
    return summary
