"""Two-process DDP training (torchrun, gloo, CPU) of the default frozen student: it checkpoints and validates on rank
0, trains without USA (uni heads unused), and with feature gathering every rank's loss sees the whole global batch
with the teacher block of exactly those rows — its first loss is the one-process loss of that batch."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from helpers_train import BIN, REPO, invoke_json, one_torch_thread, read_jsonl, subprocess_env, train_args
from train.cli import train_main

NO_DROPOUT = ("--set", "frozen.dropout=0")  # rank 1's dropout masks would differ from a one-process run's


def torchrun_train(args: list[str]) -> dict:
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(BIN / "cusa-train"),
                           *[str(a) for a in args]], capture_output=True, text=True, timeout=400,
                          env=subprocess_env(), cwd=REPO)
    if proc.returncode != 0:  # the ranks' own error lines, then the launcher's tail
        errors = [line for line in proc.stderr.splitlines() if "Error" in line and "[rank" in line]
        pytest.fail("\n".join(errors[:20] + ["..."] + proc.stderr.splitlines()[-40:]))
    return json.loads(proc.stdout)  # only rank 0 prints


def one_process_first_step(demo_dir: Path, demo_cache: Path, out: Path, *extra: str, batch_size: int) -> dict:
    with one_torch_thread():
        invoke_json(train_main, train_args(demo_dir, demo_cache, out, *NO_DROPOUT, *extra, epochs=1,
                                           batch_size=batch_size))
    return read_jsonl(out / "metrics.jsonl")[0]


@pytest.fixture(scope="module")
def ddp_run(demo_dir, demo_cache, tmp_path_factory) -> tuple[Path, dict]:
    """2 epochs, 16 pairs per rank, validated on the demo val split; contrastive + CSA only, so the uni heads get no
    gradient (DDP must not wait for them)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, torchrun_train(train_args(demo_dir, demo_cache, out, *NO_DROPOUT, "--loss", "csa", epochs=2,
                                          batch_size=16, val=True))


@pytest.fixture(scope="module")
def ddp_gather_run(demo_dir, demo_cache, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ddp_gather") / "run"
    return out, torchrun_train(train_args(demo_dir, demo_cache, out, *NO_DROPOUT, "--set", "gather=true",
                                          epochs=2, batch_size=16))


def test_two_process_run_checkpoints_and_validates_once_on_rank_zero(ddp_run):
    out, summary = ddp_run
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    # 210 pairs in global batches of 2 × 16: six full and one of 2 × 9
    assert summary["steps"] == 2 * 7
    assert summary["loss_terms"] == ["contrastive", "csa"]
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2  # epochs finished, numbered from 1
    assert isinstance(last["rng"], list) and len(last["rng"]) == 2  # each rank's RNG, for an exact resume
    assert not torch.equal(last["rng"][0]["torch"], last["rng"][1]["torch"])
    records = read_jsonl(out / "metrics.jsonl")
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]  # one writer: each epoch logged once
    rsums = [r["val"]["rsum"] for r in epochs]
    assert summary["best_epoch"] == rsums.index(max(rsums)) + 1
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == summary["best_epoch"]
    assert all(0.01 <= r["tau"] <= 0.10 and 0.10 <= r["tau_csa"] <= 0.99 for r in records)
    assert all(r["usa"] == 0.0 and r["csa"] > 0 for r in records)


def test_rank_zero_first_loss_is_the_one_process_loss_of_its_slice(ddp_run, demo_dir, demo_cache, tmp_path):
    # rank 0's first batch is the first 16 pairs of the epoch's permutation, as a one-process batch of 16 is
    out, _ = ddp_run
    ddp_first = read_jsonl(out / "metrics.jsonl")[0]
    single = one_process_first_step(demo_dir, demo_cache, tmp_path / "single", "--loss", "csa", batch_size=16)
    assert ddp_first["step"] == single["step"] == 0
    for term in ("loss", "contrastive", "csa"):
        assert ddp_first[term] == pytest.approx(single[term], rel=1e-5), term


def test_gathered_run_trains_and_its_first_loss_is_the_one_process_loss_of_the_global_batch(
        ddp_gather_run, demo_dir, demo_cache, tmp_path):
    out, summary = ddp_gather_run
    assert summary["world_size"] == 2 and summary["steps"] == 14
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 2
    # the gathered batch is rank 0's 16 pairs then rank 1's: the one-process batch of 32; the CSA and USA terms only
    # match when the teacher block was read for those 32 rows in that order
    gathered_first = read_jsonl(out / "metrics.jsonl")[0]
    single = one_process_first_step(demo_dir, demo_cache, tmp_path / "single", batch_size=32)
    for term in ("loss", "contrastive", "csa", "usa"):
        assert gathered_first[term] == pytest.approx(single[term], rel=1e-5), term
    assert gathered_first["csa"] > 0 and gathered_first["usa"] > 0
