"""Stores at a URL, against real servers on 127.0.0.1 (tests/servers.py): an HTTP file server with and without Range
support, and moto's S3 API reached through s3fs at a custom endpoint. Reads equal the local store's bytes, each
download is size-checked and each chunk checksum-checked before it is cached, the local cache keeps to its bound, a
dropped connection is retried and then named in one line, secrets never show; push → pull gives back the same bytes,
and a push stopped midway leaves a store every reader refuses as incomplete."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers_train import train_args
from pipeline.cli import main
from servers import FileServer, S3Server, environment, http_server, s3_server  # noqa: F401 (fixtures)
from teacher_cache.chunk_reader import ChunkReader
from teacher_cache.errors import RemoteError
from teacher_cache.remote import (BoundedFileCache, RetryPolicy, TruncatedTransfer, failure_kind, redact_text,
                                  redact_url, with_retries)
from teacher_cache.remote_store import PUSH_LIST, StoreCacheSettings, open_store
from teacher_cache.store import MODALITIES, Store
from teacher_cache.verify import verify_store
from train.cli import train_main

CLI = Path(sys.executable).parent / "cusa-cache"
FAST = RetryPolicy(attempts=3, first_delay=0.05)


def cli(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def error_line(result) -> str:
    """The one error line of a failed command, with no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def tree_bytes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def same_rows(a: Store, b: Store) -> None:
    for m in MODALITIES:
        assert np.array_equal(a.load(m), b.load(m)), m
        ids_a, sims_a = a.neighbors(m)
        ids_b, sims_b = b.neighbors(m)
        assert np.array_equal(ids_a, ids_b) and np.array_equal(sims_a, sims_b), m
    assert list(a.captions) == list(b.captions) and list(a.image_ids) == list(b.image_ids)


@pytest.fixture
def served(demo_cache, http_server) -> FileServer:
    """The demo cache copied into the HTTP server's folder as ``store``."""
    shutil.copytree(demo_cache, http_server.root / "store")
    return http_server


# ---------------------------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("url, shown", [
    ("https://alice:hunter2@example.org/caches/coco", "https://REDACTED@example.org/caches/coco"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123",
     "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED"),
    ("https://acct.blob.core.windows.net/c/store?sv=2022&sig=s3cr3t%2B&sp=r",
     "https://acct.blob.core.windows.net/c/store?sv=REDACTED&sig=REDACTED&sp=r"),
    ("http://127.0.0.1:8000/store?token=abc&page=2", "http://127.0.0.1:8000/store?token=REDACTED&page=2"),
    ("s3://bucket/caches/coco", "s3://bucket/caches/coco"),
    ("/data/caches/coco", "/data/caches/coco"),
])
def test_redact_url_masks_user_info_and_signed_query_values_only(url, shown):
    assert redact_url(url) == shown
    assert redact_text(f"cannot read {url} (timeout)") == f"cannot read {shown} (timeout)"


def test_a_transient_failure_is_retried_with_growing_waits_then_named_in_one_line():
    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert with_retries(flaky, url="s3://b/k", what="a chunk", policy=RetryPolicy(4, 0.5, 2.0), sleep=waits.append) \
        == "ok"
    assert waits == [0.5, 1.0]
    waits.clear()
    with pytest.raises(RemoteError) as err:
        with_retries(lambda: (_ for _ in ()).throw(TimeoutError("timed out")), url="https://u:p@h/x?sig=S",
                     what="images chunk 2 (rows 32-47)", policy=RetryPolicy(3, 0.5, 2.0, max_delay=0.75),
                     sleep=waits.append)
    assert waits == [0.5, 0.75]
    message = str(err.value)
    assert message.startswith("https://REDACTED@h/x?sig=REDACTED: cannot transfer images chunk 2 (rows 32-47) "
                              "after 3 tries") and "\n" not in message and "p@" not in message


