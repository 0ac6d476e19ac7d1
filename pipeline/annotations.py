"""Annotation files read into a `Manifest`: Karpathy split files, caption-list JSON and CSV/TSV.

- ``karpathy``: the Karpathy split files ``dataset_coco.json`` / ``dataset_flickr30k.json``;
- ``caption-json``: a list of ``{"image", "caption", "image_id"?, "split"?}`` entries (ALBEF style);
- ``csv``: CSV/TSV with an image column and a caption column (one row per caption).

Ids, paths and split labels name files and join rows: one containing a control character or an invalid code point
(a lone surrogate) is refused. Captions are kept as written (the build normalises what its teacher reads). Repeated
images (same id, else same path) are one row. The result is columnar (:mod:`pipeline.manifest_table`): the readers
keep one list per column while reading, never a record per row.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.columns import StringColumn
from pipeline.errors import ManifestError
from pipeline.manifest_table import CaptionTable, ImageTable, Manifest, narrow_codes
from pipeline.source_names import ANNOTATION_FORMATS

FORMATS = ANNOTATION_FORMATS
CSV_SUFFIXES = (".csv", ".tsv", ".txt")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def read_annotations(path: Path, format: str, image_root: str | os.PathLike[str] | None = None,
                     image_column: str = "image", caption_column: str = "caption", id_column: str | None = None,
                     split_column: str | None = "split") -> Manifest:
    """Read one annotation file (``format``: auto or one of FORMATS) into a Manifest; ManifestError (one line,
    naming file and entry) on bad input. ``image_root`` defaults to the file's folder."""
    if not path.is_file():
        raise ManifestError(f"{path}: annotation file not found")
    builder = _Builder(path)
    data: Any = None
    if format == "auto":
        if path.suffix.lower() == ".json":
            data = load_json(path)
            format = json_format(path, data)
        elif path.suffix.lower() in CSV_SUFFIXES:
            format = "csv"
        else:
            raise unknown_extension(path)
    if format == "karpathy":
        _read_karpathy(path, load_json(path) if data is None else data, builder)
    elif format == "caption-json":
        _read_caption_json(path, load_json(path) if data is None else data, builder)
    else:
        _read_csv(path, builder, image_column, caption_column, id_column, split_column)
    root = Path(image_root) if image_root is not None else path.parent
    return builder.finish(str(root), format)


def unknown_extension(path: Path) -> ManifestError:
    return ManifestError(
        f"{path}: cannot tell the annotation format from the extension {path.suffix or '(none)'!r}; "
        f"use .json or .csv/.tsv/.txt, or pass a format ({', '.join(FORMATS)}, webdataset)"
    )


class _Builder:
    """Collects (image, caption) pairs column by column, merging repeated images into one row and checking
    consistency."""

    def __init__(self, source: Path):
        self.source = source
        self.ids: list[str] = []
        self.paths: list[str] = []
        self.splits: list[int] = []
        self.split_labels: dict[str, int] = {}
        self.texts: list[str] = []
        self.caption_rows: list[int] = []
        self.row_of_key: dict[str, int] = {}
        self.where: list[str] = []  # where each image first appeared, for conflict messages
        self.has_caption: list[bool] = []

    def add_image(self, where: str, image_id: str | None, image_path: str, split: str) -> int:
        """Row of the image, creating it on first sight; ``where`` names the entry for error messages."""
        for name, value in (("image id", image_id), ("image path", image_path), ("split", split)):
            _refuse_odd_characters(self.source, where, name, value)
        _check_path(self.source, where, image_path)
        key = f"id:{image_id}" if image_id is not None else f"path:{image_path}"
        record_id = image_id if image_id is not None else image_path
        code = self.split_labels.setdefault(split, len(self.split_labels))
        row = self.row_of_key.get(key)
        if row is None:
            row = len(self.ids)
            self.row_of_key[key] = row
            self.ids.append(record_id)
            self.paths.append(image_path)
            self.splits.append(code)
            self.where.append(where)
            self.has_caption.append(False)
            return row
        if self.paths[row] != image_path:
            raise ManifestError(
                f"{self.source}: {where}: image id {record_id!r} has path {image_path!r} "
                f"but {self.where[row]} gave it path {self.paths[row]!r}"
            )
        if self.splits[row] != code:
            seen = list(self.split_labels)[self.splits[row]]
            raise ManifestError(
                f"{self.source}: {where}: image {record_id!r} is in split {split!r} "
                f"but {self.where[row]} put it in split {seen!r}"
            )
        return row

    def add_caption(self, where: str, row: int, text: Any) -> None:
        if not isinstance(text, str):
            raise ManifestError(f"{self.source}: {where}: caption must be a string, got {type(text).__name__}")
        text = text.strip()
        if not has_text(text):
            odd = " (only control characters)" if text else ""
            raise ManifestError(f"{self.source}: {where}: caption is empty{odd}")
        self.texts.append(text)
        self.caption_rows.append(row)
        self.has_caption[row] = True

    def finish(self, image_root: str, format: str) -> Manifest:
        if not self.ids:
            raise ManifestError(f"{self.source}: no images in the annotation file")
        for row, ok in enumerate(self.has_caption):
            if not ok:
                raise ManifestError(f"{self.source}: {self.where[row]}: image {self.ids[row]!r} has no captions")
        codes = narrow_codes(np.asarray(self.splits), len(self.split_labels))
        paths = StringColumn.from_strings(self.paths)
        ids = None if self.ids == self.paths else StringColumn.from_strings(self.ids)
        images = ImageTable(codes, list(self.split_labels), paths=paths, ids=ids)
        captions = CaptionTable(StringColumn.from_strings(self.texts), np.asarray(self.caption_rows, dtype=np.int64))
        return Manifest(images, captions, str(self.source), image_root, format)


