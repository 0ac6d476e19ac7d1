"""Webdataset shards read into the canonical `Manifest`, without extracting them.

A source names tar shards as open_clip's ``--train-data`` and webdataset spell them:

- a brace pattern, ``data/train-{000000..000127}.tar`` (expanded by webdataset, ``${VAR}`` from ``WDS_VAR``);
- several patterns joined with ``::``;
- a single ``.tar``;
- a text file listing one shard (or pattern) per line; relative lines are relative to the list's folder, blank lines
  and ``#`` comments are ignored.

A sample is the members of a shard that share a key (webdataset's rule: the member name up to the first dot of its
base name; consecutive members with the same key form one sample; ``__*__`` metadata members are ignored). Its
image is the first member present among ``ShardLayout.image_key`` (default jpg, jpeg, png, webp); its captions are
the non-empty lines of the ``txt`` member, or the list of strings under a field of the ``json`` member
(``caption_key="json:FIELD"``). The image id is the sample key, or with ``id_field`` a field of the ``json`` member:
samples with the same id are then one image, as img2dataset writes a repeated image once per caption.

Rows follow shard order, then sample order inside a shard, so the samples of one shard are one contiguous range of
image rows and of caption rows (:func:`shard_row_ranges`), the unit a shuffled-shard epoch order can visit.

One pattern is one split: its label is the split word (train, val, test and their synonyms) in the pattern's file
name, else in the name of the folder holding it, else none ("", which serves any split request). The manifest
fingerprint covers each image's ``SHARD_NAME/MEMBER`` (the shard's *file name*, not its folder, so a folder of shards
can move without invalidating its stores, while renaming a shard or re-encoding an image does), its id and split,
and every caption.

The shard index (member names, offsets and sizes) is read once, when the manifest is read, with wids' indexed tar
reader; only the caption and json members are read then. Every later image read is one seek and one read of the
member's bytes (:func:`read_member`), so DataLoader workers and torchrun ranks read just the rows they are given.

Bad samples do not stop the reading: a sample without a caption, with an unreadable caption or id, or cut off by a
truncated tar is left out and listed in ``Manifest.skipped_samples`` (shard, key, reason), which the build refuses
unless ``--on-bad-image skip``. A sample without an image member stays a row whose image read fails (like a
missing image file), so it is a bad image for the build.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ImageError, ManifestError
from pipeline.manifest import (CaptionRecord, ImageRecord, Manifest, ShardMember, split_from_filename,
                               unusable_characters)

FORMAT = "webdataset"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEFAULT_CAPTION_KEY = "txt"
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default: metadata members, never sample members
_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_SHARD_LIST_SUFFIXES = (".txt", ".lst")
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
    """Whether ``source`` names webdataset shards: a ``::`` list, a ``.tar`` (or brace pattern of them), or a text
    file whose every line names a ``.tar`` (a CSV/TSV ``.txt`` has a header row, which does not)."""
    text = str(source).strip()
    if "::" in text:
        return True
    if text.lower().endswith((".tar", *_COMPRESSED)):
        return True
    path = Path(text)
    return path.suffix.lower() in _SHARD_LIST_SUFFIXES and path.is_file() and _lists_shards(path)


def _lists_shards(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            head = fh.read(1 << 16)
    except (OSError, UnicodeDecodeError):
        return False
    lines = _list_lines(head if len(head) < 1 << 16 else head.rsplit("\n", 1)[0])
    return bool(lines) and all(line.lower().endswith(".tar") for line in lines)


def _list_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def parse_shard_source(source: str | os.PathLike[str]) -> list[ShardPattern]:
    """The patterns of a source with their expanded shard paths and split labels; ManifestError (one line) when a
    shard is missing, remote, compressed or listed twice."""
    text = str(source).strip()
    if not text:
        raise ManifestError("empty shard source; give a .tar, a brace pattern such as data/{000000..000009}.tar, "
                            "patterns joined with '::', or a text file listing one shard per line")
    patterns = []
    for part in text.split("::"):
        part = part.strip()
        if not part:
            raise ManifestError(f"{text}: empty pattern between '::' separators")
        patterns.append(_parse_pattern(part))
    seen: dict[str, str] = {}
    for pattern in patterns:
        for shard in pattern.shards:
            key = os.path.realpath(shard)
            if key in seen:
                raise ManifestError(f"{text}: shard {shard} is listed twice (also by {seen[key]}); each shard may "
                                    "appear once in a source")
            seen[key] = pattern.text
    return patterns


def _parse_pattern(part: str) -> ShardPattern:
    path = Path(part)
    if path.suffix.lower() in _SHARD_LIST_SUFFIXES and "{" not in part:
        if not path.is_file():
            raise ManifestError(f"{part}: shard list file not found")
        try:
            lines = _list_lines(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{part}: cannot read the shard list ({exc})") from None
        if not lines:
            raise ManifestError(f"{part}: the shard list names no shards")
        shards: list[str] = []
        for line in lines:
            for shard in _expand(line):
                shards.append(shard if _REMOTE.match(shard) or os.path.isabs(shard) else str(path.parent / shard))
        split = _split_of(path)
    else:
        shards = _expand(part)
        split = _split_of(Path(part))
    for shard in shards:
        _check_shard(part, shard)
    return ShardPattern(part, tuple(shards), split)


def _expand(pattern: str) -> list[str]:
    # webdataset's own expansion (the one open_clip's --train-data goes through): ${VAR} from WDS_VAR, then braces
    from webdataset.shardlists import expand_urls

    try:
        return [s for s in expand_urls(pattern) if s]
    except Exception as exc:  # an unbalanced brace and the like
        raise ManifestError(f"{pattern}: cannot expand the shard pattern ({exc})") from None


def _split_of(path: Path) -> str:
    """A pattern's split label: the split word in its file name, else in its folder's name, else none."""
    return split_from_filename(path.name) or (split_from_filename(path.parent.name) if path.parent.name else "")


def _check_shard(pattern: str, shard: str) -> None:
    where = f"{pattern}: shard {shard}" if shard != pattern else shard
    if _REMOTE.match(shard) and not os.path.exists(shard):
        raise ManifestError(f"{where}: remote shards are not read yet; copy the shards to a local folder")
    if shard.lower().endswith(_COMPRESSED):
        raise ManifestError(f"{where}: compressed shards are not supported (members are read in place); "
                            "decompress them into plain .tar files")
    if not shard.lower().endswith(".tar"):
        raise ManifestError(f"{where}: not a .tar shard")
    if not os.path.exists(shard):
        raise ManifestError(f"{where}: shard not found")
    if os.path.isdir(shard):
        raise ManifestError(f"{where}: is a folder, not a tar shard")


def shard_name(shard: str) -> str:
    """The name a shard has in image paths and so in the manifest fingerprint: its file name."""
    return os.path.basename(shard)


# ---------------------------------------------------------------------------------------------- one shard
@dataclass
class ShardIndex:
    """Regular-file members of one shard in archive order, and what (if anything) is wrong with the archive."""

    shard: str
    names: list[str]
    offsets: np.ndarray  # int64 byte offset of each member's data
    sizes: np.ndarray  # int64 member sizes
    file_size: int
    damage: str = ""  # "" for a sound archive; else why the index stops early (truncated, corrupt, not a tar)


@functools.lru_cache(maxsize=1)
def _indexing_reader():
    """wids' tar indexer, made to keep the members it read before a damaged part instead of losing them all."""
    from wids.wids_tar import TarFileReader

    class PartialTarIndex(TarFileReader):
        damage = ""

        def _create_tar_index(self):
            try:
                super()._create_tar_index()
            except (tarfile.TarError, EOFError, OSError) as exc:
                # the members before the damage stay listed in self.fnames / self.index
                self.damage = str(exc) or type(exc).__name__

    return PartialTarIndex


