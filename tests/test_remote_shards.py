"""Shards read where they live, from real servers on 127.0.0.1: moto's S3 API (through s3fs and AWS_ENDPOINT_URL), an
HTTP server (with and without Range support, with and without ETag/Last-Modified) and a `pipe:cat ...` command.

From each, `cusa-cache build` stores the bytes the local build stores, fetching every shard whole into a shard cache
that stays within its bound; a frozen-student run trained from remote shards and a remote store ends with the
all-local run's test recalls; an unchanged remote source reopens from its index without fetching a shard; a dropped
connection is retried, a truncated transfer never cached; 404/403 name the URL; a server killed mid-build or
mid-training ends the command in one line and the command run again reaches the uninterrupted result; a token in a
URL never reaches a store, an index, a run folder or the output. gs:// and hf:// are checked up to fsspec (no network
here): the message when the package or the network is missing.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers_build import BIN, BUILD_ARGS, assert_same_rows, one_thread_env, one_torch_thread, val_reference
from helpers_train import METRIC_KEYS, TINY_CLIP, assert_same_training, invoke_json, one_error_line, subprocess_env
from pipeline.cli import main as cache_main
from pipeline.console import error_line
from pipeline.errors import CusaError
from pipeline.file_stat import FileStat
from pipeline.manifest import read_manifest
from pipeline.shard_cache import SHARD_CACHE_ENV, SHARD_CACHE_GIB_ENV, ShardCache, ShardCacheSettings, shard_cache
from pipeline.shard_read_ahead import ShardReadAhead
from servers import FileServer, environment, s3_server  # noqa: F401 (a fixture)
from teacher_cache.errors import RemoteError, StoreError
from teacher_cache.store import Store
from train.cli import eval_main, train_main

VAL = "val-{000000..000002}.tar"
TEST = "test-{000000..000002}.tar"
RECALLS = (*METRIC_KEYS, "rsum")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    # cusa's caches (shards, manifests, stores, features) inside the test's own folder
    monkeypatch.setenv("CUSA_CACHE_DIR", str(tmp_path / "cusa-cache"))
    monkeypatch.delenv(SHARD_CACHE_ENV, raising=False)
    monkeypatch.delenv(SHARD_CACHE_GIB_ENV, raising=False)
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def reference(demo_dir, tmp_path_factory) -> Path:
    """The local build of the demo val split (9 images in 3 shards, 45 captions, chunks of 4 rows)."""
    return val_reference(demo_dir, tmp_path_factory.getbasetemp())


def shard_files(demo_shards, split: str) -> list[Path]:
    return sorted(Path(demo_shards[split]).parent.glob(f"{split}-*.tar"))


def tight_cache_gib(demo_shards, shards: float = 1.5) -> float:
    """A shard cache of one and a half (``shards``) val shards: a build must fetch shards again after indexing them."""
    return shards * max(p.stat().st_size for p in shard_files(demo_shards, "val")) / 2**30


def cache_bytes(tmp_path: Path) -> int:
    root = tmp_path / "cusa-cache" / "shards"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
               and ".locks" not in p.parts)


def served(kind: str, demo_shards, tmp_path: Path, request, splits=("val",)) -> tuple[dict[str, str], object]:
    """The demo shards of ``splits`` served one way: {split: source}, and the server (None for pipe:)."""
    if kind == "s3":
        server = request.getfixturevalue("s3_server")
        for split in splits:
            server.upload(shard_files(demo_shards, split), f"{tmp_path.name}/{split}")
        return {s: server.url(f"{tmp_path.name}/{s}/{VAL if s == 'val' else TEST}") for s in splits}, server
    if kind == "pipe":
        folder = Path(demo_shards["val"]).parent
        return {s: f"pipe:cat {folder}/{VAL if s == 'val' else TEST}" for s in splits}, None
    root = tmp_path / "www"
    root.mkdir(exist_ok=True)
    for split in splits:
        for path in shard_files(demo_shards, split):
            if kind == "http-gz":
                (root / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes(), mtime=0))
            else:
                shutil.copy(path, root / path.name)
    server = FileServer(root, range_support=kind != "http-no-range", validators=kind != "http-no-validators").start()
    request.addfinalizer(server.stop)
    suffix = ".gz" if kind == "http-gz" else ""
    return {s: server.url((VAL if s == "val" else TEST) + suffix) for s in splits}, server


def build(source: str, out: Path, *extra: str) -> dict:
    result = CliRunner().invoke(cache_main, ["build", source, "--out", str(out), *BUILD_ARGS, "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def fetches(server: FileServer) -> dict[str, int]:
    """How many times each file's bytes were asked for."""
    counts: dict[str, int] = {}
    for get in server.gets:
        counts[get.split(" ")[0]] = counts.get(get.split(" ")[0], 0) + 1
    return counts