def _refuse_odd_characters(source: Path, where: str, name: str, value: str | None) -> None:
    """Ids, paths and split labels name files and join rows: a control character or a lone surrogate in one is a
    broken annotation file, not something to guess a repair for."""
    if value is None:
        return
    odd = unusable_characters(value)
    if odd:
        raise ManifestError(f"{source}: {where}: {name} {value!r} contains {odd}")


def unusable_characters(value: str) -> str:
    """"the invalid character U+0007 (BELL)" when ``value`` holds a control character or a lone surrogate, else ""."""
    if value.isascii() and value.isprintable():  # most values: no search needed
        return ""
    bad = _CONTROL.search(value) or _SURROGATE.search(value)
    if not bad:
        return ""
    char = bad.group()
    label = unicodedata.name(char, "") if not _SURROGATE.match(char) else "lone surrogate"
    return f"the invalid character U+{ord(char):04X}{f' ({label})' if label else ''}"


def has_text(value: str) -> bool:
    """Whether a caption holds text once control characters are set aside."""
    return bool(_CONTROL.sub("", value).strip())


def _id_value(source: Path, where: str, name: str, value: Any) -> str | None:
    """An image id as text: strings and integers are ids; other JSON types are a mistake in the file."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ManifestError(f"{source}: {where}: field {name!r} must be a string or an integer, "
                            f"got {type(value).__name__} {value!r:.60}")
    text = str(value)
    if not text.strip():
        raise ManifestError(f"{source}: {where}: field {name!r} is empty")
    return text


def _check_path(source: Path, where: str, image_path: str) -> None:
    """Refuse relative paths that climb out of the image root: an annotation file must not reach elsewhere."""
    if os.path.isabs(image_path):
        return
    normalised = posixpath.normpath(image_path.replace("\\", "/"))
    if normalised == ".." or normalised.startswith("../"):
        raise ManifestError(f"{source}: {where}: image path {image_path!r} escapes the image root via '..'")


def _read_text(path: Path) -> str:
    """An annotation file's text (UTF-8, BOM tolerated); a one-line ManifestError otherwise."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read annotation file ({e.strerror or e})") from None


def load_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def json_format(path: Path, data: Any) -> str:
    if isinstance(data, dict) and "images" in data:
        return "karpathy"
    if isinstance(data, list):
        return "caption-json"
    kind = "an object without an 'images' key" if isinstance(data, dict) else f"a {type(data).__name__}"
    raise ManifestError(
        f"{path}: top level is {kind}; expected a Karpathy split object {{'images': [...]}} or a list of captions"
    )


