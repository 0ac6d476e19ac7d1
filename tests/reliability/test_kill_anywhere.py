"""Kill anywhere: `cusa-cache build` killed with SIGKILL at any moment, then run again, gives the store an
uninterrupted build gives (same embedding bytes, neighbor tables, checksums, data files), never recomputes a chunk
finished before the kill, and leaves no duplicated or missing row.

Kills land deterministically at each stage of a build through the CUSA_FAULT_AT hook, and at random moments
(seeded; the seed is printed, CUSA_RELIABILITY_SEED replays it). The default run makes 13 + 4 + 1 + 10 kills
(stages, a finished store's neighbor-table rebuild, left-over temporary files, random moments); --slow adds 150
random kills and 30 through the pixel path with a DataLoader worker."""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import pytest

from reliability_support import assert_same_store, markers, stage_reached
from teacher_cache.errors import StoreError
from teacher_cache.store import Store

# (fault, what the store must show afterwards): every stage of a build, mid-chunk included
STAGE_KILLS = [
    ("store_ready:1", "images (0 chunks done)"),
    ("image_batch:1", "images (0 chunks done)"),  # mid-chunk: one batch of two rows of a three-row chunk
    ("image_chunk_data:2", "images (1 chunks done)"),  # rows of chunk 1 written, its marker not yet
    ("image_chunk_written:2", "images (2 chunks done)"),
    ("images_done:1", "images (3 chunks done)"),  # between the modalities
    ("text_batch:3", "captions (1 chunks done)"),  # mid-chunk of captions
    ("text_chunk_data:4", "captions (3 chunks done)"),
    ("text_chunk_written:7", "captions (7 chunks done)"),
    ("texts_done:1", "captions (7 chunks done)"),
    ("neighbors_images:1", "captions (7 chunks done)"),  # table and index written, marker not yet
    ("neighbors_texts:1", "neighbor tables (1 of 2 done)"),
    ("before_finalize:1", "neighbor tables (2 of 2 done)"),
    ("after_finalize:1", "complete"),  # killed after the mark, before the lock is released
]
RANDOM_KILLS = 10  # landed kills (a run may finish before its kill time: it is not counted)
SLOW_KILLS = 150


def run_and_check(server, args: list[str], out: Path, **kw) -> dict:
    """One build run; markers finished before it must come out untouched (never recomputed)."""
    before = markers(out)
    result = server.run(args, **kw)
    after = markers(out)
    redone = sorted(name for name, value in before.items() if after.get(name) != value)
    assert not redone, f"finished parts recomputed or lost: {redone}"
    return result


def finish_and_compare(server, tiny, out: Path, reference: Path, **build) -> dict:
    before = markers(out)
    result = run_and_check(server, tiny.build_args(out, **build), out)
    assert result["rc"] == 0, result["stderr"]
    summary = json.loads(result["stdout"])
    assert summary["complete"] is True
    done = {m: sum(name.startswith(f"{m}/") for name in before) for m in ("images", "texts")}
    # resumed chunks are skipped, the rest embedded exactly once
    assert summary["images"]["skipped_chunks"] == done["images"]
    assert summary["texts"]["skipped_chunks"] == done["texts"]
    rows_done = {m: sum(json.loads(v[1])["stop"] - json.loads(v[1])["start"]
                        for name, v in before.items() if name.startswith(f"{m}/")) for m in ("images", "texts")}
    assert summary["images"]["rows"] == summary["counts"]["images"] - rows_done["images"]
    assert summary["texts"]["rows"] == summary["counts"]["texts"] - rows_done["texts"]
    assert_same_store(out, reference)
    return summary


@pytest.mark.parametrize("fault, expected_stage", STAGE_KILLS, ids=[f for f, _ in STAGE_KILLS])
def test_build_killed_at_each_stage_resumes_to_the_uninterrupted_store(server, tiny, reference, tmp_path, fault,
                                                                       expected_stage):
    out = tmp_path / "store"
    result = run_and_check(server, tiny.build_args(out), out, fault=fault)
    assert result["rc"] == -signal.SIGKILL, result
    assert stage_reached(out) == expected_stage
    if expected_stage != "complete":
        with pytest.raises(StoreError, match="incomplete|not a cusa store"):
            Store.open(out, require_complete=True)
    assert (out / "_build.lock").is_file()  # the dead build's lock, taken over by the next run
    finish_and_compare(server, tiny, out, reference[0])


