"""Webdataset shard sources: which shards a source names, how a sample is laid out, and reading a member.

A source names tar shards as open_clip's ``--train-data`` and webdataset spell them:

- a brace pattern, ``data/train-{000000..000127}.tar`` (expanded by webdataset, ``${VAR}`` from ``WDS_VAR``);
- several patterns joined with ``::``;
- a single ``.tar``;
- a text file listing one shard (or pattern) per line; relative lines are relative to the list's folder, blank lines
  and ``#`` comments are ignored (the list may itself be at a URL);
- a folder in CLIP_benchmark's webdataset layout: ``ROOT/dataset_type.txt`` and, per split, ``ROOT/SPLIT/nshards.txt``
  with shards ``ROOT/SPLIT/0.tar`` … ``N-1.tar``; each split folder is one pattern labelled with its name, and a
  caption member holds one caption a line, a line break inside a caption written as a literal ``\\n``.

A shard is a local path, a URL (``s3://``, ``gs://``, ``http(s)://``, ``hf://``, read through fsspec) or a
``pipe:CMD`` whose standard output is the tar (webdataset's and open_clip's spelling: ``pipe:curl -s -L
https://host/train-{000000..000127}.tar``, braces expanded across the command); a compressed shard (``.tar.gz``,
``.tgz``, ``.tar.bz2``, ``.tar.xz``, ``.tar.zst``) is read too. All but plain local tars are fetched whole into the
shard cache and read from there (:mod:`pipeline.shard_cache`).

How a shard's samples become rows is :mod:`pipeline.shard_scan`; the rows of a source are cached by
:mod:`pipeline.manifest_index`. Rows follow shard order, then sample order inside a shard, so the samples of one shard
are one contiguous range of image rows and of caption rows (:func:`shard_row_ranges`), the unit a shuffled-shard
epoch order can visit.

One pattern is one split: its label is the split word (train, val, test and their synonyms) in the pattern's file
name, else in the name of the folder holding it, else none ("", which serves any split request). The manifest
fingerprint covers each image's ``SHARD_NAME/MEMBER`` (the shard's *file name*, not its folder, so a folder of shards
can move without invalidating its stores, while renaming a shard or re-encoding an image does), its id and split,
and every caption.

Every image read is one seek and one read of the member's bytes (:func:`read_member`), from the shard or its local
copy, so DataLoader workers and torchrun ranks read just the rows they are given.

Bad samples do not stop the reading: a sample without a caption, with an unreadable caption or id, or cut off by a
truncated tar is left out and listed in ``Manifest.skipped_samples`` (shard, key, reason), which the build refuses
unless ``--on-bad-image skip``. A sample without an image member stays a row whose image read fails (like a
missing image file), so it is a bad image for the build.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.annotations import split_from_filename
from pipeline.errors import ImageError, ManifestError
from pipeline.file_stat import FileStat
from pipeline.manifest_table import Manifest
from pipeline.shard_cache import COMPRESSED_SUFFIXES, is_pipe, is_remote, needs_cache, read_cached_member, shard_cache
from pipeline.shard_scan import ScanRules
from pipeline.tar_index import read_at
from teacher_cache.remote import RemoteLocation, is_url, redact_url

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# CLIP_benchmark's reader takes the first of these a sample holds (webdataset's to_tuple over a list of keys)
CLIP_BENCHMARK_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
DEFAULT_CAPTION_KEY = "txt"
_COMPRESSED = COMPRESSED_SUFFIXES
_SHARD_LIST_SUFFIXES = (".txt", ".lst")
_ENV_VAR = re.compile(r"\$\{(\w+)\}")
CLIP_BENCHMARK_TYPE = "dataset_type.txt"
CLIP_BENCHMARK_NSHARDS = "nshards.txt"
_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*:(//|[^/\\])", re.IGNORECASE)  # http://, s3://, pipe:, gs://, ...


@dataclass(frozen=True)
class ShardLayout:
    """Which members of a sample hold its image, its captions and (optionally) its image id."""

    image_key: str | None = None  # extension(s) of the image member, ";"- or ","-separated; None: jpg;jpeg;png;webp
    caption_key: str = DEFAULT_CAPTION_KEY  # extension of a text member (one caption per line) or "json:FIELD"
    id_field: str | None = None  # field of the json member holding the image id; None: the sample key

    def __post_init__(self) -> None:
        if self.caption_key is None or not str(self.caption_key).strip():
            raise ManifestError("--caption-key is empty; use an extension such as txt, or json:FIELD")
        if self.caption_key.startswith("json:") and not self.caption_key[5:].strip():
            raise ManifestError("--caption-key json: names no field; use json:FIELD, e.g. json:captions")
        if self.id_field is not None and not str(self.id_field).strip():
            raise ManifestError("--id-field is empty; name a field of the sample's json member, e.g. image_id")
        if not self.image_extensions:
            raise ManifestError(f"--image-key {self.image_key!r} names no extension; e.g. jpg or jpg;png")

    @property
    def image_extensions(self) -> tuple[str, ...]:
        if self.image_key is None:
            return IMAGE_EXTENSIONS
        return tuple(e.strip().lower().lstrip(".") for e in re.split(r"[;,]", self.image_key) if e.strip())

    @property
    def caption_json_field(self) -> str | None:
        return self.caption_key[5:].strip() if self.caption_key.startswith("json:") else None

    def to_dict(self) -> dict[str, Any]:
        return {"image_key": self.image_key, "caption_key": self.caption_key, "id_field": self.id_field}


@dataclass(frozen=True)
class ShardPattern:
    """One ``::``-separated part of a source: the text as given, its shards (paths) and its split label."""

    text: str
    shards: tuple[str, ...]
    split: str
    escaped_newlines: bool = False  # CLIP_benchmark's captions: a literal "\\n" is a line break inside a caption


@dataclass(frozen=True)
class ShardRows:
    """The contiguous rows of one shard's samples: images [image_start, image_stop), captions likewise."""

    shard: str
    image_start: int
    image_stop: int
    caption_start: int
    caption_stop: int