def read_shard_index(shard: str) -> ShardIndex:
    """Index one shard with wids (no index file is written next to it). A shard that is not a tar at all, is empty
    or is compressed is a ManifestError; a damaged one keeps the members before the damage, with ``damage`` set."""
    size = os.path.getsize(shard)
    if size == 0:
        raise ManifestError(f"{shard}: empty file, not a tar shard")
    try:
        reader = _indexing_reader()(shard, index_file=None, verbose=False)
    except tarfile.ReadError as exc:
        raise ManifestError(f"{shard}: not a tar archive ({exc})") from None
    except OSError as exc:
        raise ManifestError(f"{shard}: cannot read the shard ({exc.strerror or exc})") from None
    try:
        if getattr(reader.tar_file, "fileobj", None) is not None and \
                type(reader.tar_file.fileobj).__name__ not in ("BufferedReader", "FileIO"):
            raise ManifestError(f"{shard}: a compressed tar; members are read in place, so decompress the shards "
                                "into plain .tar files")
        names = list(reader.fnames)
        index = np.asarray(reader.index, dtype=np.int64).reshape(-1, 2)
        damage = reader.damage
    finally:
        reader.close()
    if not names and damage:
        raise ManifestError(f"{shard}: not a readable tar archive ({damage})")
    offsets, sizes = index[:, 0].copy(), index[:, 1].copy()
    cut = np.flatnonzero(offsets + sizes > size)
    if len(cut):
        first = int(cut[0])
        damage = damage or "unexpected end of data"
        damage = f"truncated tar: ends inside member {names[first]!r} ({damage})"
        names, offsets, sizes = names[:first + 1], offsets[:first + 1], sizes[:first + 1]
    elif damage:
        damage = f"truncated or corrupt tar after member {names[-1]!r} ({damage})"
    return ShardIndex(shard, names, offsets, sizes, size, damage)


