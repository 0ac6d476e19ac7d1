"""One webdataset shard read into columns (:func:`scan_shard`), and shards put together into a Manifest
(:func:`assemble`).

A sample is the members of a shard that share a key (webdataset's rule: the member name up to the first dot of its
base name; consecutive members with the same key form one sample; ``__*__`` metadata members are ignored). Its image
is the first member present among ``ShardLayout.image_key``; its captions are the non-empty lines of the caption
member, or the strings under a field of the ``json`` member; its id is the sample key, or a field of the ``json``
member (``id_field``: samples with the same id are then one image row, as img2dataset writes a repeated image once
per caption).

Only the tar headers and the caption/json members are read (:mod:`pipeline.tar_index`); an image is read later by
its offset. A scan depends on nothing but its shard, its split label and the layout, so the manifest index
(:mod:`pipeline.manifest_index`) keeps one per shard and scans again only the shards that changed.
"""

from __future__ import annotations

import json
import mmap
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow.compute as pc

from pipeline.annotations import has_text, unusable_characters
from pipeline.columns import StringColumn
from pipeline.errors import ManifestError
from pipeline.manifest_table import Block, CaptionTable, ImageTable, Manifest, ShardColumns, narrow_codes
from pipeline.tar_index import TarMembers, scan_tar

FORMAT = "webdataset"
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default: metadata members, never sample members
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_LINE_BREAK = re.compile(r"\r\n|\n|\r")
_ODD_IN_TEXT = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # control characters but line breaks


@dataclass
class ShardScan:
    """One shard's usable samples in order, before images repeated across samples are merged: each sample's key,
    image member (extension as stored, a code into ``ext_table``, 0 when it has none; data offset and size) and id
    (``id_field`` layouts); each caption's text and sample. ``skipped``: samples left out, with why."""

    shard: str
    split: str
    keys: StringColumn
    ext: np.ndarray  # uint8/uint16 codes into ext_table
    ext_table: list[str]
    offset: np.ndarray  # int64
    size: np.ndarray  # int64
    ids: StringColumn | None
    missing: dict[int, str]  # sample -> why it has no image member
    texts: StringColumn
    caption_sample: np.ndarray  # int64 sample of each caption
    skipped: list[dict] = field(default_factory=list)
    digest: str = ""  # the shard's fingerprint block when its samples are its image rows (no id_field)

    @property
    def n_samples(self) -> int:
        return len(self.offset)


@dataclass(frozen=True)
class ScanRules:
    """How captions and ids are read from a sample's members (a ShardLayout's fields, plus the CLIP_benchmark
    convention of a literal ``\\n`` for a line break inside a caption)."""

    image_extensions: tuple[str, ...]
    caption_key: str
    caption_json_field: str | None
    id_field: str | None
    escaped_newlines: bool = False


