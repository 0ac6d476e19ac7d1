"""Concurrency: a second build of a store while one runs is refused, naming the running build's host and pid; a dead
build's lock is taken over, by exactly one of several builds racing for it; many processes reading one store at
the same time read identical bytes."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from reliability_support import assert_same_store, markers, one_error_line
from teacher_cache.errors import StoreError
from teacher_cache.store import BuildLock, Store

READERS = 4


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def lock_holder(store: Path) -> dict | None:
    try:
        return json.loads((store / "_build.lock").read_text())
    except (OSError, ValueError):
        return None


def test_a_second_build_is_refused_while_one_runs_and_a_killed_builds_lock_is_taken_over(server, tiny, reference,
                                                                                          tmp_path):
    out = tmp_path / "store"
    # the first build stops (alive, holding its lock) in the middle of the captions
    first = server.start(tiny.build_args(out), fault="text_chunk_written:2:stall")
    try:
        wait_for(lambda: sum(k.startswith("texts/") for k in markers(out)) == 2, "the first build's caption chunks")
        assert lock_holder(out) == {**lock_holder(out), "host": socket.gethostname(), "pid": first}
        before = markers(out)
        second = server.run(tiny.build_args(out))
        line = one_error_line(second)
        assert "another build is running on this store" in line
        assert f"host {socket.gethostname()}, pid {first}" in line
        assert markers(out) == before  # the refused build wrote nothing
        assert lock_holder(out)["pid"] == first
    finally:
        killed = server.kill(first)
    assert killed["rc"] == -signal.SIGKILL
    assert lock_holder(out)["pid"] == first  # a dead build's lock stays behind ...
    third = server.run(tiny.build_args(out))  # ... and is taken over
    assert third["rc"] == 0, third["stderr"]
    summary = json.loads(third["stdout"])
    assert summary["images"]["skipped_chunks"] == 3 and summary["texts"]["skipped_chunks"] == 2
    assert_same_store(out, reference[0])


def _race_for_lock(store: str, start_at: float, hold: float, results) -> None:
    """One contender (a forked process): try the lock at ``start_at``; the winner holds it for ``hold`` seconds."""
    while time.time() < start_at:
        time.sleep(0.0005)
    lock = BuildLock(Path(store))
    try:
        lock.acquire()
    except StoreError as exc:
        results.put((os.getpid(), "refused", str(exc)))
        return
    results.put((os.getpid(), "won", ""))
    time.sleep(hold)
    lock.release()


@pytest.mark.parametrize("leftover", ["dead-pid", "empty-file", "garbage"])
def test_exactly_one_of_several_builds_takes_over_a_stale_lock(tmp_path, leftover):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ctx = multiprocessing.get_context("fork")  # the contenders only touch the lock file
    for attempt in range(3):
        store = tmp_path / f"store{attempt}"
        store.mkdir()
        lock_file = store / "_build.lock"
        lock_file.write_text({"dead-pid": json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": 0}),
                              "empty-file": "", "garbage": "{not json"}[leftover])
        results = ctx.Queue()
        start_at = time.time() + 0.3
        procs = [ctx.Process(target=_race_for_lock, args=(str(store), start_at, 0.8, results)) for _ in range(6)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        winners = [pid for pid, what, _ in outcomes if what == "won"]
        assert len(winners) == 1, outcomes
        for pid, what, message in outcomes:
            if what == "refused":
                assert "another build is running on this store" in message, message
        assert not lock_file.exists()  # released by the winner


def test_a_live_builds_lock_is_respected_even_without_its_file_lock(tmp_path):
    """A lock file naming a live process on this host (written by a build of an older cusa, say) is respected."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "_build.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        with pytest.raises(StoreError, match=f"pid {sleeper.pid}"):
            BuildLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = BuildLock(tmp_path)
    lock.acquire()  # its process gone: taken over
    assert lock_holder(tmp_path)["pid"] == os.getpid()
    lock.release()


def _hold_lock_with_a_lingering_child(store: str) -> None:
    """A build that took the lock and forked a worker (as DataLoader does); killed, its worker outlives it."""
    BuildLock(Path(store)).acquire()
    if os.fork() == 0:
        time.sleep(5)
        os._exit(0)
    time.sleep(60)


def test_a_killed_builds_lock_is_free_at_once_even_while_its_forked_workers_live_on(tmp_path):
    ctx = multiprocessing.get_context("fork")
    build = ctx.Process(target=_hold_lock_with_a_lingering_child, args=(str(tmp_path),))
    build.start()
    wait_for(lambda: (lock_holder(tmp_path) or {}).get("pid") == build.pid, "the lock to be taken")
    with pytest.raises(StoreError, match=f"pid {build.pid}"):
        BuildLock(tmp_path).acquire()
    os.kill(build.pid, signal.SIGKILL)
    build.join()
    lock = BuildLock(tmp_path)
    lock.acquire()  # the worker still runs, holding the descriptor; the lock is free anyway
    assert lock_holder(tmp_path)["pid"] == os.getpid()
    lock.release()


READER = r"""
import hashlib, json, os, sys, time
import numpy as np
from teacher_cache.store import Store
path, gate, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
open(f"{gate}.ready{seed}.{time.time()}", "w").close()
while not os.path.exists(gate):  # every reader starts reading at the same moment
    time.sleep(0.001)
store = Store.open(path, require_complete=True)
rng = np.random.default_rng(seed)
digest = hashlib.sha256()
for _ in range(40):
    for modality in ("images", "texts"):
        rows = np.sort(rng.integers(0, store.counts[modality], size=5))
        digest.update(store.rows(modality, rows).tobytes())
for modality in ("images", "texts"):
    for start, block in store.iter_chunks(modality):
        digest.update(block.tobytes())
    ids, sims = store.neighbors(modality)
    digest.update(ids.tobytes() + sims.tobytes())
print(json.dumps({"digest": digest.hexdigest(), "end": time.time()}))
"""


def expected_digest(path: Path, seed: int) -> str:
    store = Store.open(path, require_complete=True)
    rng = np.random.default_rng(seed)
    digest = hashlib.sha256()
    for _ in range(40):
        for modality in ("images", "texts"):
            rows = np.sort(rng.integers(0, store.counts[modality], size=5))
            digest.update(store.rows(modality, rows).tobytes())
    for modality in ("images", "texts"):
        for start, block in store.iter_chunks(modality):
            digest.update(block.tobytes())
        ids, sims = store.neighbors(modality)
        digest.update(ids.tobytes() + sims.tobytes())
    return digest.hexdigest()


def test_many_processes_reading_one_store_at_once_read_identical_bytes(reference, tmp_path):
    store = reference[0]
    gate = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(store), str(gate), str(i % 2)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(READERS)]
    wait_for(lambda: len(list(tmp_path.glob("go.ready*"))) == READERS, "the readers to start")
    gate.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    digests = [json.loads(out)["digest"] for out, _ in outputs]
    assert digests == [expected_digest(store, i % 2) for i in range(READERS)]
