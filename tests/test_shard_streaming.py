"""Streamed teacher rows when the training data are webdataset shards: the chunk-local order's units are the shards
(a shard's samples are one contiguous range of store rows), so a window reads a few shards' members and the chunks
of their rows only; each chunk is decoded once an epoch; and a run killed after a step checkpoint resumes to the
uninterrupted model. The store's teachers are precomputed arrays, so no model runs."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers_train import (assert_identical, invoke_json, one_torch_thread, read_jsonl, subprocess_env,
                           without_timings)
from pipeline.build import BuildConfig, build_store
from pipeline.manifest import read_manifest
from pipeline.shards import shard_row_ranges
from teacher_cache.store import Store
from train.chunk_order import chunk_local_batches, pair_units
from train.cli import train_main
from train.data import join_pairs

SHARDS = 11  # demo train split: 42 images in shards of 4 samples


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def teachers(demo_shards, tmp_path_factory) -> tuple[str, str]:
    """Precomputed teachers of the train shards: image features by image id, caption embeddings in manifest order."""
    folder = tmp_path_factory.mktemp("shard-teachers")
    manifest = read_manifest(demo_shards["train"])
    rng = np.random.default_rng(0)
    np.save(folder / "images.npy", rng.standard_normal((len(manifest.images), 24)).astype(np.float32))
    (folder / "images.ids.txt").write_text("\n".join(im.image_id for im in manifest.images))
    np.save(folder / "captions.npy", rng.standard_normal((len(manifest.captions), 16)).astype(np.float32))
    return f"precomputed:{folder / 'images.npy'}", f"precomputed:{folder / 'captions.npy'}"


@pytest.fixture(scope="module")
def shard_store(demo_shards, teachers, tmp_path_factory):
    out = tmp_path_factory.mktemp("shard-stream") / "store"
    build_store(BuildConfig(annotations=demo_shards["train"], out=str(out), image_teacher=teachers[0],
                            text_teacher=teachers[1], chunk_rows=8, neighbors=4, workers=0, device="cpu",
                            progress=False))
    return out


def test_the_units_of_shard_data_are_its_shards_and_a_window_reads_only_theirs(demo_shards, shard_store):
    manifest = read_manifest(demo_shards["train"])
    store = Store.open(shard_store, require_complete=True)
    pairs = join_pairs(manifest, [store])
    units = pair_units(pairs, store, store)
    assert units.modality == "shards" and units.n_units == SHARDS
    ranges = shard_row_ranges(manifest)
    for u, shard in enumerate(ranges):  # unit u: exactly the pairs of shard u, whose captions are one row range
        captions = pairs.caption_rows[units.unit_of_pair == u]
        assert captions.min() == shard.caption_start and captions.max() == shard.caption_stop - 1
        assert len(captions) == shard.caption_stop - shard.caption_start
    batches = chunk_local_batches(units.unit_of_pair, 8, seed=0, epoch=0, window=2, image_of_pair=pairs.image_rows)
    order = np.concatenate(batches)
    shards_in_sequence = units.unit_of_pair[order]
    # a window's shards share one stretch of the epoch, which no other shard enters: the stretches (first to last
    # pair) of shards overlap only within a window of (at most) 2
    span = {int(u): (int(np.flatnonzero(shards_in_sequence == u)[0]), int(np.flatnonzero(shards_in_sequence == u)[-1]))
            for u in np.unique(shards_in_sequence)}
    assert len(span) == SHARDS
    groups, end = [], -1
    for u, (first, last) in sorted(span.items(), key=lambda kv: kv[1][0]):
        if first > end:
            groups.append([])
        groups[-1].append(u)
        end = max(end, last)
    assert all(len(g) <= 2 for g in groups) and len(groups) == -(-SHARDS // 2)
    for b in batches:
        assert len(np.unique(units.unit_of_pair[b])) <= 4  # a window, and across its border the next


def test_a_streamed_run_from_shards_decodes_each_chunk_once_an_epoch_and_resumes_mid_epoch(demo_shards, teachers,
                                                                                           shard_store, tmp_path):
    student = f"frozen:{teachers[0]}+{teachers[1]}"  # the store's own teachers as backbones: nothing to compute

    def args_for(out):
        return ["--data", demo_shards["train"], "--split", "train", "--cache", str(shard_store), "--student", student,
                "--out", str(out), "--epochs", "3", "--batch-size", "8", "--lr", "1e-3", "--seed", "0",
                "--workers", "0", "--device", "cpu", "--json", "--set", "frozen.hidden=32", "--set",
                "frozen.embed_dim=32", "--set", "soft_labels.stream=true", "--set", "soft_labels.window=3",
                "--set", "log_every=1", "--save-every-steps", "5"]

    from test_step_checkpoints import KILLED_AFTER_A_MID_EPOCH_CHECKPOINT

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary = invoke_json(train_main, args_for(straight))
    plan = summary["soft_labels_plan"]
    assert summary["soft_labels_mode"] == "stream" and plan["unit_modality"] == "shards"
    assert plan["units"] == SHARDS and plan["window"] == 3
    assert plan["decodes_per_chunk_per_epoch"] == {"images": 1.0, "texts": 1.0}
    assert summary["backbone_passes"] == 0

    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_A_MID_EPOCH_CHECKPOINT, *args_for(resumed)],
                          capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "partial_epoch" in torch.load(resumed / "last.pt", map_location="cpu", weights_only=True)
    invoke_json(train_main, [*args_for(resumed), "--resume"])
    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(resumed / "last.pt", map_location="cpu", weights_only=True)
    for key in ("student", "loss", "optimizer", "scheduler", "rng", "epoch"):
        assert_identical(a[key], b[key], key)
    assert without_timings(read_jsonl(straight / "metrics.jsonl")) == without_timings(
        read_jsonl(resumed / "metrics.jsonl"))
