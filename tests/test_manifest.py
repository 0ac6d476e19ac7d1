"""Annotation readers, format detection, fingerprints and split selection of pipeline.manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ManifestError
from pipeline.manifest import (
    CaptionRecord,
    ImageRecord,
    Manifest,
    detect_format,
    read_manifest,
    split_from_filename,
)


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def karpathy_coco() -> dict:
    return {
        "dataset": "coco",
        "images": [
            {"filepath": "val2014", "filename": "a.jpg", "cocoid": 11, "split": "test",
             "sentences": [{"raw": "A cat on a mat. "}, {"raw": "a sleeping cat"}]},
            {"filepath": "train2014", "filename": "b.jpg", "cocoid": 22, "split": "train",
             "sentences": [{"raw": "Two dogs"}]},
            {"filepath": "val2014", "filename": "c.jpg", "cocoid": 33, "split": "restval",
             "sentences": [{"raw": "a red bus"}, {"raw": "a bus on a street"}, {"raw": "public transport"}]},
            {"filepath": "val2014", "filename": "d.jpg", "cocoid": 44, "split": "val",
             "sentences": [{"raw": "a kite"}]},
        ],
    }


# ---------------------------------------------------------------- readers


def test_karpathy_coco_reads_ids_paths_splits_and_captions_in_order(tmp_path: Path) -> None:
    path = write_json(tmp_path / "dataset_coco.json", karpathy_coco())
    m = read_manifest(path)
    assert m.format == "karpathy"
    assert m.image_ids() == ["11", "22", "33", "44"]
    assert [r.path for r in m.images] == ["val2014/a.jpg", "train2014/b.jpg", "val2014/c.jpg", "val2014/d.jpg"]
    # restval is trained on in the standard protocol
    assert [r.split for r in m.images] == ["test", "train", "train", "val"]
    assert m.caption_texts() == ["A cat on a mat.", "a sleeping cat", "Two dogs", "a red bus",
                                 "a bus on a street", "public transport", "a kite"]
    rows = m.caption_image_rows()
    assert rows.dtype == np.int64
    assert rows.tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert m.image_root == str(tmp_path)
    assert m.source == str(path)
    assert m.image_path(0) == tmp_path / "val2014" / "a.jpg"
    assert m.splits() == ["test", "train", "val"]


def test_karpathy_flickr_uses_imgid_and_bare_filename(tmp_path: Path) -> None:
    data = {"dataset": "flickr30k", "images": [
        {"filename": "1000.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "a man"}]},
        {"filename": "1001.jpg", "imgid": 1, "split": "test", "sentences": [{"raw": "a woman"}, {"raw": "a lady"}]},
        {"filename": "1002.jpg", "split": "val", "sentences": [{"raw": "a child"}]},
    ]}
    m = read_manifest(write_json(tmp_path / "dataset_flickr30k.json", data), image_root=tmp_path / "flickr30k-images")
    assert m.image_ids() == ["0", "1", "1002.jpg"]  # filename when there is no numeric id
    assert [r.path for r in m.images] == ["1000.jpg", "1001.jpg", "1002.jpg"]
    assert m.image_path(1) == tmp_path / "flickr30k-images" / "1001.jpg"
    assert m.caption_image_rows().tolist() == [0, 1, 1, 2]


def test_caption_json_merges_entries_of_one_image_and_infers_split_from_file_name(tmp_path: Path) -> None:
    entries = [
        {"image": "img/x.jpg", "caption": "first x", "image_id": 7},
        {"image": "img/y.jpg", "caption": "first y"},
        {"image": "img/x.jpg", "caption": "second x", "image_id": 7},
        {"image": "img/y.jpg", "caption": ["second y", "third y"]},
        {"image_path": "img/z.jpg", "caption": ["only z"], "image_id": "z1"},
    ]
    m = read_manifest(write_json(tmp_path / "coco_karpathy_test.json", entries))
    assert m.format == "caption-json"
    assert m.images == [
        ImageRecord("7", "img/x.jpg", "test"),
        ImageRecord("img/y.jpg", "img/y.jpg", "test"),  # no id: the path is the id
        ImageRecord("z1", "img/z.jpg", "test"),
    ]
    # captions keep file order; merged images just share a row
    assert m.captions == [
        CaptionRecord("first x", 0), CaptionRecord("first y", 1), CaptionRecord("second x", 0),
        CaptionRecord("second y", 1), CaptionRecord("third y", 1), CaptionRecord("only z", 2),
    ]


def test_caption_json_entry_split_wins_over_file_name_and_unlabelled_file_has_empty_split(tmp_path: Path) -> None:
    labelled = [{"image": "a.png", "caption": "x", "split": "val"}, {"image": "b.png", "caption": "y"}]
    m = read_manifest(write_json(tmp_path / "flickr_train.json", labelled))
    assert [r.split for r in m.images] == ["val", "train"]
    m = read_manifest(write_json(tmp_path / "captions.json", [{"image": "a.png", "caption": "x"}]))
    assert m.splits() == [""]


@pytest.mark.parametrize(
    ("name", "split"),
    [("coco_karpathy_train.json", "train"), ("coco_karpathy_val.json", "val"), ("f30k-test.csv", "test"),
     ("restval.json", "train"), ("captions.json", ""), ("train_and_test.json", ""), ("contest.json", "")],
)
def test_split_from_filename_matches_whole_words_only(name: str, split: str) -> None:
    assert split_from_filename(name) == split


def test_csv_reader_merges_rows_and_reads_split_and_id_columns(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text(
        "file,text,key,split\n"
        "p/1.jpg,\"a dog, running\",d1,train\n"
        "p/2.jpg,a cat,c1,test\n"
        "p/1.jpg,\"a dog\nin two lines\",d1,train\n",
        encoding="utf-8",
    )
    m = read_manifest(path, image_column="file", caption_column="text", id_column="key")
    assert m.format == "csv"
    assert m.images == [ImageRecord("d1", "p/1.jpg", "train"), ImageRecord("c1", "p/2.jpg", "test")]
    assert m.caption_texts() == ["a dog, running", "a cat", "a dog\nin two lines"]
    assert m.caption_image_rows().tolist() == [0, 1, 0]


def test_tsv_and_sniffed_txt_without_split_column(tmp_path: Path) -> None:
    tsv = tmp_path / "data.tsv"
    tsv.write_text("image\tcaption\na.jpg\tone, two\nb.jpg\tthree\na.jpg\tfour\n", encoding="utf-8")
    m = read_manifest(tsv)
    assert [r.image_id for r in m.images] == ["a.jpg", "b.jpg"]
    assert m.caption_texts() == ["one, two", "three", "four"]
    assert m.splits() == [""]
    txt = tmp_path / "val_pairs.txt"
    txt.write_text("image|caption\na.jpg|hello there\nb.jpg|general kenobi\n", encoding="utf-8")
    m = read_manifest(txt)
    assert m.caption_texts() == ["hello there", "general kenobi"]
    assert m.splits() == ["val"]  # from the file name


def test_absolute_image_paths_are_kept_and_not_joined_to_the_root(tmp_path: Path) -> None:
    absolute = str(tmp_path / "elsewhere" / "a.png")
    m = read_manifest(write_json(tmp_path / "c.json", [{"image": absolute, "caption": "x"}]), image_root="/data")
    assert m.image_path(0) == Path(absolute)


def test_dot_dot_inside_the_root_is_allowed(tmp_path: Path) -> None:
    m = read_manifest(write_json(tmp_path / "c.json", [{"image": "a/../b.png", "caption": "x"}]))
    assert m.images[0].path == "a/../b.png"


# ---------------------------------------------------------------- detection


def test_detect_format_by_extension_and_top_level_type(tmp_path: Path) -> None:
    assert detect_format(write_json(tmp_path / "k.json", karpathy_coco())) == "karpathy"
    assert detect_format(write_json(tmp_path / "c.json", [{"image": "a", "caption": "b"}])) == "caption-json"
    for name in ("a.csv", "a.tsv", "a.txt"):
        (tmp_path / name).write_text("image,caption\n", encoding="utf-8")
        assert detect_format(tmp_path / name) == "csv"
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    with pytest.raises(ManifestError, match=r"a\.parquet.*'\.parquet'"):
        detect_format(tmp_path / "a.parquet")
    with pytest.raises(ManifestError, match=r"a\.parquet"):
        read_manifest(tmp_path / "a.parquet")


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    path = write_json(tmp_path / "k.json", karpathy_coco())
    assert read_manifest(path, format="karpathy").format == "karpathy"
    with pytest.raises(ManifestError, match=r"k\.json: top level must be a list"):
        read_manifest(path, format="caption-json")
    with pytest.raises(ManifestError, match="unknown annotation format 'xml'"):
        read_manifest(path, format="xml")


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_across_reads_locations_and_processes(tmp_path: Path) -> None:
    data = karpathy_coco()
    a = read_manifest(write_json(tmp_path / "a.json", data))
    (tmp_path / "moved").mkdir()
    b = read_manifest(write_json(tmp_path / "moved" / "b.json", data), image_root="/somewhere/else")
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64 and int(a.fingerprint(), 16) >= 0
    code = (
        "from pipeline.manifest import read_manifest; import sys; "
        "print(read_manifest(sys.argv[1]).fingerprint())"
    )
    # A fresh interpreter has a different hash seed: the fingerprint must not depend on it.
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.json")],
                         capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == a.fingerprint()


def test_fingerprint_changes_with_each_field() -> None:
    base = Manifest(
        images=[ImageRecord("1", "a.jpg", "train"), ImageRecord("2", "b.jpg", "test")],
        captions=[CaptionRecord("one", 0), CaptionRecord("two", 1)],
        source="x.json", image_root="/r", format="caption-json",
    )
    variants = [
        Manifest([ImageRecord("9", "a.jpg", "train"), base.images[1]], base.captions, "x", "/r", "caption-json"),
        Manifest([ImageRecord("1", "z.jpg", "train"), base.images[1]], base.captions, "x", "/r", "caption-json"),
        Manifest([ImageRecord("1", "a.jpg", "val"), base.images[1]], base.captions, "x", "/r", "caption-json"),
        Manifest(base.images, [CaptionRecord("one!", 0), base.captions[1]], "x", "/r", "caption-json"),
        Manifest(base.images, [CaptionRecord("one", 1), base.captions[1]], "x", "/r", "caption-json"),
        Manifest(base.images, base.captions[::-1], "x", "/r", "caption-json"),
        Manifest(base.images, base.captions[:1], "x", "/r", "caption-json"),
    ]
    prints = {base.fingerprint()} | {v.fingerprint() for v in variants}
    assert len(prints) == 1 + len(variants)
    # source, root and format are not content
    same = Manifest(base.images, base.captions, "other.csv", "/elsewhere", "csv")
    assert same.fingerprint() == base.fingerprint()


def test_fingerprint_handles_non_ascii_and_lone_surrogates(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('[{"image": "caf\u00e9.png", "caption": "bad \\ud800 text"}]', encoding="utf-8")
    m = read_manifest(path)
    assert m.images[0].path == "caf\u00e9.png" and m.captions[0].text == "bad \ud800 text"
    assert len(m.fingerprint()) == 64


def test_fingerprint_separates_field_boundaries() -> None:
    # naive concatenation would make these two equal
    a = Manifest([ImageRecord("1", "ab", "")], [CaptionRecord("c", 0)], "s", "r", "csv")
    b = Manifest([ImageRecord("1a", "b", "")], [CaptionRecord("c", 0)], "s", "r", "csv")
    assert a.fingerprint() != b.fingerprint()


# ---------------------------------------------------------------- select_split


def test_select_split_keeps_order_and_remaps_caption_rows(tmp_path: Path) -> None:
    m = read_manifest(write_json(tmp_path / "dataset_coco.json", karpathy_coco()))
    train = m.select_split("train")
    assert train.image_ids() == ["22", "33"]
    assert train.caption_texts() == ["Two dogs", "a red bus", "a bus on a street", "public transport"]
    assert train.caption_image_rows().tolist() == [0, 1, 1, 1]
    assert train.source == m.source and train.image_root == m.image_root and train.format == "karpathy"
    assert train.image_path(1) == tmp_path / "val2014" / "c.jpg"
    test = m.select_split("test")
    assert test.image_ids() == ["11"] and test.caption_image_rows().tolist() == [0, 0]
    assert m.select_split("all") is m
    assert m.image_rows_of_split("train").tolist() == [1, 2]
    assert m.image_rows_of_split("all").tolist() == [0, 1, 2, 3]
    assert train.fingerprint() != m.fingerprint()


def test_select_split_of_unlabelled_file_returns_everything(tmp_path: Path) -> None:
    entries = [{"image": "a", "caption": "x"}, {"image": "b", "caption": "y"}]
    m = read_manifest(write_json(tmp_path / "captions.json", entries))
    assert m.select_split("test") is m
    assert m.select_split("train") is m
    assert m.image_rows_of_split("train").tolist() == [0, 1]


def test_select_missing_split_lists_the_splits_present(tmp_path: Path) -> None:
    m = read_manifest(write_json(tmp_path / "dataset_coco.json", karpathy_coco()))
    with pytest.raises(ManifestError) as err:
        m.select_split("dev")
    expected = f"{tmp_path / 'dataset_coco.json'}: no images in split 'dev'; splits present: test, train, val"
    assert str(err.value) == expected


# ---------------------------------------------------------------- errors


def error_of(path: Path, **kwargs: object) -> str:
    with pytest.raises(ManifestError) as err:
        read_manifest(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n {"image": "a.jpg",\n  "caption": "x"\n ,, }\n]', encoding="utf-8")
    assert "malformed JSON at line 4 column 3" in error_of(path)


@pytest.mark.parametrize("data", [{"annotations": []}, "just a string", 42])
def test_wrong_top_level_type_is_refused(tmp_path: Path, data: object) -> None:
    assert "top level is" in error_of(write_json(tmp_path / "t.json", data))


def test_karpathy_images_not_a_list_is_refused(tmp_path: Path) -> None:
    assert "'images' is a list" in error_of(write_json(tmp_path / "k.json", {"images": {"a": 1}}))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"caption": "x"}, "entry 1: missing field 'image' (or 'image_path')"),
        ({"image": "", "caption": "x"}, "entry 1: field 'image' must be a non-empty string"),
        ({"image": "b.png"}, "entry 1: missing field 'caption'"),
        ({"image": "b.png", "caption": "   "}, "entry 1: caption is empty"),
        ({"image": "b.png", "caption": 5}, "entry 1: caption must be a string, got int"),
        ({"image": "b.png", "caption": ["ok", None]}, "entry 1.caption[1]: caption must be a string, got NoneType"),
        ({"image": "b.png", "caption": []}, "entry 1: field 'caption' is an empty list"),
        ({"image": "../b.png", "caption": "x"}, "entry 1: image path '../b.png' escapes the image root"),
        ({"image": "a/../../b.png", "caption": "x"}, "entry 1: image path 'a/../../b.png' escapes the image root"),
        ({"image": "b.png", "caption": "x", "split": 3}, "entry 1: field 'split' must be a string"),
        ("not an object", "entry 1: expected an object, got str"),
    ],
)
def test_caption_json_entry_errors_name_file_entry_and_field(tmp_path: Path, entry: object, expected: str) -> None:
    path = write_json(tmp_path / "caps.json", [{"image": "a.png", "caption": "fine"}, entry])
    assert expected in error_of(path)


def test_duplicate_image_id_with_conflicting_path_is_refused(tmp_path: Path) -> None:
    entries = [{"image": "a.png", "caption": "x", "image_id": 1}, {"image": "b.png", "caption": "y", "image_id": 1}]
    message = error_of(write_json(tmp_path / "caps.json", entries))
    assert "entry 1: image id '1' has path 'b.png' but entry 0 gave it path 'a.png'" in message


def test_same_image_in_two_splits_is_refused(tmp_path: Path) -> None:
    entries = [{"image": "a.png", "caption": "x", "split": "train"},
               {"image": "a.png", "caption": "y", "split": "test"}]
    assert "entry 1: image 'a.png' is in split 'test' but entry 0 put it in split 'train'" in error_of(
        write_json(tmp_path / "caps.json", entries))


def test_karpathy_entry_errors(tmp_path: Path) -> None:
    data = karpathy_coco()
    data["images"][2]["sentences"] = []
    assert "images[2]: image '33' has no captions" in error_of(write_json(tmp_path / "k1.json", data))
    data = karpathy_coco()
    del data["images"][1]["filename"]
    assert "images[1]: missing field 'filename'" in error_of(write_json(tmp_path / "k2.json", data))
    data = karpathy_coco()
    data["images"][3]["sentences"][0] = {"tokens": ["a"]}
    assert "images[3].sentences[0]: missing field 'raw'" in error_of(write_json(tmp_path / "k3.json", data))
    data = karpathy_coco()
    data["images"][0]["sentences"][1]["raw"] = " \t"
    assert "images[0].sentences[1]: caption is empty" in error_of(write_json(tmp_path / "k4.json", data))
    data = karpathy_coco()
    data["images"][3]["cocoid"] = 11
    assert "images[3]: image id '11' has path 'val2014/d.jpg' but images[0] gave it path 'val2014/a.jpg'" in error_of(
        write_json(tmp_path / "k5.json", data))
    data = karpathy_coco()
    del data["images"][0]["sentences"]
    assert "images[0]: missing field 'sentences'" in error_of(write_json(tmp_path / "k6.json", data))


def test_csv_errors_name_the_line_and_list_columns(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("img,text\na.jpg,hello\n", encoding="utf-8")
    assert "missing column(s) 'image', 'caption'; columns present: 'img', 'text'" in error_of(path)
    assert "missing column(s) 'key'; columns present: 'img', 'text'" in error_of(
        path, image_column="img", caption_column="text", id_column="key")
    path.write_text("image,caption\na.jpg,hello\nb.jpg,\n", encoding="utf-8")
    assert "line 3: caption is empty" in error_of(path)
    path.write_text("image,caption\na.jpg,hello\n,world\n", encoding="utf-8")
    assert "line 3: column 'image' is empty" in error_of(path)
    path.write_text("image,caption\n../a.jpg,hello\n", encoding="utf-8")
    assert "line 2: image path '../a.jpg' escapes the image root" in error_of(path)
    path.write_text("", encoding="utf-8")
    assert "empty file" in error_of(path)


def test_missing_empty_and_non_utf8_files(tmp_path: Path) -> None:
    assert "annotation file not found" in error_of(tmp_path / "nope.json")
    write_json(tmp_path / "empty.json", [])
    assert "no images in the annotation file" in error_of(tmp_path / "empty.json")
    (tmp_path / "latin.csv").write_bytes("image,caption\na.jpg,caf\xe9\n".encode("latin-1"))
    assert "not UTF-8 text" in error_of(tmp_path / "latin.csv")
