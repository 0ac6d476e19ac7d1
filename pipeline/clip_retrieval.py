"""A teacher store from clip-retrieval's inference output, without running a teacher.

``clip-retrieval inference`` writes, per output partition i (the same i in every folder, in one sample order):

    DIR/img_emb/img_emb_{i}.npy            [n_i, D_img] float16, L2-normalised image embeddings
    DIR/text_emb/text_emb_{i}.npy          [n_i, D_txt] float16, L2-normalised caption embeddings
    DIR/metadata/metadata_{i}.parquet      n_i rows: image_path (a file path, or a webdataset key), caption, and
                                           the sample's json fields when it ran with metadata

One sample is one (image, caption) pair. ``import_clip_retrieval`` turns the metadata into a caption-list
annotation file (one entry per sample, in sample order: an image seen again is the same manifest row, so COCO-style
data with several captions an image come out as one image with its captions), then builds the store from it with
the embeddings as its teachers (the image rows by image id, the caption rows in sample order) through the same
build job as ``cusa-cache build``: chunked and resumable, the neighbor tables, checksums and completion mark.
Training then takes ``--data`` the annotation file and ``--cache`` the store.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.build import BuildConfig, BuildSummary, build_store
from pipeline.errors import CusaError
from pipeline.feature_files import read_plain_matrix
from pipeline.teachers.hashing import files_sha256
from pipeline.teachers.precomputed import PrecomputedEncoder
from pipeline.teachers.precomputed_text import PrecomputedTextEncoder
from teacher_cache.store import DEFAULT_CHUNK_ROWS

_PART = re.compile(r"^(?:img_emb|text_emb|metadata)_(.+)\.(?:npy|parquet)$")


@dataclass
class ClipRetrievalImport:
    folder: str  # clip-retrieval's output folder (img_emb/, text_emb/, metadata/)
    out: str  # the store to create or resume
    annotations: str | None = None  # the annotation file to write [default: OUT.annotations.json]
    id_column: str | None = None  # metadata column naming the image [default: image_path]
    split_column: str | None = None  # metadata column holding a split label per sample
    split: str = ""  # split label of every sample when there is no split column
    model: str | None = None  # the CLIP model that made the embeddings, recorded with the teachers
    neighbors: int = 32
    index: str = "Flat"
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    overwrite: bool = False
    progress: bool = True

    @property
    def annotations_path(self) -> Path:
        return Path(self.annotations) if self.annotations else Path(str(Path(self.out)) + ".annotations.json")


class _Concatenated:
    """Rows of several memory-mapped arrays as one [N, D] array: row and slice lookups, no copy of the whole."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), int(parts[0].shape[1]) if parts else 0)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        for p in np.unique(part).tolist():
            here = part == p
            out[here] = self.parts[p][rows[here] - self.starts[p]]
        return out


@dataclass
class _Part:
    name: str
    image_emb: Path
    text_emb: Path
    metadata: Path


def _parts(folder: Path) -> list[_Part]:
    """The output partitions, matched by their number in all three folders, in numeric order."""
    found: dict[str, dict[str, Path]] = {}
    for sub, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
        where = folder / sub
        if not where.is_dir():
            hint = " (clip-retrieval inference ran without --enable_text?)" if sub == "text_emb" else ""
            raise CusaError(f"{folder}: no {sub}/ folder{hint}; expected clip-retrieval inference output "
                            "(img_emb/, text_emb/, metadata/)")
        for path in sorted(where.glob(f"{sub}_*.{ext}")):
            match = _PART.match(path.name)
            if match:
                found.setdefault(match.group(1), {})[sub] = path
    if not found:
        raise CusaError(f"{folder}: no img_emb_*.npy, text_emb_*.npy or metadata_*.parquet files")
    parts = []
    for name in sorted(found, key=lambda n: (int(n) if n.isdigit() else float("inf"), n)):
        files = found[name]
        for sub, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
            if sub not in files:
                have = next(iter(files.values()))
                raise CusaError(f"{have}: partition {name} has no {sub}/{sub}_{name}.{ext}")
        parts.append(_Part(name, files["img_emb"], files["text_emb"], files["metadata"]))
    return parts


def _metadata_columns(path: Path, wanted: dict[str, str | None]) -> dict[str, list]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # not a parquet file, truncated
        raise CusaError(f"{path}: cannot read parquet metadata ({type(exc).__name__}: {exc})") from exc
    missing = [col for col in wanted.values() if col is not None and col not in schema.names]
    if missing:
        raise CusaError(f"{path}: no column {missing[0]!r} (columns: {', '.join(schema.names)})")
    columns = sorted({col for col in wanted.values() if col is not None})
    table = pq.read_table(path, columns=columns)
    return {role: table.column(col).to_pylist() if col else None for role, col in wanted.items()}