# ---------------------------------------------------------------------------------------------- sources
def is_shard_source(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names webdataset shards: a ``::`` list, a ``.tar`` (or brace pattern of them, compressed
    or not, local or at a URL), a ``pipe:`` command, a shard list at a URL, or a local text file whose every line
    names a ``.tar`` (a CSV/TSV ``.txt`` has a header row, which does not)."""
    text = str(source).strip()
    if "::" in text or is_pipe(text):
        return True
    if _without_query(text).lower().endswith((".tar", *_COMPRESSED)):
        return True
    if is_url(text):
        return _without_query(text).lower().endswith(_SHARD_LIST_SUFFIXES)
    path = Path(text)
    if path.is_dir():
        return (path / CLIP_BENCHMARK_TYPE).is_file() or (path / CLIP_BENCHMARK_NSHARDS).is_file()
    return path.suffix.lower() in _SHARD_LIST_SUFFIXES and path.is_file() and _lists_shards(path)


def _lists_shards(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            head = fh.read(1 << 16)
    except (OSError, UnicodeDecodeError):
        return False
    lines = _list_lines(head if len(head) < 1 << 16 else head.rsplit("\n", 1)[0])
    return bool(lines) and all(line.lower().endswith(".tar") for line in lines)


def _without_query(text: str) -> str:
    return text.split("?", 1)[0] if is_url(text) else text


def _list_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def parse_shard_source(source: str | os.PathLike[str]) -> list[ShardPattern]:
    """The patterns of a source with their expanded shard paths and split labels; ManifestError (one line) when a
    local shard is missing, a name is not a tar shard's, or a shard is listed twice. Shards at URLs are checked when
    their folder is listed (:mod:`pipeline.shard_cache`)."""
    text = str(source).strip()
    if not text:
        raise ManifestError("empty shard source; give a .tar, a brace pattern such as data/{000000..000009}.tar, "
                            "patterns joined with '::', or a text file listing one shard per line")
    patterns = []
    for part in text.split("::"):
        part = part.strip()
        if not part:
            raise ManifestError(f"{text}: empty pattern between '::' separators")
        patterns.extend(_parse_part(part))
    seen: dict[str, str] = {}
    for pattern in patterns:
        for shard in pattern.shards:
            key = redact_url(shard) if is_remote(shard) else os.path.realpath(shard)
            if key in seen:
                raise ManifestError(f"{text}: shard {shard} is listed twice (also by {seen[key]}); each shard may "
                                    "appear once in a source")
            seen[key] = pattern.text
    return patterns


def _parse_part(part: str) -> list[ShardPattern]:
    if part.lower().startswith("file://"):
        part = part[len("file://"):]
    if is_remote(part):
        return [_parse_pattern(part)]
    path = Path(part)
    if path.is_dir() and (path / CLIP_BENCHMARK_TYPE).is_file():
        return clip_benchmark_patterns(path)
    if path.is_dir() and (path / CLIP_BENCHMARK_NSHARDS).is_file():
        return [_clip_benchmark_split(path)]
    return [_parse_pattern(part)]


def clip_benchmark_patterns(root: Path) -> list[ShardPattern]:
    """One pattern per split folder of a CLIP_benchmark webdataset folder (``dataset_type.txt``: retrieval)."""
    try:
        kind = (root / CLIP_BENCHMARK_TYPE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{root / CLIP_BENCHMARK_TYPE}: cannot read it ({exc})") from None
    if kind != "retrieval":
        raise ManifestError(f"{root}: a CLIP_benchmark dataset of type {kind!r}; only retrieval datasets (image "
                            "and captions) can be read")
    splits = sorted(p for p in root.iterdir() if p.is_dir() and (p / CLIP_BENCHMARK_NSHARDS).is_file())
    if not splits:
        raise ManifestError(f"{root}: no split folder with a {CLIP_BENCHMARK_NSHARDS} (e.g. {root}/test/"
                            f"{CLIP_BENCHMARK_NSHARDS})")
    return [_clip_benchmark_split(p) for p in splits]


def _clip_benchmark_split(folder: Path) -> ShardPattern:
    try:
        n = int((folder / CLIP_BENCHMARK_NSHARDS).read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{folder / CLIP_BENCHMARK_NSHARDS}: expected a number of shards ({exc})") from None
    if n <= 0:
        raise ManifestError(f"{folder / CLIP_BENCHMARK_NSHARDS}: names {n} shards")
    shards = tuple(str(folder / f"{i}.tar") for i in range(n))
    for shard in shards:
        _check_shard(str(folder), shard)
    return ShardPattern(str(folder), shards, folder.name, escaped_newlines=True)


def _parse_pattern(part: str) -> ShardPattern:
    path = Path(_without_query(part))
    if path.suffix.lower() in _SHARD_LIST_SUFFIXES and "{" not in part and not is_pipe(part):
        lines = _list_lines(_read_list(part))
        if not lines:
            raise ManifestError(f"{redact_url(part)}: the shard list names no shards")
        shards: list[str] = []
        for line in lines:
            for shard in _expand(line):
                shards.append(shard if _REMOTE.match(shard) or os.path.isabs(shard) else _beside(part, shard))
        split = _split_of(path)
    else:
        shards = _expand(part)
        split = _split_of(path)
    for shard in shards:
        _check_shard(part, shard)
    return ShardPattern(part, tuple(shards), split)


def _read_list(part: str) -> str:
    """The text of a shard list file, local or at a URL."""
    if is_url(part):
        folder, _, name = _without_query(part).rpartition("/")
        query = part.partition("?")[2]
        location = RemoteLocation.open(f"{folder}?{query}" if query else folder)
        data = location.read_bytes(name, "a list of tar shards, one a line")
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{redact_url(part)}: cannot read the shard list ({exc})") from None
    path = Path(part)
    if not path.is_file():
        raise ManifestError(f"{part}: shard list file not found")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{part}: cannot read the shard list ({exc})") from None


def _beside(listing: str, shard: str) -> str:
    """A relative line of a shard list: relative to the list's folder (a URL's folder, its query kept)."""
    if not is_url(listing):
        return str(Path(listing).parent / shard)
    folder = _without_query(listing).rpartition("/")[0]
    query = listing.partition("?")[2]
    return f"{folder}/{shard}" + (f"?{query}" if query and "?" not in shard else "")


def _expand(pattern: str) -> list[str]:
    """A pattern's shards as webdataset (and so open_clip's ``--train-data``) expands it: ``${VAR}`` from the
    environment variable ``WDS_VAR`` (repeatedly), then braces: ``{000..127}`` ranges and ``{a,b}`` lists."""
    from braceexpand import braceexpand  # webdataset's own brace expansion, without importing webdataset (torch)

    for _ in range(10):
        missing = [m.group(1) for m in _ENV_VAR.finditer(pattern) if f"WDS_{m.group(1)}" not in os.environ]
        if missing:
            raise ManifestError(f"{pattern}: cannot expand the shard pattern (environment variable WDS_{missing[0]} "
                                "is not set)")
        expanded = _ENV_VAR.sub(lambda m: os.environ[f"WDS_{m.group(1)}"], pattern)
        if expanded == pattern:
            break
        pattern = expanded
    try:
        return [s for s in braceexpand(pattern) if s]
    except Exception as exc:  # an unbalanced brace and the like
        raise ManifestError(f"{pattern}: cannot expand the shard pattern ({exc})") from None


def _split_of(path: Path) -> str:
    """A pattern's split label: the split word in its file name, else in its folder's name, else none."""
    return split_from_filename(path.name) or (split_from_filename(path.parent.name) if path.parent.name else "")


def _check_shard(pattern: str, shard: str) -> None:
    where = f"{pattern}: shard {shard}" if shard != pattern else shard
    if is_pipe(shard):
        return  # a command's output is known once it has run
    if is_remote(shard):
        if not _without_query(shard).lower().endswith((".tar", *_COMPRESSED)):
            raise ManifestError(f"{redact_url(where)}: not a .tar shard (nor a compressed one, .tar.gz ...)")
        return  # found (or not) by the listing of its folder
    if not shard.lower().endswith((".tar", *_COMPRESSED)):
        raise ManifestError(f"{where}: not a .tar shard")
    if not os.path.exists(shard):
        raise ManifestError(f"{where}: shard not found")
    if os.path.isdir(shard):
        raise ManifestError(f"{where}: is a folder, not a tar shard")


def scan_rules(layout: ShardLayout, escaped_newlines: bool = False) -> ScanRules:
    """What :func:`pipeline.shard_scan.scan_shard` needs of a layout. A CLIP_benchmark split (``escaped_newlines``)
    without an explicit ``--image-key`` prefers image members in CLIP_benchmark's own order."""
    images = CLIP_BENCHMARK_IMAGE_EXTENSIONS if escaped_newlines and layout.image_key is None \
        else layout.image_extensions
    return ScanRules(images, layout.caption_key.lower().lstrip("."), layout.caption_json_field, layout.id_field,
                     escaped_newlines)