# ================================================================================================ builds
@pytest.mark.parametrize("kind", ["s3", "http", "http-no-range", "pipe", "http-gz"])
def test_a_build_from_remote_shards_stores_the_local_builds_bytes_through_a_bounded_shard_cache(
        kind, demo_shards, reference, tmp_path, request):
    sources, server = served(kind, demo_shards, tmp_path, request)
    bound = tight_cache_gib(demo_shards)
    out = tmp_path / "store"
    summary = build(sources["val"], out, "--shard-cache-gib", str(bound))
    assert summary["counts"] == {"images": 9, "texts": 45}
    assert_same_rows(out, reference)
    store = Store.open(out, require_complete=True)
    local = read_manifest(demo_shards["val"])
    if kind != "http-gz":  # a .tar.gz shard is another file name, so other image paths
        assert store.fingerprint == local.fingerprint()
    assert store.image_paths[0].startswith("val-000000.tar")
    assert cache_bytes(tmp_path) <= bound * 2**30  # the bound holds (a whole shard never exceeds it here)
    if isinstance(server, FileServer):
        per_file = fetches(server)
        assert len(per_file) == 3 and all(" " not in g for g in server.gets)  # whole files: no Range requests
        # indexed once, fetched again by the build (the cache holds 1.5 shards): never a request per image
        assert all(1 <= n <= 2 for n in per_file.values()) and sum(per_file.values()) < 9


def test_the_shard_cache_stays_within_its_bound_while_workers_and_the_read_ahead_fetch_at_once(
        demo_shards, tmp_path, request):
    sources, server = served("http", demo_shards, tmp_path, request, splits=("val", "test"))
    files = shard_files(demo_shards, "train")
    for path in files:
        shutil.copy(path, server.root / path.name)
    source = server.url("train-{000000..000010}.tar")
    bound = 4 * max(p.stat().st_size for p in files)  # 4 of the 11 shards
    folder, peak, stop = tmp_path / "shards", [0], threading.Event()

    def size(path: Path) -> int:  # a file may go between listing and stat: evicted, or renamed into place
        try:
            return path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:
            return 0

    def sample() -> None:  # every file counts here, transfers in progress included
        while not stop.is_set():
            peak[0] = max(peak[0], sum(size(p) for p in folder.rglob("*")))
            stop.wait(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        out = tmp_path / "store"
        result = CliRunner().invoke(cache_main, ["build", source, "--out", str(out), "--chunk-rows", "4", "--neighbors",
                                                 "0", "--workers", "2", "--batch-size", "4", "--device", "cpu",
                                                 "--shard-cache", str(folder), "--shard-cache-gib", str(bound / 2**30)])
    finally:
        stop.set()
        watcher.join()
    assert result.exit_code == 0, result.output
    assert Store.open(out, require_complete=True).fingerprint == read_manifest(demo_shards["train"]).fingerprint()
    assert 0 < peak[0] <= bound
    assert max(fetches(server).values()) <= 3  # indexed, then read: no shard fetched over and over


def test_a_shard_cache_that_holds_the_source_fetches_each_shard_once(demo_shards, reference, tmp_path, request):
    sources, server = served("http", demo_shards, tmp_path, request)
    build(sources["val"], tmp_path / "store", "--shard-cache", str(tmp_path / "shards"))
    assert fetches(server) == {f"val-00000{i}.tar": 1 for i in range(3)}
    assert sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in (tmp_path / "shards").rglob("*.tar")) \
        == ["val-000000", "val-000001", "val-000002"]
    assert_same_rows(tmp_path / "store", reference)


