"""`cusa-train --resume` takes the run's settings from its folder: a command that contradicts them is refused in one
line naming the setting and leaves config.json as it was; only how a run is computed (device, workers, ...) and
--epochs (to extend it) may change, and summary.json's seconds count the whole run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from helpers_train import invoke, invoke_json, one_torch_thread, read_jsonl, run_script, train_args
from train.cli import train_main


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture
def two_epochs(demo_dir, demo_cache, tmp_path) -> tuple[Path, dict, bytes]:
    """A 2-epoch run at lr 3e-3 (not the default), its summary and the bytes of its config.json."""
    out = tmp_path / "run"
    summary = invoke_json(train_main, train_args(demo_dir, demo_cache, out, "--lr", "3e-3", epochs=2))
    return out, summary, (out / "config.json").read_bytes()


def test_resume_with_another_loss_is_refused_in_one_line_and_config_json_is_unchanged(two_epochs, demo_dir,
                                                                                     demo_cache):
    out, _, config = two_epochs
    proc = run_script("cusa-train", ["--data", demo_dir / "train.json", "--cache", demo_cache, "--out", out,
                                     "--resume", "--loss", "contrastive", "--json"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f'Error: {out}: --resume continues the run with its own settings, and loss is "cusa" there but '
        f'"contrastive" in this command; leave it out (the settings are in {out / "config.json"}) or start a new run '
        "in another --out"]
    assert (out / "config.json").read_bytes() == config


def test_resume_without_the_lr_flag_keeps_the_runs_lr_and_never_rewrites_config_json(two_epochs, demo_dir,
                                                                                     demo_cache):
    out, first, config = two_epochs
    # --lr left out, --epochs 3 extends the run, --workers may differ: none of it rewrites config.json
    summary = invoke_json(train_main, ["--data", demo_dir / "train.json", "--cache", demo_cache, "--out", out,
                                       "--resume", "--epochs", "3", "--workers", "1", "--json"])
    assert (out / "config.json").read_bytes() == config
    assert json.loads(config)["lr"] == 3e-3 and json.loads(config)["epochs"] == 2
    assert summary["epochs"] == 3 and summary["lr_groups"]["heads"]["lr"] == 3e-3
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 3 and last["config"]["lr"] == 3e-3 and last["config"]["epochs"] == 3
    assert [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()] == [
        {"epochs_done": 2, "changed": {"epochs": [2, 3], "workers": [0, 1]}}]
    epochs = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    # seconds: the whole run, both invocations
    assert summary["seconds"] > first["seconds"] and summary["resumes"] == 1

    # a later resume continues with the extended settings: no flags at all, not even --data and --cache
    again = invoke_json(train_main, ["--out", out, "--resume", "--json"])
    assert again["epochs"] == 3 and again["steps"] == summary["steps"]
    shorter = invoke(train_main, ["--out", out, "--resume", "--epochs", "2", "--json"])
    assert shorter.exit_code == 1
    assert shorter.output.strip().splitlines() == [
        f"Error: {out}: the run has trained 3 epochs; --epochs 2 cannot shorten it"]


def test_resume_accepts_flags_equal_to_the_runs_settings_and_refuses_a_set_override_naming_it(two_epochs, demo_dir,
                                                                                              demo_cache):
    out, _, config = two_epochs
    # every flag of the command that started it, repeated (a relative and an absolute path to the same file too)
    same = invoke_json(train_main, train_args(demo_dir, demo_cache, out, "--resume", "--lr", "3e-3", "--loss",
                                              "cusa", "--data", os.path.relpath(demo_dir / "train.json"), epochs=2))
    assert same["epochs"] == 2
    refused = invoke(train_main, ["--out", out, "--resume", "--set", "csa.rate=0.3", "--json"])
    assert refused.exit_code == 1
    assert "csa.rate is 0.1 there but 0.3 in this command" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert (out / "config.json").read_bytes() == config


def test_resume_of_a_folder_without_a_run_says_so_instead_of_starting_fresh(demo_dir, demo_cache, tmp_path):
    out = tmp_path / "nothing"
    result = invoke(train_main, ["--data", demo_dir / "train.json", "--cache", demo_cache, "--out", out, "--resume"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {out}: no run to resume here (no config.json); start it without --resume"]
    assert not out.exists()


def test_summary_json_ends_with_a_newline(two_epochs):
    out, summary, _ = two_epochs
    text = (out / "summary.json").read_text()
    assert text.endswith("}\n") and json.loads(text) == summary
    assert (out / "config.json").read_text().endswith("}\n")


def test_a_failed_train_leaves_no_empty_out_folder(demo_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke(train_main, train_args(demo_dir, tmp_path / "no-cache", out, epochs=1))
    assert result.exit_code == 1 and "not a cusa store" in result.output
    assert not out.exists()
