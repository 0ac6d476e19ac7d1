"""train/factory.py: a student is built from a run's settings, its checkpoint records what rebuilds it, and loading a
trained run (``load_model``, ``cusa-eval``) never imports the training loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_train import REPO, invoke_json, one_torch_thread, subprocess_env, train_args
from train.cli import train_main
from train.config import build_config
from train.factory import build_student, checkpoint_state
from train.student_kinds import KINDS, FrozenKind, OpenClipKind, RegionKind, kind_of
from train.vocab import Vocabulary

LOADS_WITHOUT_THE_LOOP = """
import json, sys
from train.model import load_model
model = load_model(sys.argv[1], device="cpu")
texts = model.encode_texts(["a red square", "two blue circles"])
images = model.encode_images(sys.argv[2:4])
print(json.dumps({"trainer": "train.trainer" in sys.modules, "texts": list(texts.shape),
                  "images": list(images.shape), "dim": model.dim}))
"""

EVALUATES_WITHOUT_THE_LOOP = """
import sys
from train.cli import eval_main
eval_main.main(sys.argv[1:], prog_name="cusa-eval", standalone_mode=False)
print("TRAINER-IMPORTED" if "train.trainer" in sys.modules else "TRAINER-ABSENT", file=sys.stderr)
"""


@pytest.fixture(scope="module")
def tiny_run(demo_dir, demo_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("factory") / "run"
    with one_torch_thread():
        invoke_json(train_main, train_args(demo_dir, demo_cache, out, epochs=1))
    return out


def test_load_model_on_a_trained_run_never_imports_the_training_loop(tiny_run, demo_dir):
    manifest = json.loads((demo_dir / "test.json").read_text())
    images = [str(demo_dir / entry["image"]) for entry in manifest[:2]]
    proc = subprocess.run([sys.executable, "-c", LOADS_WITHOUT_THE_LOOP, str(tiny_run), *images],
                          capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["trainer"] is False
    assert result["texts"] == [2, result["dim"]] and result["images"] == [2, result["dim"]]


def test_cusa_eval_of_a_trained_run_never_imports_the_training_loop(tiny_run, demo_dir):
    proc = subprocess.run([sys.executable, "-c", EVALUATES_WITHOUT_THE_LOOP, str(tiny_run), "--data",
                           str(demo_dir / "test.json"), "--device", "cpu", "--workers", "0", "--json"],
                          capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRAINER-ABSENT" in proc.stderr
    assert json.loads(proc.stdout)["rsum"] >= 0


def test_the_kinds_table_names_one_kind_object_for_every_student_kind():
    assert KINDS == {"frozen": FrozenKind, "open_clip": OpenClipKind, "sgr": RegionKind, "saf": RegionKind}
    assert kind_of("frozen:efficientnet-lite0+minilm-l6") is FrozenKind
    assert kind_of("saf:precomp:/data/f30k") is RegionKind
    with pytest.raises(ValueError, match="unknown kind 'clip'"):
        kind_of("clip:ViT-B-32")


def test_a_checkpoints_record_builds_a_frozen_student_of_the_same_shape_and_weights_it_loads():
    cfg = build_config(flags={"student": "frozen:a+b"}, overrides=["frozen.hidden=16", "frozen.embed_dim=8"])
    torch.manual_seed(0)
    student = build_student(cfg, {"image_dim": 12, "text_dim": 20})
    assert (student.image_dim, student.text_dim, student.embed_dim) == (12, 20, 8)
    loss = torch.nn.Linear(1, 1)
    optimizer = torch.optim.AdamW(student.parameters())
    state = checkpoint_state(cfg, student, loss, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1),
                             epochs=3)
    assert state["dims"] == {"image_dim": 12, "text_dim": 20} and state["epoch"] == 3 and "vocab" not in state
    again = build_student(cfg, state["dims"], weights_from_checkpoint=True)
    again.load_state_dict(state["student"])
    x, t = torch.randn(4, 12), torch.randn(4, 20)
    student.eval(), again.eval()
    assert torch.equal(student(x, t)["image_cross"], again(x, t)["image_cross"])


def test_a_checkpoints_record_builds_a_region_student_with_its_vocabulary():
    cfg = build_config("sgraf-paper", flags={"student": "sgr:grid:efficientnet-lite0"},
                       overrides=["region.embed_dim=16", "region.sim_dim=8", "region.word_dim=8", "region.uni_dim=16"])
    vocab = Vocabulary.build(["a dog runs", "a cat sleeps", "a dog sleeps"], 1)
    student = build_student(cfg, {"image_dim": 24}, vocab)
    assert student.kind == "sgr" and student.vocab is vocab
    optimizer = torch.optim.AdamW(student.parameters())
    state = checkpoint_state(cfg, student, torch.nn.Linear(1, 1), optimizer,
                             torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1), epochs=1, vocab=vocab)
    assert state["dims"] == {"image_dim": 24, "vocab_size": len(vocab)} and state["vocab"] == vocab.to_dict()
    assert RegionKind.recorded_vocab(state, "best.pt").words == vocab.words
    with pytest.raises(ValueError, match="best.pt: a region student's checkpoint without its word vocabulary"):
        RegionKind.recorded_vocab({k: v for k, v in state.items() if k != "vocab"}, "best.pt")