@pytest.mark.parametrize("kind", ["http", "http-no-validators", "s3"])
def test_an_unchanged_remote_source_reopens_without_fetching_and_a_changed_shard_is_fetched_alone(
        kind, demo_shards, tmp_path, request):
    sources, server = served(kind, demo_shards, tmp_path, request)
    cache = shard_cache()
    first = read_manifest(sources["val"])
    fetched = cache.cache.stats.fetched
    assert fetched == 3
    again = read_manifest(sources["val"])  # a listing (S3) or HEADs (http), then the index
    assert cache.cache.stats.fetched == fetched
    assert again.fingerprint() == first.fingerprint() == read_manifest(demo_shards["val"]).fingerprint()
    # one shard replaced by another one (other samples, another size, which is all a server without ETag and
    # Last-Modified tells): only it is fetched and scanned again
    replacement = shard_files(demo_shards, "test")[2]
    assert replacement.stat().st_size != shard_files(demo_shards, "val")[1].stat().st_size
    if kind == "s3":
        server.client().upload_file(str(replacement), server.bucket, f"{tmp_path.name}/val/val-000001.tar")
    else:
        time.sleep(0.01)
        shutil.copy(replacement, server.root / "val-000001.tar")
    changed = read_manifest(sources["val"])
    assert cache.cache.stats.fetched == fetched + 1
    assert changed.fingerprint() != first.fingerprint()
    assert changed.captions.text(changed.caption_image_rows().tolist().index(4)) == \
        read_manifest(str(replacement)).captions.text(0)


def test_pipe_sources_are_known_by_their_command_and_a_failing_command_is_one_line(demo_shards, tmp_path):
    folder = Path(demo_shards["val"]).parent
    source = f"pipe:cat {folder}/{VAL}"
    m = read_manifest(source)
    assert m.images[0].path.startswith("val-000000.tar/") and m.fingerprint() == read_manifest(
        demo_shards["val"]).fingerprint()
    fetched = shard_cache().cache.stats.fetched
    read_manifest(source)  # the index: the commands are not run again
    assert shard_cache().cache.stats.fetched == fetched
    result = CliRunner().invoke(cache_main, ["build", f"pipe:cat {folder}/missing-000000.tar", "--out",
                                             str(tmp_path / "s"), *BUILD_ARGS])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: pipe:cat {folder}/missing-000000.tar: cannot transfer the tar shard "
                           "missing-000000.tar") and "No such file" in line


