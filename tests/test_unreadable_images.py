"""Unreadable images in stage 2, on a copy of the demo set with a truncated PNG: images a build skipped are left out
of validation and `cusa-eval` (with their captions, counted as skipped_images, never as misses); an image that
breaks inside a DataLoader worker stops the run with the one-line message the main process would give (file, store
row, reason, the option that helps), and a failure while validating loses no trained epoch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_train import (METRIC_KEYS, TINY_CLIP, invoke, invoke_json, one_torch_thread, read_jsonl, run_script,
                           train_args, without_timings)
from pipeline.build import BuildConfig, build_store
from pipeline.manifest import read_manifest
from teacher_cache.store import Store
from train.cli import eval_main, train_main
from train.evaluation_run import load_trained_student
from train.search_cli import search_main

@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def truncate(path: Path) -> bytes:
    """Cut a PNG in half (as an interrupted download leaves it); returns the original bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


def image_of(data: Path, split: str, index: int = 0) -> tuple[int, str]:
    """(row in all.json, relative path) of the ``index``-th image of ``split``."""
    manifest = read_manifest(str(data / "all.json"))
    row = int(manifest.image_rows_of_split(split)[index])
    return row, manifest.images[row].path


def copy_of(data: Path, tmp_path: Path) -> Path:
    """A private copy of the broken demo set (same annotations, so the same cache serves it)."""
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    return copy


@pytest.fixture(scope="module")
def broken(demo_dir, tmp_path_factory):
    """A copy of the demo set whose first test image is truncated, and a cache of all its splits built with
    --on-bad-image skip (which lists that image as skipped)."""
    root = tmp_path_factory.mktemp("broken")
    data = root / "data"
    shutil.copytree(demo_dir, data)
    row, rel = image_of(data, "test")
    truncate(data / rel)
    cache = root / "cache"
    with one_torch_thread():
        build_store(BuildConfig(annotations=str(data / "all.json"), out=str(cache), workers=0, batch_size=16,
                                chunk_rows=16, neighbors=8, progress=False, device="cpu", on_bad_image="skip"))
    assert [s["row"] for s in Store.open(cache).skipped_images] == [row]
    return data, cache, rel


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    return f"open_clip:local-dir:{folder}"


