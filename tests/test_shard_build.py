"""`cusa-cache build` from webdataset shards: the same embedding bytes and neighbor tables as the caption-list JSON
build of the same images and captions, resumption after SIGKILL, and bad samples refused or skipped by name.
Real teachers (efficientnet-lite0, MiniLM), real Zarr and FAISS, real tar shards."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import webdataset as wds
from click.testing import CliRunner

from helpers_build import BIN, BUILD_ARGS, assert_same_rows, kill_build_after_image_chunks, one_thread_env, \
    one_torch_thread, val_reference
from pipeline.cli import main
from pipeline.manifest import read_manifest
from teacher_cache.errors import StoreError
from teacher_cache.store import Store


@pytest.fixture(scope="module")
def reference(demo_dir, tmp_path_factory) -> Path:
    """The JSON build of the demo val split (9 images, 45 captions, chunks of 4 rows)."""
    return val_reference(demo_dir, tmp_path_factory.getbasetemp())


def markers(store: Path, modality: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (store / "_progress" / modality).glob("*.json")}


def test_a_shard_build_gives_the_json_builds_bytes_and_matches_its_own_manifest(demo_shards, reference, tmp_path):
    out = tmp_path / "store"
    with one_torch_thread():
        # one DataLoader worker: images are read from the shards in a worker process
        result = CliRunner().invoke(main, ["build", demo_shards["val"], "--out", str(out), "--chunk-rows", "4",
                                           "--neighbors", "4", "--workers", "1", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["counts"] == {"images": 9, "texts": 45} and summary["skipped_samples"] == []
    assert_same_rows(out, reference)
    store = Store.open(out, require_complete=True)
    manifest = read_manifest(demo_shards["val"])
    assert store.fingerprint == manifest.fingerprint() != Store.open(reference).fingerprint
    assert store.split_fingerprints == {"val": manifest.fingerprint()}
    assert store.image_paths[0] == f"val-000000.tar/{store.image_ids[0]}.png"


def test_a_killed_shard_build_resumes_to_the_uninterrupted_store(demo_shards, reference, tmp_path):
    out = tmp_path / "store"
    command = ["build", demo_shards["val"], "--out", str(out), *BUILD_ARGS, "--json"]
    kill_build_after_image_chunks(command, out)
    done = markers(out, "images")
    with pytest.raises(StoreError, match="incomplete"):
        Store.open(out, require_complete=True)

    with one_torch_thread():
        result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"]["skipped_chunks"] == len(done) >= 2
    assert {n: t for n, t in markers(out, "images").items() if n in done} == done  # not written again
    assert_same_rows(out, reference)
    assert Store.open(out).fingerprint == read_manifest(demo_shards["val"]).fingerprint()


def bad_shards(demo_shards, folder: Path) -> str:
    """Two shards from the demo val images: one sample without a caption, one undecodable image, the rest good."""
    manifest = read_manifest(demo_shards["val"])
    samples = []
    for row in range(4):
        record = manifest.images[row]
        with open(record.member.shard, "rb") as fh:
            fh.seek(record.member.offset)
            png = fh.read(record.member.size)
        texts = [c.text for c in manifest.captions if c.image_row == row]
        samples.append({"__key__": record.image_id, "png": png, "txt": "\n".join(texts).encode()})
    del samples[1]["txt"]
    samples[2]["png"] = samples[2]["png"][:200]  # a truncated PNG
    folder.mkdir()
    for number, part in enumerate((samples[:2], samples[2:])):
        with wds.TarWriter(str(folder / f"bad-{number:06d}.tar"), encoder=False, mtime=0) as sink:
            for s in part:
                sink.write(s)
    return f"{folder}/bad-{{000000..000001}}.tar"


def test_bad_samples_stop_the_build_in_one_line_naming_shard_and_key_or_are_skipped_and_listed(demo_shards,
                                                                                               tmp_path):
    source = bad_shards(demo_shards, tmp_path / "bad")
    ids = [r.image_id for r in read_manifest(demo_shards["val"]).images[:4]]
    base = ["build", source, "--out", str(tmp_path / "store"), "--chunk-rows", "4", "--neighbors", "2",
            "--workers", "0", "--device", "cpu"]
    with one_torch_thread():
        refused = CliRunner().invoke(main, base)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert refused.output.strip().splitlines() == [
        f"Error: {tmp_path / 'bad' / 'bad-000000.tar'}: sample {ids[1]!r}: no caption member {ids[1]}.txt "
        f"(members: {ids[1]}.png); fix the shard or use --on-bad-image skip to leave such samples out"]
    assert not (tmp_path / "store").exists()  # refused before any teacher ran

    with one_torch_thread():
        skipped = CliRunner().invoke(main, [*base, "--on-bad-image", "skip", "--json"])
    assert skipped.exit_code == 0, skipped.output
    summary = json.loads(skipped.stdout)
    assert summary["counts"] == {"images": 3, "texts": 15}
    assert summary["skipped_samples"] == [{"shard": str(tmp_path / "bad" / "bad-000000.tar"), "key": ids[1],
                                           "reason": f"no caption member {ids[1]}.txt (members: {ids[1]}.png)"}]
    [bad] = summary["skipped_images"]
    assert bad["row"] == 1 and bad["id"] == ids[2] and bad["path"] == f"bad-000001.tar/{ids[2]}.png"
    assert bad["reason"].startswith(f"{tmp_path / 'bad' / 'bad-000001.tar'}: member '{ids[2]}.png' (image row 1): "
                                    "truncated or corrupt image data")
    store = Store.open(tmp_path / "store", require_complete=True)
    assert store.skipped_samples == summary["skipped_samples"]
    assert not store.array("images")[1].any() and store.array("images")[0].any()
    info = CliRunner().invoke(main, ["info", str(tmp_path / "store"), "--json"])
    assert json.loads(info.stdout)["skipped_samples"] == summary["skipped_samples"]


def test_two_torchrun_ranks_build_from_shards_in_disjoint_shares_to_the_json_builds_bytes(demo_shards, reference,
                                                                                       tmp_path):
    out = tmp_path / "store"
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "pipeline.cli", "build",
         demo_shards["val"], "--out", str(out), *BUILD_ARGS, "--json"],
        env=one_thread_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["world_size"] == 2
    assert_same_rows(out, reference)
    done = Store.open(out).progress().done["images"]
    assert {c: m["rank"] for c, m in done.items()} == {0: 0, 1: 1, 2: 1}  # each rank read only its images' rows
