"""ECCV Caption: COCO ids from manifests and the COCO captions file, and the package's metrics fed through our ranked
lists, checked against our own COCO 5K recall and a by-hand mAP@R over the package's extended positives."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from train.data import load_split
from train.eccv import coco_image_number, eccv_metrics, evaluate_eccv, read_coco_captions

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    eccv_caption = pytest.importorskip("eccv_caption")


def test_coco_image_number_comes_from_a_numeric_id_or_the_file_name():
    assert coco_image_number("391895", "val2014/anything.jpg") == 391895
    assert coco_image_number("val2014/COCO_val2014_000000391895.jpg",
                             "val2014/COCO_val2014_000000391895.jpg") == 391895
    assert coco_image_number("demo_x", "images/demo_x.png") is None


def test_coco_captions_are_read_by_annotation_id_and_missing_ids_are_named(tmp_path):
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": [], "annotations": [
        {"id": 38, "image_id": 179765, "caption": " A black Honda motorcycle. "},
        {"id": 182, "image_id": 179765, "caption": "A Honda motorcycle parked."}]}))
    assert read_coco_captions(path, [182, 38]) == ["A Honda motorcycle parked.", "A black Honda motorcycle."]
    with pytest.raises(ValueError) as err:
        read_coco_captions(path, [38, 6638, 6803])
    assert str(err.value) == (f"{path}: 2 of the 3 COCO 5K test captions are missing (first: annotation id 6638); "
                              "pass captions_val2014.json")
    path.write_text("[]")
    with pytest.raises(ValueError, match="not a COCO captions file"):
        read_coco_captions(path, [38])


def test_a_split_without_the_coco_test_images_is_refused_before_any_embedding(demo_dir, tmp_path):
    manifest = load_split(str(demo_dir / "test.json"), "test")
    with pytest.raises(ValueError) as err:
        evaluate_eccv(None, manifest, tmp_path / "unused.json")
    assert str(err.value).startswith(f"{demo_dir / 'test.json'}: 5000 of the 5000 COCO 5K test images are not in "
                                     "the evaluated split (first: COCO image id ")


def top_ranked(queries: np.ndarray, gallery: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Gallery rows of each query's k most similar items, best first (numpy, chunked)."""
    out = []
    for lo in range(0, len(queries), chunk):
        sims = queries[lo:lo + chunk] @ gallery.T
        if k == 1:
            out.append(sims.argmax(axis=1)[:, None])
            continue
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        out.append(np.take_along_axis(part, order, axis=1))
    return np.concatenate(out)


def hand_map_at_r(ranked_ids: np.ndarray, positives: list[set[int]]) -> float:
    """mAP@R: AP@R = (1/R) Σ_{i≤R} P(i)·rel(i) over each query's top R = |positives|, percent."""
    aps = []
    for ids, pos in zip(ranked_ids, positives):
        rel = [int(x) in pos for x in ids[:len(pos)]]
        aps.append(sum(sum(rel[:i + 1]) / (i + 1) for i in range(len(rel)) if rel[i]) / len(pos))
    return 100 * float(np.mean(aps))


