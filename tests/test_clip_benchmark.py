"""CLIP_benchmark both ways: `cusa-cache demo-data --clip-benchmark` writes its webdataset retrieval layout, which its
own reader and cusa read alike; `clip_benchmark eval` on an exported student (and, through the loader registered in
its TYPE2FUNC table, on any run) reports the recalls `cusa-eval --json` reports under the same names."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from helpers_train import BIN, REPO, TINY_CLIP, invoke_json, one_torch_thread, subprocess_env, train_args
from pipeline.cli import main as cache_main
from pipeline.manifest import read_manifest
from pipeline.images import open_image
from train.cli import eval_main, train_main
from train.data import load_split
from train.export_cli import export_main

RECALL_NAMES = [f"{side}_retrieval_recall@{k}" for k in (1, 5, 10) for side in ("image", "text")]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def benchmark_data(tmp_path_factory) -> Path:
    """A demo set whose test split (96 images, 480 captions, 3 shards) is also in CLIP_benchmark's layout."""
    out = tmp_path_factory.mktemp("cb") / "demo"
    invoke_json(cache_main, ["demo-data", out, "--images", "120", "--splits", "0.1,0.1,0.8", "--clip-benchmark",
                             "--samples-per-shard", "40", "--json"])
    return out


@pytest.fixture(scope="module")
def runs(demo_dir, demo_cache, tmp_path_factory) -> dict[str, Path]:
    """Tiny open_clip students trained on the demo, without cross heads (exported too) and with the reference ones,
    and a frozen-backbone student."""
    root = tmp_path_factory.mktemp("cb_runs")
    (root / "arch").mkdir()
    (root / "arch" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    out = {}
    with one_torch_thread():
        for name, extra in (("plain", ["--set", "cross_head=none"]), ("heads", [])):
            out[name] = root / name
            invoke_json(train_main, train_args(demo_dir, demo_cache, out[name], "--student",
                                               f"open_clip:local-dir:{root / 'arch'}", *extra, epochs=3))
        out["frozen"] = root / "frozen"
        invoke_json(train_main, train_args(demo_dir, demo_cache, out["frozen"], epochs=1))
        out["exported"] = root / "exported"
        invoke_json(export_main, [out["plain"], out["exported"], "--json"])
    return out


def clip_benchmark_samples(root: Path, split: str = "test") -> list[tuple[Image.Image, list[str]]]:
    """What CLIP_benchmark's own reader yields for a retrieval split: (image, captions) per sample, in order."""
    from clip_benchmark.datasets.builder import build_wds_dataset

    return list(build_wds_dataset("demo", transform=lambda image: image.convert("RGB"), split=split,
                                  data_dir=str(root)))


def test_demo_data_writes_the_test_split_in_clip_benchmarks_layout(benchmark_data):
    root = benchmark_data / "clip_benchmark"
    assert (root / "dataset_type.txt").read_text() == "retrieval\n"
    assert (root / "test" / "nshards.txt").read_text() == "3\n"
    assert sorted(p.name for p in (root / "test").iterdir()) == ["0.tar", "1.tar", "2.tar", "nshards.txt"]
    expected = read_manifest(benchmark_data / "test.json")
    samples = clip_benchmark_samples(root)
    assert len(samples) == len(expected.images) == 96
    captions = [[] for _ in expected.images]
    for c in expected.captions:
        captions[c.image_row].append(c.text)
    for row, (image, texts) in enumerate(samples):
        assert texts == captions[row]
        assert np.array_equal(np.asarray(image), np.asarray(open_image(expected, row)))
    # and cusa reads the folder as the same images and captions, in the same order
    cusa = load_split(str(root), "test")
    assert cusa.caption_texts() == expected.caption_texts()
    assert [c.image_row for c in cusa.captions] == [c.image_row for c in expected.captions]


def _write_sample(sink, key: str, members: dict[str, bytes]) -> None:
    sink.write({"__key__": key, **members})


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _webp(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def test_cusa_reads_clip_benchmark_samples_as_its_reader_does(tmp_path):
    root = tmp_path / "cb"
    (root / "test").mkdir(parents=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    (root / "test" / "nshards.txt").write_text("1\n")
    with wds.TarWriter(str(root / "test" / "0.tar"), encoder=False) as sink:
        # two image members: CLIP_benchmark takes the webp (its order: webp, png, jpg, jpeg)
        _write_sample(sink, "s0000000", {"png": _png((255, 0, 0)), "webp": _webp((0, 0, 255)),
                                         "txt": "a red square\nthe same square".encode()})
        # a caption holding a line break (written as a literal \n), and a Unicode line separator, which
        # CLIP_benchmark's str.splitlines treats as the end of a caption
        _write_sample(sink, "s0000001", {"jpg": _png((0, 255, 0)),
                                         "txt": "two lines\\nin one caption\nleft\u2028right\n".encode()})
    samples = clip_benchmark_samples(root)
    manifest = load_split(str(root), "test")
    assert len(manifest.images) == len(samples) == 2
    assert manifest.images[0].member.name.endswith(".webp")
    for row, (image, texts) in enumerate(samples):
        assert np.array_equal(np.asarray(open_image(manifest, row)), np.asarray(image))
        mine = [c.text for c in manifest.captions if c.image_row == row]
        # the one difference: cusa reads the line break CLIP_benchmark's writer escaped, its reader keeps "\n"
        assert mine == [t.replace("\\n", "\n") for t in texts]
    assert [c.text for c in manifest.captions if c.image_row == 1] == ["two lines\nin one caption", "left", "right"]


def cusa_eval(run: Path, data: Path, split: str = "test") -> dict:
    return invoke_json(eval_main, [run, "--data", data, "--split", split, "--device", "cpu", "--workers", "0",
                                   "--json"])


def assert_same_recalls(clip_benchmark: dict, cusa: dict) -> None:
    for name in RECALL_NAMES:
        assert abs(clip_benchmark[name] - cusa[name]) <= 0.01, (name, clip_benchmark[name], cusa[name])


def test_cusa_eval_writes_its_recalls_under_clip_benchmarks_names(runs, benchmark_data):
    result = cusa_eval(runs["plain"], benchmark_data / "test.json")
    for k in (1, 5, 10):
        assert result[f"image_retrieval_recall@{k}"] == pytest.approx(result[f"t2i_r{k}"] / 100)
        assert result[f"text_retrieval_recall@{k}"] == pytest.approx(result[f"i2t_r{k}"] / 100)
    # the CLIP_benchmark folder is the same test split: the same recalls
    assert_same_recalls(cusa_eval(runs["plain"], benchmark_data / "clip_benchmark"), result)
    assert 0 < result["image_retrieval_recall@10"] < 1  # neither nothing nor everything found


def test_clip_benchmark_eval_of_an_exported_student_agrees_with_cusa_eval(runs, benchmark_data, tmp_path):
    out = runs["exported"]
    result = tmp_path / "result.json"
    done = subprocess.run([str(BIN / "clip_benchmark"), "eval", "--dataset", "wds/demo", "--dataset_root",
                           str(benchmark_data / "clip_benchmark"), "--task", "zeroshot_retrieval",
                           "--model", f"local-dir:{out}", "--pretrained", str(out / "open_clip_model.safetensors"),
                           "--recall_k", "1", "5", "10", "--num_workers", "0", "--no_amp", "--output", str(result)],
                          capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_recalls(json.loads(result.read_text())["metrics"],
                        cusa_eval(runs["plain"], benchmark_data / "clip_benchmark"))


def run_clip_benchmark(monkeypatch, main, args: list[str], output: Path) -> dict:
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", "eval", *args, "--recall_k", "1", "5", "10",
                                      "--num_workers", "0", "--no_amp", "--output", str(output)])
    main()
    return json.loads(output.read_text())["metrics"]


def test_clip_benchmark_with_a_named_architecture_and_the_weights_file(runs, benchmark_data, tmp_path, monkeypatch):
    import open_clip
    from clip_benchmark.cli import main

    # the tiny architecture under a name, as a built-in one would be: --model ARCH --pretrained FILE
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "cusa-export-tiny.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "configs")
    metrics = run_clip_benchmark(monkeypatch, main, [
        "--dataset", "wds/demo", "--dataset_root", str(benchmark_data / "clip_benchmark"), "--task",
        "zeroshot_retrieval", "--model", "cusa-export-tiny", "--pretrained",
        str(runs["exported"] / "open_clip_model.safetensors")], tmp_path / "named.json")
    assert_same_recalls(metrics, cusa_eval(runs["plain"], benchmark_data / "clip_benchmark"))


@pytest.mark.parametrize("run", ["heads", "frozen"])
def test_clip_benchmark_with_cusas_loader_evaluates_students_open_clip_cannot_load(run, runs, benchmark_data, tmp_path,
                                                                                 monkeypatch):
    from train.clip_benchmark import main

    metrics = run_clip_benchmark(monkeypatch, main, [
        "--model_type", "cusa", "--model", "cusa", "--pretrained", str(runs[run]), "--dataset", "wds/demo",
        "--dataset_root", str(benchmark_data / "clip_benchmark"), "--task", "zeroshot_retrieval"],
        tmp_path / f"{run}.json")
    assert_same_recalls(metrics, cusa_eval(runs[run], benchmark_data / "clip_benchmark"))