def test_temporary_files_of_writes_cut_short_are_removed_and_not_recorded(server, tiny, reference, tmp_path):
    out = tmp_path / "store"
    assert server.run(tiny.build_args(out), fault="before_finalize:1")["rc"] == -signal.SIGKILL
    # what a kill in the middle of zarr's, the markers' and FAISS's atomic writes leaves behind
    leftovers = [out / "texts/emb/c/3/0.4f1c2b.partial", out / "zarr.9e8d7c.partial",
                 out / "_progress/images/.00000001.json.4242.tmp", out / "faiss/.texts.index.tmp-4242"]
    for path in leftovers:
        path.write_bytes(b"half written")
    finish_and_compare(server, tiny, out, reference[0])
    assert not any(path.exists() for path in leftovers if "_progress" not in str(path))


@pytest.mark.parametrize("fault", ["store_ready:1", "neighbors_images:1", "neighbors_texts:1", "before_finalize:1"])
def test_a_finished_store_killed_while_its_neighbor_tables_are_rebuilt_is_never_complete_and_half_changed(
        server, tiny, reference, tmp_path, fault):
    out = tmp_path / "store"
    shutil.copytree(reference[0], out)
    # re-running with another K rebuilds both tables: the store must not claim to be complete meanwhile
    chunks = {k: v for k, v in markers(out).items() if not k.startswith("neighbors_")}
    result = server.run(tiny.build_args(out, neighbors=2), fault=fault)
    assert result["rc"] == -signal.SIGKILL
    with pytest.raises(StoreError, match="incomplete"):
        Store.open(out, require_complete=True)
    # and the original command then restores exactly the original store, tables rebuilt, no chunk recomputed
    result = server.run(tiny.build_args(out))
    assert result["rc"] == 0, result["stderr"]
    assert {k: v for k, v in markers(out).items() if not k.startswith("neighbors_")} == chunks
    assert_same_store(out, reference[0])


def _random_kills(server, tiny, reference, tmp_path, seed: int, stream: int, kills: int, max_per_store: int,
                  **build) -> list[str]:
    """Kill builds at random moments until ``kills`` kills landed; every store is then finished and compared."""
    try:
        return _random_kills_from(random.Random(seed * 1000 + stream), server, tiny, reference, tmp_path, kills,
                                  max_per_store, **build)
    except AssertionError as exc:
        raise AssertionError(f"replay with CUSA_RELIABILITY_SEED={seed}: {exc}") from exc


def _random_kills_from(rng: random.Random, server, tiny, reference, tmp_path, kills: int, max_per_store: int,
                       **build) -> list[str]:
    ref, seconds = reference
    stages: list[str] = []
    attempts = 0
    chain = 0
    while len(stages) < kills:
        out = tmp_path / f"store{chain}"
        for _ in range(rng.randint(1, max_per_store)):
            attempts += 1
            assert attempts <= 3 * kills, f"only {len(stages)} of {attempts} random kills landed"
            kill_after = rng.uniform(0.0, seconds)
            result = run_and_check(server, tiny.build_args(out, **build), out, kill_after=kill_after)
            context = f"store {chain}, kill after {kill_after:.3f} s"
            assert result["rc"] in (0, -signal.SIGKILL), f"{context}: {result}"
            if result["rc"] == 0:  # finished first: the next runs aim earlier
                seconds = 0.8 * seconds
                break
            stages.append(stage_reached(out))
        finish_and_compare(server, tiny, out, ref, **build)
        chain += 1
    return stages


def test_build_killed_at_random_moments_resumes_to_the_uninterrupted_store(server, tiny, reference, tmp_path,
                                                                          reliability_seed):
    stages = _random_kills(server, tiny, reference, tmp_path, reliability_seed, 0, RANDOM_KILLS, 2)
    print(f"random kills landed at: {sorted(stages)}")


@pytest.mark.slow
def test_many_random_kills_resume_to_the_uninterrupted_store(server, tiny, reference, tmp_path, reliability_seed):
    stages = _random_kills(server, tiny, reference, tmp_path, reliability_seed, 1, SLOW_KILLS, 4)
    print(f"{len(stages)} random kills landed at: {sorted(set(stages))}")
    assert len(set(stages)) >= 8  # spread over the build, not bunched at its start


@pytest.mark.slow
def test_random_kills_with_pixel_decoding_workers_resume_to_the_uninterrupted_store(server, tiny, tmp_path,
                                                                                   reliability_seed):
    ref = tmp_path / "pixel-reference"
    first = server.run(tiny.build_args(ref, pixels=True, workers=1))
    assert first["rc"] == 0, first["stderr"]
    stages = _random_kills(server, tiny, (ref, first["seconds"]), tmp_path, reliability_seed, 2, 30, 3,
                           pixels=True, workers=1)
    print(f"{len(stages)} random kills (pixels, 1 worker) landed at: {sorted(set(stages))}")
