"""A build sharded over two torchrun processes (gloo, CPU) fills one store with exactly the bytes a one-process build
writes, each rank embedding a disjoint, chunk-aligned share."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers_build import BIN, BUILD_ARGS, one_thread_env, val_reference
from teacher_cache.store import MODALITIES, Store


@pytest.fixture(scope="module")
def two_process_build(demo_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dist") / "store"
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "pipeline.cli", "build",
         str(demo_dir / "val.json"), "--out", str(out), *BUILD_ARGS, "--json"],
        env=one_thread_env(), capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)  # only rank 0 prints


def test_two_process_build_writes_the_bytes_of_a_one_process_build(two_process_build, demo_dir, tmp_path_factory):
    out, summary = two_process_build
    reference = val_reference(demo_dir, tmp_path_factory.getbasetemp())
    sharded, single = Store.open(out, require_complete=True), Store.open(reference, require_complete=True)
    assert sharded.counts == single.counts == {"images": 9, "texts": 45}
    for modality in MODALITIES:
        # one thread per process on both sides, so the teachers' float sums run in the same order: equal bytes
        assert sharded.array(modality)[:].tobytes() == single.array(modality)[:].tobytes(), modality
        np.testing.assert_array_equal(sharded.neighbors(modality)[0], single.neighbors(modality)[0])
        np.testing.assert_array_equal(sharded.neighbors(modality)[1], single.neighbors(modality)[1])
    assert sharded.attrs["checksums"] == single.attrs["checksums"]
    assert sharded.fingerprint == single.fingerprint and sharded.teachers == single.teachers


def test_each_rank_embedded_a_disjoint_contiguous_share_and_the_summary_counts_both(two_process_build):
    out, summary = two_process_build
    store = Store.open(out)
    by_rank = {}
    for modality in MODALITIES:
        done = store.progress().done[modality]
        assert sorted(done) == list(range(store.n_chunks(modality)))
        by_rank[modality] = {r: sorted(c for c, m in done.items() if m["rank"] == r) for r in (0, 1)}
    # 3 image chunks and 12 caption chunks, split in contiguous halves (rank 1 takes the extra image chunk)
    assert by_rank["images"] == {0: [0], 1: [1, 2]}
    assert by_rank["texts"] == {0: list(range(6)), 1: list(range(6, 12))}
    assert summary["world_size"] == 2 and summary["complete"] is True
    assert (summary["images"]["rows"], summary["images"]["skipped_chunks"]) == (9, 0)
    assert (summary["texts"]["rows"], summary["texts"]["skipped_chunks"]) == (45, 0)
    assert store.attrs["build"]["world_size"] == 2
    assert not (out / "_build.lock").exists()
