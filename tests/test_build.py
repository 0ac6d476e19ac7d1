"""The embedding job: a build killed mid-way (SIGKILL in a subprocess) resumes to exactly the uninterrupted store
without recomputing finished chunks; re-running a finished build embeds nothing. Real teachers, real Zarr, FAISS."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers_build import BUILD_ARGS, kill_build_after_image_chunks, one_torch_thread, val_reference
from pipeline.build import BuildConfig, build_store
from pipeline.cli import main
from teacher_cache.errors import StoreError
from teacher_cache.store import MODALITIES, Store


@pytest.fixture(scope="module")
def reference(demo_dir, tmp_path_factory) -> Path:
    return val_reference(demo_dir, tmp_path_factory.getbasetemp())


def markers(store: Path, modality: str) -> dict[str, int]:
    """Finished-chunk markers of a store: file name -> mtime in ns."""
    return {p.name: p.stat().st_mtime_ns for p in (store / "_progress" / modality).glob("*.json")}


def assert_same_store(a: Path, b: Path) -> None:
    """Same embedding bytes, the same neighbor tables and the same recorded checksums."""
    sa, sb = Store.open(a, require_complete=True), Store.open(b, require_complete=True)
    for modality in MODALITIES:
        ea, eb = sa.array(modality)[:], sb.array(modality)[:]
        assert ea.dtype == eb.dtype == np.float16
        assert ea.tobytes() == eb.tobytes(), modality
        ids_a, sims_a = sa.neighbors(modality)
        ids_b, sims_b = sb.neighbors(modality)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(sims_a, sims_b)
    assert sa.attrs["checksums"] == sb.attrs["checksums"]
    assert sa.fingerprint == sb.fingerprint and sa.teachers == sb.teachers
    assert sa.skipped_images == sb.skipped_images == []


def test_killed_build_resumes_to_the_uninterrupted_store_without_redoing_finished_chunks(demo_dir, reference,
                                                                                            tmp_path):
    out = tmp_path / "store"
    command = ["build", str(demo_dir / "val.json"), "--out", str(out), *BUILD_ARGS, "--json"]
    kill_build_after_image_chunks(command, out)

    done_images, done_texts = markers(out, "images"), markers(out, "texts")
    assert 2 <= len(done_images) <= 3 and len(done_images) + len(done_texts) < 3 + 12
    with pytest.raises(StoreError, match="incomplete"):
        Store.open(out, require_complete=True)
    assert Store.open(out).complete is False
    assert (out / "_build.lock").is_file()  # left behind by the killed process, taken over below

    with one_torch_thread():
        result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["complete"] is True
    assert summary["images"]["skipped_chunks"] == len(done_images) >= 2
    assert summary["texts"]["skipped_chunks"] == len(done_texts)
    rows_done = min(4 * len(done_images), 9)
    assert summary["images"]["rows"] == 9 - rows_done
    assert summary["texts"]["rows"] == 45 - sum(min(4, 45 - 4 * int(name[:8])) for name in done_texts)
    # the chunks finished before the kill were not written again
    assert {name: mtime for name, mtime in markers(out, "images").items() if name in done_images} == done_images
    assert {name: mtime for name, mtime in markers(out, "texts").items() if name in done_texts} == done_texts
    assert len(markers(out, "images")) == 3 and len(markers(out, "texts")) == 12
    assert not (out / "_build.lock").exists()

    assert_same_store(out, reference)


def test_rerunning_a_finished_build_embeds_nothing_and_rebuilds_only_a_changed_neighbor_table(demo_dir, reference,
                                                                                             tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    chunk_files = {p: p.stat().st_mtime_ns for m in MODALITIES for p in (out / m / "emb").rglob("*") if p.is_file()}
    with one_torch_thread():
        summary = build_store(BuildConfig(annotations=str(demo_dir / "val.json"), out=str(out), chunk_rows=4,
                                          neighbors=2, workers=0, device="cpu", progress=False))
    assert summary.complete
    assert (summary.images["rows"], summary.images["skipped_chunks"]) == (0, 3)
    assert (summary.texts["rows"], summary.texts["skipped_chunks"]) == (0, 12)
    assert {p: p.stat().st_mtime_ns for p in chunk_files} == chunk_files
    ref, new = Store.open(reference), Store.open(out, require_complete=True)
    for modality in MODALITIES:
        ids, sims = new.neighbors(modality)
        assert ids.shape == (new.counts[modality], 2)
        np.testing.assert_array_equal(ids, ref.neighbors(modality)[0][:, :2])
        np.testing.assert_array_equal(sims, ref.neighbors(modality)[1][:, :2])
        assert summary.neighbors[modality]["k"] == 2
    assert new.attrs["checksums"] == ref.attrs["checksums"]


def test_a_build_in_progress_holds_the_store_against_a_second_build(demo_dir, reference, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # the lock a live build on this host holds
        (out / "_build.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "since": 0}))
        result = CliRunner().invoke(main, ["build", str(demo_dir / "val.json"), "--out", str(out), *BUILD_ARGS])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "another build is running on this store" in result.stderr and f"pid {sleeper.pid}" in result.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