def wrapped(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize("exc, kind", [
    (FileNotFoundError("no such key"), "missing"), (PermissionError("403"), "denied"),
    (ConnectionRefusedError(), "transient"), (TruncatedTransfer("short"), "transient"), (ValueError("x"), "fatal"),
    (wrapped(FileNotFoundError("http://h/x.tar"), ConnectionResetError()), "transient"),  # fsspec http's probe
    (wrapped(FileNotFoundError("http://h/x.tar"), ValueError("x")), "missing"),
])
def test_failures_are_classified_so_that_only_transient_ones_are_retried(exc, kind):
    assert failure_kind(exc) == kind
    tries = []

    def fail():
        tries.append(1)
        raise exc

    with pytest.raises(RemoteError):
        with_retries(fail, url="s3://b/k", what="x", policy=RetryPolicy(3, 0.0))
    assert len(tries) == (3 if kind == "transient" else 1)


def test_the_file_cache_keeps_its_bound_evicting_the_least_recently_used_but_never_a_pinned_file(tmp_path):
    cache = BoundedFileCache(tmp_path / "c", max_bytes=250)

    def writer(n):
        return lambda tmp: tmp.write_bytes(b"x" * n)

    for key in ("a", "b"):
        assert cache.read(key, writer(100), 100) == b"x" * 100
    cache.read("a", writer(100), 100)  # a used again: b is now the least recently used
    with cache.pinned("c", writer(100), 100) as path:
        assert path.read_bytes() == b"x" * 100
    assert set(cache.usage()) == {"a", "c"} and cache.size_bytes() == 200
    assert cache.stats.to_dict() == {"hits": 1, "fetched": 3, "fetched_bytes": 300, "evicted": 1}
    with cache.pinned("big", writer(400), 400) as big:  # larger than the bound: delivered, then let go
        with cache.pinned("d", writer(100), 100):
            assert big.is_file()
    assert "big" not in cache.usage() and cache.size_bytes() <= 250


def test_a_fetch_that_brings_the_wrong_size_is_never_cached(tmp_path):
    cache = BoundedFileCache(tmp_path / "c", max_bytes=1000)
    with pytest.raises(TruncatedTransfer):
        cache.read("k", lambda tmp: tmp.write_bytes(b"half"), 8)
    assert cache.usage() == {} and not list((tmp_path / "c").rglob("*.partial"))
    assert cache.read("k", lambda tmp: tmp.write_bytes(b"complete"), 8) == b"complete"


# ---------------------------------------------------------------------------------------------- http
@pytest.mark.parametrize("range_support", [True, False])
def test_a_store_served_over_http_reads_the_same_rows_dense_and_chunk_by_chunk(demo_cache, tmp_path, range_support):
    root = tmp_path / "www"
    shutil.copytree(demo_cache, root / "store")
    server = FileServer(root, range_support=range_support).start()
    try:
        remote = open_store(server.url("store"), require_complete=True,
                            local_cache=StoreCacheSettings(str(tmp_path / "cache")))
        local = Store.open(demo_cache)
        assert remote.location == server.url("store") and remote.counts == local.counts
        same_rows(remote, local)
        reader = ChunkReader(remote, "texts")
        assert reader._direct is not None  # the fast decode path, fed by the local cache
        for c in range(reader.n_chunks):
            start, stop = local.chunk_range("texts", c)
            assert np.array_equal(reader.read(c), local.array("texts")[start:stop])
        assert verify_store(remote).ok
        # every embedding chunk was downloaded once: later reads came from the local cache
        chunks = [r for r in server.requests if "/emb/c/" in r]
        assert sorted(chunks) == sorted(set(chunks)) and len(chunks) == sum(local.n_chunks(m) for m in MODALITIES)
    finally:
        server.stop()


def test_a_dropped_transfer_is_retried_and_a_truncated_download_is_never_cached(served, tmp_path):
    settings = StoreCacheSettings(str(tmp_path / "cache"))
    served.truncate_next(2)  # fewer than the attempts: the reads succeed
    store = open_store(served.url("store"), local_cache=settings, policy=FAST)
    assert np.array_equal(store.load("images"), Store.open(served.root / "store").load("images"))
    cached = store.path / "texts" / "emb" / "c" / "0" / "0"
    store.array("texts")  # its metadata document now cached, so the chunks are the next transfers
    assert not cached.exists()
    served.truncate_next(100)  # every transfer cut short
    with pytest.raises(RemoteError) as err:
        store.load("texts")
    message = str(err.value)
    assert message.startswith(f"{served.url('store')}/texts/emb/c/") and "cannot transfer texts chunk" in message
    assert "after 3 tries" in message and "\n" not in message
    # zarr reads chunks concurrently: transfers still under way when the first one failed end as theirs do
    deadline = time.monotonic() + 20
    while list(store.path.rglob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(store.path.rglob("*.partial"))
    assert not [p for p in (store.path / "texts" / "emb" / "c").rglob("0") if p.is_file()]


def test_a_chunk_damaged_at_the_url_is_refused_naming_the_chunk(served, tmp_path):
    chunk = served.root / "store" / "texts" / "emb" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[-3] ^= 0xFF  # same size, other bytes
    chunk.write_bytes(bytes(raw))
    store = open_store(served.url("store"), require_complete=True,
                       local_cache=StoreCacheSettings(str(tmp_path / "cache")))
    with pytest.raises(RemoteError, match=r"/texts/emb/c/1/0: texts chunk 1 \(rows 16-31\) does not match the "
                                          r"checksum its build recorded \(damaged at the URL\)"):
        store.load("texts")
    assert not (store.path / "texts" / "emb" / "c" / "1" / "0").exists()


def test_403_and_404_name_the_url_without_its_token_and_what_was_expected(demo_cache, tmp_path):
    root = tmp_path / "www"
    shutil.copytree(demo_cache, root / "store")
    server = FileServer(root, token="s3cr3t-t0ken").start()
    try:
        bad = server.url("store").replace("s3cr3t-t0ken", "wrong-t0ken")
        result = cli("info", bad)
        line = error_line(result)
        assert line == (f"Error: http://127.0.0.1:{server.port}/store/zarr.json?token=REDACTED: access denied "
                        "(expected the store's root document zarr.json); check the credentials (AWS_* variables or "
                        "~/.aws, Google application credentials, HF_TOKEN; never a flag) and that they may read this "
                        "location")
        assert "wrong-t0ken" not in result.output
        assert "not a cusa store (no zarr.json at this URL)" in error_line(cli("info", server.url("nothing")))
        (root / "store" / "images" / "split" / "c" / "0").unlink()
        result = cli("info", server.url("store"))
        line = error_line(result)
        assert line.startswith(f"Error: http://127.0.0.1:{server.port}/store/images/split/c/0?token=REDACTED: not "
                               "found, expected images/split/c/0, ")
        assert "s3cr3t" not in result.output
    finally:
        server.stop()


def test_the_local_cache_keeps_to_its_bound_and_is_reused_across_opens(served, tmp_path, monkeypatch):
    monkeypatch.setenv("CUSA_CACHE_DIR", str(tmp_path / "cusa"))
    store = open_store(served.url("store"))  # default folder: $CUSA_CACHE_DIR/stores
    assert store.path.is_relative_to(tmp_path / "cusa" / "stores")
    store.load("texts")
    before = len(served.requests)
    again = open_store(served.url("store"))
    again.load("texts")
    assert [r for r in served.requests[before:] if "/emb/c/" in r] == []  # from the cache
    bound = 30_000
    small = open_store(served.url("store"), local_cache=StoreCacheSettings(str(tmp_path / "small"), bound / 2**30))
    largest = max(small.remote.files.values())
    for modality in MODALITIES:
        reader = ChunkReader(small, modality)
        for c in range(reader.n_chunks):
            reader.read(c)
            assert small.remote.cache.size_bytes() <= max(bound, largest)
    assert small.remote.cache.stats.evicted > 0


# ---------------------------------------------------------------------------------------------- s3: push and pull
def test_push_then_pull_gives_back_the_same_bytes_and_a_store_that_verifies(demo_cache, s3_server, tmp_path):
    url = s3_server.url("caches/push-pull")
    pushed = json.loads(cli("push", demo_cache, url, "--json").stdout)
    assert pushed["url"] == url and pushed["bytes"] == sum(p.stat().st_size for p in demo_cache.rglob("*")
                                                           if p.is_file())
    objects = s3_server.objects("caches/push-pull/")
    assert "caches/push-pull/" + PUSH_LIST in objects and "caches/push-pull/zarr.json" in objects
    pulled = json.loads(cli("pull", url, tmp_path / "pulled", "--json").stdout)
    assert pulled["store"] == str(tmp_path / "pulled")
    assert tree_bytes(tmp_path / "pulled") == tree_bytes(demo_cache, skip=("_build.lock",))
    verified = json.loads(cli("verify", tmp_path / "pulled", "--json").stdout)
    assert verified["ok"] and verified["problems"] == []
    # read in place too, straight from the bucket
    remote = json.loads(cli("verify", url, "--json").stdout)
    assert remote["ok"] and remote["store"] == url
    info = json.loads(cli("info", url, "--json").stdout)
    assert info["complete"] and info["chunks_done"] == info["chunks_total"]
    same_rows(open_store(url, local_cache=StoreCacheSettings(str(tmp_path / "cache"))), Store.open(demo_cache))
    # pushing the same store again is fine; another store at the URL is refused unless --overwrite
    assert cli("push", demo_cache, url, "--json").exit_code == 0
    other = tmp_path / "other"
    shutil.copytree(demo_cache, other)
    doc = json.loads((other / "zarr.json").read_text())
    doc["attributes"]["fingerprint"] = "0" * 64
    (other / "zarr.json").write_text(json.dumps(doc))
    assert "damaged store refused" in error_line(cli("push", other, url))  # checked before any upload
    assert s3_server.client().get_object(Bucket=s3_server.bucket, Key="caches/push-pull/zarr.json")["Body"].read() \
        == (demo_cache / "zarr.json").read_bytes()


def test_push_refuses_a_store_built_from_other_data_and_files_that_are_no_store(demo_cache, s3_server, tmp_path):
    url = s3_server.url("caches/taken")
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="caches/taken/notes.txt", Body=b"mine")
    assert error_line(cli("push", demo_cache, url)) == \
        f"Error: {url}: holds 1 file(s) and no cusa store; choose an empty location"
    s3_server.clear("caches/taken/")
    doc = json.loads((demo_cache / "zarr.json").read_text())
    doc["attributes"]["fingerprint"] = "f" * 64
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="caches/taken/zarr.json", Body=json.dumps(doc).encode())
    assert error_line(cli("push", demo_cache, url)) == (f"Error: {url}: holds another store (its fingerprint "
                                                          "differs); pass --overwrite to replace it, or choose another "
                                                          "URL")
    assert cli("push", demo_cache, url, "--overwrite", "--json").exit_code == 0
    assert Store.open(demo_cache).fingerprint == open_store(url, local_cache=StoreCacheSettings(
        str(tmp_path / "cache"))).fingerprint


