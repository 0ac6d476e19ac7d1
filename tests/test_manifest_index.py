"""The manifest index: a second command opens an unchanged source from it without reading the data; a changed,
added, removed or renamed shard (or a changed annotation file) is read again alone; a write killed midway is never
taken as an index; two commands indexing at once both get the right rows; a store keeps a copy that later commands
use; a store of the earlier fingerprint format still trains and is upgraded without a teacher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_shards import sample, write_shard

from pipeline import manifest_index
from pipeline.manifest import read_manifest
from pipeline.manifest_index import STORE_INDEX_DIR

REPO = Path(__file__).resolve().parents[1]


def backdate(*paths: Path, seconds: float = 3600) -> None:
    """Files last changed a while ago, as data on disk usually is (an index trusts only those)."""
    old = time.time() - seconds
    for path in paths:
        os.utime(path, (old, old))


def three_shards(folder: Path, n: int = 3) -> str:
    for k in range(n):
        write_shard(folder / f"part-{k:06d}.tar",
                    [sample(f"s{k}-{i}", captions=(f"shard {k} sample {i}", f"another {k}.{i}")) for i in range(4)])
    backdate(*folder.glob("*.tar"))
    return f"{folder}/part-{{000000..{n - 1:06d}}}.tar"


@pytest.fixture
def scans(monkeypatch) -> list[str]:
    """The shards scanned (read from their tar) from now on, in order."""
    seen: list[str] = []
    real = manifest_index.scan_shard

    def counting(shard, split, rules):
        seen.append(Path(shard).name)
        return real(shard, split, rules)

    monkeypatch.setattr(manifest_index, "scan_shard", counting)
    return seen


def same_rows(a, b) -> None:
    assert a.image_ids() == b.image_ids()
    assert [r.path for r in a.images] == [r.path for r in b.images]
    assert [r.member for r in a.images] == [r.member for r in b.images]
    assert a.caption_texts() == b.caption_texts()
    assert a.caption_image_rows().tolist() == b.caption_image_rows().tolist()
    assert a.skipped_samples == b.skipped_samples
    assert a.fingerprint() == b.fingerprint()


def fresh(source: str, tmp_path: Path):
    """The source read with an empty index cache of its own."""
    return read_manifest(source, manifest_cache=tmp_path / f"fresh-{time.monotonic_ns()}")


# ================================================================================================ reuse
def test_a_second_read_of_unchanged_shards_scans_nothing_and_maps_the_index(tmp_path, scans):
    source = three_shards(tmp_path / "data")
    cache = tmp_path / "cache"
    first = read_manifest(source, manifest_cache=cache)
    assert scans == [f"part-{k:06d}.tar" for k in range(3)]
    second = read_manifest(source, manifest_cache=cache)
    assert scans == [f"part-{k:06d}.tar" for k in range(3)]  # nothing read again
    same_rows(first, second)
    assert second.index_path is not None and second.index_path.parent.parent == cache
    # the columns are views of the memory-mapped Arrow files, not copies
    offsets, data = second.captions.texts.buffers()
    assert not data.flags.writeable and not second.caption_image_rows().flags.writeable
    assert second.known_fingerprints[""] == first.fingerprint()


def test_a_modified_shard_is_read_again_alone_and_the_rows_equal_a_fresh_read(tmp_path, scans):
    source = three_shards(tmp_path / "data")
    cache = tmp_path / "cache"
    before = read_manifest(source, manifest_cache=cache)
    scans.clear()
    write_shard(tmp_path / "data" / "part-000001.tar",
                [sample(f"s1-{i}", captions=(f"changed caption {i}",)) for i in range(5)])
    backdate(tmp_path / "data" / "part-000001.tar", seconds=1800)
    after = read_manifest(source, manifest_cache=cache)
    assert scans == ["part-000001.tar"]
    same_rows(after, fresh(source, tmp_path))
    assert len(after.images) == 13 and after.fingerprint() != before.fingerprint()
    # the unchanged shards' fingerprint blocks are the ones computed before
    assert after.blocks[0].digest == before.blocks[0].digest and after.blocks[2].digest == before.blocks[2].digest
    assert after.blocks[1].digest != before.blocks[1].digest


def test_an_added_removed_or_renamed_shard_is_the_only_one_read(tmp_path, scans):
    data = tmp_path / "data"
    three_shards(data, n=4)
    cache = tmp_path / "cache"
    read_manifest(f"{data}/part-{{000000..000002}}.tar", manifest_cache=cache)
    scans.clear()
    grown = f"{data}/part-{{000000..000003}}.tar"
    read_manifest(grown, manifest_cache=cache)
    assert scans == ["part-000003.tar"]  # added
    scans.clear()
    shrunk = f"{data}/part-000000.tar::{data}/part-000002.tar::{data}/part-000003.tar"
    m = read_manifest(shrunk, manifest_cache=cache)
    assert scans == []  # removed: nothing to read, the rest taken from the index
    same_rows(m, fresh(shrunk, tmp_path))
    (data / "part-000002.tar").rename(data / "part-000009.tar")  # a rename keeps the modification time
    scans.clear()
    renamed = f"{data}/part-000000.tar::{data}/part-000009.tar::{data}/part-000003.tar"
    m = read_manifest(renamed, manifest_cache=cache)
    assert scans == ["part-000009.tar"]
    scans.clear()
    assert m.images[4].path == "part-000009.tar/s2-0.png"
    same_rows(m, fresh(renamed, tmp_path))


def test_a_shard_changed_in_the_same_second_it_was_indexed_is_not_trusted(tmp_path, scans):
    data = tmp_path / "data"
    source = three_shards(data)
    for shard in data.glob("*.tar"):
        os.utime(shard, None)  # just written: a change within the same clock tick would keep size and mtime
    cache = tmp_path / "cache"
    read_manifest(source, manifest_cache=cache)
    scans.clear()
    read_manifest(source, manifest_cache=cache)
    assert sorted(scans) == [f"part-{k:06d}.tar" for k in range(3)]


def test_an_annotation_file_is_read_again_only_when_it_changed(tmp_path, monkeypatch):
    ann = tmp_path / "captions_train.json"
    ann.write_text(json.dumps([{"image": f"im{i}.jpg", "caption": f"caption {i}"} for i in range(5)]))
    backdate(ann)
    cache = tmp_path / "cache"
    first = read_manifest(ann, manifest_cache=cache)
    reads = []
    real = manifest_index.open_annotation_file

    def spy(path, options, image_root, read, places):
        return real(path, options, image_root, lambda: reads.append(path) or read(), places)

    monkeypatch.setattr("pipeline.manifest.open_annotation_file", spy)
    second = read_manifest(ann, manifest_cache=cache)
    assert reads == [] and second.index_path is not None
    same_rows(first, second)
    assert second.image_path(0) == tmp_path / "im0.jpg"  # the image root applies to an index opened later too
    ann.write_text(json.dumps([{"image": f"im{i}.jpg", "caption": f"new caption {i}"} for i in range(5)]))
    backdate(ann, seconds=1800)
    third = read_manifest(ann, manifest_cache=cache)
    assert reads == [ann] and third.caption_texts()[0] == "new caption 0"
    # other reading options are another index
    assert read_manifest(ann, manifest_cache=cache, format="caption-json").format == "caption-json"


# ================================================================================================ faults
KILL_DURING_WRITE = textwrap.dedent("""
    import os, signal, sys
    from pipeline import manifest_index
    from pipeline.manifest import read_manifest
    real = manifest_index._write_table
    def dying(path, columns):
        real(path, columns)
        os.kill(os.getpid(), signal.SIGKILL)  # after the first file of the version: a half-written index
    manifest_index._write_table = dying
    read_manifest(sys.argv[1], manifest_cache=sys.argv[2])
