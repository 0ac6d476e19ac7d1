"""ECCV Caption for region students: the metrics of a score matrix equal those of the embeddings it comes from, and
`evaluate_eccv` scores the manifest's test images (by COCO id) against the COCO captions (by annotation id)."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from train.eccv import coco_image_number, eccv_metrics, eccv_metrics_from_similarity, evaluate_eccv

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    eccv_caption = pytest.importorskip("eccv_caption")


def coco_test_ids():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = eccv_caption.Metrics()
    return metric, list(metric.coco_gts["i2t"]), [int(c) for c in metric.coco_ids]


def test_metrics_of_a_score_matrix_equal_those_of_its_embeddings():
    metric, image_ids, caption_ids = coco_test_ids()
    row_of = {int(i): r for r, i in enumerate(image_ids)}
    caption_image = np.array([row_of[metric.coco_gts["t2i"][c][0]] for c in caption_ids])
    rng = np.random.default_rng(0)
    img = rng.normal(size=(5000, 16)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img[caption_image] + 0.6 * rng.normal(size=(25000, 16)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    from_embeddings = eccv_metrics(image_ids, img, caption_ids, txt)
    from_scores = eccv_metrics_from_similarity(image_ids, caption_ids, torch.from_numpy(img) @ torch.from_numpy(txt).T)
    for key in ("map_at_r", "r_precision", "r1", "coco_5k_r1"):
        assert from_scores[key] == pytest.approx(from_embeddings[key]), key
    assert from_scores["queries"] == from_embeddings["queries"]
    assert 0 < from_scores["map_at_r"]["i2t"] < 100 and 0 < from_scores["coco_5k_r1"]["t2i"] < 100
    with pytest.raises(ValueError, match=r"a similarity matrix \[5000, 25000\] is needed"):
        eccv_metrics_from_similarity(image_ids, caption_ids, torch.zeros(5000, 3))


class ScoresByImageNumber:
    """Stands in for a region student: image row r of the regions is COCO image numbers[r]; a caption "photo N"
    scores 1 with image N and a value in [0, 0.5) with every other image."""

    def __init__(self, numbers: list[int]):
        from train.vocab import Vocabulary

        self.vocab = Vocabulary(["<pad>", "<unk>", "photo", *sorted({str(n) for n in numbers})])
        self.numbers = numbers
        self.calls = []

    def similarity(self, regions, captions, device, image_chunk, caption_chunk, progress, image_rows):
        self.calls.append(len(image_rows))
        caption_numbers = torch.tensor([int(self.vocab.words[int(t[1])]) for t in captions.tokens])
        image_numbers = torch.tensor([self.numbers[r] for r in image_rows])
        i = torch.arange(len(image_numbers))[:, None]
        c = torch.arange(len(caption_numbers))[None, :]
        others = ((i * 7 + c * 13) % 97).float() / 200
        return torch.where(image_numbers[:, None] == caption_numbers[None, :], torch.tensor(1.0), others)


def test_evaluate_eccv_scores_test_images_by_coco_id_against_captions_by_annotation_id(tmp_path):
    from pipeline.manifest import CaptionRecord, ImageRecord, Manifest

    metric, numbers, caption_ids = coco_test_ids()
    order = np.random.default_rng(2).permutation(len(numbers))  # manifest rows in another order than the package's
    images = [ImageRecord(f"val2014/COCO_val2014_{numbers[i]:012d}.jpg", f"val2014/COCO_val2014_{numbers[i]:012d}.jpg",
                          "test") for i in order]
    manifest = Manifest(images=images, captions=[CaptionRecord("unused", 0)], source="coco_karpathy_test.json",
                        image_root=str(tmp_path), format="caption-json")
    annotations = [{"id": c, "caption": f"photo {metric.coco_gts['t2i'][c][0]}"} for c in caption_ids]
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"annotations": annotations}))
    student = ScoresByImageNumber([coco_image_number(im.image_id, im.path) for im in images])
    embedder = SimpleNamespace(region=True, student=student, device="cpu",
                               config=SimpleNamespace(region=SimpleNamespace(max_words=64)))
    regions = SimpleNamespace(features=None, image_chunk=128, caption_chunk=128)
    result = evaluate_eccv(embedder, manifest, tmp_path / "captions_val2014.json", regions=regions)
    assert student.calls == [5000]
    # every caption scores highest with its own image: a right mapping ranks the ground truth first every time
    assert result["coco_5k_r1"] == {"i2t": 100.0, "t2i": 100.0}
    assert (result["images"], result["captions"]) == (5000, 25000)