def scan_shard(shard: str, split: str, rules: ScanRules, local: str | None = None) -> ShardScan:
    """Read one shard's samples; a shard that is not a tar, is empty or is compressed is a ManifestError, a damaged
    one keeps its whole samples before the damage (the sample it cuts is left out, with the damage as reason).
    ``local``: a local copy to read instead (of a shard at a URL, say), named ``shard`` everywhere."""
    members = scan_tar(local or shard, shown=shard)
    if not members.names and members.damage:
        raise ManifestError(f"{shard}: not a readable tar archive ({members.damage})")
    samples = group_samples(members.names)
    out = _ScanBuilder(shard, split, rules)
    if not samples:
        reason = _damage_text(members) if members.damage else "no samples in the shard (no member named KEY.EXT)"
        out.skipped.append({"shard": shard, "key": "", "split": split, "reason": reason})
        return out.finish()
    with open(local or shard, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        read = _MemberReader(mapped, members)
        last = len(samples) - 1
        for i, (key, positions, names, problem) in enumerate(samples):
            if not problem and members.damage and i == last:
                problem = _damage_text(members)  # its later members may be missing
            if not problem:
                problem = out.add(key, positions, names, read)
            if problem:
                out.skipped.append({"shard": shard, "key": key, "split": split, "reason": problem})
    return out.finish()


def _kept_captions(captions: list[str]) -> list[str]:
    """The captions that hold text once control characters are set aside (kept as written)."""
    return [c for c in captions if has_text(c)]


def _damage_text(members: TarMembers) -> str:
    if members.damage.startswith("ends inside member"):
        return f"truncated tar: {members.damage}"
    last = f" after member {members.names[-1]!r}" if members.names else ""
    return f"truncated or corrupt tar{last} ({members.damage})"


def group_samples(member_names: list[str]) -> list[tuple[str, dict[str, int], dict[str, str], str]]:
    """(key, extension -> member position, extension -> member name, problem) of each sample, in archive order."""
    samples: list[tuple[str, dict[str, int], dict[str, str], str]] = []
    key_ext = _KEY_EXT.match
    current = None
    positions: dict[str, int] = {}
    names: dict[str, str] = {}
    for position, name in enumerate(member_names):
        if name.startswith("__") and (_SKIP_META.match(name) or (name.endswith("__") and "/" not in name)):
            continue
        if "/" in name:
            match = key_ext(name)
            if match is None:
                continue  # no extension: not part of any sample (webdataset skips these too)
            key, ext = match.group(1), match.group(2).lower()
        else:  # the same rule without folders: the key is what precedes the first dot, and is not empty
            dot = name.find(".")
            if dot <= 0:
                continue
            key, ext = name[:dot], name[dot + 1:].lower()
        if key != current:
            current, positions, names = key, {}, {}
            samples.append((key, positions, names, ""))
        if ext in positions:
            if not samples[-1][3]:
                samples[-1] = (key, positions, names, f"two members named {name!r} in one sample")
            continue
        positions[ext] = position
        names[ext] = name
    return samples


class _MemberReader:
    """A member's bytes by its position in the shard's listing, from the memory-mapped shard."""

    def __init__(self, mapped: mmap.mmap, members: TarMembers):
        self.mapped = mapped
        self.offsets = members.offsets.tolist()
        self.sizes = members.sizes.tolist()

    def __call__(self, position: int) -> bytes:
        start = self.offsets[position]
        return self.mapped[start:start + self.sizes[position]]


class _ScanBuilder:
    def __init__(self, shard: str, split: str, rules: ScanRules):
        self.shard, self.split, self.rules = shard, split, rules
        self.keys: list[str] = []
        self.ext: list[int] = []
        self.ext_codes: dict[str, int] = {"": 0}
        self.offset: list[int] = []
        self.size: list[int] = []
        self.ids: list[str] = []
        self.missing: dict[int, str] = {}
        self.texts: list[str] = []
        self.caption_sample: list[int] = []
        self.skipped: list[dict] = []
        self.wants_json = rules.caption_json_field is not None or rules.id_field is not None

    def add(self, key: str, positions: dict[str, int], names: dict[str, str], read: _MemberReader) -> str:
        """Add one sample; returns why it cannot be a row ("" when it was added)."""
        rules = self.rules
        meta: Any = None
        if self.wants_json:
            if "json" not in positions:
                return f"no json member (members: {', '.join(sorted(names.values()))})"
            try:
                meta = json.loads(read(positions["json"]).decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                return f"{names['json']}: not valid UTF-8 JSON ({exc})"
            if not isinstance(meta, dict):
                return f"{names['json']}: expected a JSON object, got {type(meta).__name__}"
        json_field = rules.caption_json_field
        if json_field is not None:
            value = meta.get(json_field)
            if value is None:
                return f"{names['json']}: no field {json_field!r}"
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                return f"{names['json']}: field {json_field!r} must be a string or a list of strings"
            captions = _kept_captions([v.strip() for v in values])
            where = f"{names['json']} field {json_field!r}"
        else:
            ext = rules.caption_key
            position = positions.get(ext)
            if position is None:
                present = ", ".join(sorted(names.values()))
                return f"no caption member {key}.{ext} (members: {present})"
            try:
                text = read(position).decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"{names[ext]}: not UTF-8 text (byte {exc.start})"
            if text[:1] == "\ufeff":
                text = text[1:]
            if rules.escaped_newlines:
                # CLIP_benchmark's reader splits with str.splitlines (every Unicode line boundary); its writer
                # writes a line break inside a caption as a literal \n
                lines = [line.replace("\\n", "\n") for line in text.splitlines()]
            else:
                lines = text.split("\n") if "\r" not in text else _LINE_BREAK.split(text)  # line breaks only
            if _ODD_IN_TEXT.search(text) is None:  # the usual case: no control character but the line breaks
                captions = [c for c in (line.strip() for line in lines) if c]
            else:
                captions = _kept_captions([line.strip() for line in lines])
            where = names[ext]
        if not captions:
            return f"{where}: holds no caption"
        image_id = key
        if rules.id_field is not None:
            value = meta.get(rules.id_field)
            if value is None or isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
                got = "missing" if value is None else f"{value!r:.40}"
                return (f"{names['json']}: field {rules.id_field!r} must be a non-empty string or an integer, "
                        f"got {got}")
            image_id = str(value)
        odd = unusable_characters(key)
        if odd:
            return f"sample key {key!r} contains {odd}"
        if image_id is not key:
            odd = unusable_characters(image_id)
            if odd:
                return f"image id {image_id!r} contains {odd}"
        sample = len(self.keys)
        self.keys.append(key)
        if rules.id_field is not None:
            self.ids.append(image_id)
        for ext in rules.image_extensions:
            position = positions.get(ext)
            if position is not None:
                stored = names[ext][len(key) + 1:]
                code = self.ext_codes.get(stored)
                if code is None:
                    code = self.ext_codes[stored] = len(self.ext_codes)
                self.ext.append(code)
                self.offset.append(read.offsets[position])
                self.size.append(read.sizes[position])
                break
        else:
            wanted = ", ".join(f".{e}" for e in rules.image_extensions)
            present = ", ".join(sorted(names.values()))
            self.missing[sample] = f"no image member ({wanted}; choose with --image-key); members: {present}"
            self.ext.append(0)
            self.offset.append(-1)
            self.size.append(0)
        self.texts.extend(captions)
        self.caption_sample.extend([sample] * len(captions))
        return ""

    def finish(self) -> ShardScan:
        scan = ShardScan(
            self.shard, self.split, StringColumn.from_strings(self.keys),
            narrow_codes(np.asarray(self.ext, dtype=np.int64), len(self.ext_codes)), list(self.ext_codes),
            np.asarray(self.offset, dtype=np.int64), np.asarray(self.size, dtype=np.int64),
            StringColumn.from_strings(self.ids) if self.rules.id_field is not None else None, self.missing,
            StringColumn.from_strings(self.texts), np.asarray(self.caption_sample, dtype=np.int64), self.skipped)
        if self.rules.id_field is None:
            scan.digest = _shard_digest(scan)
        return scan


def _shard_digest(scan: ShardScan) -> str:
    """The shard's fingerprint block, hashed as the assembled manifest hashes it: a one-block manifest of it."""
    columns = ShardColumns([scan.shard], np.zeros(scan.n_samples, dtype=np.int32), scan.keys, scan.ext,
                           scan.ext_table, scan.offset, scan.size, scan.missing)
    images = ImageTable(np.zeros(scan.n_samples, dtype=np.uint8), [scan.split], shards=columns)
    alone = Manifest(images, CaptionTable(scan.texts, scan.caption_sample), scan.shard, "", FORMAT)
    return alone.block_digest(alone.blocks[0])


# ---------------------------------------------------------------------------------------------- a source
@dataclass
class ShardEntry:
    """One shard's part of a SourceScan: its sample and caption ranges, and what its scan found."""

    shard: str
    split: str
    samples: tuple[int, int]
    captions: tuple[int, int]
    digest: str
    skipped: list[dict]
    missing: dict[int, str]  # sample within the shard -> why it has no image member


@dataclass
class SourceScan:
    """Every shard's scan of a source, end to end: the form the manifest index stores (columns over all samples and
    captions; ``caption_sample`` numbers samples across the source)."""

    entries: list[ShardEntry]
    keys: StringColumn
    ext: np.ndarray
    ext_table: list[str]
    offset: np.ndarray
    size: np.ndarray
    ids: StringColumn | None
    texts: StringColumn
    caption_sample: np.ndarray

    def shard_scan(self, k: int) -> ShardScan:
        """Shard ``k`` as its own scan again (to reuse it in the index of a source whose other shards changed)."""
        e = self.entries[k]
        (a, b), (c, d) = e.samples, e.captions
        return ShardScan(e.shard, e.split, self.keys.slice(a, b), self.ext[a:b], self.ext_table, self.offset[a:b],
                         self.size[a:b], None if self.ids is None else self.ids.slice(a, b), dict(e.missing),
                         self.texts.slice(c, d), self.caption_sample[c:d] - a, list(e.skipped), e.digest)


def combine(scans: Sequence[ShardScan]) -> SourceScan:
    """The shards' scans, in order, as one SourceScan."""
    n_samples = np.array([scan.n_samples for scan in scans], dtype=np.int64)
    sample_start = np.concatenate([[0], np.cumsum(n_samples)])
    n_captions = np.array([len(scan.caption_sample) for scan in scans], dtype=np.int64)
    caption_start = np.concatenate([[0], np.cumsum(n_captions)])
    ext_table: dict[str, int] = {"": 0}
    ext_parts = []
    for scan in scans:
        remap = np.array([ext_table.setdefault(e, len(ext_table)) for e in scan.ext_table], dtype=np.int64)
        ext_parts.append(remap[scan.ext.astype(np.int64)])
    entries = [ShardEntry(scan.shard, scan.split, (int(sample_start[k]), int(sample_start[k + 1])),
                          (int(caption_start[k]), int(caption_start[k + 1])), scan.digest, scan.skipped, scan.missing)
               for k, scan in enumerate(scans)]
    with_ids = bool(scans) and scans[0].ids is not None
    empty = np.zeros(0, dtype=np.int64)
    return SourceScan(
        entries, StringColumn.concat([scan.keys for scan in scans]),
        narrow_codes(np.concatenate(ext_parts) if ext_parts else empty, len(ext_table)), list(ext_table),
        np.concatenate([scan.offset for scan in scans]) if scans else empty,
        np.concatenate([scan.size for scan in scans]) if scans else empty,
        StringColumn.concat([scan.ids for scan in scans]) if with_ids else None,
        StringColumn.concat([scan.texts for scan in scans]),
        np.concatenate([scan.caption_sample + sample_start[k] for k, scan in enumerate(scans)]) if scans else empty)


def assemble(scan: SourceScan, source: str, id_field: str | None,
             fingerprints: dict[str, str] | None = None) -> Manifest:
    """The manifest of a shard source from its SourceScan (see the module docstring); ``fingerprints``: ones the
    index already knows."""
    entries = scan.entries
    skipped = [s for e in entries for s in e.skipped]
    if not len(scan.offset):
        first = f"; the first left out: {describe_skipped(skipped[0])}" if skipped else ""
        raise ManifestError(f"{source}: no usable samples in the shards{first}")
    n_samples = np.array([e.samples[1] - e.samples[0] for e in entries], dtype=np.int64)
    n_captions = np.array([e.captions[1] - e.captions[0] for e in entries], dtype=np.int64)
    sample_start = np.array([e.samples[0] for e in entries] + [len(scan.offset)], dtype=np.int64)
    split_labels: dict[str, int] = {}
    shard_split = np.array([split_labels.setdefault(e.split, len(split_labels)) for e in entries], dtype=np.int64)
    shard_of_sample = np.repeat(np.arange(len(entries), dtype=np.int32), n_samples)
    missing = {e.samples[0] + i: why for e in entries for i, why in e.missing.items()}
    shards = [e.shard for e in entries]
    columns = ShardColumns(shards, shard_of_sample, scan.keys, scan.ext, scan.ext_table, scan.offset, scan.size,
                           missing)
    split_codes = narrow_codes(shard_split[shard_of_sample], len(split_labels))
    caption_shard = np.repeat(np.arange(len(entries), dtype=np.int32), n_captions)
    if id_field is None:
        images = ImageTable(split_codes, list(split_labels), shards=columns)
        blocks = [Block(e.samples[0], e.samples[1], e.captions[0], e.captions[1], e.digest) for e in entries]
        captions = CaptionTable(scan.texts, scan.caption_sample, caption_shard, shards)
        return Manifest(images, captions, source, "", FORMAT, skipped, blocks, fingerprints)
    row_of_sample, first_sample, chosen = _merge_by_id(scan.ids, scan.ext)
    _check_split_agreement(entries, row_of_sample, first_sample, shard_of_sample, split_codes, scan.ids, columns)
    images = ImageTable(split_codes[first_sample], list(split_labels), ids=scan.ids.take(first_sample),
                        shards=columns.take(chosen))
    image_start = np.searchsorted(first_sample, sample_start)
    blocks = [Block(int(image_start[k]), int(image_start[k + 1]), e.captions[0], e.captions[1])
              for k, e in enumerate(entries)]
    captions = CaptionTable(scan.texts, row_of_sample[scan.caption_sample], caption_shard, shards)
    return Manifest(images, captions, source, "", FORMAT, skipped, blocks, fingerprints)


def _merge_by_id(ids: StringColumn, ext: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image row of each sample, first sample of each row, the sample whose image each row shows: the first one
    that has an image member, else the first)."""
    encoded = pc.dictionary_encode(ids.array)  # indices in order of first appearance
    row_of_sample = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n_rows = len(encoded.dictionary)
    _, first_sample = np.unique(row_of_sample, return_index=True)
    chosen = first_sample.copy()
    with_image = np.flatnonzero(ext != 0)
    rows_with, first_with = np.unique(row_of_sample[with_image], return_index=True)
    lacking = np.zeros(n_rows, dtype=bool)
    lacking[rows_with] = True
    lacking &= ext[first_sample] == 0
    chosen[lacking] = with_image[first_with[np.searchsorted(rows_with, np.flatnonzero(lacking))]]
    return row_of_sample, first_sample.astype(np.int64), chosen.astype(np.int64)


def _check_split_agreement(entries, row_of_sample, first_sample, shard_of_sample, split_codes, ids, columns) -> None:
    first = first_sample[row_of_sample]
    bad = np.flatnonzero(split_codes != split_codes[first])
    if not len(bad):
        return
    s, f = int(bad[0]), int(first[bad[0]])
    shard, seen_shard = entries[int(shard_of_sample[s])], entries[int(shard_of_sample[f])]
    raise ManifestError(f"{shard.shard}: sample {columns.keys.value(s)!r}: image id {ids.value(s)!r} is in split "
                        f"{shard.split!r} but {seen_shard.shard} sample {columns.keys.value(f)!r} put it in split "
                        f"{seen_shard.split!r}")


def describe_skipped(record: dict) -> str:
    """One line naming a left-out sample: "SHARD: sample 'KEY': REASON" (or "SHARD: REASON" for a whole shard)."""
    sample = f"sample {record['key']!r}: " if record.get("key") else ""
    return f"{record['shard']}: {sample}{record['reason']}"