def _annotation_entries(cfg: ClipRetrievalImport, parts: list[_Part]) -> tuple[list[dict], list[str]]:
    """One caption-list entry per sample, in sample order, and the image id of each sample."""
    id_column = cfg.id_column or "image_path"
    entries, ids = [], []
    dims: dict[str, int] = {}
    for part in parts:
        cols = _metadata_columns(part.metadata, {"path": "image_path", "caption": "caption", "id": id_column,
                                                 "split": cfg.split_column})
        n = len(cols["caption"])
        for what, path in (("img_emb", part.image_emb), ("text_emb", part.text_emb)):
            array = read_plain_matrix(path, f"{what} embeddings")
            if array.ndim != 2 or array.shape[0] != n:
                raise CusaError(f"{path}: shape {tuple(array.shape)}, but {part.metadata.name} has {n} rows; the "
                                "partition's files must hold the same samples")
            if dims.setdefault(what, array.shape[1]) != array.shape[1]:
                raise CusaError(f"{path}: {array.shape[1]}-d embeddings, the partitions before hold "
                                f"{dims[what]}-d ones")
        for row in range(n):
            where = f"{part.metadata} row {row}"
            caption, image_path, image_id = cols["caption"][row], cols["path"][row], cols["id"][row]
            if not isinstance(caption, str) or not caption.strip():
                raise CusaError(f"{where}: caption is empty or missing ({caption!r:.40})")
            if image_path is None or image_id is None or not str(image_path).strip() or not str(image_id).strip():
                raise CusaError(f"{where}: no image path or id")
            split = cols["split"][row] if cols["split"] is not None else cfg.split
            entries.append({"image": str(image_path), "image_id": str(image_id), "caption": caption,
                            "split": "" if split is None else str(split)})
            ids.append(str(image_id))
    return entries, ids


def _write_json_atomically(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, ensure_ascii=False))
    os.replace(tmp, path)


def import_clip_retrieval(cfg: ClipRetrievalImport) -> tuple[BuildSummary, Path]:
    """Write the annotation file and build (or resume) the store; returns the build summary and the file."""
    folder = Path(cfg.folder)
    if not folder.is_dir():
        raise CusaError(f"{folder}: not a folder; give clip-retrieval inference's output folder")
    parts = _parts(folder)
    entries, sample_ids = _annotation_entries(cfg, parts)
    annotations = cfg.annotations_path
    _write_json_atomically(annotations, entries)

    # the image of each image id is its first sample's embedding; captions are the samples, in order
    first_sample: dict[str, int] = {}
    for sample, image_id in enumerate(sample_ids):
        first_sample.setdefault(image_id, sample)
    images = _Concatenated([read_plain_matrix(p.image_emb, "img_emb embeddings") for p in parts])
    texts = _Concatenated([read_plain_matrix(p.text_emb, "text_emb embeddings") for p in parts])
    first = np.fromiter(first_sample.values(), dtype=np.int64, count=len(first_sample))

    class _FirstSampleRows:  # the image rows PrecomputedEncoder looks up: one per image id
        shape = (len(first), images.shape[1])

        def __getitem__(self, rows):
            return images[first[np.asarray(rows, dtype=np.int64)]]

    spec = f"clip-retrieval:{folder.resolve()}"
    files = [p for part in parts for p in (part.image_emb, part.text_emb, part.metadata)]

    def weights() -> str:
        return f"sha256:{files_sha256(files)}"

    extra = {"model": cfg.model} if cfg.model else {}
    image_encoder = PrecomputedEncoder(spec, _FirstSampleRows(), list(first_sample), str(folder / "img_emb"),
                                       weights, extra=extra)
    text_encoder = PrecomputedTextEncoder(spec, texts, None, str(folder / "text_emb"), weights, extra=extra)
    build = BuildConfig(annotations=str(annotations), out=cfg.out, format="caption-json", split="all",
                        image_teacher=spec, text_teacher=spec, workers=0, batch_size=4096, device="cpu",
                        neighbors=cfg.neighbors, index=cfg.index, overwrite=cfg.overwrite, chunk_rows=cfg.chunk_rows,
                        progress=cfg.progress)
    return build_store(build, image_encoder=image_encoder, text_encoder=text_encoder), annotations
