"""`cusa-cache report`: teacher agreement measures on hand-made neighbor tables with answers worked out by hand,
and the command on the real demo cache (numbers re-derived from the store by brute force, files written)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from demo_constants import DEMO_NEIGHBORS
from pipeline.cli import main
from pipeline.report import (_neighbors, capped_ks, content_words, image_agreement, jaccard, lift, random_pairs,
                             text_agreement, verdict)
from teacher_cache.store import Store


# ================================================================================================ measures
def test_content_words_are_lowercased_words_without_stopwords():
    assert content_words("A RED circle, and two blue squares on the left.") == \
        {"red", "circle", "blue", "squares", "left"}
    assert content_words("the of a") == frozenset()


def test_jaccard_is_intersection_over_union_and_zero_for_two_empty_sets():
    assert jaccard({"red", "circle"}, {"red", "square"}) == pytest.approx(1 / 3)
    assert jaccard({"a"}, {"a"}) == 1.0
    assert jaccard(set(), set()) == 0.0


def test_ks_are_capped_at_the_tables_k_without_duplicates():
    assert capped_ks(8) == [1, 5, 8]
    assert capped_ks(3) == [1, 3]
    assert capped_ks(32) == [1, 5, 10]
    with pytest.raises(ValueError, match="keeps 0 neighbors"):
        capped_ks(0)


# Six captions: image 0 has captions 0,1,2; image 1 has 3,4; image 2 has only 5. K = 3, one missing slot (-1).
CAPTION_IMAGE = np.array([0, 0, 0, 1, 1, 2])
CAPTION_NEIGHBORS = np.array([
    [1, 3, 2],   # same image: yes, no, yes
    [3, 0, 5],   # no, yes, no
    [0, 1, 4],   # yes, yes, no
    [4, 0, 1],   # yes, no, no
    [0, 3, 2],   # no, yes, no
    [0, 3, -1],  # no, no, missing
])


def test_text_precision_hit_ceiling_and_chance_match_a_hand_count():
    t = text_agreement(CAPTION_NEIGHBORS, np.arange(6), CAPTION_IMAGE, [1, 3])
    assert t["queries"] == 6
    # top-1 right for captions 0, 2, 3
    assert t["precision"][1] == pytest.approx(3 / 6)
    assert t["hit"][1] == pytest.approx(3 / 6)
    # top-3 hits per caption 2,1,2,1,1,0 of 3 -> 7/18; some hit for all but caption 5
    assert t["precision"][3] == pytest.approx(7 / 18)
    assert t["hit"][3] == pytest.approx(5 / 6)
    # partners (other captions of the same image) 2,2,2,1,1,0
    assert t["precision_ceiling"][1] == pytest.approx(5 / 6)
    assert t["precision_ceiling"][3] == pytest.approx((2 + 2 + 2 + 1 + 1 + 0) / 3 / 6)
    # a random ranking of the 5 other captions: partners/5 on average
    assert t["precision_chance"][1] == pytest.approx(8 / 30)
    assert t["hit_chance"][1] == pytest.approx(8 / 30)
    # 3 of 5 drawn: P(no partner) = (3/5)(2/4)(1/3) = 1/10 with 2 partners, (4/5)(3/4)(2/3) = 2/5 with 1
    assert t["hit_chance"][3] == pytest.approx((3 * 0.9 + 2 * 0.6 + 0) / 6)


def test_text_agreement_counts_only_the_query_rows_of_the_evaluated_data():
    t = text_agreement(CAPTION_NEIGHBORS, np.array([3, 4]), CAPTION_IMAGE, [1])
    assert t["queries"] == 2
    assert t["precision"][1] == pytest.approx(1 / 2)  # caption 3 right, caption 4 wrong


# Four images described by their content words; K = 2.
IMAGE_WORDS = [frozenset({"red", "circle"}), frozenset({"red", "square"}), frozenset({"blue", "circle"}),
               frozenset({"green", "star"})]
IMAGE_NEIGHBORS = np.array([[1, 2], [0, 3], [0, 3], [2, 1]])


def test_image_neighbor_jaccard_against_every_random_pair_matches_a_hand_count():
    pairs = random_pairs(np.arange(4), np.arange(4), max_pairs=100, rng=np.random.default_rng(0))
    assert len(pairs[0]) == 12 and not np.any(pairs[0] == pairs[1])  # every ordered pair, no self pairs
    i = image_agreement(IMAGE_NEIGHBORS, np.arange(4), IMAGE_WORDS, [1, 2], pairs)
    # J(0,1) = J(0,2) = 1/3, every pair with image 3 and J(1,2) are 0
    assert i["jaccard"][1] == pytest.approx((1 / 3 + 1 / 3 + 1 / 3 + 0) / 4)
    assert i["jaccard"][2] == pytest.approx((1 / 3 + 1 / 6 + 1 / 6 + 0) / 4)
    assert i["random_jaccard"] == pytest.approx((4 * 1 / 3) / 12)
    assert i["random_pairs"] == 12
    assert lift(i["jaccard"][1], i["random_jaccard"]) == pytest.approx(2.25)


def test_random_pairs_are_sampled_without_self_pairs_and_reproducibly_above_the_exact_limit():
    q, c = np.arange(300), np.arange(300)
    a1, b1 = random_pairs(q, c, max_pairs=1000, rng=np.random.default_rng(7))
    a2, b2 = random_pairs(q, c, max_pairs=1000, rng=np.random.default_rng(7))
    assert 990 <= len(a1) <= 1000 and not np.any(a1 == b1)
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2)


def test_verdict_reads_the_lift_with_the_documented_thresholds():
    assert verdict(2.25) == "informative"
    assert verdict(1.5) == "informative"
    assert verdict(1.2) == "weak"
    assert verdict(1.0) == "no better than chance"
    assert lift(0.3, 0.0) == float("inf") and lift(0.0, 0.0) == 1.0


def test_a_store_without_a_neighbor_table_gets_exact_neighbors_computed_over_its_rows():
    emb = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], dtype=np.float32)  # unit rows
    fake = SimpleNamespace(has_neighbors=lambda m: False, load=lambda m: emb, path="store")
    ids, sims, source = _neighbors(fake, "images", np.arange(4))
    assert source == "computed" and ids.shape == (4, 3)
    assert ids[:, 0].tolist() == [1, 0, 1, 2]  # cosines: 0-1 0.8, 1-2 0.6, 0-2 0, 2-3 0, 1-3 -0.8, 0-3 -1
    assert sims[0].tolist() == pytest.approx([0.8, 0.0, -1.0])


# ================================================================================================ the command
def brute_force_top1(emb: np.ndarray) -> np.ndarray:
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(axis=1)


@pytest.fixture(scope="module")
def demo_report(demo_dir, demo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(main, ["report", str(demo_cache), "--data", str(demo_dir / "train.json"),
                                       "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_report_json_is_printed_and_written_with_the_tables_k_and_the_data_counts(demo_report):
    out, report = demo_report
    assert json.loads((out / "report.json").read_text()) == report
    assert report["counts"]["images"] == 42 and report["counts"]["captions"] == 210
    assert report["neighbor_tables"]["texts"] == {"k": DEMO_NEIGHBORS, "source": "store"}
    assert list(report["text_teacher"]["precision"]) == ["1", "5", "8"]
    assert report["teachers"] == {"image": "efficientnet-lite0", "text": "minilm-l6"}


def test_report_text_precision_at_1_equals_a_brute_force_search_of_the_stored_embeddings(demo_report, demo_cache):
    _, report = demo_report
    store = Store.open(demo_cache)
    top1 = brute_force_top1(store.load("texts"))
    image_of = store.caption_image_rows
    assert report["text_teacher"]["precision"]["1"] == pytest.approx(np.mean(image_of[top1] == image_of))
    # 5 captions per image: 4 partners among 209 other captions
    assert report["text_teacher"]["precision_chance"]["1"] == pytest.approx(4 / 209)
    assert report["text_teacher"]["precision_ceiling"]["5"] == pytest.approx(4 / 5)
    t = report["text_teacher"]
    assert t["lift"] == pytest.approx(t["precision"]["5"] / t["precision_chance"]["5"])


def test_report_image_jaccard_equals_a_brute_force_recount_from_the_captions(demo_report, demo_cache):
    _, report = demo_report
    store = Store.open(demo_cache)
    words = [set() for _ in range(store.counts["images"])]
    for text, img in zip(store.captions.tolist(), store.caption_image_rows.tolist()):
        words[img] |= content_words(text)
    top1 = brute_force_top1(store.load("images"))
    expected = np.mean([jaccard(words[i], words[j]) for i, j in enumerate(top1)])
    n = len(words)
    every_pair = np.mean([jaccard(words[i], words[j]) for i in range(n) for j in range(n) if i != j])
    i = report["image_teacher"]
    assert i["jaccard"]["1"] == pytest.approx(expected)
    assert i["random_pairs"] == 42 * 41 and i["random_jaccard"] == pytest.approx(every_pair)
    assert i["lift"] == pytest.approx(i["jaccard"]["5"] / i["random_jaccard"])


def test_report_similarity_summaries_hold_the_stored_neighbor_sims(demo_report, demo_cache):
    _, report = demo_report
    _, sims = Store.open(demo_cache).neighbors("images")
    assert report["similarities"]["images"]["top1"]["mean"] == pytest.approx(float(sims[:, 0].mean()), rel=1e-5)
    assert report["similarities"]["images"]["neighbors"]["count"] == 42 * DEMO_NEIGHBORS


def test_report_writes_markdown_and_two_pngs_with_example_neighbors(demo_report):
    out, report = demo_report
    md = (out / "report.md").read_text()
    assert "## Text teacher `minilm-l6`" in md and "![nearest images](report_examples.png)" in md
    with Image.open(out / "report_hist.png") as hist, Image.open(out / "report_examples.png") as examples:
        assert hist.size[0] > 500 and examples.size[1] > 4 * 150  # four example rows
    assert len(report["examples"]["images"]) == 4
    assert all(len(e["neighbors"]) == 5 for e in report["examples"]["images"])
    first = report["examples"]["captions"][0]
    assert first["caption"] in md and all(n["caption"] in md for n in first["neighbors"])


def test_report_human_summary_goes_to_the_default_folder_next_to_the_store(demo_dir, cache_copy):
    result = CliRunner().invoke(main, ["report", str(cache_copy), "--data", str(demo_dir / "train.json"),
                                       "--examples", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].startswith("text teacher  minilm-l6: ")
    assert lines[4].startswith("image teacher efficientnet-lite0: ")
    assert (cache_copy.parent / "store-report" / "report.json").is_file()


def test_a_report_on_one_split_goes_to_its_own_default_folder_and_keeps_the_whole_stores(demo_dir, cache_copy):
    whole = CliRunner().invoke(main, ["report", str(cache_copy), "--data", str(demo_dir / "train.json"),
                                      "--examples", "0", "--json"])
    assert whole.exit_code == 0, whole.output
    before = (cache_copy.parent / "store-report" / "report.json").read_bytes()
    split = CliRunner().invoke(main, ["report", str(cache_copy), "--data", str(demo_dir / "train.json"),
                                      "--split", "train", "--examples", "0", "--json"])
    assert split.exit_code == 0, split.output
    assert json.loads((cache_copy.parent / "store-report-train" / "report.json").read_text())["split"] == "train"
    assert (cache_copy.parent / "store-report" / "report.json").read_bytes() == before


def test_report_refuses_annotations_the_store_was_not_built_from_in_one_line(demo_dir, demo_cache, tmp_path):
    result = CliRunner().invoke(main, ["report", str(demo_cache), "--data", str(demo_dir / "val.json"),
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {demo_cache}: the annotations ")
    assert "is not the manifest this store was built from" in lines[0]