def test_eccv_metrics_agree_with_a_hand_coco_5k_r1_and_a_hand_map_at_r():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = eccv_caption.Metrics()
    image_ids = np.array(list(metric.coco_gts["i2t"]))
    caption_ids = np.array([int(c) for c in metric.coco_ids])
    row_of = {int(i): r for r, i in enumerate(image_ids)}
    caption_image = np.array([row_of[metric.coco_gts["t2i"][int(c)][0]] for c in caption_ids])
    # each caption is its image's random vector plus noise: far from perfect, so every metric is informative
    rng = np.random.default_rng(0)
    img = rng.normal(size=(5000, 32)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img[caption_image] + 0.8 * rng.normal(size=(25000, 32)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)

    result = eccv_metrics(image_ids.tolist(), img, caption_ids.tolist(), txt)
    assert (result["images"], result["captions"]) == (5000, 25000)
    assert result["queries"] == {"i2t": len(metric.eccv_gts["i2t"]), "t2i": len(metric.eccv_gts["t2i"])}

    # COCO 5K R@1 with the original pairs: the id mapping must send every ranking to the right COCO ids
    t2i_top = top_ranked(txt, img, 1)[:, 0]
    i2t_top = top_ranked(img, txt, 1)[:, 0]
    assert result["coco_5k_r1"]["t2i"] == pytest.approx(100 * np.mean(t2i_top == caption_image))
    assert result["coco_5k_r1"]["i2t"] == pytest.approx(100 * np.mean(caption_image[i2t_top] == np.arange(5000)))

    # ECCV: image queries against the extended caption positives
    queries = list(metric.eccv_gts["i2t"])
    ranked = caption_ids[top_ranked(img[[row_of[q] for q in queries]], txt, 48)]
    positives = [set(metric.eccv_gts["i2t"][q]) for q in queries]
    assert result["map_at_r"]["i2t"] == pytest.approx(hand_map_at_r(ranked, positives), abs=1e-9)
    assert result["r1"]["i2t"] == pytest.approx(100 * np.mean([r[0] in p for r, p in zip(ranked, positives)]))
    assert 0 < result["map_at_r"]["t2i"] < 100 and 0 < result["r_precision"]["i2t"] < 100


def test_eccv_metrics_refuse_rankings_that_miss_test_images():
    with pytest.raises(ValueError, match=r"needs every COCO 5K test image and caption; 5000 images and 25000 "
                                         r"captions are missing \(first: image id "):
        eccv_metrics([1], np.ones((1, 4)), [2], np.ones((1, 4)))


class ByImageNumber:
    """Stands in for a student: an image's embedding is a fixed random vector of its COCO id (read from the file
    name), and a caption "photo N" gets exactly the vector of image N."""

    def __init__(self, image_numbers: list[int]):
        rng = np.random.default_rng(1)
        self.vectors = {n: v for n, v in zip(image_numbers, rng.normal(size=(len(image_numbers), 16)))}
        self.calls = []

    def images(self, paths, embedding):
        self.calls.append(("images", embedding))
        return np.stack([self.vectors[coco_image_number("", str(p))] for p in paths])

    def manifest_images(self, manifest, rows, embedding):
        return self.images([manifest.image_path(r) for r in rows], embedding)

    def texts(self, texts, embedding):
        self.calls.append(("texts", embedding))
        return np.stack([self.vectors[int(t.split()[-1])] for t in texts])


def test_evaluate_eccv_matches_manifest_images_by_file_name_and_captions_by_annotation_id(tmp_path):
    from pipeline.manifest import CaptionRecord, ImageRecord, Manifest

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = eccv_caption.Metrics()
    numbers = list(metric.coco_gts["i2t"])
    # ALBEF-style records: non-numeric ids, COCO numbers only in the file names; shuffled, plus one extra image
    order = np.random.default_rng(2).permutation(len(numbers))
    images = [ImageRecord(f"val2014/COCO_val2014_{numbers[i]:012d}.jpg", f"val2014/COCO_val2014_{numbers[i]:012d}.jpg",
                          "test") for i in order] + [ImageRecord("extra", "val2014/extra.jpg", "test")]
    manifest = Manifest(images=images, captions=[CaptionRecord("unused", 0)], source="coco_karpathy_test.json",
                        image_root=str(tmp_path), format="caption-json")
    annotations = [{"id": int(c), "image_id": metric.coco_gts["t2i"][int(c)][0],
                    "caption": f"photo {metric.coco_gts['t2i'][int(c)][0]}"} for c in metric.coco_ids]
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"annotations": annotations}))
    embedder = ByImageNumber(numbers)
    result = evaluate_eccv(embedder, manifest, tmp_path / "captions_val2014.json")
    assert embedder.calls == [("images", "cross"), ("texts", "cross")]
    # each caption embeds exactly as its own image: a right mapping ranks the ground truth first every time
    assert result["coco_5k_r1"] == {"i2t": 100.0, "t2i": 100.0}
    assert (result["images"], result["captions"]) == (5000, 25000)


def test_cusa_eval_refuses_a_missing_coco_captions_file_before_evaluating(tmp_path, demo_dir):
    from click.testing import CliRunner

    from train.cli import eval_main

    result = CliRunner().invoke(eval_main, [str(tmp_path / "no-run"), "--data", str(demo_dir / "test.json"),
                                            "--eccv", str(tmp_path / "captions_val2014.json")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'captions_val2014.json'}: COCO captions file not found (captions_val2014.json from "
        "the COCO 2014 annotations)"]
