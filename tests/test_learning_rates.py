"""Learning rates by kind of parameter: the paper preset fine-tunes open_clip at 1e-5 and trains a frozen student's
new layers at 1e-3, a preset may set one lr for every student, explicit settings always win, and the lr of each
parameter group (pretrained backbone, new heads) is logged."""

from __future__ import annotations

import json

import pytest

from helpers_train import TINY_CLIP, invoke_json, one_torch_thread, read_jsonl, train_args
from train import config as config_module
from train.cli import train_main
from train.config import build_config
from train.losses import CusaLoss
from train.optim import BACKBONE, HEADS, parameter_groups
from train.students import FeatureStudent, OpenClipStudent

def test_paper_preset_gives_each_kind_of_student_its_own_lr():
    frozen = build_config("paper")
    assert (frozen.lr, frozen.min_lr, frozen.head_lr) == (1e-3, 1e-4, None)
    clip = build_config("paper", flags={"student": "open_clip:ViT-B-32:openai"})
    assert (clip.lr, clip.min_lr, clip.head_lr) == (1e-5, 1e-6, None)  # the reference: one lr, heads included
    # the student may come from any layer: a --set override decides the kind as well
    assert build_config("paper", overrides=["student=open_clip:ViT-B-32"]).lr == 1e-5


def test_explicit_lr_from_a_flag_a_file_or_set_beats_the_per_student_default(tmp_path):
    assert build_config("paper", flags={"lr": 5e-4}).lr == 5e-4
    assert build_config("paper", overrides=["lr=2e-4"]).lr == 2e-4
    path = tmp_path / "run.yaml"
    path.write_text("lr: 3.0e-4\nhead_lr: 1.0e-3\n")
    cfg = build_config("paper", str(path), flags={"student": "open_clip:ViT-B-32"})
    assert (cfg.lr, cfg.head_lr) == (3e-4, 1e-3)


def test_a_lower_lr_with_its_own_min_lr_is_accepted_whatever_order_the_layers_give_them(tmp_path):
    # --lr below the frozen default's min_lr is fine when min_lr comes down too, from a later or an earlier layer
    cfg = build_config("paper", flags={"lr": 1e-5}, overrides=["min_lr=1e-6"])
    assert (cfg.lr, cfg.min_lr) == (1e-5, 1e-6)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"min_lr": 1e-7}))
    assert build_config("paper", str(path), flags={"lr": 1e-5}).min_lr == 1e-7
    with pytest.raises(ValueError, match=r"min_lr must lie in \[0, lr = 1e-05\], got 0.0001"):
        build_config("paper", flags={"lr": 1e-5}, overrides=["min_lr=1e-4"])


def test_an_lr_given_without_min_lr_keeps_the_presets_floor_at_the_same_fraction():
    # the frozen default decays 1e-3 -> 1e-4 and open_clip 1e-5 -> 1e-6: a tenth of the peak, whatever --lr says
    assert build_config("paper", flags={"lr": 1e-5}).min_lr == pytest.approx(1e-6)
    assert build_config("paper", overrides=["lr=3e-4"]).min_lr == pytest.approx(3e-5)
    clip = build_config("paper", flags={"student": "open_clip:ViT-B-32", "lr": 2e-5})
    assert clip.min_lr == pytest.approx(2e-6)


def test_a_preset_without_per_student_values_sets_its_lr_for_every_student(monkeypatch):
    monkeypatch.setitem(config_module.PRESETS, "region-like", {"lr": 2e-4, "min_lr": 1e-5, "epochs": 40})
    for student in (None, "open_clip:ViT-B-32"):
        cfg = build_config("region-like", flags={"student": student})
        assert (cfg.lr, cfg.min_lr, cfg.epochs) == (2e-4, 1e-5, 40)


@pytest.mark.parametrize("item, message", [
    ("min_lr=0.1", "min_lr must lie in [0, lr = 0.001], got 0.1; set it with --set min_lr=X"),
    ("head_lr=-1", "head_lr must be > 0 (or none: the same as lr), got -1.0"),
    ("head_lr=fast", "setting head_lr must be a number, got 'fast'"),
])
def test_bad_learning_rates_are_refused_naming_the_setting(item, message):
    with pytest.raises(ValueError) as err:
        build_config("paper", overrides=[item])
    assert str(err.value) == message


def test_open_clip_backbone_and_new_heads_are_separate_groups_at_lr_and_head_lr(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    student = OpenClipStudent(f"local-dir:{tmp_path}")
    cfg = build_config("paper", flags={"student": f"open_clip:local-dir:{tmp_path}"}, overrides=["head_lr=1e-3"])
    loss = CusaLoss(cfg.losses)
    groups = parameter_groups(student, loss, cfg)
    lrs = {(g["name"], g["weight_decay"]): g["lr"] for g in groups}
    assert lrs == {(BACKBONE, 1e-4): 1e-5, (BACKBONE, 0.0): 1e-5, (HEADS, 1e-4): 1e-3, (HEADS, 0.0): 1e-3}
    in_groups = {name: {id(p) for g in groups if g["name"] == name for p in g["params"]} for name in (BACKBONE, HEADS)}
    assert in_groups[BACKBONE] == {id(p) for p in student.model.parameters() if p.requires_grad}
    heads = [student.cross_head_v, student.cross_head_t, student.uni_head_v, student.uni_head_t, loss]
    assert in_groups[HEADS] == {id(p) for m in heads for p in m.parameters() if p.requires_grad}


def test_a_frozen_student_has_only_new_parameters():
    cfg = build_config("paper")
    groups = parameter_groups(FeatureStudent(12, 8, embed_dim=16, hidden=16), CusaLoss(cfg.losses), cfg)
    assert {g["name"] for g in groups} == {HEADS} and {g["lr"] for g in groups} == {1e-3}


def test_lr_per_group_is_logged_in_metrics_and_summary(demo_dir, demo_cache, tmp_path):
    out = tmp_path / "run"
    args = [a for a in train_args(demo_dir, demo_cache, out, epochs=1) if a not in ("--lr", "1e-3")]
    with one_torch_thread():
        summary = invoke_json(train_main, args + ["--set", "head_lr=2e-3"])
    assert summary["lr_groups"] == {HEADS: {"lr": 2e-3, "min_lr": pytest.approx(2e-4),
                                            "parameters": summary["lr_groups"][HEADS]["parameters"]}}
    assert summary["lr_groups"][HEADS]["parameters"] > 0
    records = read_jsonl(out / "metrics.jsonl")
    assert records[0]["lr_groups"][HEADS] < 2e-3 and records[-1]["lr_groups"][HEADS] == pytest.approx(2e-4)
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3  # the frozen student's default