def _text_field(source: Path, where: str, entry: dict[str, Any], name: str) -> str:
    value = entry.get(name)
    if value is None:
        raise ManifestError(f"{source}: {where}: missing field {name!r}")
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{source}: {where}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def _read_karpathy(path: Path, data: Any, builder: _Builder) -> None:
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ManifestError(f"{path}: expected a Karpathy split object whose 'images' is a list")
    for index, entry in enumerate(images):
        where = f"images[{index}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"{path}: {where}: expected an object, got {type(entry).__name__}")
        filename = _text_field(path, where, entry, "filename")
        folder = entry.get("filepath")
        image_path = f"{folder}/{filename}" if isinstance(folder, str) and folder else filename
        if entry.get("cocoid") is not None:
            image_id = _id_value(path, where, "cocoid", entry["cocoid"])
        elif entry.get("imgid") is not None:
            image_id = _id_value(path, where, "imgid", entry["imgid"])
        else:
            image_id = filename
        split = entry.get("split", "")
        if not isinstance(split, str):
            raise ManifestError(f"{path}: {where}: field 'split' must be a string, got {split!r}")
        # Karpathy's "restval" images are COCO val2014 images that the standard protocol trains on.
        split = "train" if split == "restval" else split
        sentences = entry.get("sentences")
        if sentences is None:
            raise ManifestError(f"{path}: {where}: missing field 'sentences'")
        if not isinstance(sentences, list):
            raise ManifestError(f"{path}: {where}: field 'sentences' must be a list")
        row = builder.add_image(where, image_id, image_path, split)
        for k, sentence in enumerate(sentences):
            if not isinstance(sentence, dict) or "raw" not in sentence:
                raise ManifestError(f"{path}: {where}.sentences[{k}]: missing field 'raw'")
            builder.add_caption(f"{where}.sentences[{k}]", row, sentence["raw"])


_SPLIT_WORDS = {
    "train": "train", "training": "train", "restval": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}


def split_from_filename(path: str | os.PathLike[str]) -> str:
    """Split named by a file's stem (``coco_karpathy_test.json`` -> "test"); "" when none or ambiguous."""
    words = re.split(r"[^a-z]+", Path(path).stem.lower())
    found = {_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS}
    return found.pop() if len(found) == 1 else ""


def _read_caption_json(path: Path, data: Any, builder: _Builder) -> None:
    if not isinstance(data, list):
        raise ManifestError(f"{path}: top level must be a list of caption entries, got {type(data).__name__}")
    default_split = split_from_filename(path)
    for index, entry in enumerate(data):
        where = f"entry {index}"
        if not isinstance(entry, dict):
            raise ManifestError(f"{path}: {where}: expected an object, got {type(entry).__name__}")
        field_name = "image" if "image" in entry else "image_path" if "image_path" in entry else None
        if field_name is None:
            raise ManifestError(f"{path}: {where}: missing field 'image' (or 'image_path')")
        image_path = _text_field(path, where, entry, field_name)
        image_id = _id_value(path, where, "image_id", entry.get("image_id"))
        split = entry.get("split", default_split)
        if not isinstance(split, str):
            raise ManifestError(f"{path}: {where}: field 'split' must be a string, got {split!r}")
        split = "train" if split == "restval" else split
        if "caption" not in entry:
            raise ManifestError(f"{path}: {where}: missing field 'caption'")
        captions = entry["caption"]
        if isinstance(captions, list):
            if not captions:
                raise ManifestError(f"{path}: {where}: field 'caption' is an empty list")
        else:
            captions = [captions]
        row = builder.add_image(where, image_id, image_path, split)
        for k, text in enumerate(captions):
            builder.add_caption(where if len(captions) == 1 else f"{where}.caption[{k}]", row, text)


def _read_csv(
    path: Path,
    builder: _Builder,
    image_column: str,
    caption_column: str,
    id_column: str | None,
    split_column: str | None,
) -> None:
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        delimiter = "\t"
    elif suffix == ".csv":
        delimiter = ","
    else:
        try:
            delimiter = csv.Sniffer().sniff(text[:65536], delimiters=",\t;|").delimiter
        except csv.Error:
            raise ManifestError(f"{path}: cannot tell the column delimiter; use a .csv or .tsv extension") from None
    # newline="" keeps line breaks inside quoted captions intact, as the csv module requires.
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = reader.fieldnames or []
    if not columns:
        raise ManifestError(f"{path}: empty file, expected a header row")
    wanted = [image_column, caption_column] + ([id_column] if id_column else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ManifestError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
            f"columns present: {', '.join(map(repr, columns))}"
        )
    use_split = split_column is not None and split_column in columns
    default_split = split_from_filename(path)
    for record in reader:
        where = f"line {reader.line_num}"
        image_path = record.get(image_column)
        if image_path is None or not image_path.strip():
            raise ManifestError(f"{path}: {where}: column {image_column!r} is empty")
        image_id = None
        if id_column:
            image_id = (record.get(id_column) or "").strip()
            if not image_id:
                raise ManifestError(f"{path}: {where}: column {id_column!r} is empty")
        split = (record.get(split_column) or "").strip() if use_split else default_split
        split = "train" if split == "restval" else split
        row = builder.add_image(where, image_id, image_path.strip(), split)
        builder.add_caption(where, row, record.get(caption_column) or "")
