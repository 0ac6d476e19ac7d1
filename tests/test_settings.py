"""One settings engine (train/settings.py) for the training config and the loss config: every key reaches its setting
whether dotted, nested or under ``losses.``, values are coerced by the type of the setting, mistakes are one-line
errors naming the key, and the paper's values (train/paper.py) are what the defaults and the ``paper`` preset hold."""

from __future__ import annotations

import re

import pytest

from train.config import PRESETS, STUDENT_DEFAULTS_KEY, TrainConfig, apply_overrides, build_config
from train.losses import LossConfig
from train.paper import PAPER
from train.settings import flat_settings

OPEN_CLIP = {"student": "open_clip:ViT-B-32"}


def resolved(*overrides: str, preset: str = "paper", flags: dict | None = None) -> dict:
    return flat_settings(build_config(preset, flags=flags or OPEN_CLIP, overrides=list(overrides)).to_dict())


@pytest.mark.parametrize("key,value", [("csa.rate", 0.25), ("usa.tau_images.max", 0.9), ("contrastive.tau.init", 0.07),
                                       ("itr.margin", 0.3), ("tau_soft", 0.5), ("usa.enabled", False)])
def test_a_loss_key_means_the_same_at_the_top_level_under_losses_and_nested(key, value, tmp_path):
    top = resolved(f"{key}={str(value).lower()}")
    under = resolved(f"losses.{key}={str(value).lower()}")
    nested: dict = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    from_file = flat_settings(apply_overrides(TrainConfig(), nested).to_dict())
    assert top[key] == under[key] == from_file[key] == value


def test_loss_names_are_read_case_insensitively_and_training_names_are_not():
    assert resolved("csa.mode=ADD", "contrastive.reduction= Sum")["csa.mode"] == "add"
    assert resolved("contrastive.reduction= Sum")["contrastive.reduction"] == "sum"
    with pytest.raises(ValueError, match=re.escape("sampler must be one of random, teacher-neighbors, got 'Random'")):
        resolved("sampler=Random")


def test_a_bare_number_for_a_temperature_sets_its_initial_value_and_keeps_its_range():
    got = resolved("csa.tau=0.3")
    assert (got["csa.tau.init"], got["csa.tau.min"], got["csa.tau.max"]) == (0.3, 0.10, 0.99)


@pytest.mark.parametrize("item,key,expected", [
    ("epochs=2.0", "epochs", 2), ("gather=yes", "gather", True), ("gather=0", "gather", False),
    ("head_lr=1e-3", "head_lr", 1e-3), ("head_lr=none", "head_lr", None), ("soft_labels.stream=AUTO", "soft_labels.stream", None),
    ("soft_labels.stream=on", "soft_labels.stream", True), ("soft_labels.stream=false", "soft_labels.stream", False),
    ("frozen.hidden=64", "frozen.hidden", 64), ("region.smooth=4", "region.smooth", 4.0),
    ("csa.tau.learnable=off", "csa.tau.learnable", False), ("image_root=none", "image_root", None),
])
def test_values_are_coerced_to_the_type_of_their_setting(item, key, expected):
    got = resolved(item)[key]
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("item,message", [
    ("epochs=2.5", "setting epochs must be an integer, got 2.5"),
    ("epochs=none", "setting epochs must be an integer, got None"),
    ("csa.rate=none", "loss setting csa.rate must be a number, got None"),
    ("gather=2", "setting gather must be true or false, got 2"),
    ("lr=fast", "setting lr must be a number, got 'fast'"),
    ("usa.enabled=maybe", "loss setting usa.enabled must be true or false, got 'maybe'"),
    ("soft_labels.stream=maybe", "soft_labels.stream must be true, false or auto, got 'maybe'"),
    ("frozen.foo.bar=1", "unknown setting 'frozen.foo.bar' (known under frozen: embed_dim, hidden, dropout, "
                         "feature_cache)"),
    ("lr.x=1", "unknown setting 'lr.x'"),
    ("losses.csa.rte=1", "unknown loss setting 'csa.rte' (known under csa.: enabled, rate, tau, mode, form, reduction)"),
    ("tau=0.3", "unknown setting 'tau'"),
    ("csa=0.1", "loss setting csa must be a mapping, got 0.1"),
    ("csa.mode=mul", "loss setting csa: mode must be one of each|add|dot, got 'mul'"),
    ("csa.tau.init=5", "loss setting csa.tau: temperature needs 0 < min <= init <= max"),
    ("loss=all", "loss must be one of contrastive, csa, usa, cusa, got 'all'"),
])
def test_a_bad_setting_is_one_line_naming_the_key(item, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolved(item)


def test_a_setting_given_twice_in_one_layer_is_refused():
    with pytest.raises(ValueError, match=re.escape("loss setting csa.rate is given twice")):
        apply_overrides(TrainConfig(), {"csa.rate": 0.1, "losses": {"csa": {"rate": 0.2}}})
    with pytest.raises(ValueError, match=re.escape("setting soft_labels.mode is given twice")):
        apply_overrides(TrainConfig(), {"soft_labels.mode": "sparse", "soft_labels": {"mode": "dense"}})


def test_the_loss_term_set_applies_first_so_explicit_switches_beside_it_win():
    cfg = apply_overrides(TrainConfig(), {"usa.enabled": True, "loss": "csa"})
    assert cfg.losses.terms == ("contrastive", "csa", "usa")
    assert apply_overrides(TrainConfig(), {"loss": "contrastive"}).losses.terms == ("contrastive",)


def test_overrides_never_change_the_mapping_they_are_given():
    updates = {"csa": {"tau": {"max": 0.9}}, "csa.tau.init": 0.3, "soft_labels": {"mode": "sparse"}}
    before = repr(updates)
    apply_overrides(TrainConfig(), updates)
    LossConfig.from_dict({"csa": {"tau": {"max": 0.9}}, "csa.tau.init": 0.3})
    assert repr(updates) == before


def test_the_paper_values_are_the_defaults_and_the_paper_preset_of_a_fine_tuned_student():
    paper = flat_settings(PAPER)
    defaults = flat_settings(TrainConfig().to_dict())
    loss_defaults = flat_settings(LossConfig().to_dict())
    preset = resolved()
    for key, value in paper.items():
        assert defaults[key] == value and preset[key] == value, key
    loss_keys = [key for key in paper if key.split(".")[0] in LossConfig.__dataclass_fields__]
    assert loss_keys and all(loss_defaults[key] == paper[key] for key in loss_keys)
    assert {k: v for k, v in PRESETS["paper"].items() if k != STUDENT_DEFAULTS_KEY} == PAPER
    # the region preset keeps the paper's temperatures and changes what its appendix changes
    sgr = resolved(preset="sgraf-paper", flags={"student": "sgr:grid:efficientnet-lite0"})
    assert sgr["csa.tau.init"] == sgr["usa.tau_texts.init"] == 0.45 and sgr["contrastive.tau.max"] == 0.10
    assert (sgr["csa.rate"], sgr["usa.rate"], sgr["lr"], sgr["epochs"], sgr["itr.reduction"]) == (0.6, 0.75, 2e-4, 40,
                                                                                                   "mean")
