"""Retrieval metrics against rankings worked out by hand, and the COCO 1K protocol against manual folds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.evaluate import (
    METRIC_KEYS,
    coco_1k_5fold,
    evaluate_embeddings,
    format_table,
    gain,
    retrieval_metrics,
)


def _three_images_two_captions() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images are one-hot, so sim(image i, caption j) is component i of caption j (captions have unit norm).

    Similarity matrix (rows images, columns captions c0..c5; c0,c1 → img0, c2,c3 → img1, c4,c5 → img2):
              c0    c1    c2    c3    c4    c5
      img0   .80   .36   .36   .60   .48   .00
      img1   .60   .48   .80   .00   .64   .96
      img2   .00   .80   .48   .80   .60   .28
    image→text (best rank among own captions = number of captions strictly above the best own one):
      img0: own .80 (c0) is the top                      → rank 0
      img1: own .80 (c2); above it c5 .96                → rank 1
      img2: own .60 (c4); above it c1 .80, c3 .80        → rank 2
      → R@1 = 1/3, R@5 = R@10 = 3/3
    text→image (rank of the own image in the column):
      c0: .80 vs .60, .00 → 0    c1: .36 vs .48, .80 → 2    c2: .80 vs .36, .48 → 0
      c3: .00 vs .60, .80 → 2    c4: .60 vs .48, .64 → 1    c5: .28 vs .00, .96 → 1
      → R@1 = 2/6, R@5 = R@10 = 6/6
    """
    images = np.eye(3, dtype=np.float32)
    captions = np.array([
        [0.80, 0.60, 0.00],
        [0.36, 0.48, 0.80],
        [0.36, 0.80, 0.48],
        [0.60, 0.00, 0.80],
        [0.48, 0.64, 0.60],
        [0.00, 0.96, 0.28],
    ], dtype=np.float32)
    rows = np.array([0, 0, 1, 1, 2, 2])
    return images, captions, rows


def test_hand_computed_three_images_two_captions_each():
    images, captions, rows = _three_images_two_captions()
    m = retrieval_metrics(images, captions, rows)
    assert list(m) == list(METRIC_KEYS)
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == m["i2t_r10"] == 100.0
    assert m["t2i_r1"] == pytest.approx(100 * 2 / 6)
    assert m["t2i_r5"] == m["t2i_r10"] == 100.0
    assert m["rsum"] == pytest.approx(2 * 100 / 3 + 400)
    assert all(isinstance(v, float) for v in m.values())


def test_torch_numpy_and_float16_inputs_give_the_same_metrics():
    images, captions, rows = _three_images_two_captions()
    ref = retrieval_metrics(images, captions, rows)
    assert retrieval_metrics(torch.from_numpy(images), torch.from_numpy(captions), torch.from_numpy(rows)) == ref
    assert retrieval_metrics(images.astype(np.float16), captions.astype(np.float16), rows) == ref


def test_unnormalised_inputs_are_ranked_by_cosine():
    images, captions, rows = _three_images_two_captions()
    scale = np.array([[1.0], [7.0], [0.1], [3.0], [0.5], [2.0]], dtype=np.float32)
    assert retrieval_metrics(images * 5, captions * scale, rows) == retrieval_metrics(images, captions, rows)


