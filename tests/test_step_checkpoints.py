"""Step-level checkpoints: `--save-every-steps N` writes last.pt mid-epoch, and a run killed after one resumes from
that step to the model, optimizer, random state and log of an uninterrupted run, bit for bit: for a frozen student
(dense and streamed soft labels) and for an open_clip student whose image augmentations are drawn per pair; and a run
trains the same whether its backbone features were computed or cached."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from helpers_train import (assert_identical, invoke, invoke_json, one_torch_thread, read_jsonl, subprocess_env,
                           train_args, without_timings)
from train.cli import train_main

# 210 pairs in batches of 32: 7 steps an epoch (numbered from 1). Every 3 steps: mid-epoch checkpoints after run-wide
# steps 3 and 6 (epoch 1), 9 and 12 (epoch 2: its steps 2 and 5), ...
EVERY = ("--save-every-steps", "3", "--set", "log_every=1")

# Dies right after the first step logged behind the first mid-epoch checkpoint of the second epoch: last.pt then holds
# the second epoch two steps in, and the log one step it must forget.
KILLED_AFTER_A_MID_EPOCH_CHECKPOINT = """
import os, signal, sys
import torch
torch.set_num_threads(1)
import train.trainer as trainer
from train.metrics_log import MetricsLogger
from train.cli import train_main

save, log = trainer.save_checkpoint, MetricsLogger.log
saved = []

def save_and_note(path, payload):
    save(path, payload)
    if "partial_epoch" in payload and payload["epoch"] >= 1:
        saved.append(payload["partial_epoch"])

def log_then_die(self, record):
    log(self, record)
    if saved and record["kind"] == "step":
        os.kill(os.getpid(), signal.SIGKILL)

trainer.save_checkpoint, MetricsLogger.log = save_and_note, log_then_die
train_main.main(sys.argv[1:], prog_name="cusa-train")
"""


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def straight_and_resumed(args_for, tmp_path) -> tuple[dict, dict, dict]:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    invoke_json(train_main, args_for(straight))
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_A_MID_EPOCH_CHECKPOINT, *args_for(resumed)],
                          capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = torch.load(resumed / "last.pt", map_location="cpu", weights_only=True)
    summary = invoke_json(train_main, [*args_for(resumed), "--resume"])
    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(resumed / "last.pt", map_location="cpu", weights_only=True)
    for key in ("student", "loss", "optimizer", "scheduler", "best", "rng", "epoch"):
        assert_identical(a[key], b[key], key)
    assert "partial_epoch" not in b  # the run ended on an epoch's checkpoint
    assert without_timings(read_jsonl(straight / "metrics.jsonl")) == without_timings(
        read_jsonl(resumed / "metrics.jsonl"))
    return killed, summary, a


def test_a_run_killed_mid_epoch_resumes_from_its_step_checkpoint_to_the_uninterrupted_model(demo_dir, demo_cache,
                                                                                           tmp_path):
    killed, summary, _ = straight_and_resumed(
        lambda out: train_args(demo_dir, demo_cache, out, *EVERY, epochs=3, val=True), tmp_path)
    assert killed["epoch"] == 1 and killed["partial_epoch"]["epoch"] == 2 and killed["partial_epoch"]["steps"] == 2
    assert set(killed["partial_epoch"]["sums"]) == {"loss", "contrastive", "csa", "usa"}
    assert summary["steps"] == 21


def test_a_streamed_run_resumes_mid_epoch_to_the_uninterrupted_model(demo_dir, demo_cache, tmp_path):
    killed, summary, _ = straight_and_resumed(
        lambda out: train_args(demo_dir, demo_cache, out, *EVERY, "--set", "soft_labels.max_memory_mib=0.21",
                               epochs=3), tmp_path)
    assert killed["partial_epoch"]["steps"] == 2
    assert summary["soft_labels_mode"] == "stream"


def test_an_open_clip_student_with_augmentation_in_workers_resumes_mid_epoch_exactly(demo_dir, demo_cache, tmp_path):
    from test_train_cli import TINY_CLIP

    (tmp_path / "tiny_clip").mkdir()
    (tmp_path / "tiny_clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    student = ("--student", f"open_clip:local-dir:{tmp_path / 'tiny_clip'}")

    def args_for(out):
        args = train_args(demo_dir, demo_cache, out, *student, *EVERY, epochs=2)
        return [a if a != "0" or args[i - 1] != "--workers" else "1" for i, a in enumerate(args)]

    killed, _, _ = straight_and_resumed(args_for, tmp_path / "runs")
    assert killed["partial_epoch"]["steps"] == 2


def test_step_checkpoints_are_only_extra_checkpoints(demo_dir, demo_cache, tmp_path):
    # the same run with and without them trains the same model
    invoke_json(train_main, train_args(demo_dir, demo_cache, tmp_path / "every", *EVERY, epochs=2))
    invoke_json(train_main, train_args(demo_dir, demo_cache, tmp_path / "plain", "--set", "log_every=1", epochs=2))
    a = torch.load(tmp_path / "every" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "plain" / "last.pt", map_location="cpu", weights_only=True)
    assert_identical(a["student"], b["student"])
    assert json.loads((tmp_path / "every" / "config.json").read_text())["save_every_steps"] == 3
    result = invoke(train_main, train_args(demo_dir, demo_cache, tmp_path / "bad", "--save-every-steps", "-1"))
    assert result.exit_code == 2 and "--save-every-steps" in result.output


def test_a_run_trains_the_same_whether_its_backbone_features_were_computed_or_cached(demo_dir, demo_cache, tmp_path):
    # computing them draws random numbers (DataLoader seeds); the run's own random state must not see that
    features = ("--set", f"frozen.feature_cache={tmp_path / 'features'}")
    first = invoke_json(train_main, train_args(demo_dir, demo_cache, tmp_path / "a", *features, epochs=1, val=True))
    second = invoke_json(train_main, train_args(demo_dir, demo_cache, tmp_path / "b", *features, epochs=1, val=True))
    assert first["backbone_passes"] == 1 and second["backbone_passes"] == 0
    assert without_timings(read_jsonl(tmp_path / "a" / "metrics.jsonl")) == without_timings(
        read_jsonl(tmp_path / "b" / "metrics.jsonl"))
