"""The neighbor table: exact against numpy, self excluded, approximate indexes within recall, disk round trip."""

from __future__ import annotations

import numpy as np
import pytest

from teacher_cache.neighbors import (
    NeighborTable,
    build_neighbor_table,
    default_nprobe,
    load_index,
    recall_at_k,
    recommended_factory,
    save_index,
    search,
)


def normalised(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rows: int, dim: int, centres: int, seed: int = 0) -> np.ndarray:
    """Rows around a few centres, so approximate indexes have structure to exploit (as real embeddings do)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    x = c[rng.integers(0, centres, rows)] + 0.7 * rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = emb.astype(np.float64) @ emb.astype(np.float64).T
    np.fill_diagonal(sims, -np.inf)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(sims, ids, axis=1).astype(np.float32)


def test_flat_table_equals_numpy_brute_force_top_k():
    emb = normalised(500, 24)
    table = build_neighbor_table(emb, k=10, progress=False)
    exact_ids, exact_sims = brute_force(emb, 10)

    assert isinstance(table, NeighborTable)
    assert table.ids.dtype == np.int64 and table.ids.shape == (500, 10)
    assert table.sims.dtype == np.float32 and table.sims.shape == (500, 10)
    assert table.factory == "Flat" and table.missing == 0
    np.testing.assert_allclose(table.sims, exact_sims, atol=1e-5)
    # Ids may differ only where two candidates tie in similarity.
    differ = table.ids != exact_ids
    assert np.all(np.abs(table.sims[differ] - exact_sims[differ]) < 1e-5)
    assert differ.mean() < 0.01


def test_sims_are_inner_products_of_the_listed_rows_and_descending():
    emb = normalised(300, 16, seed=1)
    table = build_neighbor_table(emb, k=8, progress=False, query_batch=64)
    recomputed = np.einsum("nd,nkd->nk", emb, emb[table.ids])
    np.testing.assert_allclose(table.sims, recomputed, atol=1e-5)
    assert np.all(np.diff(table.sims, axis=1) <= 0)


def test_self_is_excluded_even_when_rows_are_duplicated():
    base = normalised(50, 8, seed=2)
    # Rows 0..49 and 50..99 are identical, and row 7 appears three more times: for those rows the
    # query's own id ties with its copies and need not come back first.
    emb = np.concatenate([base, base, base[[7, 7, 7]]])
    table = build_neighbor_table(emb, k=4, progress=False)
    rows = np.arange(len(emb))[:, None]
    assert not np.any(table.ids == rows)
    for row in (7, 57, 100):
        copies = {7, 57, 100, 101, 102} - {row}
        assert set(table.ids[row]) == copies
        np.testing.assert_allclose(table.sims[row], 1.0, atol=1e-5)
    # An ordinary duplicated row finds its twin first.
    assert table.ids[3, 0] == 53 and table.ids[53, 0] == 3


def test_more_duplicates_than_k_still_returns_k_other_rows():
    emb = np.repeat(normalised(3, 8, seed=3), 6, axis=0)  # each row has 5 identical copies
    table = build_neighbor_table(emb, k=2, progress=False)
    assert not np.any(table.ids == np.arange(len(emb))[:, None])
    np.testing.assert_allclose(table.sims, 1.0, atol=1e-5)
    assert np.all(table.ids // 6 == np.arange(len(emb))[:, None] // 6)


def test_k_not_below_row_count_is_a_clear_error():
    emb = normalised(5, 8)
    with pytest.raises(ValueError, match=r"k=5.*N=5"):
        build_neighbor_table(emb, k=5, progress=False)
    assert build_neighbor_table(emb, k=4, progress=False).ids.shape == (5, 4)


def test_float16_input_is_upcast():
    emb = normalised(200, 16, seed=4)
    table16 = build_neighbor_table(emb.astype(np.float16), k=5, progress=False)
    assert table16.sims.dtype == np.float32
    exact_ids, exact_sims = brute_force(emb.astype(np.float16).astype(np.float32), 5)
    np.testing.assert_allclose(table16.sims, exact_sims, atol=1e-4)


def test_ivf_factory_recall_against_exact():
    emb = clustered(3000, 32, centres=40)
    exact = build_neighbor_table(emb, k=10, progress=False)
    approx = build_neighbor_table(emb, k=10, factory="IVF16,Flat", progress=False)
    assert approx.search_params == f"nprobe={default_nprobe(16, 3000, 10)}"
    assert recall_at_k(approx.ids, exact.ids, 10) >= 0.9
    assert np.all(np.diff(approx.sims, axis=1) <= 0)
    assert not np.any(approx.ids == np.arange(len(emb))[:, None])


def test_ivf_nprobe_and_params_strings_are_applied():
    emb = clustered(2000, 16, centres=20, seed=5)
    one = build_neighbor_table(emb, k=5, factory="IVF16,Flat", nprobe=1, progress=False)
    assert one.search_params == "nprobe=1"
    all_lists = build_neighbor_table(emb, k=5, factory="IVF16,Flat", params="nprobe=16", progress=False)
    assert all_lists.search_params == "nprobe=16"
    exact = build_neighbor_table(emb, k=5, progress=False)
    # Probing every list is exhaustive; probing one is not.
    assert recall_at_k(all_lists.ids, exact.ids, 5) == pytest.approx(1.0)
    assert recall_at_k(one.ids, exact.ids, 5) < 1.0


def test_more_inverted_lists_than_rows_is_a_clear_error():
    with pytest.raises(ValueError, match=r"64 inverted lists.*N=40"):
        build_neighbor_table(normalised(40, 8), k=3, factory="IVF64,Flat", progress=False)


def test_nprobe_on_an_index_without_lists_is_rejected():
    with pytest.raises(ValueError, match="nprobe"):
        build_neighbor_table(normalised(50, 8), k=3, nprobe=4, progress=False)


def test_hnsw_factory_builds_a_table_with_high_recall():
    emb = clustered(1500, 16, centres=30, seed=6)
    exact = build_neighbor_table(emb, k=8, progress=False)
    table = build_neighbor_table(emb, k=8, factory="HNSW32", progress=False)
    assert "efSearch=128" in table.search_params
    assert recall_at_k(table.ids, exact.ids, 8) >= 0.9
    assert not np.any(table.ids == np.arange(len(emb))[:, None])
    assert np.all(np.diff(table.sims, axis=1) <= 0)


def test_use_gpu_without_a_gpu_is_a_clear_error(monkeypatch):
    import faiss

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    with pytest.raises(ValueError, match="GPU"):
        build_neighbor_table(normalised(20, 8), k=3, use_gpu=True, progress=False)


def test_saved_index_searches_like_the_original(tmp_path):
    emb = clustered(2000, 16, centres=20, seed=7)
    table = build_neighbor_table(emb, k=5, factory="IVF16,Flat", progress=False)
    path = tmp_path / "faiss" / "texts.index"
    save_index(table.index, path)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["texts.index"]  # no temporary file left behind

    loaded = load_index(path)
    assert loaded.ntotal == len(emb)
    queries = emb[:100]
    ids_a, sims_a = search(table.index, queries, 6)
    ids_b, sims_b = search(loaded, queries, 6)
    # nprobe is a property of the stored index, so the reloaded one probes the same lists.
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(sims_a, sims_b)
    assert ids_a.dtype == np.int64 and sims_a.dtype == np.float32
    # Searching the table's own rows gives each row first, then its table neighbors.
    np.testing.assert_array_equal(ids_a[:, 0], np.arange(100))
    np.testing.assert_array_equal(ids_a[:, 1:], table.ids[:100])


def test_save_index_replaces_an_existing_file(tmp_path):
    path = tmp_path / "images.index"
    save_index(build_neighbor_table(normalised(30, 8), k=3, progress=False).index, path)
    save_index(build_neighbor_table(normalised(40, 8), k=3, progress=False).index, path)
    assert load_index(path).ntotal == 40


def test_load_index_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.index"):
        load_index(tmp_path / "nothing.index")


def test_search_rejects_queries_of_the_wrong_dimension():
    index = build_neighbor_table(normalised(30, 8), k=3, progress=False).index
    with pytest.raises(ValueError, match="dimension 4"):
        search(index, normalised(2, 4), 3)


def test_recall_at_k_counts_shared_ids_per_row():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[3, 2, 9], [7, 8, 9]])
    assert recall_at_k(approx, exact, 3) == pytest.approx((2 / 3 + 0) / 2)
    assert recall_at_k(approx, exact, 1) == pytest.approx(0.0)
    assert recall_at_k(exact, exact, 3) == 1.0


def test_default_nprobe_scans_enough_candidates_for_k():
    assert default_nprobe(4096, 600_000, 32) == 16  # ~146 rows a list: 16 lists hold >= 64*33 rows
    assert default_nprobe(2048, 100_000, 32) == 64  # ~49 rows a list need more lists
    assert default_nprobe(16, 3000, 10) == 8  # never below 8
    assert default_nprobe(16, 100, 32) == 16  # never above nlist


def test_recommended_factory_is_exact_for_small_tables_and_ivf_for_large():
    assert recommended_factory(10_000) == "Flat"
    assert recommended_factory(600_000) == "IVF4096,Flat"
    assert recommended_factory(600_000, gpu=True) == "Flat"
