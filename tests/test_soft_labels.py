"""SoftLabelSource on the real demo cache: dense blocks are the cosine of the stored float16 rows (in memory,
streamed, or prefetched in a thread), sparse blocks keep exactly the FAISS neighbor table's pairs, and unusable
stores or K values are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from teacher_cache.errors import StoreError
from teacher_cache.soft_labels import SoftLabelSource
from teacher_cache.store import Store

# rows with repeats (an image shown by several captions of one batch) and out of order
IMAGE_ROWS = np.array([5, 3, 3, 40, 0, 5, 17, 41, 22, 3])
CAPTION_ROWS = np.array([1, 2, 2, 100, 7, 209, 9, 150, 1, 60])


@pytest.fixture(scope="module")
def store(demo_cache) -> Store:
    return Store.open(demo_cache, require_complete=True)


def numpy_cosine(store: Store, modality: str, rows: np.ndarray) -> np.ndarray:
    """The reference: gather the stored float16 rows, cosine in float32 (float64 accumulate)."""
    emb = np.asarray(zarr.open_group(str(store.path), mode="r")[f"{modality}/emb"][:], dtype=np.float16)
    x = emb[rows].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def random_batches(store: Store, n: int, size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, store.counts["images"], size), rng.integers(0, store.counts["texts"], size))
            for _ in range(n)]


# ------------------------------------------------------------------------------------------------ dense
def test_dense_block_is_the_cosine_of_the_stored_float16_rows_including_repeats(store):
    t_ii, t_tt = SoftLabelSource(store).block(IMAGE_ROWS, CAPTION_ROWS)
    assert t_ii.dtype == torch.float32 and t_ii.shape == (10, 10) and t_tt.shape == (10, 10)
    assert not t_ii.requires_grad
    np.testing.assert_allclose(t_ii.numpy(), numpy_cosine(store, "images", IMAGE_ROWS), atol=2e-6)
    np.testing.assert_allclose(t_tt.numpy(), numpy_cosine(store, "texts", CAPTION_ROWS), atol=2e-6)
    # a repeated row is the same item: similarity 1 with itself, identical rows and columns
    for block, rows in ((t_ii, IMAGE_ROWS), (t_tt, CAPTION_ROWS)):
        same = rows[:, None] == rows[None, :]
        np.testing.assert_allclose(block.numpy()[same], 1.0, atol=1e-6)
        np.testing.assert_allclose(block.numpy(), block.numpy().T, atol=1e-6)
    np.testing.assert_allclose(t_ii[1].numpy(), t_ii[2].numpy(), atol=1e-6)
    np.testing.assert_allclose(t_tt[0].numpy(), t_tt[8].numpy(), atol=1e-6)
    # the demo scenes differ: not everything is 1 off the repeats
    assert float(t_ii[0, 3]) < 0.99 and float(t_tt[0, 3]) < 0.99


def test_dense_block_accepts_torch_row_indices(store):
    source = SoftLabelSource(store)
    a = source.block(IMAGE_ROWS, CAPTION_ROWS)
    b = source.block(torch.as_tensor(IMAGE_ROWS), torch.as_tensor(CAPTION_ROWS))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_streamed_blocks_equal_in_memory_blocks(store):
    memory, streamed = SoftLabelSource(store), SoftLabelSource(store, stream=True)
    assert streamed.memory_bytes() == 0
    for image_rows, caption_rows in [(IMAGE_ROWS, CAPTION_ROWS), *random_batches(store, 3, 16)]:
        for a, b in zip(memory.block(image_rows, caption_rows), streamed.block(image_rows, caption_rows)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_prefetching_blocks_iterator_yields_the_same_sequence_as_block(store, stream):
    source = SoftLabelSource(store, stream=stream, prefetch=2)
    batches = random_batches(store, 7, 12, seed=1)
    prefetched = list(source.blocks(iter(batches)))
    assert len(prefetched) == len(batches)
    for (image_rows, caption_rows), (t_ii, t_tt) in zip(batches, prefetched):
        ref_ii, ref_tt = source.block(image_rows, caption_rows)
        assert torch.equal(t_ii, ref_ii) and torch.equal(t_tt, ref_tt)


def test_prefetching_blocks_iterator_raises_a_failed_batch_in_the_consumer(store):
    source = SoftLabelSource(store)
    batches = [(IMAGE_ROWS, CAPTION_ROWS), (np.array([0, 10_000]), np.array([0, 1]))]  # image row out of range
    got = []
    with pytest.raises(IndexError):
        for block in source.blocks(batches):
            got.append(block)
    assert len(got) == 1


def test_dense_source_keeps_exactly_the_float16_rows_resident(store):
    counts, dims = store.counts, store.dims
    expected = 2 * (counts["images"] * dims["images"] + counts["texts"] * dims["texts"])
    assert SoftLabelSource(store).memory_bytes() == expected


# ------------------------------------------------------------------------------------------------ sparse
def anchor_batch(ids: np.ndarray, anchors: list[int], seed: int = 0) -> np.ndarray:
    """Rows that include some of each anchor's table neighbors (so the sparse block has hits), random rows, and
    a repeat."""
    rng = np.random.default_rng(seed)
    rows = []
    for a in anchors:
        rows += [a, *ids[a, [0, 2, 5]].tolist()]
    rows += rng.integers(0, len(ids), 4).tolist() + [anchors[0]]
    return np.array(rows)


@pytest.mark.parametrize("k", [None, 3])
def test_sparse_entry_is_the_table_similarity_iff_the_column_is_a_top_k_neighbor(store, k):
    tables = {m: store.neighbors(m) for m in ("images", "texts")}
    rows = {m: anchor_batch(tables[m][0], [0, 7, 13]) for m in tables}
    t_ii, t_tt = SoftLabelSource(store, mode="sparse", k=k).block(rows["images"], rows["texts"])
    checked_hits = 0
    for modality, block in (("images", t_ii.numpy()), ("texts", t_tt.numpy())):
        ids, sims = tables[modality]
        kk = ids.shape[1] if k is None else k
        assert block.dtype == np.float32
        for i, r in enumerate(rows[modality]):
            for j, s in enumerate(rows[modality]):
                listed = np.flatnonzero(ids[r, :kk] == s)
                if r == s:
                    assert block[i, j] == 1.0
                elif listed.size:
                    assert block[i, j] == sims[r, listed[0]], (modality, r, s)
                    checked_hits += 1
                else:
                    assert block[i, j] == -np.inf, (modality, r, s)
        # every row keeps at least itself, so the teacher softmax over a row is defined
        assert np.isfinite(block).any(axis=1).all()
    assert checked_hits >= (18 if k is None else 12)  # the anchors' listed neighbors were really looked up


def test_sparse_source_keeps_only_the_neighbor_tables_resident(store):
    k_table = store.neighbors("images")[0].shape[1]
    rows = store.counts["images"] + store.counts["texts"]
    assert SoftLabelSource(store, mode="sparse").memory_bytes() == rows * k_table * (8 + 4)
    assert SoftLabelSource(store, mode="sparse", k=2).memory_bytes() == rows * 2 * (8 + 4)


def test_sparse_k_larger_than_the_table_is_refused_with_the_fix(store):
    k_table = store.neighbors("images")[0].shape[1]
    with pytest.raises(StoreError, match=rf"K={k_table + 1}, but the images neighbor table keeps {k_table}; "
                                         rf"rebuild with `cusa-cache build --neighbors {k_table + 1}`"):
        SoftLabelSource(store, mode="sparse", k=k_table + 1)


@pytest.mark.parametrize("k", [0, -1])
def test_sparse_k_below_one_is_refused(store, k):
    with pytest.raises(ValueError, match=rf"K ≥ 1 .* got K={k}"):
        SoftLabelSource(store, mode="sparse", k=k)


def test_unknown_mode_is_refused(store):
    with pytest.raises(ValueError, match="soft-label mode must be one of"):
        SoftLabelSource(store, mode="topk")


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("which", ["image", "text"])
def test_incomplete_store_is_refused(store, cache_copy, which):
    zarr.open_group(str(cache_copy), mode="r+").attrs["complete"] = False
    damaged = Store.open(cache_copy)
    args = (damaged, store) if which == "image" else (store, damaged)
    with pytest.raises(StoreError, match=rf"{cache_copy}: the store is incomplete; re-run its `cusa-cache build`"):
        SoftLabelSource(*args)
