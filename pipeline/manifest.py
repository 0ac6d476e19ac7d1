"""Every dataset source read into one canonical `Manifest`: the format dispatch above the readers.

Supported inputs:
- ``karpathy``: the Karpathy split files ``dataset_coco.json`` / ``dataset_flickr30k.json``;
- ``caption-json``: a list of ``{"image", "caption", "image_id"?, "split"?}`` entries (ALBEF style);
- ``csv``: CSV/TSV with an image column and a caption column (one row per caption);
- ``webdataset``: tar shards (a brace pattern, ``::``-joined patterns, a ``.tar``, a list file, or a CLIP_benchmark
  webdataset folder), see ``pipeline.shards``.

The readers are ``pipeline.annotations`` and ``pipeline.shard_scan``; the rows they produce are columns
(``pipeline.manifest_table``, whose types this module re-exports) and are kept in the manifest index
(``pipeline.manifest_index``), so a second command on an unchanged source opens it without reading it again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from pipeline.annotations import (CSV_SUFFIXES, json_format, load_json, read_annotations, split_from_filename,
                                  unknown_extension, unusable_characters)
from pipeline.errors import ManifestError
from pipeline.manifest_index import IndexPlaces, ShardToRead, open_annotation_file, open_shards
from pipeline.manifest_table import (FINGERPRINT_VERSION, Block, CaptionRecord, CaptionTable, ImageRecord, ImageTable,
                                     Manifest, ShardMember)
from pipeline.shard_cache import needs_cache
from pipeline.shards import ShardLayout, is_shard_source, parse_shard_source, scan_rules, shard_stats
from pipeline.source_names import FORMATS
from teacher_cache.remote import is_url, redact_url

__all__ = ["FORMATS", "FINGERPRINT_VERSION", "Block", "CaptionRecord", "CaptionTable", "ImageRecord", "ImageTable",
           "Manifest", "ShardMember", "detect_format", "read_manifest", "split_from_filename", "unusable_characters"]



def detect_format(path: str | os.PathLike[str]) -> str:
    """Format name of an annotation file, from its extension and (for JSON) its top-level type; "webdataset" for a
    shard source (a ``.tar``, a brace pattern of them, ``::``-joined patterns, a list of shards or a CLIP_benchmark
    folder)."""
    if is_shard_source(path):
        return "webdataset"
    path = Path(path)
    if path.suffix.lower() == ".json":
        return json_format(path, load_json(path))
    if path.suffix.lower() in CSV_SUFFIXES:
        return "csv"
    raise unknown_extension(path)


def read_manifest(
    path: str | os.PathLike[str],
    format: str = "auto",
    image_root: str | os.PathLike[str] | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str | None = None,
    split_column: str | None = "split",
    shard_layout: ShardLayout | None = None,
    *,
    manifest_cache: str | os.PathLike[str] | None = None,
    indexes: Sequence[str | os.PathLike[str]] = (),
    workers: int = 0,
    progress: bool = False,
) -> Manifest:
    """Read an annotation file (or a webdataset shard source) into a Manifest; raises ManifestError (one line, naming
    file and entry, or shard and key) on bad input.

    ``image_root`` defaults to the annotation file's folder. The CSV options name the columns; the split
    column is used only when the file has it. ``shard_layout`` says which members of a shard sample hold its image,
    captions and id (see ``pipeline.shards``); ``image_root`` does not apply to shards.

    The rows are kept in the manifest index (``manifest_cache``, see ``pipeline.manifest_index``; ``indexes``:
    read-only copies tried first, such as a store's); ``workers`` > 1 scans shards in that many processes.
    """
    if format not in ("auto", *FORMATS):
        raise ManifestError(f"{path}: unknown annotation format {format!r}; choose auto, {', '.join(FORMATS)}")
    places = IndexPlaces.resolve(manifest_cache, indexes)
    if format == "webdataset" or format == "auto" and is_shard_source(path):
        return _read_shards(str(path).strip(), shard_layout or ShardLayout(), places, workers, progress)
    if is_url(str(path)):
        raise ManifestError(f"{redact_url(str(path))}: annotation files are read from local paths; a URL names "
                            "webdataset shards (.tar, .tar.gz, a brace pattern of them, or a .txt list of shards)")
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"{path}: a folder, not an annotation file, shards or a CLIP_benchmark webdataset folder "
                            "(which holds dataset_type.txt)")
    if not path.is_file():
        raise ManifestError(f"{path}: annotation file not found")
    if format == "auto" and path.suffix.lower() not in (".json", *CSV_SUFFIXES):
        raise unknown_extension(path)
    root = str(Path(image_root) if image_root is not None else path.parent)
    options = {"format": format, "image_column": image_column, "caption_column": caption_column,
               "id_column": id_column, "split_column": split_column}

    def read() -> Manifest:
        return read_annotations(path, format, root, image_column, caption_column, id_column, split_column)

    return open_annotation_file(path, options, root, read, places)


def _read_shards(source: str, layout: ShardLayout, places: IndexPlaces, workers: int, progress: bool) -> Manifest:
    patterns = parse_shard_source(source)
    stats = iter(shard_stats([shard for pattern in patterns for shard in pattern.shards]))
    shards = [ShardToRead(next(stats), pattern.split, scan_rules(layout, pattern.escaped_newlines))
              for pattern in patterns for shard in pattern.shards]
    manifest = open_shards(shards, source, places, workers, progress)
    # the versions that were indexed travel with the rows, so every reader (a DataLoader worker, a rank) reads the
    # local copy of that version without listing the shards again
    manifest.images.shards.stats = {s.stat.path: s.stat for s in shards if needs_cache(s.stat.path)}
    return manifest