def test_a_push_killed_midway_leaves_a_store_readers_refuse_as_incomplete_until_pushed_again(demo_dir, demo_cache,
                                                                                               s3_server, tmp_path):
    url = s3_server.url("caches/killed")
    env = {**os.environ, "CUSA_FAULT_AT": "push_file:5", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(CLI), "push", str(demo_cache), url, "--json"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    uploaded = s3_server.objects("caches/killed/")
    assert 1 < len(uploaded) < len(list(p for p in demo_cache.rglob("*") if p.is_file()))
    root = json.loads(s3_server.client().get_object(Bucket=s3_server.bucket, Key="caches/killed/zarr.json")["Body"]
                      .read())
    assert root["attributes"]["complete"] is False and "attrs_digests" not in root["attributes"]
    expected = (f"Error: {url}: the store at this URL is incomplete (its upload did not finish, or it was uploaded "
                f"before its build finished); upload it again with `cusa-cache push STORE {url}`")
    for args in (("info", url), ("verify", url), ("pull", url, tmp_path / "pulled")):
        assert error_line(cli(*args)) == expected
    trained = CliRunner().invoke(train_main, train_args(demo_dir, url, tmp_path / "run", epochs=1))
    assert error_line(trained) == expected and not (tmp_path / "run" / "last.pt").exists()
    assert not (tmp_path / "pulled").exists() or not any((tmp_path / "pulled").iterdir())
    assert cli("push", demo_cache, url, "--json").exit_code == 0
    assert json.loads(cli("verify", url, "--json").stdout)["ok"]


def test_push_needs_a_complete_store_and_a_writable_url(demo_cache, s3_server, tmp_path):
    assert "read-only" in error_line(cli("push", demo_cache, "https://example.org/caches/coco"))
    assert error_line(cli("push", demo_cache, "s3://no-such-bucket/caches/coco")) == (
        "Error: s3://no-such-bucket/caches/coco/zarr.json: the bucket or folder does not exist (create it first)")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(demo_cache, unfinished)
    doc = json.loads((unfinished / "zarr.json").read_text())
    doc["attributes"]["complete"] = False
    (unfinished / "zarr.json").write_text(json.dumps(doc))
    assert "the store is incomplete" in error_line(cli("push", unfinished, s3_server.url("caches/unfinished")))
    assert s3_server.objects("caches/unfinished/") == {}


def test_a_custom_endpoint_can_come_from_fsspec_configuration_instead_of_aws_variables(demo_cache, s3_server,
                                                                                      tmp_path):
    url = s3_server.url("caches/fsspec-endpoint")
    assert cli("push", demo_cache, url, "--json").exit_code == 0
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    env.update(FSSPEC_S3_ENDPOINT_URL=s3_server.endpoint, CUSA_CACHE_DIR=str(tmp_path / "cusa"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(CLI), "info", url, "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["counts"] == Store.open(demo_cache).counts


def test_a_dead_endpoint_is_one_line_naming_the_url_after_bounded_retries(demo_cache, tmp_path):
    server = S3Server()  # never started: nothing listens on its port
    with environment(server.environment()):
        result = cli("info", server.url("caches/gone"))
    line = error_line(result)
    assert line.startswith(f"Error: {server.url('caches/gone')}/zarr.json: cannot transfer the store's root "
                           "document zarr.json after 4 tries over ")
    assert "check the connection and run the command again" in line
