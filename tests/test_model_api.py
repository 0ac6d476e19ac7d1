"""`train.model.load_model`: a trained run as a Python object whose embeddings reproduce cusa-eval's recalls, for a
frozen-backbone student and a random-init open_clip student, from image paths or PIL images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_train import METRIC_KEYS, TINY_CLIP, invoke_json, one_torch_thread, train_args
from pipeline.errors import ImageError
from train.cli import train_main
from train.data import load_split
from train.evaluate import retrieval_metrics
from train.evaluation_run import evaluate_run
from train.model import load_model

@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def frozen_run(demo_dir, demo_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("api") / "frozen"
    with one_torch_thread():
        invoke_json(train_main, train_args(demo_dir, demo_cache, out, epochs=2, val=True))
    return out


@pytest.fixture(scope="module")
def clip_run(demo_dir, demo_cache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api_clip")
    (root / "tiny_clip").mkdir()
    (root / "tiny_clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    out = root / "run"
    with one_torch_thread():
        invoke_json(train_main, train_args(demo_dir, demo_cache, out, "--student",
                                           f"open_clip:local-dir:{root / 'tiny_clip'}", epochs=1))
    return out


def split_inputs(demo_dir):
    manifest = load_split(str(demo_dir / "test.json"), "test")
    return manifest, [manifest.image_path(r) for r in range(len(manifest.images))], manifest.caption_texts()


@pytest.mark.parametrize("kind", ["frozen", "open_clip"])
def test_load_model_embeddings_give_the_recalls_cusa_eval_reports(kind, frozen_run, clip_run, demo_dir):
    run = frozen_run if kind == "frozen" else clip_run
    manifest, paths, captions = split_inputs(demo_dir)
    expected = evaluate_run(run, str(demo_dir / "test.json"), device="cpu", workers=0, progress=False)
    model = load_model(run)
    images = model.encode_images(paths)
    texts = model.encode_texts(captions)
    assert images.dtype == np.float32 and texts.dtype == np.float32
    assert images.shape == (9, model.dim) and texts.shape == (45, model.dim)
    assert np.allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    got = retrieval_metrics(images, texts, manifest.caption_image_rows())
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], abs=0.1), key
    assert model.checkpoint == Path(expected["checkpoint"]) and model.epoch == expected["epoch"]


def test_pil_images_embed_like_their_files_and_one_string_gives_one_row(frozen_run, demo_dir):
    _, paths, captions = split_inputs(demo_dir)
    model = load_model(frozen_run)
    from_files = model.encode_images(paths[:3])
    with Image.open(paths[0]) as a, Image.open(paths[1]) as b:
        pil = [a.convert("RGBA"), b.copy()]  # alpha (opaque here) is composited away as for files
        from_pil = model.encode_images(pil + [str(paths[2])])
    assert np.allclose(from_pil, from_files, atol=1e-5)
    one = model.encode_texts(captions[0])
    assert one.shape == (1, model.dim)
    assert np.allclose(one[0], model.encode_texts(captions[:2])[0], atol=1e-5)
    assert model.encode_images(paths[0]).shape == (1, model.dim)
    assert model.encode_texts([]).shape == (0, model.dim)


def test_uni_embeddings_are_the_students_uni_heads_and_differ_from_the_cross_ones(frozen_run, demo_dir):
    _, paths, captions = split_inputs(demo_dir)
    model = load_model(frozen_run)
    cross, uni = model.encode_texts(captions[:5]), model.encode_texts(captions[:5], uni=True)
    direct = model.embedder.texts(captions[:5], "uni").numpy()
    assert np.allclose(uni, direct, atol=1e-6)
    assert not np.allclose(uni, cross, atol=1e-2)
    assert np.allclose(np.linalg.norm(model.encode_images(paths[:2], uni=True), axis=1), 1, atol=1e-5)


def test_batch_size_does_not_change_the_embeddings_and_a_long_input_shows_a_progress_bar(frozen_run, demo_dir,
                                                                                         capsys):
    _, paths, captions = split_inputs(demo_dir)
    model = load_model(frozen_run, batch_size=4)
    small = model.encode_texts(captions[:10], progress=False)
    capsys.readouterr()
    whole = model.encode_texts(captions[:10], batch_size=64)  # one batch: no bar by default
    assert "captions" not in capsys.readouterr().err
    assert np.allclose(small, whole, atol=2e-3)
    model.encode_images(paths[:6])  # two batches of 4 and more: a bar
    assert "images" in capsys.readouterr().err


def test_identity_is_stable_across_loads_and_changes_with_the_weights(frozen_run):
    best, again = load_model(frozen_run / "best.pt"), load_model(frozen_run / "best.pt")
    assert best.identity == again.identity and len(best.identity) == 64
    ckpt = torch.load(frozen_run / "best.pt", map_location="cpu", weights_only=False)
    ckpt["student"]["cross_head_t.proj.bias"] += 1e-3
    changed = frozen_run.parent / "changed.pt"
    torch.save(ckpt, changed)
    assert load_model(changed).identity != best.identity


def test_bad_inputs_are_one_line_errors_naming_the_input(frozen_run, demo_dir, tmp_path):
    _, paths, _ = split_inputs(demo_dir)
    model = load_model(frozen_run)
    with pytest.raises(ImageError, match=r"nope\.png \(image row 1\): file not found"):
        model.encode_images([paths[0], tmp_path / "nope.png"])
    with pytest.raises(ValueError, match="image 0: expected a file path or a PIL image, got int"):
        model.encode_images([7])
    with pytest.raises(ValueError, match="text 1: expected a string, got int"):
        model.encode_texts(["fine", 3])
    with pytest.raises(ValueError, match="no checkpoint"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got 'gpu'"):
        load_model(frozen_run, device="gpu")