""")


def test_a_write_killed_midway_is_never_read_and_the_next_read_is_right(tmp_path, scans):
    source = three_shards(tmp_path / "data")
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, source, str(cache)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    family = next(cache.iterdir())
    assert not (family / "current").exists()
    assert [p.name.startswith(".tmp-") for p in family.iterdir() if p.is_dir()] == [True]
    m = read_manifest(source, manifest_cache=cache)
    assert sorted(scans) == [f"part-{k:06d}.tar" for k in range(3)]
    same_rows(m, fresh(source, tmp_path))
    assert (family / "current").is_file()


TWO_AT_ONCE = textwrap.dedent("""
    import json, sys
    from pipeline import manifest_index
    from pipeline.manifest import read_manifest
    scanned = []
    real = manifest_index.scan_shard
    manifest_index.scan_shard = lambda *a: scanned.append(a[0]) or real(*a)
    m = read_manifest(sys.argv[1], manifest_cache=sys.argv[2])
    print(json.dumps({"fingerprint": m.fingerprint(), "scanned": len(scanned), "captions": m.caption_texts()}))
""")


def test_two_commands_indexing_the_same_source_at_once_agree_and_one_scans(tmp_path):
    data = tmp_path / "data"
    for k in range(6):
        write_shard(data / f"part-{k:06d}.tar", [sample(f"s{k}-{i}") for i in range(40)])
    backdate(*data.glob("*.tar"))
    source, cache = f"{data}/part-{{000000..000005}}.tar", tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", TWO_AT_ONCE, source, str(cache)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["fingerprint"] == results[1]["fingerprint"] == fresh(source, tmp_path).fingerprint()
    assert results[0]["captions"] == results[1]["captions"]
    assert sorted(r["scanned"] for r in results) == [0, 6]  # the second waited for the first's index
    family = next(cache.iterdir())
    assert len([p for p in family.iterdir() if p.name.startswith("v-")]) == 1


def test_a_read_only_source_folder_is_read_and_nothing_is_written_next_to_it(tmp_path):
    data = tmp_path / "data"
    source = three_shards(data)
    before = sorted(p.name for p in data.iterdir())
    data.chmod(0o555)
    try:
        m = read_manifest(source, manifest_cache=tmp_path / "cache")
        again = read_manifest(source, manifest_cache=tmp_path / "cache")
    finally:
        data.chmod(0o755)
    assert sorted(p.name for p in data.iterdir()) == before
    same_rows(m, again)


def test_an_unwritable_cache_still_reads_the_source(tmp_path):
    source = three_shards(tmp_path / "data")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    m = read_manifest(source, manifest_cache=blocker / "cache")
    assert m.index_path is None and len(m.images) == 12


# ================================================================================================ stores
@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A 12-image demo set whose files are an hour old, and a store built from it by the real teachers."""
    import torch

    from pipeline.build import BuildConfig, build_store
    from pipeline.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("small")
    data = root / "data"
    write_demo_dataset(data, n_images=12, seed=3, image_size=48, split_fractions=(0.5, 0.25, 0.25))
    backdate(*data.rglob("*.*"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_store(BuildConfig(annotations=str(data / "train.json"), out=str(root / "store"), workers=0,
                                neighbors=2, progress=False, device="cpu", chunk_rows=4,
                                manifest_cache=str(root / "build-cache")))
    finally:
        torch.set_num_threads(threads)
    return data, root / "store"


def test_a_store_keeps_the_index_of_its_data_and_a_command_given_the_store_reads_nothing(small_store, tmp_path,
                                                                                         monkeypatch):
    from teacher_cache.store import Store
    from teacher_cache.verify import verify_store
    from train.config import TrainConfig
    from train.data import join_pairs, load_config_split

    data, store = small_store
    meta = json.loads((store / STORE_INDEX_DIR / "meta.json").read_text())
    assert meta["kind"] == "annotations" and meta["entries"][0]["name"] == "train.json"
    assert verify_store(Store.open(store)).ok  # the copy is not store data: verify does not look at it
    monkeypatch.setenv("CUSA_MANIFEST_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("pipeline.annotations.read_annotations",
                        lambda *a, **k: pytest.fail("the annotation file was read again"))
    monkeypatch.setattr("pipeline.manifest.read_annotations",
                        lambda *a, **k: pytest.fail("the annotation file was read again"))
    cfg = TrainConfig(data=str(data / "train.json"), cache=str(store))
    manifest = load_config_split(cfg, cfg.data, "train")
    assert manifest.index_path == store / STORE_INDEX_DIR
    pairs = join_pairs(manifest, [Store.open(store, require_complete=True)])
    assert len(pairs) == len(manifest.captions) and not (tmp_path / "empty-cache").exists()


def test_a_store_of_the_earlier_fingerprint_format_trains_and_upgrade_brings_it_up_without_a_teacher(
        small_store, tmp_path):
    import zarr
    from click.testing import CliRunner

    from pipeline.cli import main
    from teacher_cache.store import Store
    from teacher_cache.verify import verify_store
    from train.data import join_pairs

    data, built = small_store
    store = tmp_path / "old-store"
    shutil.copytree(built, store)
    shutil.rmtree(store / STORE_INDEX_DIR)
    manifest = read_manifest(data / "train.json", manifest_cache=tmp_path / "cache")
    # what an earlier cusa wrote: format-1 fingerprints and no fingerprint_format attribute
    Store.open(store).rewrite_fingerprints(manifest.fingerprint(1), {"train": manifest.select_split("train")
                                                                      .fingerprint(1)}, 1)
    group = zarr.open_group(str(store), mode="r+")
    attrs = dict(group.attrs)
    del attrs["fingerprint_format"]
    group.attrs.put(attrs)
    old = Store.open(store, require_complete=True)
    assert old.fingerprint_format == 1 and old.fingerprint == manifest.fingerprint(1) != manifest.fingerprint()
    pairs = join_pairs(manifest, [old])  # still trains
    assert len(pairs) == len(manifest.captions)
    before = {m: old.array(m)[:].tobytes() for m in ("images", "texts")}

    runner = CliRunner()
    wrong = runner.invoke(main, ["upgrade", str(store), "--data", str(data / "val.json"), "--json"])
    assert wrong.exit_code == 1 and len(wrong.output.strip().splitlines()) == 1
    assert "not built from" in wrong.output and str(data / "val.json") in wrong.output
    result = runner.invoke(main, ["upgrade", str(store), "--data", str(data / "train.json"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["upgraded"] and payload["fingerprint"] == manifest.fingerprint()
    new = Store.open(store, require_complete=True)
    assert new.fingerprint_format == 2 and new.fingerprint == manifest.fingerprint()
    assert new.split_fingerprints == {"train": manifest.select_split("train").fingerprint()}
    assert {m: new.array(m)[:].tobytes() for m in ("images", "texts")} == before
    assert verify_store(new).ok and (store / STORE_INDEX_DIR / "meta.json").is_file()
    again = runner.invoke(main, ["upgrade", str(store), "--data", str(data / "train.json")])
    assert again.exit_code == 0 and "nothing to do" in again.output


# ================================================================================================ the CLI
def test_manifest_cache_option_puts_the_index_where_it_says(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import main

    monkeypatch.setenv("CUSA_MANIFEST_CACHE", "restored after the test")  # the option sets it for the process
    source = three_shards(tmp_path / "data")
    where = tmp_path / "my-index"
    result = CliRunner().invoke(main, ["upgrade", str(tmp_path / "no-store"), "--data", source,
                                       "--manifest-cache", str(where)])
    assert result.exit_code == 1 and "not a cusa store" in result.output  # the data were read first
    assert [(family / "current").is_file() for family in where.iterdir()] == [True]
