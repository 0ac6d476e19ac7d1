"""`cusa-search`: a collection embedded once by a trained run, cached next to it, searched with FAISS; top-1 hits of
every test caption equal cusa-eval's t2i R@1; captions for a query image; image folders; two runs side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from helpers_train import cusa_and_contrastive_runs, invoke, invoke_json, one_torch_thread, run_script
from train.data import load_split
from train.evaluation_run import evaluate_run
from train.search import ranked, read_collection
from train.search_cli import search_main


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def runs(demo_dir, demo_cache, tmp_path_factory) -> tuple[Path, Path]:
    return cusa_and_contrastive_runs(demo_dir, demo_cache, tmp_path_factory.mktemp("search"))


def search(*args) -> dict:
    return invoke_json(search_main, [*args, "--device", "cpu", "--json"])


def test_text_query_returns_k_existing_images_and_a_second_call_reuses_the_embeddings(runs, demo_dir):
    run, _ = runs
    shutil.rmtree(run / "search-cache", ignore_errors=True)
    first = search(run, "--collection", demo_dir / "test.json", "--query", "a red circle", "-k", "4")
    assert first["collection_cached"] is False
    assert first["collection"]["images"] == 9 and first["collection"]["captions"] == 45
    (entry,) = first["queries"]
    assert entry["query"] == "a red circle" and len(entry["results"]) == 4
    test_ids = {im.image_id for im in load_split(str(demo_dir / "test.json"), "test").images}
    for r in entry["results"]:
        assert set(r) >= {"rank", "score", "path", "image_id"}
        assert Path(r["path"]).is_file() and r["image_id"] in test_ids
    scores = [r["score"] for r in entry["results"]]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in entry["results"]][0] == 1
    cache = Path(first["cache"][str(run)])
    assert cache.parent == run / "search-cache" and (cache / "images.faiss").is_file()

    second = search(run, "--collection", demo_dir / "test.json", "--query", "a red circle", "-k", "4")
    assert second["collection_cached"] is True
    assert second["queries"][0]["results"] == entry["results"]


def test_every_test_caption_as_a_query_hits_its_image_at_rank_one_as_often_as_cusa_eval_t2i_r1(runs, demo_dir,
                                                                                                tmp_path):
    run, _ = runs
    manifest = load_split(str(demo_dir / "test.json"), "test")
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(manifest.caption_texts()) + "\n\n")  # a trailing blank line is skipped
    result = search(run, "--collection", demo_dir / "test.json", "--query-file", queries, "-k", "3")
    assert len(result["queries"]) == 45 and [q["line"] for q in result["queries"]] == list(range(1, 46))
    truth = manifest.caption_image_rows()
    ids = [im.image_id for im in manifest.images]
    hits = sum(any(r["rank"] == 1 and r["image_id"] == ids[truth[i]] for r in q["results"])
               for i, q in enumerate(result["queries"]))
    expected = evaluate_run(run, str(demo_dir / "test.json"), device="cpu", workers=0, progress=False)
    assert 100.0 * hits / 45 == pytest.approx(expected["t2i_r1"])


def test_ranks_follow_cusa_eval_ties_share_a_rank_and_are_listed_by_row():
    rows = np.eye(4, dtype=np.float32)[[0, 1, 1, 2, 1]]  # rows 1, 2 and 4 are the same vector
    index = faiss.IndexFlatIP(4)
    index.add(rows)
    query = np.array([[0.1, 1.0, 0.2, 0.0]], dtype=np.float32)
    ids, scores, ranks = ranked(index, query, 5)
    assert ids[0].tolist()[:3] == [1, 2, 4] and ranks[0].tolist() == [1, 1, 1, 4, 5]
    assert ids[0].tolist()[3] == 3  # 0.2 beats 0.1
    ids, _, ranks = ranked(index, query, 50)  # k beyond the collection: all of it
    assert len(ids[0]) == 5


def test_query_image_returns_captions_of_the_collection_with_its_own_among_the_first(runs, demo_dir):
    run, _ = runs
    manifest = load_split(str(demo_dir / "test.json"), "test")
    image = manifest.image_path(0)
    result = search(run, "--collection", demo_dir / "test.json", "--image", image, "-k", "10")
    assert result["searched"] == "captions" and result["query_kind"] == "image"
    (entry,) = result["queries"]
    assert entry["query"] == str(image) and len(entry["results"]) == 10
    for r in entry["results"]:
        assert r["caption"] == manifest.captions[r["caption_row"]].text
        assert r["image_id"] == manifest.images[manifest.captions[r["caption_row"]].image_row].image_id
    assert manifest.images[0].image_id in [r["image_id"] for r in entry["results"]]


def test_an_image_folder_is_searched_recursively_and_a_changed_file_is_embedded_again(runs, demo_dir, tmp_path):
    run, _ = runs
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    sources = sorted((demo_dir / "images").glob("*.png"))[:5]
    for i, src in enumerate(sources):
        shutil.copy(src, (folder / "sub" if i % 2 else folder) / src.name)
    (folder / "notes.txt").write_text("not an image")
    result = search(run, "--collection", folder, "--query", "a blue square", "-k", "5")
    assert result["collection"]["kind"] == "image-folder" and result["collection"]["captions"] == 0
    assert result["collection_cached"] is False
    assert {r["image_id"] for r in result["queries"][0]["results"]} == {
        ("sub/" if i % 2 else "") + s.name for i, s in enumerate(sources)}
    query = folder / "sub" / sources[1].name
    same = search(run, "--collection", folder, "--image", query, "-k", "2")
    assert same["collection_cached"] is True and same["searched"] == "images"
    top = same["queries"][0]["results"][0]
    assert top["image_id"] == f"sub/{sources[1].name}" and top["score"] == pytest.approx(1.0, abs=1e-4)

    with Image.open(sources[0]) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / sources[0].name)
    assert search(run, "--collection", folder, "--query", "a blue square")["collection_cached"] is False


def test_a_retrained_checkpoint_never_reuses_the_embeddings_of_the_old_one(runs, demo_dir, tmp_path):
    run, other = runs
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    shutil.copy(run / "best.pt", ckpt / "best.pt")
    args = ("--collection", demo_dir / "test.json", "--query", "a green star")
    assert search(ckpt, *args)["collection_cached"] is False
    assert search(ckpt, *args)["collection_cached"] is True
    shutil.copy(other / "best.pt", ckpt / "best.pt")  # "retrained" in place: other weights, same file name
    again = search(ckpt, *args)
    assert again["collection_cached"] is False
    assert again["queries"][0]["results"] == search(other, *args)["queries"][0]["results"]


def test_compare_gives_both_runs_results_for_each_query_and_a_side_by_side_table(runs, demo_dir):
    run, other = runs
    result = search(run, "--collection", demo_dir / "test.json", "--query", "a red circle", "--query",
                    "two blue squares", "--compare", other, "-k", "3")
    assert [q["query"] for q in result["queries"]] == ["a red circle", "two blue squares"]
    for q in result["queries"]:
        assert "results" not in q and set(q["runs"]) == {str(run), str(other)}
        assert all(len(r) == 3 for r in q["runs"].values())
    human = invoke(search_main, [run, "--collection", demo_dir / "test.json", "--query", "a red circle",
                                 "--compare", other, "-k", "3", "--device", "cpu"])
    assert human.exit_code == 0, human.output
    lines = human.stdout.splitlines()
    header = next(line for line in lines if line.startswith("    # |"))
    assert "cusa" in header and "contrastive" in header
    assert sum(1 for line in lines if line.lstrip().startswith(("1 |", "2 |", "3 |"))) == 3


def test_console_script_prints_a_readable_table(runs, demo_dir):
    run, _ = runs
    proc = run_script("cusa-search", [run, "--collection", demo_dir / "test.json", "--query", "a red circle",
                                      "-k", "2", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"collection {demo_dir / 'test.json'}: 9 images, 45 captions")
    assert lines[2] == "query: a red circle" and lines[3].split() == ["rank", "score", "image_id", "path"]
    assert lines[4].split()[0] == "1" and Path(lines[4].split()[3]).is_file()


@pytest.mark.parametrize("args, message", [
    ([], "give one kind of query"),
    (["--query", "x", "--image", "y.png"], "give one kind of query"),
    (["--query-file", "{tmp}/empty.txt"], "empty.txt: no queries (expected one query a line)"),
    (["--image", "{tmp}/missing.png"], "missing.png: query image not found"),
])
def test_usage_mistakes_are_one_line_errors(runs, demo_dir, tmp_path, args, message):
    run, _ = runs
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = invoke(search_main, [run, "--collection", demo_dir / "test.json", *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_a_missing_collection_or_an_empty_folder_is_a_one_line_error(runs, tmp_path):
    run, _ = runs
    result = invoke(search_main, [run, "--collection", tmp_path / "nope.json", "--query", "x"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'nope.json'}: annotation file not found"]
    (tmp_path / "empty").mkdir()
    result = invoke(search_main, [run, "--collection", tmp_path / "empty", "--query", "x"])
    assert result.exit_code == 1 and "no image files" in result.output


def test_collection_fingerprint_depends_on_the_image_root(demo_dir, tmp_path):
    a = read_collection(demo_dir / "test.json")
    b = read_collection(demo_dir / "test.json", image_root=str(tmp_path))
    assert a.fingerprint != b.fingerprint and a.image_ids == b.image_ids
    assert read_collection(demo_dir / "test.json").fingerprint == a.fingerprint


def test_an_unreadable_file_in_a_folder_is_left_out_and_listed_and_the_rest_is_searched(runs, demo_dir, tmp_path):
    run, _ = runs
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted((demo_dir / "images").glob("*.png"))[:3]:
        shutil.copy(src, folder / src.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for call in range(2):
        result = search(run, "--collection", folder, "--query", "a red circle", "-k", "10")
        assert result["collection_cached"] is bool(call)
        assert result["collection"]["images"] == 3
        (skipped,) = result["collection"]["skipped"]
        assert skipped["image_id"] == "broken.jpg" and "broken.jpg" in skipped["reason"]
        assert len(result["queries"][0]["results"]) == 3
        assert "broken.jpg" not in {r["image_id"] for r in result["queries"][0]["results"]}
    human = invoke(search_main, [run, "--collection", folder, "--query", "a red circle", "--device", "cpu"])
    assert human.stdout.splitlines()[1].startswith("skipped 1 unreadable image(s), e.g. ")


def test_another_index_factory_reuses_the_embeddings_and_a_bad_one_fails_before_embedding(runs, demo_dir, tmp_path):
    run, _ = runs
    args = ("--collection", demo_dir / "test.json", "--query", "a red circle", "-k", "9", "--cache-dir", tmp_path)
    exact = search(run, *args)
    hnsw = search(run, *args, "--index", "HNSW8")
    assert exact["collection_cached"] is False and hnsw["collection_cached"] is True
    meta = json.loads((Path(hnsw["cache"][str(run)]) / "meta.json").read_text())
    assert meta["factory"] == "HNSW8" and meta["search_params"]["images"].startswith("efSearch=")
    # HNSW over 9 images with efSearch ≥ 128 visits them all: the same ranking as exact search
    assert [r["image_id"] for r in hnsw["queries"][0]["results"]] == [
        r["image_id"] for r in exact["queries"][0]["results"]]
    fresh = tmp_path / "fresh"
    result = invoke(search_main, [run, "--collection", demo_dir / "test.json", "--query", "x", "--index", "NOPE",
                                  "--cache-dir", fresh, "--device", "cpu"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "Error: FAISS index factory 'NOPE' is not valid (e.g. Flat, IVF1024,Flat, HNSW32)"]
    assert not fresh.exists()


def test_an_unreadable_image_of_an_annotation_collection_is_one_line_naming_it_even_from_a_worker(runs, demo_dir,
                                                                                                  tmp_path):
    run, _ = runs
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data, ignore=shutil.ignore_patterns("shards"))
    entries = json.loads((data / "test.json").read_text())
    bad = data / entries[2]["image"]
    data_bytes = bad.read_bytes()
    bad.write_bytes(data_bytes[:len(data_bytes) // 2])  # truncated mid-image
    result = invoke(search_main, [run, "--collection", data / "test.json", "--query", "a red circle",
                                  "--device", "cpu", "--workers", "1"])
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert errors[0].startswith(f"Error: {bad} (image row 2): truncated or corrupt image data"), errors[0]
    assert "Caught" not in result.output and "Traceback" not in result.output
