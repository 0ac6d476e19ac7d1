"""The teacher store: what a build leaves on disk (float16 unit rows in manifest order, an exact neighbor table,
chunk checksums) and how a store is opened, resumed and refused. Real Zarr stores: the shared demo cache built with
the real teachers, and small stores written through the Store API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest import read_manifest
from teacher_cache.errors import StoreError, StoreMismatch
from teacher_cache.store import FORMAT_VERSION, MODALITIES, Store, StoreLayout, chunk_checksum
from teacher_cache.verify import verify_store


@pytest.fixture(scope="module")
def store(demo_cache) -> Store:
    return Store.open(demo_cache, require_complete=True)


def small_layout(**changes) -> StoreLayout:
    """5 images, 7 captions, 2 rows per chunk: 3 image chunks and 4 caption chunks, no model needed."""
    fields = dict(
        fingerprint="a" * 64,
        split_fingerprints={"train": "b" * 64, "val": "c" * 64},
        image_ids=["i0", "i1", "i2", "i3", "i4"],
        image_paths=["p/0.png", "p/1.png", "p/2.png", "p/3.png", "p/4.png"],
        image_splits=["train", "train", "val", "train", "val"],
        captions=[f"caption {j}" for j in range(7)],
        caption_image_rows=np.array([0, 0, 1, 2, 3, 4, 4]),
        teachers={"image": {"spec": "img-a", "dim": 4}, "text": {"spec": "txt-a", "dim": 3}},
        dims={"images": 4, "texts": 3},
        chunk_rows=2,
    )
    fields.update(changes)
    return StoreLayout(**fields)


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_all_chunks(store: Store, seed: int = 0) -> dict[str, np.ndarray]:
    written = {}
    for i, modality in enumerate(MODALITIES):
        emb = unit_rows(store.counts[modality], store.dims[modality], seed + i)
        for c in range(store.n_chunks(modality)):
            start, stop = store.chunk_range(modality, c)
            store.write_chunk(modality, c, emb[start:stop])
        written[modality] = emb
    return written


# ---------------------------------------------------------------------------------------------- the demo cache


def test_demo_cache_holds_float16_unit_norm_rows_of_the_teacher_dims(store):
    assert store.counts == {"images": 42, "texts": 210}
    assert store.dims == {"images": 1280, "texts": 384}
    for modality in MODALITIES:
        arr = store.array(modality)
        assert arr.dtype == np.float16
        assert arr.shape == (store.counts[modality], store.dims[modality])
        norms = np.linalg.norm(store.load(modality), axis=1)
        assert np.abs(norms - 1.0).max() < 2e-3  # float16 rounding of a unit vector
        assert np.isfinite(store.load(modality)).all()


def test_demo_cache_rows_follow_the_manifest_row_order(store, demo_dir):
    manifest = read_manifest(demo_dir / "train.json")
    assert store.fingerprint == manifest.fingerprint()
    assert store.image_ids.tolist() == [im.image_id for im in manifest.images]
    assert store.image_paths.tolist() == [im.path for im in manifest.images]
    assert store.image_splits.tolist() == ["train"] * 42
    assert store.captions.tolist() == [c.text for c in manifest.captions]
    np.testing.assert_array_equal(store.caption_image_rows, manifest.caption_image_rows())
    assert np.bincount(store.caption_image_rows).tolist() == [5] * 42
    assert store.split_fingerprints == {"train": manifest.fingerprint()}


def test_demo_cache_neighbor_table_equals_brute_force_top_k_without_self(store):
    for modality in MODALITIES:
        ids, sims = store.neighbors(modality)
        emb = store.load(modality)
        n, k = ids.shape
        assert (n, k) == (store.counts[modality], 8)
        scores = emb @ emb.T
        np.fill_diagonal(scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        expected = np.take_along_axis(scores, order, axis=1)
        np.testing.assert_allclose(sims, expected, atol=1e-5)
        # ids agree wherever the similarities are not tied (a tie may list either row first)
        got_scores = np.take_along_axis(scores, ids, axis=1)
        np.testing.assert_allclose(got_scores, expected, atol=1e-5)
        differ = ids != order
        assert np.all(np.abs(got_scores[differ] - expected[differ]) < 1e-5)
        assert differ.sum() <= 2
        assert not (ids == np.arange(n)[:, None]).any()
        assert all(len(set(row)) == k for row in ids.tolist())
        assert np.all(np.diff(sims, axis=1) <= 0)


def test_rows_and_iter_chunks_read_the_values_of_load(store):
    for modality in MODALITIES:
        full = store.load(modality)
        index = np.array([0, 17, 5, store.counts[modality] - 1, 17])
        np.testing.assert_array_equal(store.rows(modality, index), full[index])
        starts, parts = zip(*store.iter_chunks(modality))
        assert list(starts) == list(range(0, store.counts[modality], 16))
        assert len(parts) == store.n_chunks(modality) == -(-store.counts[modality] // 16)
        np.testing.assert_array_equal(np.concatenate(parts), full)
        assert store.rows(modality, np.array([], dtype=np.int64)).shape == (0, store.dims[modality])


def test_recorded_checksums_are_the_sha256_of_each_stored_chunk(store):
    checksums = store.attrs["checksums"]
    for modality in MODALITIES:
        arr = store.array(modality)
        expected = [chunk_checksum(arr[start:stop]) for start, stop in
                    (store.chunk_range(modality, c) for c in range(store.n_chunks(modality)))]
        assert checksums[modality] == expected
        assert len(set(expected)) == len(expected)


# ---------------------------------------------------------------------------------------------- the Store API


def test_store_is_visibly_incomplete_until_every_chunk_is_written_and_finalized(tmp_path):
    store = Store.create_or_resume(tmp_path / "s", small_layout())
    assert (store.n_chunks("images"), store.n_chunks("texts")) == (3, 4)
    store.write_chunk("images", 0, unit_rows(2, 4, 0))

    reopened = Store.open(tmp_path / "s")
    assert reopened.complete is False
    assert sorted(reopened.progress().done["images"]) == [0]
    with pytest.raises(StoreError, match="incomplete") as err:
        Store.open(tmp_path / "s", require_complete=True)
    assert str(tmp_path / "s") in str(err.value) and "\n" not in str(err.value)
    report = verify_store(reopened)
    assert not report.ok and report.chunks_checked == {"images": 1, "texts": 0}
    assert any("incomplete" in p for p in report.problems)
    with pytest.raises(StoreError, match=r"images chunks \[1, 2\] are not written"):
        store.finalize({})

    written = write_all_chunks(store, seed=3)
    store.finalize({"note": 1})
    done = Store.open(tmp_path / "s", require_complete=True)
    assert done.complete and done.attrs["build"] == {"note": 1}
    np.testing.assert_allclose(done.load("images"), written["images"], atol=1e-3)
    np.testing.assert_allclose(done.load("texts"), written["texts"], atol=1e-3)
    assert verify_store(done).ok


def test_resuming_a_store_with_another_manifest_teacher_or_chunking_names_the_field(tmp_path):
    Store.create_or_resume(tmp_path / "s", small_layout())
    resumed = Store.create_or_resume(tmp_path / "s", small_layout())
    assert resumed.counts == {"images": 5, "texts": 7}
    cases = {
        "fingerprint": small_layout(fingerprint="d" * 64),
        "teachers.image": small_layout(teachers={"image": {"spec": "img-b", "dim": 4},
                                                 "text": {"spec": "txt-a", "dim": 3}}),
        "teachers.text": small_layout(teachers={"image": {"spec": "img-a", "dim": 4},
                                                "text": {"spec": "txt-a", "dim": 5}}),
        "chunk_rows": small_layout(chunk_rows=3),
    }
    for field, layout in cases.items():
        with pytest.raises(StoreMismatch) as err:
            Store.create_or_resume(tmp_path / "s", layout)
        assert err.value.field == field
        named = "--chunk-rows" if field == "chunk_rows" else field
        assert named in str(err.value) and "--overwrite" in str(err.value)
    replaced = Store.create_or_resume(tmp_path / "s", small_layout(fingerprint="d" * 64), overwrite=True)
    assert replaced.fingerprint == "d" * 64 and replaced.progress().done == {"images": {}, "texts": {}}


def test_overwrite_never_deletes_a_folder_that_is_not_a_store(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="is not a cusa store"):
            Store.create_or_resume(folder, small_layout(), overwrite=overwrite)
    assert (folder / "holiday.jpg").read_bytes() == b"precious"


def test_store_killed_while_creating_its_layout_is_created_again(tmp_path):
    path = tmp_path / "s"
    (path / "_progress").mkdir(parents=True)  # the first thing creation makes
    (path / "images").mkdir()
    store = Store.create_or_resume(path, small_layout())
    assert store.counts == {"images": 5, "texts": 7} and not store.complete


def test_open_refuses_a_folder_without_a_store_and_another_format_version(tmp_path):
    with pytest.raises(StoreError, match="not a cusa store"):
        Store.open(tmp_path)
    Store.create_or_resume(tmp_path / "s", small_layout())
    meta = tmp_path / "s" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["format_version"] = FORMAT_VERSION + 1
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreMismatch, match=f"format version {FORMAT_VERSION + 1}") as err:
        Store.open(tmp_path / "s")
    assert err.value.field == "format_version"


def test_rows_for_maps_the_whole_manifest_and_each_split_to_store_rows(tmp_path):
    store = Store.create_or_resume(tmp_path / "s", small_layout())
    images, texts = store.rows_for("a" * 64)
    assert images.tolist() == [0, 1, 2, 3, 4] and texts.tolist() == list(range(7))
    images, texts = store.rows_for("b" * 64)  # train
    assert images.tolist() == [0, 1, 3] and texts.tolist() == [0, 1, 2, 4]
    images, texts = store.rows_for("c" * 64)  # val
    assert images.tolist() == [2, 4] and texts.tolist() == [3, 5, 6]
    with pytest.raises(StoreMismatch, match="train, val") as err:
        store.rows_for("e" * 64, what="training set")
    assert err.value.field == "fingerprint" and "training set" in str(err.value)


def test_size_bytes_counts_the_store_files_on_disk_but_not_its_manifest_index_copy(store):
    files = [p for p in Path(store.path).rglob("*") if p.is_file()]
    assert any(p.relative_to(store.path).parts[0] == "manifest" for p in files)
    total = sum(p.stat().st_size for p in files if p.relative_to(store.path).parts[0] != "manifest")
    assert store.size_bytes() == total > 42 * 1280  # compressed float16 rows, still more than one byte per value
