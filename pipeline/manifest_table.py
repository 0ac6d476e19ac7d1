"""The canonical `Manifest`: images and captions in a fixed row order, held as columns.

A manifest fixes the row order of images and captions; every later artifact (the teacher store, the neighbor table,
training batches) is indexed by these rows, and its fingerprint ties them together. Its columns are numpy arrays and
:class:`~pipeline.columns.StringColumn` s (ids, paths, caption texts each one buffer plus offsets), so a manifest of
millions of rows costs a few tens of bytes a row beyond its caption text, and one opened from its on-disk index
(:mod:`pipeline.manifest_index`) is memory-mapped. ``manifest.images[row]`` and ``manifest.captions[j]`` still give
an :class:`ImageRecord` / :class:`CaptionRecord`, made when asked for.

Fingerprint (format 2): the rows are cut into blocks (one per shard of a shard source, one for an annotation file),
each block hashed on its own (ids, paths, splits, caption texts and each caption's image row relative to the block's
first image row); the fingerprint hashes the blocks' row counts and digests in order. A changed shard therefore
costs its own rehash only, and an indexed source's fingerprint is read, not computed. Format 1 (one hash over every
row as JSON) is still computed for stores built before, by :meth:`Manifest.fingerprint` with ``version=1``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from pipeline.columns import StringColumn, strings_from_codes
from pipeline.errors import ManifestError

if TYPE_CHECKING:
    from pipeline.file_stat import FileStat

FINGERPRINT_VERSION = 2
_V1_TAG = "cusa-manifest-v1"
_V2_TAG = b"cusa-manifest-v2\n"


@dataclass(frozen=True)
class ShardMember:
    """Where the bytes of an image held in a tar shard are: the shard's path, the sample key, the member's name, and
    its data offset and size in the shard (from the shard's index). ``missing`` says why a sample has no image.
    ``stat``: the version of a shard read through the shard cache (at a URL, a ``pipe:`` command, compressed) that was
    indexed, so its local copy is that version's; None for a plain local shard."""

    shard: str
    key: str
    name: str
    offset: int
    size: int
    missing: str = ""
    stat: "FileStat | None" = None


@dataclass(frozen=True)
class ImageRecord:
    """One image: its id, its path as written in the annotation file, and its split label.

    An image inside a webdataset shard has ``path`` ``SHARD_NAME/MEMBER`` and ``member`` telling where its bytes are;
    ``member`` is not part of the fingerprint (the shard's folder may move).
    """

    image_id: str
    path: str
    split: str
    member: ShardMember | None = None


@dataclass(frozen=True)
class CaptionRecord:
    """One caption and the row (index into ``Manifest.images``) of the image it describes; ``shard``: the shard
    whose sample held it (webdataset sources)."""

    text: str
    image_row: int
    shard: str | None = None


@dataclass(frozen=True)
class Block:
    """Contiguous image rows [image_start, image_stop) and caption rows [caption_start, caption_stop) hashed as one
    term of the fingerprint (a shard, or a whole annotation file); ``digest`` is "" until computed."""

    image_start: int
    image_stop: int
    caption_start: int
    caption_stop: int
    digest: str = ""


# ---------------------------------------------------------------------------------------------- columns
def _split_codes(labels_of_rows: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    labels: dict[str, int] = {}
    codes = np.fromiter((labels.setdefault(s, len(labels)) for s in labels_of_rows), dtype=np.int64,
                        count=len(labels_of_rows))
    return narrow_codes(codes, len(labels)), list(labels)


def narrow_codes(codes: np.ndarray, n: int) -> np.ndarray:
    """Codes into a table of ``n`` labels in the narrowest unsigned type that holds them."""
    return codes.astype(np.uint8 if n <= 256 else np.uint16 if n <= 65536 else np.int32)


@dataclass
class ShardColumns:
    """Where each image row's bytes are in its shard: the shard (a number into ``shards``), the sample key, the
    member's extension as stored (a code into ``ext_table``, 0 when the sample has no image member), its data offset
    and size; ``missing``: rows without an image member and why; ``stats``: the indexed version of each shard read
    through the shard cache (see ``ShardMember.stat``)."""

    shards: list[str]
    shard: np.ndarray  # int32
    keys: StringColumn
    ext: np.ndarray  # uint8/uint16
    ext_table: list[str]  # ext_table[0] == ""
    offset: np.ndarray  # int64
    size: np.ndarray  # int64
    missing: dict[int, str] = field(default_factory=dict)
    stats: dict[str, "FileStat"] = field(default_factory=dict)

    def take(self, rows: np.ndarray) -> "ShardColumns":
        missing = {}
        if self.missing:
            at = np.flatnonzero(np.isin(rows, np.fromiter(self.missing, dtype=np.int64, count=len(self.missing))))
            missing = {int(i): self.missing[int(rows[i])] for i in at}
        return ShardColumns(self.shards, self.shard[rows], self.keys.take(rows), self.ext[rows], self.ext_table,
                            self.offset[rows], self.size[rows], missing, self.stats)

    def member_name(self, row: int) -> str:
        ext = self.ext_table[int(self.ext[row])]
        return f"{self.keys.value(row)}.{ext}" if ext else ""

    def path(self, row: int) -> str:
        name = self.member_name(row) or self.keys.value(row)
        return f"{shard_file_name(self.shards[int(self.shard[row])])}/{name}"

    def member(self, row: int) -> ShardMember:
        shard = self.shards[int(self.shard[row])]
        return ShardMember(shard, self.keys.value(row), self.member_name(row),
                           int(self.offset[row]) if int(self.ext[row]) else -1, int(self.size[row]),
                           self.missing.get(row, ""), self.stats.get(shard))


_TAR_WORD = re.compile(r"\.(tar|tgz)(\.[a-z0-9]+)?([?#]|$)", re.IGNORECASE)


def shard_file_name(shard: str) -> str:
    """The name a shard has in image paths and so in the fingerprint: the last part of its path or URL (without a
    URL's query, which may hold a token); for a ``pipe:`` command, that of its last word naming a tar file (``pipe:curl
    -s https://host/data/train-000001.tar`` is ``train-000001.tar``), so a source reads alike whichever way it is
    reached."""
    text = shard.strip()
    if text.startswith("pipe:"):
        words = [w.strip("'\"") for w in text[5:].split()]
        named = [w for w in words if _TAR_WORD.search(w)]
        text = named[-1] if named else text[5:].strip()
    if "://" in text:
        text = text.split("?", 1)[0].split("#", 1)[0]
    return text.rstrip("/").rsplit("/", 1)[-1]


class _Rows(Sequence):
    """A table's rows as a read-only sequence of records made on demand (``record(i)``), comparable to a list."""

    _what = "row"

    def record(self, i: int):
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.record(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self._what} {i} of {n}")
        return self.record(i)

    def __iter__(self) -> Iterator:
        return (self.record(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, type(self))):
            return len(other) == len(self) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class ImageTable(_Rows):
    """Image rows as columns: ids, paths (written, or for shard members derived from shard name, key and
    extension), split labels (codes into ``split_labels``) and, for shard sources, where the bytes are."""

    _what = "image row"

    def __init__(self, split_codes: np.ndarray, split_labels: list[str], *, paths: StringColumn | None = None,
                 ids: StringColumn | None = None, shards: ShardColumns | None = None):
        if (paths is None) == (shards is None):
            raise ValueError("an image table has written paths or shard members, not both")
        self.split_codes = split_codes
        self.split_labels = split_labels
        self.paths_written = paths
        self.ids_written = ids  # None: the id is the path (annotation files) or the sample key (shards)
        self.shards = shards

    @classmethod
    def from_records(cls, records: Sequence[ImageRecord]) -> "ImageTable":
        records = list(records)
        codes, labels = _split_codes([r.split for r in records])
        members = [r.member for r in records]
        if records and all(m is not None for m in members):
            shards: dict[str, int] = {}
            shard = np.fromiter((shards.setdefault(m.shard, len(shards)) for m in members), np.int32, len(members))
            exts: dict[str, int] = {"": 0}
            ext = [exts.setdefault(m.name[len(m.key) + 1:] if m.name else "", len(exts)) for m in members]
            missing = {row: m.missing for row, m in enumerate(members) if m.missing}
            columns = ShardColumns(list(shards), shard, StringColumn.from_strings(m.key for m in members),
                                   narrow_codes(np.asarray(ext, dtype=np.int64), len(exts)), list(exts),
                                   np.array([m.offset for m in members], dtype=np.int64),
                                   np.array([m.size for m in members], dtype=np.int64), missing)
            table = cls(codes, labels, shards=columns)
            if any(r.image_id != m.key for r, m in zip(records, members)):
                table.ids_written = StringColumn.from_strings(r.image_id for r in records)
            return table
        paths = StringColumn.from_strings(r.path for r in records)
        same = all(r.image_id == r.path for r in records)
        return cls(codes, labels, paths=paths, ids=None if same else StringColumn.from_strings(r.image_id
                                                                                           for r in records))

    def __len__(self) -> int:
        return len(self.split_codes)

    def record(self, row: int) -> ImageRecord:
        return ImageRecord(self.image_id(row), self.path(row), self.split(row),
                           self.shards.member(row) if self.shards is not None else None)

    def image_id(self, row: int) -> str:
        if self.ids_written is not None:
            return self.ids_written.value(row)
        return self.paths_written.value(row) if self.shards is None else self.shards.keys.value(row)

    def path(self, row: int) -> str:
        return self.paths_written.value(row) if self.shards is None else self.shards.path(row)

    def split(self, row: int) -> str:
        return self.split_labels[int(self.split_codes[row])]

    def member(self, row: int) -> ShardMember | None:
        return None if self.shards is None else self.shards.member(row)

    def ids(self) -> StringColumn:
        if self.ids_written is not None:
            return self.ids_written
        return self.paths_written if self.shards is None else self.shards.keys

    def paths(self) -> StringColumn:
        """Every path as a column (for shard members built here, one row at a time: for builds and small sets)."""
        if self.shards is None:
            return self.paths_written
        return StringColumn.from_strings(self.shards.path(r) for r in range(len(self)))

    def splits(self) -> StringColumn:
        return strings_from_codes(self.split_codes, self.split_labels)

    def take(self, rows: np.ndarray) -> "ImageTable":
        rows = np.asarray(rows, dtype=np.int64)
        return ImageTable(self.split_codes[rows], self.split_labels,
                          paths=None if self.paths_written is None else self.paths_written.take(rows),
                          ids=None if self.ids_written is None else self.ids_written.take(rows),
                          shards=None if self.shards is None else self.shards.take(rows))

    def hash_into(self, digest, start: int, stop: int) -> None:
        """Feed rows [start, stop) to a fingerprint digest: ids, paths and split labels."""
        if self.shards is None:
            digest.update(b"images:ids,paths,splits\n")
            self.ids().hash_into(digest, start, stop)
            self.paths_written.hash_into(digest, start, stop)
        else:
            # a member's path is SHARD_NAME/KEY.EXT: hashing its parts covers it without building it
            s = self.shards
            digest.update(b"shard-images:ids?,shard names,keys,extensions,splits\n")
            if self.ids_written is not None:
                self.ids_written.hash_into(digest, start, stop)
            names = [shard_file_name(p) for p in s.shards]
            strings_from_codes(s.shard[start:stop], names).hash_into(digest)
            s.keys.hash_into(digest, start, stop)
            strings_from_codes(s.ext[start:stop], s.ext_table).hash_into(digest)
        strings_from_codes(self.split_codes[start:stop], self.split_labels).hash_into(digest)


class CaptionTable(_Rows):
    """Caption rows as columns: texts, the image row of each, and (shard sources) the shard that held it."""

    _what = "caption row"

    def __init__(self, texts: StringColumn, image_rows: np.ndarray, shard_codes: np.ndarray | None = None,
                 shards: list[str] | None = None):
        self.texts = texts
        self.image_rows = np.asarray(image_rows, dtype=np.int64)
        self.shard_codes = shard_codes
        self.shards = shards

    @classmethod
    def from_records(cls, records: Sequence[CaptionRecord]) -> "CaptionTable":
        records = list(records)
        rows = np.fromiter((c.image_row for c in records), dtype=np.int64, count=len(records))
        codes = shards = None
        if records and records[0].shard is not None:
            names: dict[str, int] = {}
            codes = np.fromiter((names.setdefault(str(c.shard), len(names)) for c in records), np.int32, len(rows))
            shards = list(names)
        return cls(StringColumn.from_strings(c.text for c in records), rows, codes, shards)

    def __len__(self) -> int:
        return len(self.image_rows)

    def record(self, j: int) -> CaptionRecord:
        shard = self.shards[int(self.shard_codes[j])] if self.shard_codes is not None else None
        return CaptionRecord(self.texts.value(j), int(self.image_rows[j]), shard)

    def text(self, j: int) -> str:
        return self.texts.value(j)

    def take(self, rows: np.ndarray, image_rows: np.ndarray) -> "CaptionTable":
        """Captions ``rows`` with the given (renumbered) image rows."""
        codes = None if self.shard_codes is None else self.shard_codes[rows]
        return CaptionTable(self.texts.take(rows), image_rows, codes, self.shards)

    def hash_into(self, digest, start: int, stop: int, image_start: int) -> None:
        digest.update(b"captions:texts,image rows from the block's first\n")
        self.texts.hash_into(digest, start, stop)
        digest.update((self.image_rows[start:stop] - image_start).astype("<i8").tobytes())


# ---------------------------------------------------------------------------------------------- manifest
class Manifest:
    """Images and captions in a fixed row order, plus where they came from.

    ``images`` and ``captions`` may be given as lists of records (small sets, tests) or as tables; ``blocks`` cut the
    rows for the fingerprint (default: one block); ``fingerprints`` holds ones already known (from an index):
    ``{"": whole, SPLIT: of that split}``.
    """

    def __init__(self, images: ImageTable | Sequence[ImageRecord], captions: CaptionTable | Sequence[CaptionRecord],
                 source: str, image_root: str, format: str, skipped_samples: list[dict] | None = None,
                 blocks: list[Block] | None = None, fingerprints: dict[str, str] | None = None):
        self.images = images if isinstance(images, ImageTable) else ImageTable.from_records(images)
        self.captions = captions if isinstance(captions, CaptionTable) else CaptionTable.from_records(captions)
        self.source = source
        self.image_root = image_root
        self.format = format
        # samples of a shard source left out while reading (no caption, truncated tar, ...): {shard, key, split, reason}
        self.skipped_samples: list[dict] = list(skipped_samples or [])
        self.blocks = blocks if blocks is not None else [Block(0, len(self.images), 0, len(self.captions))]
        self.known_fingerprints: dict[str, str] = dict(fingerprints or {})
        self._legacy: str | None = None  # the version-1 fingerprint once computed (a pass over every row)
        self.index_path: Path | None = None  # the manifest index version it was opened from, if any

    def __repr__(self) -> str:
        return (f"Manifest({self.format} {self.source!r}: {len(self.images)} images, {len(self.captions)} captions, "
                f"{len(self.blocks)} blocks)")

    # ------------------------------------------------------------------ fingerprints
    def fingerprint(self, version: int = FINGERPRINT_VERSION) -> str:
        """sha256 hex of the ids, paths, splits, caption texts and caption image rows (not of the source path).

        Version 2 (default) combines per-block digests; version 1 is the single hash stores built before used."""
        if version == 1:
            if self._legacy is None:
                self._legacy = self._legacy_fingerprint()
            return self._legacy
        if version != FINGERPRINT_VERSION:
            raise ValueError(f"unknown manifest fingerprint version {version}")
        known = self.known_fingerprints.get("")
        if known:
            return known
        digest = hashlib.sha256(_V2_TAG)
        self.blocks = [b if b.digest else replace(b, digest=self.block_digest(b)) for b in self.blocks]
        for b in self.blocks:
            if b.image_stop == b.image_start and b.caption_stop == b.caption_start:
                continue  # a shard with no rows (all its samples left out, or of another split) adds nothing
            digest.update(f"{b.image_stop - b.image_start} {b.caption_stop - b.caption_start} {b.digest}\n".encode())
        self.known_fingerprints[""] = digest.hexdigest()
        return self.known_fingerprints[""]

    def block_digest(self, block: Block) -> str:
        """The digest of one block of rows (a term of the fingerprint)."""
        digest = hashlib.sha256(b"block\n")
        self.images.hash_into(digest, block.image_start, block.image_stop)
        self.captions.hash_into(digest, block.caption_start, block.caption_stop, block.image_start)
        return digest.hexdigest()

    def _legacy_fingerprint(self) -> str:
        digest = hashlib.sha256(_V1_TAG.encode())
        # One canonical JSON document per section, written in pieces: "[" row "," row ... "]" as json.dumps writes
        # the whole list (fixed separators, ASCII escapes even for lone surrogates).
        step = 8192
        sections = (
            (len(self.images), lambda lo, hi: [[self.images.image_id(r), self.images.path(r), self.images.split(r)]
                                               for r in range(lo, hi)]),
            (len(self.captions), lambda lo, hi: [[self.captions.texts.value(j), int(self.captions.image_rows[j])]
                                                 for j in range(lo, hi)]),
        )
        for n, rows in sections:
            digest.update(b"\n[")
            for lo in range(0, n, step):
                text = json.dumps(rows(lo, min(lo + step, n)), ensure_ascii=True, separators=(",", ":"))
                digest.update((("," if lo else "") + text[1:-1]).encode("ascii"))
            digest.update(b"]")
        return digest.hexdigest()

    # ------------------------------------------------------------------ splits and subsets
    def splits(self) -> list[str]:
        """Distinct split labels, in order of first appearance among the images."""
        present = np.unique(self.images.split_codes)
        firsts = sorted((int(np.argmax(self.images.split_codes == c)), int(c)) for c in present)
        return [self.images.split_labels[c] for _, c in firsts]

    def select_split(self, split: str) -> "Manifest":
        """The images of one split (order kept) and their captions, rows renumbered; "all" is the whole manifest.

        A file without split labels is a single split, so any request returns the whole manifest.
        """
        present = self.splits()
        if split == "all" or present == [""]:
            return self
        if split not in present:
            listed = ", ".join(s if s else "(unlabelled)" for s in present)
            raise ManifestError(f"{self.source}: no images in split {split!r}; splits present: {listed}")
        if present == [split]:
            return self
        keep = np.flatnonzero(self.images.split_codes == self.images.split_labels.index(split))
        sub, _ = self.subset(keep)
        sub.skipped_samples = [s for s in self.skipped_samples if s.get("split") == split]
        known = self.known_fingerprints.get(split)
        sub.known_fingerprints = {"": known} if known else {}
        return sub

    def subset(self, image_rows: np.ndarray) -> tuple["Manifest", np.ndarray]:
        """The images ``image_rows`` (increasing) and their captions, rows renumbered; with the caption rows kept.
        Blocks are cut to the rows kept; a block kept whole whose captions are all of its own images keeps its
        digest."""
        image_rows = np.asarray(image_rows, dtype=np.int64)
        n = len(self.images)
        kept = np.zeros(n, dtype=bool)
        kept[image_rows] = True
        new_of_old = np.cumsum(kept) - 1
        caption_rows = np.flatnonzero(kept[self.captions.image_rows]) if n else np.zeros(0, dtype=np.int64)
        images = self.images.take(image_rows)
        captions = self.captions.take(caption_rows, new_of_old[self.captions.image_rows[caption_rows]])
        image_cut = np.searchsorted(image_rows, [b.image_start for b in self.blocks] + [n])
        caption_cut = np.searchsorted(caption_rows, [b.caption_start for b in self.blocks] + [len(self.captions)])
        blocks = []
        for k, b in enumerate(self.blocks):
            block = Block(int(image_cut[k]), int(image_cut[k + 1]), int(caption_cut[k]), int(caption_cut[k + 1]))
            whole = (block.image_stop - block.image_start == b.image_stop - b.image_start and
                     block.caption_stop - block.caption_start == b.caption_stop - b.caption_start)
            own = self.captions.image_rows[b.caption_start:b.caption_stop]
            if b.digest and whole and bool(np.all((own >= b.image_start) & (own < b.image_stop))):
                block = replace(block, digest=b.digest)
            blocks.append(block)
        return Manifest(images, captions, self.source, self.image_root, self.format,
                        list(self.skipped_samples), blocks), caption_rows

    # ------------------------------------------------------------------ rows
    def image_path(self, row: int) -> Path:
        """Filesystem path of image ``row``: absolute paths as written, others under ``image_root``. Images held in
        shards have none: read any image with ``pipeline.images.open_image(manifest, row)``."""
        path = Path(self.images.path(row))
        return path if path.is_absolute() else Path(self.image_root) / path

    def caption_image_rows(self) -> np.ndarray:
        """int64 [N_captions]: the image row of each caption."""
        return self.captions.image_rows

    def image_rows_of_split(self, split: str) -> np.ndarray:
        """int64 rows of the images labelled ``split``; every row for "all" or a file without split labels."""
        if split == "all" or self.splits() == [""]:
            return np.arange(len(self.images), dtype=np.int64)
        if split not in self.images.split_labels:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.images.split_codes == self.images.split_labels.index(split)).astype(np.int64)

    def image_ids(self) -> list[str]:
        """Image ids in row order (a list: small sets; large ones read ``images.ids()`` by row)."""
        return self.images.ids().tolist()

    def caption_texts(self) -> list[str]:
        """Caption texts in row order (a list: small sets; large ones read ``captions.texts`` by row)."""
        return self.captions.texts.tolist()

    def shard_of_caption(self) -> np.ndarray | None:
        """int64 shard number (in shard order) of each caption of a shard source, else None."""
        if self.captions.shard_codes is None:
            return None
        return self.captions.shard_codes.astype(np.int64)
