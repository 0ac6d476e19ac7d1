"""Uni-modal evaluations: mAP@R / R@1 and Spearman on made-up data with answers worked out by hand, the label and
STS file readers (both layouts, one-line errors), and `cusa-eval --image-labels --sts` on a real frozen-student run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train.unimodal as unimodal
from helpers_train import invoke, invoke_json, one_torch_thread
from train.cli import eval_main
from train.config import build_config
from train.embedding import StudentEmbedder
from train.trainer import train
from train.unimodal import average_ranks, map_at_r, read_image_labels, read_sts, spearman


def on_circle(degrees: list[float]) -> np.ndarray:
    """Unit 2-D vectors at the given angles: cosine order = angular distance order, easy to rank by hand."""
    r = np.radians(degrees)
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


# ================================================================================================ mAP@R, R@1
def test_map_at_r_and_r1_match_a_hand_ranking():
    # x0 0° a, x1 7° a, x2 19° b, x3 30° a, x4 44° b, x5 61° a      (class a: R = 3, class b: R = 1)
    emb = on_circle([0, 7, 19, 30, 44, 61])
    labels = ["a", "a", "b", "a", "b", "a"]
    # x0: x1 x2 x3 | x4 x5   -> hits at 1 and 3: AP = (1 + 2/3) / 3 = 5/9; R@1 hit
    # x1: x0 x2 x3 | ...      -> (1 + 2/3) / 3 = 5/9; hit
    # x2: x3 (11°)            -> R = 1, top-1 is class a: 0; miss
    # x3: x2 x4 x1 | x0 x5    -> hit only at 3: (1/3) / 3 = 1/9; miss (x5 at rank 5 is beyond R: not counted)
    # x4: x3 (14°)            -> 0; miss
    # x5: x4 x3 x2 | x1 x0    -> hit at 2: (1/2) / 3 = 1/6; miss
    result = map_at_r(emb, labels)
    assert result["map_at_r"] == pytest.approx(100 * (5 / 9 + 5 / 9 + 0 + 1 / 9 + 0 + 1 / 6) / 6)  # 25/108
    assert result["r1"] == pytest.approx(100 * 2 / 6)
    assert (result["queries"], result["singletons"]) == (6, 0)


def test_a_query_never_retrieves_itself():
    # every image's nearest other image is of the other class; counting the query itself would give 100
    emb = on_circle([0, 90, 10, 100])
    result = map_at_r(emb, ["a", "a", "b", "b"])
    assert result["map_at_r"] == 0.0 and result["r1"] == 0.0


def test_an_image_alone_in_its_class_is_a_distractor_but_not_a_query():
    # y0 0° a, y1 20° a, y2 10° c (alone): y2 is each a-image's nearest other image
    result = map_at_r(on_circle([0, 20, 10]), ["a", "a", "c"])
    assert (result["queries"], result["singletons"]) == (2, 1)
    assert result["map_at_r"] == 0.0 and result["r1"] == 0.0


def test_map_at_r_is_the_same_when_queries_are_processed_in_chunks(monkeypatch):
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    labels = rng.integers(0, 5, size=40).astype(str)
    whole = map_at_r(emb, labels)
    monkeypatch.setattr(unimodal, "_SORT_BUDGET", 40 * 3)  # three queries at a time
    assert map_at_r(emb, labels) == pytest.approx(whole)


def test_map_at_r_refuses_labels_without_any_class_of_two():
    with pytest.raises(ValueError, match="no class has two images"):
        map_at_r(on_circle([0, 10]), ["a", "b"])


# ================================================================================================ Spearman
def test_average_ranks_give_ties_the_mean_of_their_positions():
    assert average_ranks(np.array([10, 20, 20, 30])).tolist() == [1, 2.5, 2.5, 4]
    assert average_ranks(np.array([3.0, 1.0, 2.0])).tolist() == [3, 1, 2]


def test_spearman_without_ties_is_one_minus_six_d_squared_formula():
    # ranks of y: 1 3 2 4, d = 0 -1 1 0: 1 - 6·2 / (4·15) = 0.8
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 30, 20, 40])) == pytest.approx(0.8)
    assert spearman(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)


def test_spearman_with_ties_is_pearson_of_average_ranks():
    # x = 1 2 2 3 5 -> ranks 1 2.5 2.5 4 5;  y = 2 1 4 4 6 -> ranks 2 1 3.5 3.5 5;  both centred on 3:
    # dx = -2 -.5 -.5 1 2, dy = -1 -2 .5 .5 2; Σdxdy = 2 + 1 - .25 + .5 + 4 = 7.25; Σdx² = Σdy² = 9.5
    assert spearman(np.array([1, 2, 2, 3, 5]), np.array([2, 1, 4, 4, 6])) == pytest.approx(7.25 / 9.5)


def test_spearman_agrees_with_scipy_on_data_with_many_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, size=200), rng.integers(0, 4, size=200) + 0.5 * rng.integers(0, 6, size=200)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_refuses_a_constant_side():
    with pytest.raises(ValueError, match="constant"):
        spearman(np.array([1, 1, 1]), np.array([1, 2, 3]))


# ================================================================================================ file readers
@pytest.fixture
def three_images(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / name)
    return tmp_path


def test_image_labels_from_csv_tsv_and_json_resolve_paths_against_the_files_folder(three_images):
    root = three_images
    (root / "labels.csv").write_text("image,label\nimg/a.png,bird\nimg/b.png,bird\nimg/c.png,car\n")
    (root / "labels.tsv").write_text("label\timage\nbird\timg/a.png\nbird\timg/b.png\ncar\timg/c.png\n")
    (root / "labels.json").write_text(json.dumps([{"image": "img/a.png", "label": 1}, {"image": "img/b.png",
                                                  "label": 1}, {"image": str(root / "img/c.png"), "label": 2}]))
    for name, labels in (("labels.csv", ["bird", "bird", "car"]), ("labels.tsv", ["bird", "bird", "car"]),
                         ("labels.json", ["1", "1", "2"])):
        data = read_image_labels(root / name)
        assert data.paths == [root / "img/a.png", root / "img/b.png", root / "img/c.png"]
        assert data.labels == labels


def test_image_labels_without_a_label_column_is_a_one_line_error(three_images):
    path = three_images / "labels.csv"
    path.write_text("image,class\nimg/a.png,bird\n")
    with pytest.raises(ValueError) as err:
        read_image_labels(path)
    assert str(err.value) == f"{path}: missing column 'label' (expected columns image,label; found: image, class)"


def test_image_labels_json_entry_without_a_label_and_a_missing_image_are_named(three_images):
    path = three_images / "labels.json"
    path.write_text(json.dumps([{"image": "img/a.png", "label": "x"}, {"image": "img/b.png"}]))
    with pytest.raises(ValueError, match=r"labels.json: entry 1: missing key 'label'$"):
        read_image_labels(path)
    path = three_images / "labels.csv"
    path.write_text("image,label\nimg/a.png,x\nimg/zzz.png,x\n")
    with pytest.raises(ValueError, match=r"labels.csv: line 3: image 'img/zzz.png' not found"):
        read_image_labels(path)


def test_sts_b_tsv_is_read_without_quote_handling(tmp_path):
    path = tmp_path / "sts-dev.tsv"
    path.write_text("index\tgenre\tsentence1\tsentence2\tscore\n"
                    "0\tmain\tA man said \"hello.\tA man spoke.\t3.8\n"
                    "1\tmain\tA cat sits.\tThe dog runs.\t0.25\n")
    data = read_sts(path)
    assert data.layout == "sts-b"
    assert data.first == ['A man said "hello.', "A cat sits."]
    assert data.second == ["A man spoke.", "The dog runs."]
    assert data.scores.tolist() == [3.8, 0.25]


def test_sick_r_layout_is_recognised_by_its_header(tmp_path):
    path = tmp_path / "SICK_test.txt"
    path.write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
                    "1\tA boy plays.\tA child plays.\t4.5\tENTAILMENT\n"
                    "2\tA boy plays.\tNobody is here.\t1.2\tCONTRADICTION\n")
    data = read_sts(path)
    assert data.layout == "sick-r"
    assert data.first == ["A boy plays.", "A boy plays."] and data.scores.tolist() == [4.5, 1.2]


def test_sts_csv_is_read_with_quotes(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('sentence1,sentence2,score\n"One, two.",Three.,1\nFour.,Five.,2\n')
    assert read_sts(path).first == ["One, two.", "Four."]


def test_sts_file_without_a_score_column_is_a_one_line_error_naming_both_layouts(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("sentence1\tsentence2\tsimilarity\na\tb\t1\n")
    with pytest.raises(ValueError) as err:
        read_sts(path)
    assert str(err.value) == (f"{path}: missing column 'score' (STS-B layout: sentence1, sentence2, score; "
                              "SICK-R layout: sentence_A, sentence_B, relatedness_score; found: sentence1, sentence2, "
                              "similarity)")


def test_sts_row_with_a_non_numeric_score_or_too_few_fields_is_named_by_line(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("sentence1\tsentence2\tscore\na\tb\t1\nc\td\thigh\n")
    with pytest.raises(ValueError, match=r"pairs.tsv: line 3: score 'high' is not a number$"):
        read_sts(path)
    path.write_text("sentence1\tsentence2\tscore\na\tb\t1\nc\td\n")
    with pytest.raises(ValueError, match=r"pairs.tsv: line 3: expected 3 fields, found 2$"):
        read_sts(path)


# ================================================================================================ cusa-eval
@pytest.fixture(scope="module")
def frozen_run(demo_dir, demo_cache, tmp_path_factory) -> Path:
    """A frozen-student CUSA run on the demo cache: 1 epoch, batch 16, lr 1e-3 (a few seconds)."""
    out = tmp_path_factory.mktemp("unimodal") / "run"
    cfg = build_config("paper", None, {"data": str(demo_dir / "train.json"), "cache": str(demo_cache),
                                       "out": str(out), "epochs": 1, "batch_size": 16, "lr": 1e-3, "seed": 0,
                                       "workers": 0, "device": "cpu"},
                       ["frozen.hidden=64", "frozen.embed_dim=64"])
    with one_torch_thread():
        train(cfg, show_progress=False)
    return out


BACKGROUNDS = {(248, 248, 248): "white", (190, 190, 190): "gray", (22, 22, 22): "black", (236, 224, 196): "beige"}


@pytest.fixture(scope="module")
def eval_inputs(demo_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Real labels for the demo test images (their background colour, read from a corner pixel) and STS-B pairs
    of demo captions (same image: 5; otherwise a made-up score)."""
    root = tmp_path_factory.mktemp("unimodal_inputs")
    entries = json.loads((demo_dir / "test.json").read_text())
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label"])
        for e in entries:
            with Image.open(demo_dir / e["image"]) as img:
                writer.writerow([str(demo_dir / e["image"]), BACKGROUNDS[img.convert("RGB").getpixel((0, 0))]])
    lines = ["sentence1\tsentence2\tscore"]
    for i, e in enumerate(entries):
        lines.append(f"{e['caption'][0]}\t{e['caption'][1]}\t5")
        lines.append(f"{e['caption'][0]}\t{entries[(i + 1) % len(entries)]['caption'][2]}\t{i % 3}")
    (root / "sts.tsv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv", root / "sts.tsv"


def hand_map_at_r(emb: np.ndarray, labels: list[str]) -> tuple[float, float]:
    """mAP@R and R@1 by the textbook loop (percent)."""
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    aps, hits = [], []
    for q in range(len(emb)):
        r = sum(1 for j, lab in enumerate(labels) if lab == labels[q] and j != q)
        if r == 0:
            continue
        others = [j for j in np.argsort(-(emb @ emb[q]), kind="stable") if j != q]
        rel = [labels[j] == labels[q] for j in others[:r]]
        aps.append(sum(sum(rel[:i + 1]) / (i + 1) for i in range(r) if rel[i]) / r)
        hits.append(rel[0])
    return 100 * float(np.mean(aps)), 100 * float(np.mean(hits))


def test_cusa_eval_adds_image_retrieval_and_sts_to_the_recalls(frozen_run, eval_inputs, demo_dir):
    labels_file, sts_file = eval_inputs
    with one_torch_thread():
        result = invoke_json(eval_main, [frozen_run, "--data", demo_dir / "test.json", "--device", "cpu",
                                         "--workers", "0", "--image-labels", labels_file, "--sts", sts_file,
                                         "--json"])
        embedder = StudentEmbedder.from_checkpoint(result["checkpoint"], "cpu")
        data = read_image_labels(labels_file)
        images = embedder.images(data.paths, "uni").numpy()
        pairs = read_sts(sts_file)
        a, b = embedder.texts(pairs.first, "uni").numpy(), embedder.texts(pairs.second, "uni").numpy()
    assert {"i2t_r1", "t2i_r10", "rsum"} <= set(result)  # the retrieval table is still there
    expected_map, expected_r1 = hand_map_at_r(images, data.labels)
    ir = result["image_retrieval"]
    alone = [lab for lab in set(data.labels) if data.labels.count(lab) == 1]
    assert ir["embedding"] == "uni" and ir["images"] == 9 and ir["queries"] == 9 - len(alone)
    assert ir["classes"] == len(set(data.labels))
    assert ir["map_at_r"] == pytest.approx(expected_map) and ir["r1"] == pytest.approx(expected_r1)
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    sts = result["sts"]
    assert sts["embedding"] == "uni" and sts["pairs"] == 18 and sts["layout"] == "sts-b"
    assert sts["spearman"] == pytest.approx(100 * spearman(cosine, pairs.scores))
    assert -100 <= sts["spearman"] <= 100 and not math.isnan(sts["spearman"])


def test_frozen_backbone_features_of_image_files_equal_the_cached_split_features(frozen_run, demo_dir, demo_cache):
    from train.evaluation_run import load_trained_student
    from train.features import frozen_features
    from train.trainer import default_feature_cache
    from train.data import load_split

    student, _, _ = load_trained_student(frozen_run / "best.pt", "cpu")
    manifest = load_split(str(demo_dir / "test.json"), "test")
    fs = frozen_features(str(demo_dir / "test.json"), "test", manifest, "efficientnet-lite0",
                         "minilm-l6", default_feature_cache(str(demo_cache)), progress=False, workers=0,
                         device="cpu")
    embedder = StudentEmbedder(student, "frozen:efficientnet-lite0+minilm-l6", "cpu")
    with one_torch_thread(), torch.no_grad():
        cached = student.encode_images(torch.from_numpy(fs.images).float())
        direct = embedder.images([manifest.image_path(r) for r in range(len(manifest.images))], "cross")
        cached_txt = student.encode_texts_uni(torch.from_numpy(fs.texts).float())
        direct_txt = embedder.texts(manifest.caption_texts(), "uni")
    assert torch.allclose(direct, cached, atol=2e-3)
    assert torch.allclose(direct_txt, cached_txt, atol=2e-3)


def test_cusa_eval_human_output_prints_the_uni_modal_lines_after_the_table(frozen_run, eval_inputs, demo_dir):
    labels_file, sts_file = eval_inputs
    with one_torch_thread():
        result = invoke(eval_main, [frozen_run, "--data", demo_dir / "test.json", "--device", "cpu", "--workers",
                                    "0", "--image-labels", labels_file, "--image-embedding", "cross",
                                    "--sts", sts_file, "--text-embedding", "cross"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("image→image retrieval (cross embeddings, ")
    assert lines[-1].startswith("sentence similarity (cross embeddings, 18 sts-b pairs): Spearman ×100 ")
    assert lines[-3].startswith("R@K (%)")


def test_cusa_eval_with_a_bad_sts_file_is_a_one_line_error(frozen_run, demo_dir, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tc\n1\t2\t3\n")
    with one_torch_thread():
        result = invoke(eval_main, [frozen_run, "--data", demo_dir / "test.json", "--device", "cpu", "--workers",
                                    "0", "--sts", bad, "--json"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {bad}: missing column 'sentence1'")
