"""Training, evaluating, ablating and searching with ``--cache`` at a URL, against real servers on 127.0.0.1: a
frozen-student run from ``s3://`` (dense) or ``http://`` (streamed, through a local store cache too small to keep the
store) ends exactly where the same run from the local store does; a server killed mid-training ends the run in one
line and ``--resume`` then reaches the uninterrupted result; a token in the URL never reaches the run folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers_train import (METRIC_KEYS, assert_same_training, invoke, invoke_json, one_error_line, one_torch_thread,
                           subprocess_env, train_args)
from pipeline.cli import main as cache_main
from servers import FileServer, http_server, s3_server  # noqa: F401 (fixtures)
from train.ablate_cli import ablate_main
from train.cli import eval_main, train_main
from train.search_cli import search_main

STREAM = ("--set", "soft_labels.stream=true", "--set", "log_every=1")
TINY_STORE_CACHE = ("--store-cache-gib", str(40_000 / 2**30))  # about one image chunk: chunks are fetched again


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    # cusa's cache folder (store files, frozen features of a cache at a URL) inside the test's own folder
    monkeypatch.setenv("CUSA_CACHE_DIR", str(tmp_path / "cusa-cache"))
    with one_torch_thread():
        yield


def checkpoint(run) -> dict:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=False)


def recalls_on_test(run, demo_dir) -> dict:
    result = invoke_json(eval_main, [run, "--data", demo_dir / "test.json", "--device", "cpu", "--workers", "0",
                                     "--json"])
    return {k: result[k] for k in (*METRIC_KEYS, "rsum")}


@pytest.mark.parametrize("where", ["s3", "http"])
def test_a_frozen_run_from_a_store_at_a_url_ends_with_the_local_run_s_test_recalls(demo_dir, demo_cache, tmp_path,
                                                                                  where, request):
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        url = server.url("caches/train")
        assert invoke(cache_main, ["push", demo_cache, url, "--json"]).exit_code == 0
        extra: tuple = ()  # dense: every chunk read once, into memory
    else:
        server = request.getfixturevalue("http_server")
        shutil.copytree(demo_cache, server.root / "store")
        url = server.url("store")
        extra = (*STREAM, *TINY_STORE_CACHE)  # streamed through a store cache smaller than the store
    local, remote = tmp_path / "local", tmp_path / "remote"
    invoke_json(train_main, train_args(demo_dir, demo_cache, local, *extra[:4]))
    summary = invoke_json(train_main, train_args(demo_dir, url, remote, *extra))
    assert summary["soft_labels_mode"] == ("stream" if where == "http" else "dense")
    assert json.loads((remote / "config.json").read_text())["cache"] == url
    assert_same_training(local, remote)
    assert recalls_on_test(remote, demo_dir) == recalls_on_test(local, demo_dir)
    if where == "http":
        chunk_requests = [r for r in server.requests if "/emb/c/" in r]
        assert len(chunk_requests) > len(set(chunk_requests))  # evicted chunks were fetched again


def test_a_server_killed_mid_training_is_one_line_then_resume_reaches_the_uninterrupted_result(demo_dir, demo_cache,
                                                                                             http_server, tmp_path):
    shutil.copytree(demo_cache, http_server.root / "store")
    url = http_server.url("store")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    invoke_json(train_main, train_args(demo_dir, demo_cache, straight, *STREAM, epochs=3))
    # the server dies at the first request after the first epoch's checkpoint: the second epoch must fetch again
    http_server.die_when(lambda: (killed / "last.pt").exists())
    args = train_args(demo_dir, url, killed, *STREAM, *TINY_STORE_CACHE, epochs=3)
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "cusa-train"), *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env=subprocess_env(CUSA_CACHE_DIR=os.environ["CUSA_CACHE_DIR"]))
    error = one_error_line(proc)
    assert error.startswith(f"Error: http://127.0.0.1:{http_server.port}/store/")
    assert "cannot transfer" in error and "after 4 tries" in error
    assert checkpoint(killed)["epoch"] == 1
    http_server.restart()
    summary = invoke_json(train_main, train_args(demo_dir, url, killed, "--resume", *TINY_STORE_CACHE, epochs=3))
    assert summary["epochs"] == 3
    assert_same_training(straight, killed)


def test_a_token_in_the_cache_url_never_reaches_the_run_folder_or_the_log(demo_dir, demo_cache, tmp_path):
    root = tmp_path / "www"
    shutil.copytree(demo_cache, root / "store")
    server = FileServer(root, token="tok-5ecret").start()
    try:
        url = server.url("store")
        run = tmp_path / "run"
        result = invoke(train_main, [a for a in train_args(demo_dir, url, run, epochs=1) if a != "--json"])
        assert result.exit_code == 0, result.output
        assert "tok-5ecret" not in result.output
        for path in run.rglob("*"):
            if path.is_file():
                assert b"tok-5ecret" not in path.read_bytes(), path
        shown = url.replace("tok-5ecret", "REDACTED")
        assert json.loads((run / "config.json").read_text())["cache"] == shown
        # a resume reads the redacted URL from the run: given the URL again, it goes on (the same store)
        summary = invoke_json(train_main, ["--out", run, "--resume", "--cache", url, "--epochs", "2", "--json"])
        assert summary["epochs"] == 2
    finally:
        server.stop()


def test_cusa_ablate_runs_its_grid_from_a_store_at_a_url_and_cusa_search_needs_no_store(demo_dir, demo_cache,
                                                                                        http_server, tmp_path):
    shutil.copytree(demo_cache, http_server.root / "store")
    url = http_server.url("store")
    out = tmp_path / "abl"
    payload = invoke_json(ablate_main, ["--data", demo_dir / "train.json", "--eval-data", demo_dir / "test.json",
                                        "--cache", url, "--grid", "loss=cusa", "--seeds", "1", "--epochs", "1",
                                        "--batch-size", "32", "--lr", "1e-3", "--device", "cpu", "--workers", "0",
                                        "--store-cache", tmp_path / "stores", "--out", out, "--json"])
    assert payload["counts"]["runs"] == 2 and payload["counts"]["teacher_passes"] == 0
    assert payload["cache"] == url
    assert (tmp_path / "stores").is_dir()
    run = next(p for p in (out / "runs").iterdir() if "cusa" in p.name)
    assert json.loads((run / "config.json").read_text())["store_cache"] == str(tmp_path / "stores")
    http_server.stop()  # a trained run is searched without its teacher cache
    found = invoke_json(search_main, [run, "--collection", demo_dir / "test.json", "--query", "a red circle", "-k",
                                      "3", "--device", "cpu", "--json"])
    assert len(found["queries"][0]["results"]) == 3
