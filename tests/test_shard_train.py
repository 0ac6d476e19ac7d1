"""Stage 2 from webdataset shards: `cusa-train --data SHARDS`, `cusa-eval RUN --data SHARDS`, `cusa-ablate` and
`cusa-cache report` on a store built from the shards. The shards hold the demo files' bytes, so evaluating on the
test shards gives exactly the recalls evaluating on test.json gives, for a frozen student (features computed from
the shards) and for a random-init open_clip student (images decoded from the tars)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers_train import METRIC_KEYS, invoke_json, one_torch_thread
from pipeline.cli import main
from train.ablate_cli import ablate_main
from train.cli import eval_main, train_main

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
RECALLS = (*METRIC_KEYS, "rsum")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def shard_store(val_shard_cache, tmp_path_factory) -> Path:
    """A teacher cache built from the val shards (9 images, 45 captions): the training data of these runs. A copy of
    its own, so that the backbone features cached next to it are only those these tests compute."""
    copy = tmp_path_factory.mktemp("shard-train") / "cache"
    shutil.copytree(val_shard_cache, copy)
    return copy


def shard_train_args(demo_shards, cache: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return ["--data", demo_shards["val"], "--split", "val", "--cache", str(cache), "--out", str(out),
            "--epochs", str(epochs), "--batch-size", "4", "--lr", "1e-3", "--seed", "0", "--workers", "0",
            "--device", "cpu", "--json", "--set", "frozen.hidden=64", "--set", "frozen.embed_dim=64", *extra]


def evaluate(run: Path, data: str, *extra: str) -> dict:
    return invoke_json(eval_main, [run, "--data", data, "--device", "cpu", "--workers", "0", "--json", *extra])


def test_frozen_student_trains_from_shards_with_the_stores_features_and_evaluates_on_test_shards(
        demo_dir, demo_shards, shard_store, tmp_path):
    run = tmp_path / "run"
    summary = invoke_json(train_main, shard_train_args(demo_shards, shard_store, run, "--loss", "cusa"))
    assert summary["train_pairs"] == 45 and summary["backbone_passes"] == 0  # the store's own teacher features
    assert summary["skipped_samples"] == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == demo_shards["val"]
    assert (config["image_key"], config["caption_key"], config["id_field"]) == (None, "txt", None)

    from_shards = evaluate(run, demo_shards["test"])
    assert from_shards["backbone_passes"] == 1  # test features computed from the shards once
    assert (from_shards["images"], from_shards["captions"]) == (9, 45)
    from_json = evaluate(run, str(demo_dir / "test.json"))
    assert {k: from_shards[k] for k in RECALLS} == {k: from_json[k] for k in RECALLS}
    again = evaluate(run, demo_shards["test"])
    assert again["backbone_passes"] == 0 and {k: again[k] for k in RECALLS} == {k: from_shards[k] for k in RECALLS}


def test_open_clip_student_trains_on_images_read_from_the_tars_and_evaluates_on_test_shards(
        demo_dir, demo_shards, shard_store, tmp_path):
    (tmp_path / "tiny_clip").mkdir()
    (tmp_path / "tiny_clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    run = tmp_path / "run"
    summary = invoke_json(train_main, shard_train_args(
        demo_shards, shard_store, run, "--student", f"open_clip:local-dir:{tmp_path / 'tiny_clip'}",
        "--val-data", demo_shards["test"], "--val-split", "test", epochs=1))
    assert summary["steps"] == 11 and summary["backbone_passes"] == 0
    assert 0 <= summary["best_val"]["rsum"] <= 600
    from_shards = evaluate(run, demo_shards["test"])
    from_json = evaluate(run, str(demo_dir / "test.json"))
    assert {k: from_shards[k] for k in RECALLS} == {k: from_json[k] for k in RECALLS}
    assert from_shards["rsum"] == pytest.approx(summary["best_val"]["rsum"])


def test_layout_options_are_recorded_in_the_run_and_reused_by_eval(demo_shards, shard_store, tmp_path):
    run = tmp_path / "run"
    invoke_json(train_main, shard_train_args(demo_shards, shard_store, run, "--image-key", "png", "--caption-key",
                                             "txt", epochs=1))
    config = json.loads((run / "config.json").read_text())
    assert (config["image_key"], config["caption_key"]) == ("png", "txt")
    # the run's image key names the member to read; a wrong one given to cusa-eval overrides it and fails by name
    result = CliRunner().invoke(eval_main, [str(run), "--data", demo_shards["test"], "--device", "cpu",
                                            "--workers", "0", "--image-key", "jpg"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no image member (.jpg; choose with --image-key)" in result.output.strip().splitlines()[-1]


def test_ablate_and_report_take_shard_sources(demo_shards, shard_store, tmp_path):
    payload = invoke_json(ablate_main, [
        "--data", demo_shards["val"], "--split", "val", "--eval-data", demo_shards["test"], "--cache", str(shard_store),
        "--grid", "loss=cusa", "--seeds", "1", "--epochs", "1", "--batch-size", "4", "--lr", "1e-3",
        "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "grid"), "--set", "frozen.hidden=64",
        "--set", "frozen.embed_dim=64", "--json"])
    assert [s["name"] for s in payload["settings"]] == ["loss=contrastive", "loss=cusa"]
    assert payload["counts"]["teacher_passes"] == 0 and payload["counts"]["backbone_passes"] <= 1
    assert all(0 <= s["mean"]["rsum"] <= 600 for s in payload["settings"])

    result = CliRunner().invoke(main, ["report", str(shard_store), "--data", demo_shards["val"], "--out",
                                       str(tmp_path / "report"), "--examples", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["counts"]["images"] == 9 and report["counts"]["captions"] == 45
    assert report["examples"]["images"][0]["path"].startswith("val-000000.tar/")
    assert Path(report["files"]["examples"]).stat().st_size > 10_000


def test_report_thumbnails_come_from_the_shard_members(demo_shards):
    from pipeline.manifest import read_manifest
    from pipeline.report import _thumbnail

    manifest = read_manifest(demo_shards["val"])
    rows = {r.path: i for i, r in enumerate(manifest.images)}
    thumb = _thumbnail(manifest, rows, manifest.images[3].path)
    assert thumb is not None and thumb.shape == (96, 96, 3)
    assert _thumbnail(manifest, rows, "val-000000.tar/not-a-member.png") is None
