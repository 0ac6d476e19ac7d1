"""The member table of a tar shard, read from its headers alone (never the members' data).

A shard is memory-mapped and walked header to header: each 512-byte header gives a member's name, type and size,
and the next header is that many bytes (rounded up to a block) further on, so reading the index of a shard of large
JPEGs touches a few pages per member. ustar prefixes, GNU long names and pax ``path``/``size`` records are followed,
as Python's ``tarfile`` follows them; only regular files are listed. Every header's checksum is checked (in numpy,
once per shard).

A damaged archive keeps the members before the damage: a member whose data run past the end of the file (a truncated
download) is listed and named in ``damage``, as is a header cut short or failing its checksum after the first.
A file that is not a tar at all, or a compressed one, is a ManifestError.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ImageError, ManifestError

BLOCK = 512
_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\x00", b"7")
_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


@dataclass
class TarMembers:
    """Regular-file members of one tar in archive order: names, data offsets and sizes; ``damage`` is "" for a
    sound archive, else why the listing stops early; ``ended``: the walk met the end-of-archive block (a stream cut
    at a member boundary has no damage, and no end block either)."""

    names: list[str]
    offsets: np.ndarray  # int64 byte offset of each member's data
    sizes: np.ndarray  # int64
    file_size: int
    damage: str = ""
    ended: bool = False


def compression_of(head: bytes) -> str:
    """"gzip", "bzip2", "xz" or "zstd" when ``head`` (a file's first bytes) starts a compressed stream, else ""."""
    return next((name for magic, name in _COMPRESSED_MAGIC if head.startswith(magic)), "")


def scan_tar(path: str, shown: str | None = None) -> TarMembers:
    """The regular-file members of the tar at ``path`` (see the module docstring); messages name it ``shown`` (the
    shard a local copy stands for), else ``path``."""
    shown = shown or path
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise ManifestError(f"{shown}: empty file, not a tar shard")
        with open(path, "rb") as fh:
            compressed = compression_of(fh.read(8))
            if compressed:
                raise ManifestError(f"{shown}: a {compressed}-compressed tar named as a plain one; name it .tar.gz "
                                    "(.tar.bz2, .tar.xz, .tar.zst) to have it decompressed, or decompress it")
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ManifestError(f"{shown}: cannot read the shard ({exc.strerror or exc})") from None
    try:
        return _scan(mapped, size, shown)
    finally:
        mapped.close()


def read_at(path: str | os.PathLike, offset: int, size: int, shown: str) -> bytes:
    """The ``size`` bytes of a member at ``offset`` of the local tar ``path`` (its index gave both); ImageError naming
    the shard as ``shown`` when the file is shorter than that. OSError passes through."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise ImageError(f"{shown}: the shard is shorter than when it was indexed ({len(data)} of {size} bytes at "
                         f"offset {offset}); was it changed or truncated since?")
    return data


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # base-256 (GNU, for sizes past 8 GiB)
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\x00", 1)[0].strip() or b"0", 8)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # as tarfile decodes names


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """``LENGTH KEY=VALUE\\n`` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space] or b"0")
        if length <= 0:
            break
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


def _scan(mm: mmap.mmap, size: int, path: str) -> TarMembers:
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    headers: list[int] = []
    damage = ""
    ended = False
    long_name: str | None = None
    pax: dict[bytes, bytes] = {}
    pos = 0
    while True:
        if pos + BLOCK > size:
            if pos < size:
                damage = "unexpected end of data inside a tar header"
            break
        header = mm[pos:pos + BLOCK]
        if header == _ZERO:
            ended = True
            break
        field = header[124:136]
        try:
            member_size = int(field[:11], 8) if field[11] in (0, 32) and field[0] != 32 else _octal(field)
        except ValueError:
            if pos == 0:
                raise ManifestError(f"{path}: not a tar archive (invalid header)") from None
            damage = f"invalid tar header at byte {pos}"
            break
        headers.append(pos)
        kind = header[156:157]
        data = pos + BLOCK
        if kind in _REGULAR:
            if pax:
                member_size = int(pax.get(b"size", member_size))
            if pax and b"path" in pax:
                name = _text(pax[b"path"])
            elif long_name is not None:
                name = long_name
            else:
                raw = header[:100]
                cut = raw.find(0)
                raw = raw if cut < 0 else raw[:cut]
                if header[345] and header[257:262] == b"ustar":
                    raw = header[345:500].split(b"\x00", 1)[0] + b"/" + raw
                try:
                    name = raw.decode("ascii")
                except UnicodeDecodeError:
                    name = _text(raw)
            names.append(name)
            offsets.append(data)
            sizes.append(member_size)
            if long_name is not None or pax:
                long_name, pax = None, {}
            if data + member_size > size:
                damage = f"ends inside member {name!r} (unexpected end of data)"
                break
        elif kind == b"L":
            long_name = _text(mm[data:data + member_size].split(b"\x00", 1)[0])
        elif kind == b"x":
            pax = _pax_records(mm[data:data + member_size])
        elif kind != b"g":  # folders, links, devices: not sample members
            long_name, pax = None, {}
        pos = data + ((member_size + BLOCK - 1) & ~(BLOCK - 1))
    bad = _first_bad_checksum(mm, size, np.asarray(headers, dtype=np.int64))
    if bad is not None:
        if bad == 0:
            raise ManifestError(f"{path}: not a tar archive (bad checksum)")
        cut = int(np.searchsorted(np.asarray(offsets, dtype=np.int64), headers[bad]))
        names, offsets, sizes = names[:cut], offsets[:cut], sizes[:cut]
        damage = f"corrupt tar header at byte {headers[bad]} (bad checksum)"
    return TarMembers(names, np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64), size, damage,
                      ended and not damage)


def _first_bad_checksum(mm: mmap.mmap, size: int, headers: np.ndarray) -> int | None:
    """Index of the first header whose checksum (the sum of its bytes with the checksum field read as spaces,
    unsigned or signed as tar allows) differs from the one it stores; None when all agree."""
    if not len(headers):
        return None
    blocks_view = np.frombuffer(mm, dtype=np.uint8, count=(size // BLOCK) * BLOCK).reshape(-1, BLOCK)
    try:
        for lo in range(0, len(headers), 8192):
            blocks = blocks_view[headers[lo:lo + 8192] // BLOCK]  # headers start on block boundaries
            field = blocks[:, 148:156]
            unsigned = blocks.sum(axis=1, dtype=np.int64) - field.sum(axis=1, dtype=np.int64) + 8 * 32
            stored = _octal_fields(field)
            wrong = np.flatnonzero(unsigned != stored)
            if len(wrong):
                signed = blocks[wrong].view(np.int8)
                signed_sum = signed.sum(axis=1, dtype=np.int64) - signed[:, 148:156].sum(axis=1, dtype=np.int64) + 256
                still = wrong[signed_sum != stored[wrong]]
                if len(still):
                    return lo + int(still[0])
        return None
    finally:
        del blocks_view


def _octal_fields(fields: np.ndarray) -> np.ndarray:
    """Octal numbers written as ASCII digits (leading spaces or zeros, a NUL or space after), one per row."""
    value = np.zeros(len(fields), dtype=np.int64)
    ended = np.zeros(len(fields), dtype=bool)
    for column in range(fields.shape[1]):
        byte = fields[:, column].astype(np.int64)
        digit = (byte >= 48) & (byte <= 55) & ~ended
        ended |= ~digit & (value > 0) | (byte == 0)
        value = np.where(digit, value * 8 + (byte - 48), value)
    return value
