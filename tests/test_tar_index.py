"""The tar header scan that indexes shards: the same regular-file members, data offsets and sizes as Python's
tarfile for every header style tar writes; a damaged archive keeps what comes before the damage and says where."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest

from pipeline.errors import ManifestError
from pipeline.tar_index import scan_tar


def random_tar(path: Path, fmt: int, seed: int) -> list[tuple[str, int, int]]:
    """A tar in ``fmt`` with files of odd sizes, long and non-ASCII names, folders and links; returns tarfile's
    listing of its regular files (name, data offset, size)."""
    rng = random.Random(seed)
    with tarfile.open(path, "w", format=fmt) as tar:
        for i in range(60):
            kind = rng.random()
            if kind < 0.08:
                info = tarfile.TarInfo(f"folder{i}")
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            if kind < 0.12:
                info = tarfile.TarInfo(f"link{i}")
                info.type = tarfile.SYMTYPE
                info.linkname = "elsewhere"
                tar.addfile(info)
                continue
            stem = rng.choice([f"{i:06d}", f"deep/{'d' * rng.randint(1, 90)}/{i:06d}", f"naïve-{i}",
                               "x" * rng.randint(95, 140) + str(i)])
            data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 511, 512, 513, 3000])))
            info = tarfile.TarInfo(f"{stem}.{rng.choice(['jpg', 'txt', 'json', 'seg.png'])}")
            info.size = len(data)
            try:
                tar.addfile(info, io.BytesIO(data))
            except ValueError:  # a name this format cannot hold (ustar): left out
                continue
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("seed", range(3))
def test_the_header_scan_lists_what_tarfile_lists(tmp_path, fmt, seed):
    path = tmp_path / "shard.tar"
    expected = random_tar(path, fmt, seed)
    members = scan_tar(str(path))
    assert list(zip(members.names, members.offsets.tolist(), members.sizes.tolist())) == expected
    assert members.damage == "" and len(expected) > 20


def test_a_truncated_tar_keeps_the_members_before_the_cut_and_names_the_cut_one(tmp_path):
    path = tmp_path / "shard.tar"
    expected = random_tar(path, tarfile.GNU_FORMAT, 7)
    data = path.read_bytes()
    name, offset, size = next(m for m in expected if m[2] > 600)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:offset + 100])
    members = scan_tar(str(cut))
    assert members.names[-1] == name and members.damage == f"ends inside member {name!r} (unexpected end of data)"
    assert list(zip(members.names, members.offsets.tolist(), members.sizes.tolist())) == \
        expected[:expected.index((name, offset, size)) + 1]


def test_a_corrupt_header_ends_the_listing_there_and_a_non_tar_is_refused(tmp_path):
    path = tmp_path / "shard.tar"
    expected = random_tar(path, tarfile.USTAR_FORMAT, 1)
    data = bytearray(path.read_bytes())
    name, offset, _ = expected[5]
    data[offset - 512 + 3] ^= 0x40  # a flipped bit in the 6th member's header
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    members = scan_tar(str(bad))
    assert members.names == [m[0] for m in expected[:5]]
    assert members.damage == f"corrupt tar header at byte {offset - 512} (bad checksum)"
    jpeg = tmp_path / "photo.tar"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + bytes(2000))
    with pytest.raises(ManifestError, match="photo.tar: not a tar archive"):
        scan_tar(str(jpeg))
    gz = tmp_path / "shard-gz.tar"
    gz.write_bytes(b"\x1f\x8b\x08" + bytes(100))
    with pytest.raises(ManifestError, match="a gzip-compressed tar named as a plain one; name it .tar.gz"):
        scan_tar(str(gz))