def read_member(shard: str, offset: int, size: int) -> bytes:
    """The bytes of one member, by the offset and size its shard's index gave; ImageError if the shard changed."""
    try:
        with open(shard, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
    except OSError as exc:
        raise ImageError(f"{shard}: cannot read the shard ({exc.strerror or exc})") from None
    if len(data) != size:
        raise ImageError(f"{shard}: the shard is shorter than when it was indexed ({len(data)} of {size} bytes at "
                         f"offset {offset}); was it changed or truncated since?")
    return data


@dataclass
class _Sample:
    key: str
    members: dict[str, int]  # lower-cased extension -> position in the shard index
    names: dict[str, str]  # lower-cased extension -> member name as stored
    problem: str = ""


def _samples(index: ShardIndex) -> list[_Sample]:
    """Members grouped into samples as webdataset groups them: consecutive members with the same key."""
    from webdataset.tariterators import base_plus_ext

    samples: list[_Sample] = []
    for position, name in enumerate(index.names):
        if _SKIP_META.match(name) or (name.startswith("__") and name.endswith("__") and "/" not in name):
            continue
        key, ext = base_plus_ext(name)
        if key is None:
            continue  # no extension: not part of any sample (webdataset skips these too)
        ext = ext.lower()
        if not samples or samples[-1].key != key:
            samples.append(_Sample(key, {}, {}))
        sample = samples[-1]
        if ext in sample.members:
            sample.problem = sample.problem or f"two members named {name!r} in one sample"
            continue
        sample.members[ext] = position
        sample.names[ext] = name
    return samples


# ---------------------------------------------------------------------------------------------- manifest
def read_shard_manifest(source: str | os.PathLike[str], layout: ShardLayout | None = None) -> Manifest:
    """Read a shard source into a Manifest (format "webdataset"); see the module docstring for the rules."""
    layout = layout or ShardLayout()
    text = str(source).strip()
    patterns = parse_shard_source(text)
    builder = _ShardManifestBuilder(text, layout)
    for pattern in patterns:
        for shard in pattern.shards:
            builder.add_shard(shard, pattern.split)
    return builder.finish()


class _ShardManifestBuilder:
    def __init__(self, source: str, layout: ShardLayout):
        self.source = source
        self.layout = layout
        self.images: list[ImageRecord] = []
        self.captions: list[CaptionRecord] = []
        self.skipped: list[dict] = []
        self.row_of_id: dict[str, int] = {}
        self.first_seen: list[str] = []  # "shard key" of each image row, for conflict messages

    def add_shard(self, shard: str, split: str) -> None:
        index = read_shard_index(shard)
        samples = _samples(index)
        if not samples and not index.damage:
            self.skipped.append({"shard": shard, "key": "", "split": split,
                                 "reason": "no samples in the shard (no member named KEY.EXT)"})
            return
        with open(shard, "rb") as fh:
            for i, sample in enumerate(samples):
                cut = bool(index.damage) and i == len(samples) - 1  # its later members may be missing
                problem = sample.problem or (index.damage if cut else "")
                captions, image_id = [], sample.key
                if not problem:
                    problem, captions, image_id = self._read_text_members(fh, index, sample)
                if problem:
                    self.skipped.append({"shard": shard, "key": sample.key, "split": split, "reason": problem})
                    continue
                self._add(shard, split, sample, index, captions, image_id)
        if index.damage and not samples:
            self.skipped.append({"shard": shard, "key": "", "split": split, "reason": index.damage})

    def _read_text_members(self, fh, index: ShardIndex, sample: _Sample) -> tuple[str, list[str], str]:
        """(problem, captions, image id) of a sample; problem is "" when it can be a row."""
        layout = self.layout
        wants_json = layout.caption_json_field is not None or layout.id_field is not None
        meta: Any = None
        if wants_json:
            if "json" not in sample.members:
                return f"no json member (members: {', '.join(sorted(sample.names.values()))})", [], ""
            try:
                meta = json.loads(_member_bytes(fh, index, sample.members["json"]).decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                return f"{sample.names['json']}: not valid UTF-8 JSON ({exc})", [], ""
            if not isinstance(meta, dict):
                return f"{sample.names['json']}: expected a JSON object, got {type(meta).__name__}", [], ""
        field = layout.caption_json_field
        if field is not None:
            value = meta.get(field)
            if value is None:
                return f"{sample.names['json']}: no field {field!r}", [], ""
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                return f"{sample.names['json']}: field {field!r} must be a string or a list of strings", [], ""
            captions = [v.strip() for v in values]
            where = f"{sample.names['json']} field {field!r}"
        else:
            ext = layout.caption_key.lower().lstrip(".")
            if ext not in sample.members:
                present = ", ".join(sorted(sample.names.values()))
                return f"no caption member {sample.key}.{ext} (members: {present})", [], ""
            try:
                text = _member_bytes(fh, index, sample.members[ext]).decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                return f"{sample.names[ext]}: not UTF-8 text (byte {exc.start})", [], ""
            captions = [line.strip() for line in re.split(r"\r\n|\n|\r", text)]  # line breaks only
            where = sample.names[ext]
        captions = [c for c in captions if _has_text(c)]
        if not captions:
            return f"{where}: holds no caption", [], ""
        image_id = sample.key
        if layout.id_field is not None:
            value = meta.get(layout.id_field)
            if value is None or isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
                got = "missing" if value is None else f"{value!r:.40}"
                return (f"{sample.names['json']}: field {layout.id_field!r} must be a non-empty string or an "
                        f"integer, got {got}"), [], ""
            image_id = str(value)
        for name, value in (("sample key", sample.key), ("image id", image_id)):
            odd = unusable_characters(value)
            if odd:
                return f"{name} {value!r} contains {odd}", [], ""
        return "", captions, image_id

    def _add(self, shard: str, split: str, sample: _Sample, index: ShardIndex, captions: list[str],
             image_id: str) -> None:
        member = self._image_member(shard, sample, index)
        path = f"{shard_name(shard)}/{member.name or sample.key}"
        row = self.row_of_id.get(image_id) if self.layout.id_field is not None else None
        if row is None:
            row = len(self.images)
            self.images.append(ImageRecord(image_id, path, split, member))
            self.first_seen.append(f"{shard} sample {sample.key!r}")
            if self.layout.id_field is not None:
                self.row_of_id[image_id] = row
        else:
            seen = self.images[row]
            if seen.split != split:
                raise ManifestError(f"{shard}: sample {sample.key!r}: image id {image_id!r} is in split {split!r} "
                                    f"but {self.first_seen[row]} put it in split {seen.split!r}")
            if seen.member is not None and seen.member.missing and not member.missing:
                self.images[row] = ImageRecord(image_id, path, split, member)  # the first sample that has the image
        self.captions.extend(CaptionRecord(text, row, shard) for text in captions)

    def _image_member(self, shard: str, sample: _Sample, index: ShardIndex) -> ShardMember:
        for ext in self.layout.image_extensions:
            if ext in sample.members:
                position = sample.members[ext]
                return ShardMember(shard, sample.key, sample.names[ext], int(index.offsets[position]),
                                   int(index.sizes[position]))
        wanted = ", ".join(f".{e}" for e in self.layout.image_extensions)
        present = ", ".join(sorted(sample.names.values()))
        return ShardMember(shard, sample.key, "", -1, 0,
                           missing=f"no image member ({wanted}; choose with --image-key); members: {present}")

    def finish(self) -> Manifest:
        if not self.images:
            first = f"; the first left out: {describe_skipped(self.skipped[0])}" if self.skipped else ""
            raise ManifestError(f"{self.source}: no usable samples in the shards{first}")
        return Manifest(self.images, self.captions, self.source, "", FORMAT, skipped_samples=self.skipped)


def describe_skipped(record: dict) -> str:
    """One line naming a left-out sample: "SHARD: sample 'KEY': REASON" (or "SHARD: REASON" for a whole shard)."""
    sample = f"sample {record['key']!r}: " if record.get("key") else ""
    return f"{record['shard']}: {sample}{record['reason']}"


def _member_bytes(fh, index: ShardIndex, position: int) -> bytes:
    fh.seek(int(index.offsets[position]))
    return fh.read(int(index.sizes[position]))


def _has_text(caption: str) -> bool:
    return bool(re.sub(r"[\x00-\x1f\x7f-\x9f]", "", caption).strip())


def shard_row_ranges(manifest: Manifest) -> list[ShardRows]:
    """The image and caption rows of each shard of a shard manifest, in row order: each is one contiguous range.

    A shard's image range holds the images its samples introduced and its caption range every caption its samples
    hold (with ``id_field``, a sample repeating an image of an earlier shard adds captions only)."""
    spans: dict[str, list[int]] = {}
    for row, record in enumerate(manifest.images):
        if record.member is not None:
            span = spans.setdefault(record.member.shard, [row, row + 1, -1, -1])
            span[1] = row + 1
    for row, caption in enumerate(manifest.captions):
        if caption.shard is not None:
            span = spans.setdefault(caption.shard, [0, 0, row, row + 1])
            if span[2] < 0:
                span[2] = row
            span[3] = row + 1
    return [ShardRows(shard, a, b, max(c, 0), max(d, 0)) for shard, (a, b, c, d) in spans.items()]