def test_compressed_local_shards_are_read_through_the_shard_cache(demo_shards, tmp_path):
    for path in shard_files(demo_shards, "val"):
        (tmp_path / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    plain, packed = read_manifest(demo_shards["val"]), read_manifest(str(tmp_path / f"{VAL}.gz"))
    assert packed.image_ids() == plain.image_ids() and packed.caption_texts() == plain.caption_texts()
    from pipeline.images import open_image

    for row in range(len(plain.images)):
        assert open_image(packed, row).tobytes() == open_image(plain, row).tobytes()
    copies = list((tmp_path / "cusa-cache" / "shards").rglob("*.tar"))
    assert len(copies) == 3 and all(c.read_bytes()[:5] != b"\x1f\x8b\x08\x00\x00" for c in copies)


# ================================================================================================ faults
def test_a_dropped_connection_is_retried_and_a_cut_transfer_never_cached(demo_shards, tmp_path, request):
    sources, server = served("http", demo_shards, tmp_path, request)
    server.truncate_next(2)  # the first two transfers end halfway
    m = read_manifest(sources["val"])
    assert m.fingerprint() == read_manifest(demo_shards["val"]).fingerprint()
    assert sum(fetches(server).values()) == 5
    sizes = {p.stat().st_size for p in (tmp_path / "cusa-cache" / "shards").rglob("*.tar")}
    assert sizes == {p.stat().st_size for p in shard_files(demo_shards, "val")}


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_a_missing_shard_names_its_url_and_what_was_expected(kind, demo_shards, tmp_path, request):
    sources, _ = served(kind, demo_shards, tmp_path, request)
    source = sources["val"].replace("000002}", "000003}")
    result = CliRunner().invoke(cache_main, ["build", source, "--out", str(tmp_path / "s"), *BUILD_ARGS])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    missing = source.replace("{000000..000003}", "000003")
    assert line == f"Error: {missing}: not found, expected the tar shard val-000003.tar there"


def test_refused_access_names_the_url_and_a_token_never_leaves_the_command(demo_shards, reference, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    for path in shard_files(demo_shards, "val"):
        shutil.copy(path, root / path.name)
    server = FileServer(root, token="tok-5ecret").start()
    try:
        without = server.url(VAL).split("?")[0]
        result = CliRunner().invoke(cache_main, ["build", without, "--out", str(tmp_path / "s"), *BUILD_ARGS])
        assert result.exit_code == 1
        assert result.output.strip().splitlines()[-1].startswith(
            f"Error: {without.replace(VAL, 'val-000000.tar')}: access denied (expected the tar shard val-000000.tar)")
        out = tmp_path / "store"
        result = CliRunner().invoke(cache_main, ["build", server.url(VAL), "--out", str(out), *BUILD_ARGS, "--json"])
        assert result.exit_code == 0, result.output
        assert "tok-5ecret" not in result.output
        assert_same_rows(out, reference)
        for folder in (out, tmp_path / "cusa-cache"):
            for path in folder.rglob("*"):
                assert "tok-5ecret" not in str(path)
                if path.is_file() and path.suffix != ".tar":
                    assert b"tok-5ecret" not in path.read_bytes(), path
        assert Store.open(out).attrs["source"] == server.url(VAL).replace("tok-5ecret", "REDACTED")
    finally:
        server.stop()


def test_a_server_killed_mid_build_is_one_line_and_the_build_then_resumes_to_the_local_bytes(
        demo_shards, reference, tmp_path, request):
    sources, server = served("http", demo_shards, tmp_path, request)
    out = tmp_path / "store"
    # a shard cache of one shard: the read-ahead cannot fetch the last shard before the first chunk is finished
    command = ["build", sources["val"], "--out", str(out), *BUILD_ARGS, "--shard-cache-gib",
               str(tight_cache_gib(demo_shards, shards=1)), "--json"]
    # the server dies at the first request after the first image chunk is finished
    server.die_when(lambda: any((out / "_progress" / "images").glob("*.json")))
    proc = subprocess.run([str(BIN / "cusa-cache"), *command], capture_output=True, text=True, timeout=300,
                          env={**one_thread_env(), "CUSA_CACHE_DIR": os.environ["CUSA_CACHE_DIR"]})
    error = one_error_line(proc)
    assert error.startswith(f"Error: http://127.0.0.1:{server.port}/val-00000")
    assert "cannot transfer the tar shard val-00000" in error and "after 4 tries" in error
    done = len(list((out / "_progress" / "images").glob("*.json")))
    assert done >= 1
    server.restart()
    result = CliRunner().invoke(cache_main, command)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"]["skipped_chunks"] == done  # finished chunks were kept
    assert_same_rows(out, reference)


# ================================================================================================ training
def train_args(data: str, cache, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return ["--data", data, "--split", "val", "--cache", str(cache), "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "4", "--lr", "1e-3", "--seed", "0", "--workers", "0", "--device", "cpu", "--json",
            "--set", "frozen.hidden=64", "--set", "frozen.embed_dim=64", *extra]


def recalls_on(run: Path, data: str) -> dict:
    result = invoke_json(eval_main, [run, "--data", data, "--device", "cpu", "--workers", "0", "--json"])
    return {k: result[k] for k in RECALLS}


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_a_frozen_run_from_remote_shards_ends_with_the_all_local_runs_test_recalls(
        kind, demo_shards, val_shard_cache, tmp_path, request):
    sources, server = served(kind, demo_shards, tmp_path, request, splits=("val", "test"))
    cache = val_shard_cache
    if kind == "s3":  # the teacher cache at a URL too
        cache = server.url(f"{tmp_path.name}/store")
        assert CliRunner().invoke(cache_main, ["push", str(val_shard_cache), cache, "--json"]).exit_code == 0
    local, remote = tmp_path / "local", tmp_path / "remote"
    invoke_json(train_main, train_args(demo_shards["val"], val_shard_cache, local, "--loss", "cusa"))
    summary = invoke_json(train_main, train_args(sources["val"], cache, remote, "--loss", "cusa"))
    assert summary["train_pairs"] == 45
    assert json.loads((remote / "config.json").read_text())["data"] == sources["val"]
    assert_same_training(local, remote)
    assert recalls_on(remote, sources["test"]) == recalls_on(local, demo_shards["test"])


def test_a_server_killed_mid_training_is_one_line_and_resume_reaches_the_uninterrupted_run(
        demo_shards, val_shard_cache, tmp_path, request):
    (tmp_path / "tiny_clip").mkdir()
    (tmp_path / "tiny_clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    student = ("--student", f"open_clip:local-dir:{tmp_path / 'tiny_clip'}")
    sources, server = served("http", demo_shards, tmp_path, request)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    invoke_json(train_main, train_args(demo_shards["val"], val_shard_cache, straight, *student, epochs=2))
    # images are read from the tars every epoch; the shard cache keeps 1.5 shards, so epoch 2 fetches them again
    tight = ("--shard-cache-gib", str(tight_cache_gib(demo_shards)))
    server.die_when(lambda: (killed / "last.pt").exists())
    proc = subprocess.run([str(BIN / "cusa-train"), *train_args(sources["val"], val_shard_cache, killed, *student, *tight,
                                                                 epochs=2)],
                          capture_output=True, text=True, timeout=300,
                          env=subprocess_env(CUSA_CACHE_DIR=os.environ["CUSA_CACHE_DIR"]))
    error = one_error_line(proc)
    assert error.startswith(f"Error: http://127.0.0.1:{server.port}/val-00000")
    assert "cannot transfer the tar shard" in error
    server.restart()
    summary = invoke_json(train_main, ["--out", killed, "--resume", *tight, "--json"])
    assert summary["epochs"] == 2
    assert_same_training(straight, killed)


# ================================================================================================ read-ahead
def test_the_read_ahead_fetches_the_next_shards_before_the_loop_reaches_them_within_the_bound(
        demo_shards, tmp_path, request):
    sources, server = served("http", demo_shards, tmp_path, request, splits=("val", "test"))
    urls = [server.url(f"val-00000{i}.tar") for i in range(3)] + [server.url(f"test-00000{i}.tar") for i in range(3)]
    sizes = [p.stat().st_size for p in shard_files(demo_shards, "val") + shard_files(demo_shards, "test")]
    bound = 2 * max(sizes) + 1
    cache = ShardCache(ShardCacheSettings(str(tmp_path / "shards"), bound / 2**30))
    stats = cache.stats(urls)
    seen_bytes = []
    with ShardReadAhead([[(u, s)] for u, s in zip(urls, stats)], ahead=1, cache=cache) as ahead:
        for i, _ in enumerate(ahead.follow(range(len(urls)), read_on_arrival=False)):
            time.sleep(0.3)  # the work on shard i: the thread fetches shard i+1 meanwhile
            cached = {k.rsplit("-", 1)[0].split("/")[-1] for k in cache.cache.usage()}
            if i + 1 < len(urls):
                assert Path(urls[i + 1].rsplit("/", 1)[1]).stem in cached, (i, cached)
            cache.read(urls[i], 0, 512, stats[i])
            seen_bytes.append(cache.cache.size_bytes())
    assert ahead.fetched == len(urls) and cache.cache.stats.fetched == len(urls)
    assert max(seen_bytes) <= bound
    assert sorted(fetches(server).values()) == [1] * len(urls)


def test_each_rank_plans_only_the_shards_of_its_own_rows(demo_shards, tmp_path, request):
    sources, _ = served("http", demo_shards, tmp_path, request)
    m = read_manifest(sources["val"])
    # the build gives rank 1 of 2 the second half of the chunks: rows 4-8, in shards 1 and 2
    plan = ShardReadAhead.for_rows(m, [list(range(4, 8)), [8]])
    assert [s.rsplit("/", 1)[1] for s in plan.order] == ["val-000001.tar", "val-000002.tar"]
    assert all(isinstance(s, FileStat) and s.size > 0 for s in plan.stats)
    assert not ShardReadAhead.for_rows(read_manifest(demo_shards["val"]), [[0, 1]]).active  # local: no thread


# ================================================================================================ gs:// and hf://
def test_gs_and_hf_sources_reach_fsspec_and_say_what_is_missing(tmp_path):
    with pytest.raises(RemoteError) as err:
        read_manifest("gs://bucket/shards/train-{000000..000001}.tar")
    message = str(err.value)
    assert message.startswith("gs://bucket/shards: reading gs:// URLs needs a package") or "cannot transfer" in message
    if "needs a package" in message:
        assert "pip install 'cusa[gcs]'" in message
    with environment({"HF_HUB_OFFLINE": "1"}), pytest.raises((RemoteError, CusaError, StoreError)) as err:
        read_manifest("hf://datasets/someone/data/shards/train-{000000..000001}.tar")
    assert str(err.value).startswith("hf://datasets/someone/data/shards: ") and "\n" not in str(err.value)


class _FailingReads(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        raise RemoteError("http://127.0.0.1:9/val-000001.tar: cannot transfer the tar shard val-000001.tar after 4 "
                          "tries over 3.5 s (ServerDisconnectedError: Server disconnected); check the connection")


def test_a_transfer_that_failed_in_a_dataloader_worker_is_reported_as_its_own_line():
    loader = torch.utils.data.DataLoader(_FailingReads(), batch_size=2, num_workers=1)
    with pytest.raises(RemoteError) as err:
        next(iter(loader))
    assert str(err.value).startswith("Caught RemoteError in DataLoader worker process 0")  # what torch makes of it
    assert error_line(err.value) == ("http://127.0.0.1:9/val-000001.tar: cannot transfer the tar shard val-000001.tar "
                                     "after 4 tries over 3.5 s (ServerDisconnectedError: Server disconnected); check "
                                     "the connection")