def _rank_controlled(ranks: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N one-hot images, caption j belongs to image j and is 0.5·e_j + Σ e_k over ranks[j] other images, so
    exactly ranks[j] images (similarity 1/n) are above its own image (0.5/n): its text→image rank is ranks[j]."""
    n = len(ranks)
    images = np.eye(n, dtype=np.float32)
    captions = np.zeros((n, n), dtype=np.float32)
    for j, r in enumerate(ranks):
        captions[j, j] = 0.5
        others = [k for k in range(n) if k != j][:r]
        captions[j, others] = 1.0
    return images, captions, np.arange(n)


def test_recall_at_5_and_10_thresholds_use_rank_strictly_below_k():
    ranks = [0, 0, 1, 2, 4, 4, 5, 6, 9, 9, 10, 11]
    images, captions, rows = _rank_controlled(ranks)
    m = retrieval_metrics(images, captions, rows)
    assert m["t2i_r1"] == pytest.approx(100 * 2 / 12)   # ranks 0, 0
    assert m["t2i_r5"] == pytest.approx(100 * 6 / 12)   # ranks 0, 0, 1, 2, 4, 4 (rank 5 is the 6th place)
    assert m["t2i_r10"] == pytest.approx(100 * 10 / 12)  # all but ranks 10, 11


def test_with_one_caption_per_image_directions_are_symmetric():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 8)).astype(np.float32)
    b = (a + rng.normal(scale=1.0, size=a.shape)).astype(np.float32)
    rows = np.arange(40)
    ab, ba = retrieval_metrics(a, b, rows), retrieval_metrics(b, a, rows)
    for k in (1, 5, 10):
        assert ab[f"i2t_r{k}"] == ba[f"t2i_r{k}"]
        assert ab[f"t2i_r{k}"] == ba[f"i2t_r{k}"]


def _reference_metrics(images: np.ndarray, captions: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """Straightforward argsort definition, valid when there are no ties."""
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    captions = captions / np.linalg.norm(captions, axis=1, keepdims=True)
    sims = images.astype(np.float64) @ captions.T.astype(np.float64)
    i2t = []
    for i in range(len(images)):
        order = np.argsort(-sims[i])
        i2t.append(min(int(np.where(order == j)[0][0]) for j in np.where(rows == i)[0]))
    t2i = []
    for j in range(len(captions)):
        order = np.argsort(-sims[:, j])
        t2i.append(int(np.where(order == rows[j])[0][0]))
    out = {}
    for name, r in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float((r < k).mean())
    out["rsum"] = sum(out.values())
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_argsort_reference_on_random_data_for_any_chunk_size(chunk_size):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(30, 6)).astype(np.float32)
    rows = rng.permutation(np.repeat(np.arange(30), 3))          # 3 captions per image, shuffled order
    captions = (images[rows] + rng.normal(scale=1.2, size=(90, 6))).astype(np.float32)
    got = retrieval_metrics(images, captions, rows, chunk_size=chunk_size)
    want = _reference_metrics(images, captions, rows)
    assert got == pytest.approx(want)
    assert 0 < got["i2t_r1"] < 100 and 0 < got["t2i_r1"] < 100   # the case is not trivial


def test_image_to_text_uses_the_best_ranked_caption_not_the_first():
    # img0's first caption (c0) is last in its ranking; its third caption (c2) is on top → still an R@1 hit.
    images = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    captions = np.array([
        [-1.0, 0.2],   # c0 → img0: sim to img0 -0.98, the worst caption for img0
        [0.0, 1.0],    # c1 → img0: sim 0
        [1.0, 0.1],    # c2 → img0: sim 0.995, the best caption for img0
        [0.6, 0.8],    # c3 → img1: sim to img0 0.6, second for img0
    ], dtype=np.float32)
    rows = np.array([0, 0, 0, 1])
    m = retrieval_metrics(images, captions, rows)
    # img0 → best own caption c2 at rank 0; img1: sims c0 .196, c1 1.0, c2 .0995, c3 .8 → c1 (not own) above
    # c3 → rank 1. So i2t R@1 = 1/2.
    assert m["i2t_r1"] == 50.0
    assert m["i2t_r5"] == 100.0


def test_ties_do_not_push_the_ground_truth_down():
    # c0 (→ img0) and c1 (→ img1) are identical vectors equal to img0; img1 equals img0 too.
    # Every similarity is 1.0: each query ties with every candidate, and no candidate is strictly better.
    images = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    captions = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    m = retrieval_metrics(images, captions, np.array([0, 1]))
    assert m["i2t_r1"] == 100.0 and m["t2i_r1"] == 100.0


def test_a_tie_with_a_negative_counts_only_strictly_greater_candidates():
    from train.evaluate import image_to_text_ranks, text_to_image_ranks
    images = torch.eye(3)
    captions = torch.tensor([
        [0.6, 0.8, 0.0],   # c0 → img0
        [0.6, 0.8, 0.0],   # c1 → img1, identical to c0
        [0.8, 0.0, 0.6],   # c2 → img2
    ])
    rows = torch.tensor([0, 1, 2])
    # img0: own c0 .6 ties c1 .6, c2 .8 strictly above → 1 (not 2);  img1: own c1 .8 ties c0 .8 → 0;
    # img2: own c2 .6, others 0 → 0
    assert image_to_text_ranks(images, captions, rows).tolist() == [1, 0, 0]
    # c0: own img0 .6, img1 .8 above → 1;  c1: own img1 .8 top → 0;  c2: own img2 .6, img0 .8 above → 1
    assert text_to_image_ranks(images, captions, rows).tolist() == [1, 0, 1]
    m = retrieval_metrics(images, captions, rows)
    assert m["i2t_r1"] == pytest.approx(200 / 3) and m["t2i_r1"] == pytest.approx(100 / 3)


def test_images_without_captions_are_an_error():
    images = np.eye(3, dtype=np.float32)
    captions = np.eye(3, dtype=np.float32)[:2]
    with pytest.raises(ValueError, match="no caption.*image row 2"):
        retrieval_metrics(images, captions, np.array([0, 1]))


@pytest.mark.parametrize("rows, match", [
    (np.array([0, 3]), "out of range"),
    (np.array([0, -1]), "out of range"),
    (np.array([0]), "shape"),
    (np.array([0.0, 1.0]), "integer"),
])
def test_bad_caption_rows_are_one_line_errors(rows, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), rows)


def test_dimension_mismatch_and_nan_are_errors():
    with pytest.raises(ValueError, match="dimension"):
        retrieval_metrics(np.eye(2, dtype=np.float32), np.ones((2, 3), np.float32), np.array([0, 1]))
    bad = np.eye(2, dtype=np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(bad, np.eye(2, dtype=np.float32), np.array([0, 1]))


def _synthetic_coco(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Two captions per image (five in COCO; two keep the test fast), in shuffled order so that each fold's
    # captions are picked by image row, not by position.
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(5000, 16)).astype(np.float32)
    rows = rng.permutation(np.repeat(np.arange(5000), 2))
    captions = (images[rows] + rng.normal(scale=1.5, size=(10000, 16))).astype(np.float32)
    return images, captions, rows


def test_coco_1k_5fold_equals_manual_per_fold_average():
    images, captions, rows = _synthetic_coco()
    got = coco_1k_5fold(images, captions, rows)
    folds = []
    for f in range(5):
        keep = (rows >= 1000 * f) & (rows < 1000 * (f + 1))
        folds.append(retrieval_metrics(images[1000 * f:1000 * (f + 1)], captions[keep], rows[keep] - 1000 * f))
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(np.mean([fold[key] for fold in folds]))

    results = evaluate_embeddings(torch.from_numpy(images), torch.from_numpy(captions), torch.from_numpy(rows))
    assert set(results) == {"all", "coco_1k"}
    assert results["coco_1k"] == pytest.approx(got)
    # Searching 1000 candidates is easier than 5000: the 1K protocol scores higher.
    assert results["coco_1k"]["rsum"] > results["all"]["rsum"]


def test_coco_1k_needs_exactly_5000_images_and_evaluate_skips_it_otherwise():
    images = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="exactly 5000 images, got 4"):
        coco_1k_5fold(images, images, np.arange(4))
    assert set(evaluate_embeddings(images, images, np.arange(4))) == {"all"}


def test_gain_and_table_show_every_run_with_one_decimal():
    images, captions, rows = _three_images_two_captions()
    base = retrieval_metrics(images, captions, rows)
    better = dict(base, i2t_r1=66.66666, rsum=base["rsum"] + 33.33333)
    g = gain(base, better)
    assert g["i2t_r1"] == pytest.approx(66.66666 - 100 / 3)
    assert g["t2i_r5"] == 0.0
    table = format_table({"contrastive": base, "cusa": better, "gain": g}, title="COCO 5K")
    lines = table.splitlines()
    assert lines[0] == "COCO 5K"
    assert "R@1" in table and "R@10" in table and "rsum" in table
    runs = ("contrastive", "cusa", "gain")
    row = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in runs}
    assert row["contrastive"].split() == ["contrastive", "|", "33.3", "100.0", "100.0", "|", "33.3", "100.0",
                                          "100.0", "|", "466.7"]
    assert "66.7" in row["cusa"] and "500.0" in row["cusa"]
    assert "+33.3" in row["gain"] and "+0.0" in row["gain"]
    assert len({len(line) for line in lines[2:]}) == 1       # fixed width: header, rule and rows align


def test_table_names_a_run_with_missing_metrics():
    with pytest.raises(ValueError, match="'cusa'.*'rsum'"):
        format_table({"cusa": {k: 0.0 for k in METRIC_KEYS if k != "rsum"}})
