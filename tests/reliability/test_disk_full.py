"""Disk full or unwritable output: the build stops with one line naming the store and the error, the chunks it
finished stay valid, the lock is released, and running the same command again resumes to the uninterrupted store.

A full disk is simulated two ways: the CUSA_FAULT_AT hook raising ENOSPC at chosen writes, and a real failing write
— the build process runs under RLIMIT_FSIZE, so the kernel refuses (EFBIG) the first write past the limit, root or
not, with no mount needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from reliability_support import assert_same_store, markers, one_error_line
from teacher_cache.errors import StoreError
from teacher_cache.store import Store


def check_stopped_cleanly(out: Path, line: str, reason: str) -> dict:
    assert str(out) in line and reason in line and "re-run the same command to resume" in line, line
    assert not (out / "_build.lock").exists()
    with pytest.raises(StoreError, match="incomplete"):
        Store.open(out, require_complete=True)
    store = Store.open(out)
    assert store.changed_since_written() == []  # every chunk marked finished holds the rows it was written with
    return markers(out)


def resume_and_compare(server, args: list[str], out: Path, reference: Path, finished: dict) -> None:
    result = server.run(args)
    assert result["rc"] == 0, result["stderr"]
    assert {k: v for k, v in markers(out).items() if k in finished} == finished  # not recomputed
    assert_same_store(out, reference)


ENOSPC_AT = {
    "image-chunk": ("image_chunk_data:2", {"images": 1, "texts": 0}),
    "caption-chunk": ("text_chunk_data:3", {"images": 3, "texts": 2}),
    "neighbor-table": ("neighbors_texts:1", {"images": 3, "texts": 7}),
}


@pytest.mark.parametrize("case", ENOSPC_AT, ids=list(ENOSPC_AT))
def test_a_full_disk_stops_the_build_with_one_line_and_the_next_run_resumes(case, server, tiny, reference, tmp_path):
    fault, finished_chunks = ENOSPC_AT[case]
    out = tmp_path / "store"
    line = one_error_line(server.run(tiny.build_args(out), fault=f"{fault}:enospc"))
    finished = check_stopped_cleanly(out, line, "No space left on device")
    for modality, n in finished_chunks.items():
        assert sum(k.startswith(f"{modality}/") for k in finished) == n
    resume_and_compare(server, tiny.build_args(out), out, reference[0], finished)


def test_a_real_failed_chunk_write_stops_the_build_with_one_line_and_the_next_run_resumes(server, tiny, tmp_path):
    # MiniLM rows make 2.2 KB caption chunks; image chunks and every metadata document stay under 1.6 KB
    args = lambda out: tiny.build_args(out, text_teacher="minilm-l6")  # noqa: E731
    reference = tmp_path / "reference"
    assert server.run(args(reference))["rc"] == 0
    out = tmp_path / "store"
    line = one_error_line(server.run(args(out), fsize_limit=1600))
    finished = check_stopped_cleanly(out, line, "File too large")
    assert sorted(finished) == ["images/00000000.json", "images/00000001.json", "images/00000002.json"]
    resume_and_compare(server, args(out), out, reference, finished)


def test_a_failed_write_of_the_completion_mark_leaves_the_store_incomplete_and_the_next_run_finishes(
        server, tiny, reference, tmp_path):
    out = tmp_path / "store"
    # every file fits except the final root document (chunk checksums, digests, file sizes: about 5.7 KB)
    line = one_error_line(server.run(tiny.build_args(out), fsize_limit=3000))
    finished = check_stopped_cleanly(out, line, "File too large")
    assert len(finished) == 3 + 7 + 2  # every chunk and both neighbor tables were done
    assert json.loads((out / "zarr.json").read_text())["attributes"]["complete"] is False
    resume_and_compare(server, tiny.build_args(out), out, reference[0], finished)


def test_an_output_path_that_cannot_be_created_is_one_line(server, tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = one_error_line(server.run(tiny.build_args(blocker / "store")))
    assert str(blocker / "store") in line and "Not a directory" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders anyway")
def test_a_read_only_output_folder_is_one_line(server, tiny, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        line = one_error_line(server.run(tiny.build_args(folder / "store")))
        assert "Permission denied" in line
    finally:
        folder.chmod(0o700)
