"""Retrieval metrics from a precomputed image × caption similarity matrix: the same rankings and conventions as the
embedding path (which hands the rankers blocks of the cosine matrix), chunking, COCO 1K folds and bad matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.evaluate import (coco_1k_5fold, evaluate_similarity, retrieval_metrics, similarity_coco_1k_5fold,
                            similarity_retrieval_metrics)


def cosine(images: np.ndarray, captions: np.ndarray) -> np.ndarray:
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    captions = captions / np.linalg.norm(captions, axis=1, keepdims=True)
    return (images @ captions.T).astype(np.float32)


def hand_ranked(sims: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """By the textbook loop: an image's rank is its best caption's; only strictly higher scores count."""
    i2t = [min(int((sims[i] > sims[i, j]).sum()) for j in np.flatnonzero(rows == i)) for i in range(sims.shape[0])]
    t2i = [int((sims[:, j] > sims[rows[j], j]).sum()) for j in range(sims.shape[1])]
    out = {f"{n}_r{k}": 100.0 * float(np.mean(np.array(r) < k)) for n, r in (("i2t", i2t), ("t2i", t2i))
           for k in (1, 5, 10)}
    out["rsum"] = sum(out.values())
    return out


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_ranking_a_score_matrix_matches_a_hand_ranking_for_any_chunk_size(chunk_size):
    rng = np.random.default_rng(0)
    rows = rng.permutation(np.repeat(np.arange(25), 3))
    sims = rng.uniform(size=(25, 75)).astype(np.float32)
    sims[rows, np.arange(75)] += 0.4  # informative: recalls strictly between 0 and 100
    got = similarity_retrieval_metrics(sims, rows, chunk_size=chunk_size)
    assert got == pytest.approx(hand_ranked(sims, rows))
    assert 0 < got["i2t_r1"] < 100 and 0 < got["t2i_r1"] < 100


def test_the_cosine_matrix_of_embeddings_ranks_exactly_like_the_embeddings():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(30, 8)).astype(np.float32)
    rows = rng.permutation(np.repeat(np.arange(30), 5))
    captions = (images[rows] + rng.normal(scale=1.5, size=(150, 8))).astype(np.float32)
    assert similarity_retrieval_metrics(cosine(images, captions), rows) == retrieval_metrics(images, captions, rows)


def test_ties_in_a_score_matrix_never_push_the_ground_truth_down():
    # image 1's caption ties with caption 2, caption 1's image ties with image 0: both still rank first; caption 2's
    # image is beaten by image 1 (0.9 > 0.8)
    sims = np.array([[1.0, 0.9, 0.2], [0.5, 0.9, 0.9], [0.1, 0.3, 0.8]], dtype=np.float32)
    got = similarity_retrieval_metrics(sims, np.array([0, 1, 2]))
    assert got["i2t_r1"] == pytest.approx(100) and got["t2i_r1"] == pytest.approx(200 / 3)
    assert got == pytest.approx(hand_ranked(sims, np.array([0, 1, 2])))


def test_coco_1k_folds_of_a_score_matrix_equal_those_of_the_embeddings():
    rng = np.random.default_rng(2)
    images = rng.normal(size=(5000, 4)).astype(np.float32)
    rows = np.repeat(np.arange(5000), 2)
    captions = (images[rows] + rng.normal(scale=0.8, size=(10000, 4))).astype(np.float32)
    sims = torch.from_numpy(cosine(images, captions))
    assert similarity_coco_1k_5fold(sims, rows) == pytest.approx(coco_1k_5fold(images, captions, rows))
    both = evaluate_similarity(sims, rows)
    assert set(both) == {"all", "coco_1k"} and both["all"] == pytest.approx(retrieval_metrics(images, captions, rows))
    assert set(evaluate_similarity(sims[:10, :20], rows[:20])) == {"all"}


@pytest.mark.parametrize("sims, rows, match", [
    (np.zeros((3,)), np.array([0, 1, 2]), "expected a non-empty"),
    (np.full((2, 2), np.nan), np.array([0, 1]), "NaN or infinite"),
    (np.zeros((2, 3)), np.array([0, 1]), r"expected shape \[3\]"),
    (np.zeros((3, 2)), np.array([0, 1]), "have no caption"),
])
def test_bad_score_matrices_are_one_line_errors(sims, rows, match):
    with pytest.raises(ValueError, match=match):
        similarity_retrieval_metrics(sims, rows)
