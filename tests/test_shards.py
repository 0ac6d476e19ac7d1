"""pipeline.shards: webdataset shards read into the same manifest a caption-list JSON gives, from every source form,
with the sample layout options, a location-independent fingerprint, and bad samples named by shard and key.
Real tar shards written with webdataset's TarWriter, real PNG/JPEG images."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from pipeline import shard_scan as shard_scan_module
from pipeline.cli import main
from pipeline.errors import ImageError, ManifestError
from pipeline.images import load_image, open_image
from pipeline.manifest import detect_format, read_manifest
from pipeline.shards import ShardLayout, is_shard_source, parse_shard_source, shard_row_ranges


def png_bytes(colour=(200, 30, 30), size=(24, 16), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A real tar shard; each sample is a dict {"__key__", ext: bytes or str}, members in the order given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for sample in samples:
            sink.write({k: (v.encode() if isinstance(v, str) and k != "__key__" else v) for k, v in sample.items()})
    return path


def sample(key: str, captions=("a red box", "a box that is red"), image=True, **extra) -> dict:
    s = {"__key__": key, "txt": "\n".join(captions), **extra}
    if image:
        s["png"] = png_bytes()
    return s


def fold(text: str) -> list[str]:
    return [c.text for c in read_manifest(text).captions]


# ================================================================================================ source forms
def test_brace_pattern_joined_patterns_single_tar_and_list_file_name_the_same_shards(demo_shards, tmp_path):
    pattern = demo_shards["val"]
    folder = Path(pattern).parent
    expanded = [str(folder / f"val-{i:06d}.tar") for i in range(3)]
    assert [s for p in parse_shard_source(pattern) for s in p.shards] == expanded
    joined = f"{expanded[0]}::{folder}/val-{{000001..000002}}.tar"
    assert [s for p in parse_shard_source(joined) for s in p.shards] == expanded
    assert parse_shard_source(expanded[1])[0].shards == (expanded[1],)
    listing = folder / "val_shards.txt"
    # relative lines are relative to the list's folder; comments and blank lines are ignored
    listing.write_text("# the val split\nval-000000.tar\n\n" + expanded[1] + "\nval-000002.tar\n")
    assert [s for p in parse_shard_source(str(listing)) for s in p.shards] == \
        [str(folder / "val-000000.tar"), expanded[1], str(folder / "val-000002.tar")]
    reference = read_manifest(pattern)
    for form in (joined, str(listing)):
        m = read_manifest(form)
        assert m.format == "webdataset" and m.fingerprint() == reference.fingerprint()


def test_format_auto_tells_a_shard_list_txt_from_a_csv_txt(demo_shards, tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text(Path(demo_shards["val"]).parent.joinpath("val-000000.tar").as_posix() + "\n")
    table = tmp_path / "captions.txt"
    table.write_text("image\tcaption\nimages/a.tar\ta picture of a tar pit\n")
    assert detect_format(listing) == "webdataset"
    assert detect_format(table) == "csv"
    assert is_shard_source(demo_shards["val"]) and is_shard_source("a.tar::b.tar")
    assert not is_shard_source(tmp_path / "x.json")


@pytest.mark.parametrize("source, message", [
    ("{d}/nothing-{{000000..000001}}.tar", "nothing-000000.tar: shard not found"),
    ("{d}/a.tar::", "empty pattern between '::' separators"),
    ("{d}/a.tar.gz", "a.tar.gz: shard not found"),
    ("{d}/a.tar::s3://bucket/shards/{{0..3}}.zip", "s3://bucket/shards/0.zip: not a .tar shard"),
    ("s3://bucket/captions.json", "annotation files are read from local paths"),
    ("{d}/a.tar::{d}/a.tar", "is listed twice"),
])
def test_sources_that_cannot_be_read_are_one_line_errors(tmp_path, source, message):
    write_shard(tmp_path / "a.tar", [sample("k0")])
    with pytest.raises(ManifestError, match=message) as err:
        read_manifest(source.format(d=tmp_path))
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_a_tar_is_named(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"\x89PNG" + b"x" * 3000)
    with pytest.raises(ManifestError, match=r"junk.tar: not a (readable )?tar archive"):
        read_manifest(tmp_path / "junk.tar")
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ManifestError, match="empty.tar: empty file, not a tar shard"):
        read_manifest(tmp_path / "empty.tar")
    tarfile.open(tmp_path / "no-samples.tar", "w").close()  # a valid archive without members
    with pytest.raises(ManifestError, match=r"no-samples.tar: no usable samples in the shards; the first left out: "
                                            r".*no-samples.tar: no samples in the shard \(no member named KEY.EXT\)$"):
        read_manifest(tmp_path / "no-samples.tar")
    write_shard(tmp_path / "good.tar", [sample("k0")])
    m = read_manifest(f"{tmp_path}/good.tar::{tmp_path}/no-samples.tar")
    assert m.image_ids() == ["k0"] and m.skipped_samples[0]["key"] == ""


# ================================================================================================ rows
def test_shards_give_the_rows_of_the_caption_json_split_and_the_same_pixels(demo_dir, demo_shards):
    for split in ("val", "train"):
        m, ref = read_manifest(demo_shards[split]), read_manifest(demo_dir / f"{split}.json")
        assert m.image_ids() == ref.image_ids()
        assert m.caption_texts() == ref.caption_texts()
        assert m.caption_image_rows().tolist() == ref.caption_image_rows().tolist()
        assert m.splits() == [split]
        assert m.images[0].path == f"{split}-000000.tar/{ref.images[0].image_id}.png"
    for row in range(len(m.images)):
        a, b = np.asarray(open_image(m, row)), np.asarray(load_image(ref.image_path(row)))
        assert a.shape == b.shape and (a == b).all()


def test_each_shard_is_one_contiguous_range_of_image_and_caption_rows(demo_shards):
    m = read_manifest(demo_shards["train"])  # 42 images in 11 shards of 4
    ranges = shard_row_ranges(m)
    assert [Path(r.shard).name for r in ranges] == [f"train-{i:06d}.tar" for i in range(11)]
    assert [(r.image_start, r.image_stop) for r in ranges] == [(i, min(i + 4, 42)) for i in range(0, 42, 4)]
    assert [(r.caption_start, r.caption_stop) for r in ranges] == [(5 * i, 5 * min(i + 4, 42)) for i in range(0, 42, 4)]
    image_rows = m.caption_image_rows()
    for r in ranges:
        assert set(image_rows[r.caption_start:r.caption_stop]) == set(range(r.image_start, r.image_stop))


def test_image_reads_after_the_manifest_never_index_a_shard_again(demo_shards, monkeypatch):
    m = read_manifest(demo_shards["val"])

    def no_scan(shard):
        raise AssertionError(f"{shard} indexed again")

    monkeypatch.setattr(shard_scan_module, "scan_tar", no_scan)
    assert all(open_image(m, row).size == (96, 96) for row in reversed(range(len(m.images))))


# ================================================================================================ fingerprint
def test_fingerprint_survives_moving_the_folder_but_not_renaming_a_shard_or_changing_a_caption(demo_shards, tmp_path):
    src = Path(demo_shards["val"]).parent
    moved = tmp_path / "elsewhere" / "val"
    moved.mkdir(parents=True)
    for p in src.glob("val-*.tar"):
        shutil.copy(p, moved / p.name)
    before = read_manifest(demo_shards["val"]).fingerprint()
    assert read_manifest(f"{moved}/val-{{000000..000002}}.tar").fingerprint() == before
    assert read_manifest(f"{moved}/val-{{000000..000002}}.tar").fingerprint() == before  # stable across reads

    (moved / "val-000002.tar").rename(moved / "val-000009.tar")
    renamed = read_manifest(f"{moved}/val-{{000000..000001}}.tar::{moved}/val-000009.tar")
    assert renamed.caption_texts() == read_manifest(demo_shards["val"]).caption_texts()
    assert renamed.fingerprint() != before

    samples = [sample("k0", captions=("an edited caption",))]
    write_shard(tmp_path / "one" / "val-000000.tar", samples)
    a = read_manifest(tmp_path / "one" / "val-000000.tar").fingerprint()
    samples[0]["txt"] = "an edited caption, edited again"
    write_shard(tmp_path / "one" / "val-000000.tar", samples)
    assert read_manifest(tmp_path / "one" / "val-000000.tar").fingerprint() != a


def test_one_pattern_is_one_split_and_an_unlabelled_pattern_serves_any_split(demo_shards, tmp_path):
    both = read_manifest(f"{demo_shards['train']}::{demo_shards['val']}")
    assert both.splits() == ["train", "val"]
    for split in ("train", "val"):
        assert both.select_split(split).fingerprint() == read_manifest(demo_shards[split]).fingerprint()
    # the split word may sit in the folder's name instead of the file's
    folder = tmp_path / "test"
    folder.mkdir()
    for p in Path(demo_shards["test"]).parent.glob("test-*.tar"):
        shutil.copy(p, folder / p.name.replace("test-", "part-"))
    assert read_manifest(f"{folder}/part-{{000000..000002}}.tar").splits() == ["test"]
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(folder / "part-000000.tar", plain / "000000.tar")
    unlabelled = read_manifest(plain / "000000.tar")
    assert unlabelled.splits() == [""]
    assert unlabelled.select_split("train").fingerprint() == unlabelled.fingerprint()


# ================================================================================================ layout
def test_image_key_chooses_the_member_and_defaults_to_the_first_of_jpg_jpeg_png_webp(tmp_path):
    jpg = png_bytes((10, 200, 10), fmt="JPEG")
    write_shard(tmp_path / "s.tar", [{"__key__": "k0", "png": png_bytes(), "jpg": jpg, "txt": "a caption"}])
    default = read_manifest(tmp_path / "s.tar")
    assert default.images[0].path == "s.tar/k0.jpg"
    assert np.asarray(open_image(default, 0))[0, 0, 1] > 150  # the green JPEG
    chosen = read_manifest(tmp_path / "s.tar", shard_layout=ShardLayout(image_key="png"))
    assert chosen.images[0].path == "s.tar/k0.png"
    assert tuple(np.asarray(open_image(chosen, 0))[0, 0]) == (200, 30, 30)
    assert chosen.fingerprint() != default.fingerprint()
    either = read_manifest(tmp_path / "s.tar", shard_layout=ShardLayout(image_key="webp;png"))
    assert either.images[0].path == "s.tar/k0.png"


def test_caption_key_reads_another_text_member_or_a_json_list(tmp_path):
    write_shard(tmp_path / "s.tar", [
        {"__key__": "k0", "png": png_bytes(), "txt": "ignored", "caption": "first one\n\n  second one  \n",
         "json": json.dumps({"captions": ["from json", "and another"], "title": "one string"})}])
    assert [c.text for c in read_manifest(tmp_path / "s.tar").captions] == ["ignored"]
    other = read_manifest(tmp_path / "s.tar", shard_layout=ShardLayout(caption_key="caption"))
    assert other.caption_texts() == ["first one", "second one"]
    listed = read_manifest(tmp_path / "s.tar", shard_layout=ShardLayout(caption_key="json:captions"))
    assert listed.caption_texts() == ["from json", "and another"]
    single = read_manifest(tmp_path / "s.tar", shard_layout=ShardLayout(caption_key="json:title"))
    assert single.caption_texts() == ["one string"]
    with pytest.raises(ManifestError, match="json: names no field"):
        ShardLayout(caption_key="json:")


def test_id_field_makes_samples_with_the_same_id_one_image_as_img2dataset_writes_them(tmp_path):
    # one caption per sample, the image repeated: ids 7, 8, 7 across two shards
    write_shard(tmp_path / "part-000000.tar", [
        {"__key__": "000", "jpg": png_bytes(fmt="JPEG"), "txt": "a dog", "json": json.dumps({"image_id": 7})},
        {"__key__": "001", "jpg": png_bytes(fmt="JPEG"), "txt": "a cat", "json": json.dumps({"image_id": 8})}])
    write_shard(tmp_path / "part-000001.tar", [
        {"__key__": "002", "jpg": png_bytes(fmt="JPEG"), "txt": "a brown dog", "json": json.dumps({"image_id": 7})}])
    source = f"{tmp_path}/part-{{000000..000001}}.tar"
    merged = read_manifest(source, shard_layout=ShardLayout(id_field="image_id"))
    assert merged.image_ids() == ["7", "8"]
    assert [(c.text, c.image_row) for c in merged.captions] == [("a dog", 0), ("a cat", 1), ("a brown dog", 0)]
    assert merged.images[0].path == "part-000000.tar/000.jpg"
    ranges = shard_row_ranges(merged)
    assert [(r.image_start, r.image_stop, r.caption_start, r.caption_stop) for r in ranges] == [(0, 2, 0, 2),
                                                                                               (0, 0, 2, 3)]
    by_key = read_manifest(source)
    assert by_key.image_ids() == ["000", "001", "002"] and len(by_key.captions) == 3


# ================================================================================================ bad samples
def test_bad_samples_are_left_out_and_named_by_shard_key_and_reason(tmp_path):
    good = sample("k0")
    write_shard(tmp_path / "s.tar", [
        good,
        {"__key__": "k1", "png": png_bytes()},                                     # no caption member
        {"__key__": "k2", "png": png_bytes(), "txt": "\n  \n"},                    # empty caption member
        {"__key__": "k3", "png": png_bytes(), "txt": b"\xff\xfe caption"},         # not UTF-8
        sample("k4", image=False),                                                # no image: a bad image row
        {"__key__": "k5", "png": b"not a png at all", "txt": "undecodable"},      # a bad image row
    ])
    m = read_manifest(tmp_path / "s.tar")
    assert m.image_ids() == ["k0", "k4", "k5"]
    reasons = {s["key"]: s["reason"] for s in m.skipped_samples}
    assert set(reasons) == {"k1", "k2", "k3"}
    assert reasons["k1"].startswith("no caption member k1.txt (members: k1.png)")
    assert reasons["k2"] == "k2.txt: holds no caption"
    assert reasons["k3"].startswith("k3.txt: not UTF-8 text")
    assert all(s["shard"] == str(tmp_path / "s.tar") for s in m.skipped_samples)
    with pytest.raises(ImageError, match=r"s.tar: sample 'k4' \(image row 1\): no image member \(.jpg, .jpeg, "
                                         r".png, .webp; choose with --image-key\); members: k4.txt"):
        open_image(m, 1)
    with pytest.raises(ImageError, match=r"s.tar: member 'k5.png' \(image row 2\): not an image file"):
        open_image(m, 2)


def test_a_truncated_tar_keeps_its_whole_samples_and_names_the_one_it_cuts(tmp_path):
    write_shard(tmp_path / "s.tar", [sample(f"k{i}") for i in range(4)])
    data = (tmp_path / "s.tar").read_bytes()
    m = read_manifest(tmp_path / "s.tar")
    cut_inside = m.images[2].member.offset + 10  # inside k2's image
    (tmp_path / "s.tar").write_bytes(data[:cut_inside])
    cut = read_manifest(tmp_path / "s.tar")
    assert cut.image_ids() == ["k0", "k1"]
    [skipped] = cut.skipped_samples
    assert skipped["key"] == "k2" and skipped["reason"].startswith("truncated tar: ends inside member 'k2.png'")
    assert all(open_image(cut, r).size == (24, 16) for r in range(2))


def test_a_shard_changed_after_it_was_indexed_is_an_image_error_not_a_wrong_image(tmp_path):
    write_shard(tmp_path / "s.tar", [sample(f"k{i}") for i in range(3)])
    m = read_manifest(tmp_path / "s.tar")
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[:m.images[2].member.offset + 5])
    with pytest.raises(ImageError, match="shorter than when it was indexed"):
        open_image(m, 2)


# ================================================================================================ demo-data --shards
def test_demo_data_shards_hold_100_samples_each_with_png_txt_json_and_are_byte_identical_per_seed(tmp_path):
    args = ["demo-data", "--images", "240", "--seed", "3", "--shards", "--json"]
    first = CliRunner().invoke(main, [*args[:1], str(tmp_path / "a"), *args[1:]])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["counts"]["train"] == 120
    assert summary["shards"]["train"] == str(tmp_path / "a" / "shards" / "train-{000000..000001}.tar")
    train = read_manifest(summary["shards"]["train"])
    assert [r.image_stop - r.image_start for r in shard_row_ranges(train)] == [100, 20]
    assert train.caption_texts() == read_manifest(summary["files"]["train"]).caption_texts()
    with tarfile.open(tmp_path / "a" / "shards" / "train-000000.tar") as tar:
        key = train.images[0].image_id
        assert tar.getnames()[:3] == [f"{key}.json", f"{key}.png", f"{key}.txt"]
        assert json.loads(tar.extractfile(f"{key}.json").read()) == {"image_id": key}
        assert tar.extractfile(f"{key}.txt").read().decode().split("\n") == train.caption_texts()[:5]
    assert (tmp_path / "a" / "train.json").is_file() and (tmp_path / "a" / "all.json").is_file()
    CliRunner().invoke(main, [*args[:1], str(tmp_path / "b"), *args[1:]])
    for shard in sorted((tmp_path / "a" / "shards").glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "b" / "shards" / shard.name).read_bytes()
