"""How a run holds its teacher rows, end to end through `cusa-train` on the demo cache: dense while both modalities
fit `soft_labels.max_memory_mib`, streamed in the chunk-local order otherwise (each stored chunk decoded once an
epoch, resident rows within the budget), said in the log and in summary.json; a streamed run resumed after a kill
ends where an uninterrupted one does."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers_train import (invoke, invoke_json, one_torch_thread, read_jsonl, subprocess_env, train_args,
                           without_timings)
from teacher_cache.soft_labels import dense_bytes
from teacher_cache.store import Store
from train.cli import train_main

MIB = 1 << 20
# the demo cache holds 0.26 MiB of teacher rows; 0.21 MiB streams them a window of one image chunk at a time
SMALL_BUDGET = ("--set", "soft_labels.max_memory_mib=0.21")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def run(demo_dir, demo_cache, out, *extra, epochs=1) -> tuple[dict, str]:
    """summary.json and the console log of a run (without --json, which prints the summary only)."""
    args = [a for a in train_args(demo_dir, demo_cache, out, *extra, epochs=epochs) if a != "--json"]
    result = invoke(train_main, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text()), result.stderr


def test_auto_holds_the_rows_in_memory_when_both_modalities_fit_and_says_so(demo_dir, demo_cache, tmp_path):
    summary, log = run(demo_dir, demo_cache, tmp_path / "run")
    dense = dense_bytes(Store.open(demo_cache))
    assert summary["soft_labels_mode"] == "dense"
    assert summary["teacher_rows_mib"] == pytest.approx(dense / MIB, abs=1e-3)
    assert "soft labels: dense (auto: 0.3 MiB of teacher rows, budget 8192 MiB)" in log


def test_auto_streams_rows_over_the_budget_decoding_each_chunk_once_an_epoch(demo_dir, demo_cache, tmp_path):
    summary, log = run(demo_dir, demo_cache, tmp_path / "stream", *SMALL_BUDGET, epochs=2)
    assert summary["soft_labels_mode"] == "stream"
    assert 0 < summary["teacher_rows_mib"] <= 0.21
    plan = summary["soft_labels_plan"]
    assert plan["order"] == "chunk-local" and plan["unit_modality"] == "images" and plan["window"] == 1
    assert plan["decodes_per_chunk_per_epoch"] == {"images": 1.0, "texts": 1.0}
    assert "soft labels: stream (auto: 0.3 MiB of teacher rows exceed soft_labels.max_memory_mib=0.21; a window holds only ~2 batches" in log
    assert "the pairs of 1 of 3 image chunks shuffled together" in log
    records = read_jsonl(tmp_path / "stream" / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) and r["csa"] > 0 and r["usa"] > 0 for r in records)
    # another order than the full shuffle: other batches, other losses
    run(demo_dir, demo_cache, tmp_path / "dense", epochs=2)
    assert without_timings(read_jsonl(tmp_path / "dense" / "metrics.jsonl")) != without_timings(records)


def test_explicit_window_and_explicit_dense_override_the_budget(demo_dir, demo_cache, tmp_path):
    summary, log = run(demo_dir, demo_cache, tmp_path / "w", "--set", "soft_labels.stream=true", "--set",
                       "soft_labels.window=2")
    assert summary["soft_labels_mode"] == "stream" and summary["soft_labels_plan"]["window"] == 2
    summary, _ = run(demo_dir, demo_cache, tmp_path / "d", *SMALL_BUDGET, "--set", "soft_labels.stream=false")
    assert summary["soft_labels_mode"] == "dense"
    summary, log = run(demo_dir, demo_cache, tmp_path / "over", *SMALL_BUDGET, "--set", "soft_labels.window=3")
    assert summary["soft_labels_plan"]["window"] == 3 and "decoded more than once an epoch" in log


def test_runs_without_teacher_rows_say_what_they_hold(demo_dir, demo_cache, tmp_path):
    summary, _ = run(demo_dir, demo_cache, tmp_path / "con", "--loss", "contrastive")
    assert summary["soft_labels_mode"] == "none" and summary["teacher_rows_mib"] == 0
    summary, _ = run(demo_dir, demo_cache, tmp_path / "sparse", "--set", "soft_labels.mode=sparse", "--set",
                     "soft_labels.k=4")
    assert summary["soft_labels_mode"] == "sparse" and 0 < summary["teacher_rows_mib"] < 0.1


@pytest.mark.parametrize("item, message", [
    ("soft_labels.max_memory_mib=0.05", "soft_labels.max_memory_mib=0.05 cannot hold one window of stored chunks"),
    ("soft_labels.stream=sometimes", "soft_labels.stream must be true, false or auto, got 'sometimes'"),
    ("soft_labels.max_memory_mib=0", "soft_labels.max_memory_mib must be > 0"),
    ("soft_labels.window=-1", "soft_labels.window must be ≥ 0"),
])
def test_unusable_streaming_settings_are_one_line_errors(demo_dir, demo_cache, tmp_path, item, message):
    result = invoke(train_main, train_args(demo_dir, demo_cache, tmp_path / "bad", "--set", item, epochs=1))
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------ resume
KILLED_IN_SECOND_EPOCH = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from train.metrics_log import MetricsLogger
from train.cli import train_main

log = MetricsLogger.log
epochs_logged = []

def log_then_die(self, record):
    # dies right after the first step of the second epoch was logged: last.pt holds the first epoch
    log(self, record)
    if record["kind"] == "epoch":
        epochs_logged.append(record)
    elif record["kind"] == "step" and epochs_logged:
        os.kill(os.getpid(), signal.SIGKILL)

MetricsLogger.log = log_then_die
train_main.main(sys.argv[1:], prog_name="cusa-train")
"""


def test_a_streamed_run_resumed_after_a_kill_ends_with_the_uninterrupted_model(demo_dir, demo_cache, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = (*SMALL_BUDGET, "--set", "log_every=1")
    invoke_json(train_main, train_args(demo_dir, demo_cache, straight, *args, epochs=3))
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_SECOND_EPOCH,
                           *train_args(demo_dir, demo_cache, resumed, *args, epochs=3)],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed_at = torch.load(resumed / "last.pt", map_location="cpu", weights_only=False)["epoch"]
    assert killed_at == torch.load(straight / "last.pt", map_location="cpu", weights_only=False)["epoch"] - 2
    summary = invoke_json(train_main, train_args(demo_dir, demo_cache, resumed, "--resume", *args, epochs=3))
    assert summary["soft_labels_mode"] == "stream"
    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "last.pt", map_location="cpu", weights_only=False)
    for key in ("student", "loss"):
        assert set(a[key]) == set(b[key])
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert without_timings(read_jsonl(straight / "metrics.jsonl")) == without_timings(
        read_jsonl(resumed / "metrics.jsonl"))