def shard_stats(shards: list[str]) -> list[FileStat]:
    """The version of each shard (local: name, size, modification time; at a URL: from its folder's listing;
    ``pipe:``: the command text), what the manifest index keys its entries by."""
    if not any(needs_cache(s) for s in shards):
        return [FileStat.of(s) for s in shards]
    return shard_cache().stats(shards)


def read_member(shard: str, offset: int, size: int, stat: FileStat | None = None) -> bytes:
    """The bytes of one member, by the offset and size its shard's index gave; ImageError if the shard changed.
    A shard at a URL, from a ``pipe:`` command or compressed is read from its local copy in the shard cache (of the
    version ``stat``, the indexed one), fetched whole first if need be."""
    if needs_cache(shard):
        return read_cached_member(shard, offset, size, stat)
    try:
        return read_at(shard, offset, size, shard)
    except OSError as exc:
        raise ImageError(f"{shard}: cannot read the shard ({exc.strerror or exc})") from None


def shard_row_ranges(manifest: Manifest) -> list[ShardRows]:
    """The image and caption rows of each shard of a shard manifest, in row order: each is one contiguous range.

    A shard's image range holds the images its samples introduced and its caption range every caption its samples
    hold (with ``id_field``, a sample repeating an image of an earlier shard adds captions only)."""
    spans: dict[str, list[int]] = {}
    members = manifest.images.shards
    if members is not None:
        for code, first, last in _runs(members.shard):
            spans.setdefault(members.shards[code], [first, last + 1, -1, -1])[1] = last + 1
    captions = manifest.captions
    if captions.shard_codes is not None:
        for code, first, last in _runs(captions.shard_codes):
            span = spans.setdefault(captions.shards[code], [0, 0, first, last + 1])
            if span[2] < 0:
                span[2] = first
            span[3] = last + 1
    return [ShardRows(shard, a, b, max(c, 0), max(d, 0)) for shard, (a, b, c, d) in spans.items()]


def _runs(codes: np.ndarray) -> list[tuple[int, int, int]]:
    """(code, first row, last row) of each code, in order of first appearance."""
    if not len(codes):
        return []
    values, first = np.unique(codes, return_index=True)
    last = len(codes) - 1 - np.unique(codes[::-1], return_index=True)[1]
    order = np.argsort(first)
    return [(int(values[i]), int(first[i]), int(last[i])) for i in order]
