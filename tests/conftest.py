"""Shared fixtures: a small real demo dataset (rendered PNGs, 5 captions each) and a teacher cache built from it
with the real built-in teachers. Both are session-scoped: tests that modify a store copy it first."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# manifest indexes (and other caches) of this run, never the user's: inherited by every command a test starts
_CACHE_DIR = tempfile.mkdtemp(prefix="cusa-test-cache-")
os.environ["CUSA_CACHE_DIR"] = _CACHE_DIR

from demo_constants import DEMO_CHUNK_ROWS, DEMO_IMAGES, DEMO_NEIGHBORS, DEMO_SAMPLES_PER_SHARD


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run the long randomized variants")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="long randomized variant: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from pipeline.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, n_images=DEMO_IMAGES, seed=0, image_size=96, split_fractions=(0.70, 0.15, 0.15))
    return root


@pytest.fixture(scope="session")
def demo_shards(demo_dir, tmp_path_factory) -> dict[str, str]:
    """The demo splits written as webdataset shards of 4 samples (KEY.png, KEY.txt, KEY.json): split -> brace
    pattern. The images are the demo files' bytes, so a shard build equals the JSON build of the same split."""
    from pipeline.manifest import read_manifest
    from pipeline.shard_writer import write_manifest_shards

    out = tmp_path_factory.mktemp("shards")
    return {split: write_manifest_shards(read_manifest(demo_dir / f"{split}.json"), out, split,
                                         DEMO_SAMPLES_PER_SHARD)["pattern"]
            for split in ("train", "val", "test")}


@pytest.fixture(scope="session")
def demo_cache(demo_dir, tmp_path_factory) -> Path:
    """A complete teacher cache of the demo train split (real efficientnet-lite0 + MiniLM teachers)."""
    from pipeline.build import BuildConfig, build_store

    import torch

    out = tmp_path_factory.mktemp("cache") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than 2 threads fighting other test processes for 2 cores
    try:
        build_store(BuildConfig(annotations=str(demo_dir / "train.json"), out=str(out), workers=0, batch_size=16,
                                chunk_rows=DEMO_CHUNK_ROWS, neighbors=DEMO_NEIGHBORS, progress=False,
                                device="cpu"))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def val_shard_cache(demo_shards, tmp_path_factory) -> Path:
    """A teacher cache built from the demo val shards (9 images, 45 captions; chunks of 16 rows, 4 neighbors): the
    training data of the runs that train from shards."""
    from pipeline.build import BuildConfig, build_store

    import torch

    out = tmp_path_factory.mktemp("shard-cache") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_store(BuildConfig(annotations=demo_shards["val"], out=str(out), chunk_rows=16, neighbors=4,
                                workers=0, device="cpu", progress=False))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def cache_copy(demo_cache, tmp_path) -> Path:
    """A private copy of the demo cache that a test may damage."""
    dst = tmp_path / "store"
    shutil.copytree(demo_cache, dst)
    return dst
