"""The one-process build that resumed and sharded builds are compared against: the demo val split (9 images,
45 captions) in chunks of 4 rows, on one CPU thread.

Float sums inside the teachers depend on the number of threads, so every build compared byte for byte with this one
runs on one thread too (torchrun sets OMP_NUM_THREADS=1 for its workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.build import BuildConfig, build_store
from teacher_cache.errors import StoreError
from teacher_cache.store import MODALITIES, Store

BUILD_ARGS = ("--chunk-rows", "4", "--neighbors", "4", "--workers", "0", "--device", "cpu")
BIN = Path(sys.executable).parent


def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def kill_build_after_image_chunks(command: list[str], out: Path, chunks: int = 2) -> None:
    """Run `cusa-cache COMMAND` in a subprocess (one thread) and SIGKILL it once ``chunks`` image chunks of the store
    ``out`` are marked finished."""
    proc = subprocess.Popen([str(BIN / "cusa-cache"), *command], env=one_thread_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(list((out / "_progress" / "images").glob("*.json"))) < chunks:
            assert proc.poll() is None, f"the build ended before {chunks} image chunks were marked finished"
            assert time.monotonic() < deadline, "no image chunk finished within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


class one_torch_thread:
    """Run torch on one thread inside the block, as a subprocess with OMP_NUM_THREADS=1 does."""

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.before)


def val_reference(demo_dir: Path, root: Path) -> Path:
    """Build (once per test session: ``root`` is the session's base folder) the reference store of the val split."""
    out = root / "val-reference"
    try:
        if Store.open(out).complete:
            return out
    except StoreError:
        pass
    with one_torch_thread():
        build_store(BuildConfig(annotations=str(demo_dir / "val.json"), out=str(out), chunk_rows=4, neighbors=4,
                                workers=0, device="cpu", progress=False))
    return out


def assert_same_rows(shard_store: Path, json_store: Path) -> None:
    """Same embedding bytes, neighbor tables, checksums, ids and captions; the fingerprints differ only because
    image paths do (SHARD/MEMBER against images/FILE)."""
    a, b = Store.open(shard_store, require_complete=True), Store.open(json_store, require_complete=True)
    for modality in MODALITIES:
        assert a.array(modality)[:].tobytes() == b.array(modality)[:].tobytes(), modality
        for x, y in zip(a.neighbors(modality), b.neighbors(modality)):
            np.testing.assert_array_equal(x, y)
    assert a.attrs["checksums"] == b.attrs["checksums"]
    assert a.image_ids.tolist() == b.image_ids.tolist() and a.captions.tolist() == b.captions.tolist()
    assert a.caption_image_rows.tolist() == b.caption_image_rows.tolist()