def error_lines(stderr: str) -> list[str]:
    """stderr less open_clip's own notes on starting from random weights (the tiny CLIP has none)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("WARNING:root:")]


def hand_recalls(image: np.ndarray, text: np.ndarray, image_of_caption: np.ndarray) -> dict[str, float]:
    sims = image @ text.T
    i2t = np.array([min(int((sims[i] > sims[i, j]).sum()) for j in np.flatnonzero(image_of_caption == i))
                    for i in range(len(image))])
    t2i = np.array([int((sims[:, j] > sims[image_of_caption[j], j]).sum()) for j in range(len(text))])
    return {f"{name}_r{k}": 100.0 * float(np.mean(ranks < k)) for name, ranks in (("i2t", i2t), ("t2i", t2i))
            for k in (1, 5, 10)}


@pytest.fixture(scope="module")
def frozen_run(broken, tmp_path_factory) -> tuple[Path, dict]:
    data, cache, _ = broken
    out = tmp_path_factory.mktemp("frozen") / "run"
    with one_torch_thread():
        summary = invoke_json(train_main, train_args(data, cache, out, "--val-data", data / "all.json",
                                                     "--val-split", "test", epochs=2))
    return out, summary


def test_validation_leaves_out_an_image_the_build_skipped_and_counts_it(frozen_run):
    out, summary = frozen_run
    assert summary["val_skipped_images"] == 1
    for record in (r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "epoch"):
        # 8 readable test images: every image->text recall is a whole number of eighths (9 images would give ninths)
        for k in ("i2t_r1", "i2t_r5", "i2t_r10"):
            assert record["val"][k] * 8 / 100 == pytest.approx(round(record["val"][k] * 8 / 100))


def test_eval_ranks_only_the_readable_images_and_reports_skipped_images(frozen_run, broken):
    out, _ = frozen_run
    data, cache, rel = broken
    proc = run_script("cusa-eval", [out, "--data", data / "all.json", "--split", "test", "--device", "cpu",
                                    "--workers", "0", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["skipped_images"] == 1 and result["skipped_image_details"][0]["path"] == rel
    assert (result["images"], result["captions"]) == (8, 40)
    # the same numbers as ranking the eight readable images and their forty captions by hand
    student, cfg, _ = load_trained_student(out / "best.pt", "cpu")
    store = Store.open(cache)
    manifest = read_manifest(str(data / "all.json"))
    rows = [r for r in manifest.image_rows_of_split("test").tolist() if manifest.images[r].path != rel]
    captions = [j for j, c in enumerate(manifest.captions) if c.image_row in rows]
    with torch.no_grad():
        image = student.encode_images(torch.from_numpy(store.load("images")[rows])).double().numpy()
        text = student.encode_texts(torch.from_numpy(store.load("texts")[captions])).double().numpy()
    image_of_caption = np.array([rows.index(manifest.captions[j].image_row) for j in captions])
    expected = hand_recalls(image, text, image_of_caption)
    for key in METRIC_KEYS:
        assert result[key] == pytest.approx(expected[key]), key

    human = run_script("cusa-eval", [out, "--data", data / "all.json", "--split", "test", "--device", "cpu",
                                     "--workers", "0"])
    assert human.returncode == 0, human.stderr[-3000:]
    assert (f"[test]: 8 images, 40 captions, skipped_images: 1 (unreadable: left out with their captions, not "
            "counted as misses)") in human.stdout.splitlines()[0]
    row = image_of(data, "test")[0]
    assert human.stdout.splitlines()[-1] == (f"skipped   {rel}: skipped by the build of {cache} (store row {row}): "
                                             "truncated or corrupt image data (image file is truncated)")


def test_open_clip_validation_skips_what_the_cache_skipped_with_two_workers(broken, tiny_clip, tmp_path):
    data, cache, _ = broken
    summary = invoke_json(train_main, train_args(data, cache, tmp_path / "run", "--student", tiny_clip,
                                                 "--val-data", data / "all.json", "--val-split", "test",
                                                 "--workers", "2", epochs=1))
    assert summary["val_skipped_images"] == 1 and summary["best_epoch"] == 1


def test_a_training_image_broken_after_the_build_fails_in_a_worker_with_one_line_naming_its_store_row(
        broken, tiny_clip, tmp_path):
    data, cache, _ = broken
    copy = copy_of(data, tmp_path)
    row, rel = image_of(copy, "train", 1)
    truncate(copy / rel)
    proc = run_script("cusa-train", train_args(copy, cache, tmp_path / "run", "--student", tiny_clip,
                                               "--workers", "2", epochs=1))
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr, lines
    # the row in the cache (all splits: not the row within the train split, which is 1)
    assert lines[0].startswith(f"Error: {copy / rel} (store row {row} of {cache}): truncated or corrupt")
    assert row != 1
    assert lines[0].endswith("rebuild the cache with --on-bad-image skip --overwrite")


def test_a_validation_failure_keeps_the_trained_epoch_and_a_resume_redoes_only_the_validation(
        broken, tiny_clip, tmp_path):
    data, cache, _ = broken
    copy = copy_of(data, tmp_path)
    val_row, val_rel = image_of(copy, "val")
    args = ("--student", tiny_clip, "--val-data", copy / "all.json", "--val-split", "val", "--workers", "2")
    straight = tmp_path / "straight"
    invoke_json(train_main, train_args(copy, cache, straight, *args, epochs=2))

    original = truncate(copy / val_rel)  # broken after the cache was built: no store lists it
    run = tmp_path / "run"
    proc = run_script("cusa-train", train_args(copy, cache, run, *args, epochs=2))
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, lines
    assert lines[0].startswith(f"Error: {copy / val_rel} (store row {val_row} of {cache}): truncated or corrupt")
    assert lines[0].endswith("(--on-bad-image skip leaves such images out of the evaluation)")
    kept = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert kept["epoch"] == 1 and kept["pending_validation"]["epoch"] == 1  # the trained epoch is kept

    (copy / val_rel).write_bytes(original)
    summary = invoke_json(train_main, train_args(copy, cache, run, "--resume", *args, epochs=2))
    assert summary["best_epoch"] is not None
    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    # the same run as one never interrupted: weights, best epoch and log
    assert a["epoch"] == b["epoch"] == 2 and a["best"] == b["best"] and "pending_validation" not in b
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert without_timings(read_jsonl(run / "metrics.jsonl")) == without_timings(read_jsonl(straight / "metrics.jsonl"))


def test_eval_of_an_image_no_store_lists_fails_in_one_line_or_skips_it_on_request(broken, tiny_clip, tmp_path):
    data, cache, _ = broken
    copy = copy_of(data, tmp_path)
    run = tmp_path / "run"
    invoke_json(train_main, train_args(copy, cache, run, "--student", tiny_clip, epochs=1))
    row, rel = image_of(copy, "val")
    truncate(copy / rel)
    args = [run, "--data", copy / "all.json", "--split", "val", "--device", "cpu", "--workers", "2", "--json"]
    failed = invoke(eval_main, args)
    assert failed.exit_code == 1
    lines = failed.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {copy / rel} (store row {row} of {cache}): truncated")
    assert lines[0].endswith("(--on-bad-image skip leaves such images out of the evaluation)")
    result = invoke_json(eval_main, args + ["--on-bad-image", "skip"])
    assert result["skipped_images"] == 1 and (result["images"], result["captions"]) == (8, 40)
    assert result["skipped_image_details"][0]["path"] == rel


def test_search_leaves_out_an_image_the_build_skipped_with_its_captions_and_lists_it(frozen_run, broken):
    out, _ = frozen_run
    data, cache, rel = broken
    args = [out, "--collection", data / "all.json", "--split", "test", "--device", "cpu", "-k", "20", "--json"]
    texts = invoke_json(search_main, [*args, "--query", "a red circle"])
    col = texts["collection"]
    assert (col["images"], col["captions"]) == (8, 40)
    row = image_of(data, "test")[0]
    assert [(s["path"], s["reason"]) for s in col["skipped"]] == [
        (str(data / rel), f"skipped by the build of {cache} (store row {row}): truncated or corrupt image data "
                          "(image file is truncated)")]
    assert len(texts["queries"][0]["results"]) == 8
    assert str(data / rel) not in {r["path"] for r in texts["queries"][0]["results"]}
    # a query image: the captions of the readable images only; the second search reads the cached embeddings
    query = data / image_of(data, "test", 1)[1]
    captions = invoke_json(search_main, [*args, "--image", query])
    assert captions["collection_cached"] and captions["collection"]["skipped"] == col["skipped"]
    manifest = read_manifest(str(data / "all.json"))
    gone = {c.text for c in manifest.captions if manifest.images[c.image_row].path == rel}
    found = {r["caption"] for r in captions["queries"][0]["results"]}
    assert len(found) == 20 and not found & gone


def test_examples_leave_out_an_image_the_build_skipped(frozen_run, broken, tmp_path):
    out, _ = frozen_run
    data, _, rel = broken
    result = invoke_json(eval_main, [out, "--data", data / "all.json", "--split", "test", "--device", "cpu",
                                     "--workers", "0", "--examples", "8", "--out", tmp_path / "ex", "--json"])
    assert result["skipped_images"] == 1 and result["examples"]["n"] == 8
    text = (tmp_path / "ex" / "examples.md").read_text()
    assert text.startswith("# Retrieval examples: run\n\n8 images and 40 captions of")
    assert Path(rel).name not in text
    # the examples' recalls are the evaluation's: the same images and captions ranked
    assert result["examples"]["recall_at_1"]["run"] == {"i2t": pytest.approx(result["i2t_r1"]),
                                                        "t2i": pytest.approx(result["t2i_r1"])}
