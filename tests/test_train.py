"""Training configuration (preset, files, flags, --set) and the training loop on the demo cache: checkpoints, best
epoch chosen on validation, metrics, clamped temperatures, and a resume after a kill that reproduces an
uninterrupted run bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_train import (TEMPERATURE_RANGES, invoke, invoke_json, one_torch_thread, read_jsonl, run_script,
                           subprocess_env, train_args, without_timings)
from helpers_train import KILLED_IN_THIRD_EPOCH, assert_identical
from train.cli import train_main
from train.config import TrainConfig, build_config

PAIRS = 210  # demo train split: 42 images × 5 captions
TAU_MAX = 0.052  # the main run narrows the contrastive clamp so that it visibly engages within a few steps


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


# ================================================================================================ configuration
def test_paper_preset_holds_the_reference_values_of_method_md():
    cfg = build_config("paper", flags={"student": "open_clip:ViT-B-32:openai"})
    loss = cfg.losses
    assert (loss.contrastive.tau.init, loss.contrastive.tau.min, loss.contrastive.tau.max) == (0.05, 0.01, 0.10)
    assert (loss.csa.tau.init, loss.csa.tau.min, loss.csa.tau.max) == (0.45, 0.10, 0.99)
    for tau in (loss.usa.tau_images, loss.usa.tau_texts):
        assert (tau.init, tau.min, tau.max) == (0.45, 0.10, 1.00)
    assert all(t.learnable for t in (loss.contrastive.tau, loss.csa.tau, loss.usa.tau_images, loss.usa.tau_texts))
    assert loss.tau_soft == 1.0
    assert (loss.contrastive.rate, loss.csa.rate, loss.usa.rate) == (1.0, 0.1, 0.5)
    assert (cfg.lr, cfg.weight_decay, cfg.min_lr, cfg.head_lr) == (1e-5, 1e-4, 1e-6, None)
    assert (cfg.batch_size, cfg.epochs, cfg.gather) == (128, 30, False)
    assert (loss.csa.mode, loss.csa.form, loss.contrastive.reduction) == ("each", "kl", "mean")
    assert cfg.loss == "cusa" and loss.terms == ("contrastive", "csa", "usa")


@pytest.mark.parametrize("loss, terms", [
    ("contrastive", ("contrastive",)),
    ("csa", ("contrastive", "csa")),
    ("usa", ("contrastive", "usa")),
    ("cusa", ("contrastive", "csa", "usa")),
])
def test_loss_choice_switches_the_terms(loss, terms):
    assert build_config("paper", flags={"loss": loss}).losses.terms == terms
    assert build_config("paper", overrides=[f"loss={loss}"]).losses.terms == terms
    assert build_config("paper", flags={"loss": loss}).losses.needs_teacher == (loss != "contrastive")


def test_set_overrides_reach_loss_soft_label_and_top_level_settings():
    cfg = build_config("paper", overrides=["csa.rate=0.2", "soft_labels.mode=sparse", "csa.tau.max=0.9",
                                           "soft_labels.k=4", "gather=true", "frozen.dropout=0",
                                           "usa.tau_texts=0.3", "contrastive.reduction=sum", "epochs=3"])
    assert cfg.losses.csa.rate == 0.2
    assert (cfg.losses.csa.tau.init, cfg.losses.csa.tau.min, cfg.losses.csa.tau.max) == (0.45, 0.10, 0.9)
    assert (cfg.soft_labels.mode, cfg.soft_labels.k) == ("sparse", 4)
    assert cfg.gather is True and cfg.frozen.dropout == 0.0 and cfg.epochs == 3
    assert (cfg.losses.usa.tau_texts.init, cfg.losses.usa.tau_texts.max) == (0.3, 1.0)  # bare number: init only
    assert cfg.losses.contrastive.reduction == "sum"


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_config_files_in_yaml_and_json_set_nested_and_dotted_keys(tmp_path, suffix):
    settings = {"epochs": 7, "csa": {"rate": 0.25, "tau": {"max": 0.8}}, "usa.rate": 0.7,
                "soft_labels": {"mode": "sparse", "k": 5}, "frozen": {"hidden": 64}}
    path = tmp_path / f"run.{suffix}"
    if suffix == "yaml":
        import yaml

        path.write_text(yaml.safe_dump(settings))
    else:
        path.write_text(json.dumps(settings))
    cfg = build_config("paper", str(path))
    assert cfg.epochs == 7 and cfg.frozen.hidden == 64
    assert (cfg.losses.csa.rate, cfg.losses.csa.tau.max, cfg.losses.usa.rate) == (0.25, 0.8, 0.7)
    assert (cfg.soft_labels.mode, cfg.soft_labels.k) == ("sparse", 5)
    assert cfg.lr == 1e-3  # untouched settings keep the preset's values (for the default, frozen student)


def test_precedence_is_preset_then_file_then_flags_then_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1.0e-4\nepochs: 5\nbatch_size: 64\nloss: csa\ncsa:\n  rate: 0.3\n")
    cfg = build_config("paper", str(path), flags={"lr": 1e-3, "batch_size": None, "loss": "cusa"},
                       overrides=["lr=0.02"])
    assert cfg.lr == 0.02  # --set beats the flag, the file and the preset
    assert cfg.epochs == 5 and cfg.batch_size == 64  # the file beats the preset; an unset flag changes nothing
    assert cfg.loss == "cusa" and cfg.losses.terms == ("contrastive", "csa", "usa")  # the flag beats the file
    assert cfg.losses.csa.rate == 0.3 and cfg.weight_decay == 1e-4
    assert build_config("paper", str(path)).losses.terms == ("contrastive", "csa")


@pytest.mark.parametrize("item, message", [
    ("foo=1", "unknown setting 'foo'"),
    ("data.root=x", "unknown setting 'data.root'"),
    ("soft_labels.modes=sparse", "unknown setting 'soft_labels.modes' (known under soft_labels: mode, k, stream, max_memory_mib, window)"),
    ("csa.rat=0.2", "unknown loss setting 'csa.rat' (known under csa.: enabled, rate, tau,"),
    ("lr=fast", "setting lr must be a number, got 'fast'"),
    ("csa.rate", "--set 'csa.rate': expected KEY=VALUE, e.g. csa.rate=0.2"),
    ("soft_labels.mode=topk", "soft_labels.mode must be dense or sparse, got 'topk'"),
    ("csa.tau.max=0.3", "temperature needs 0 < min <= init <= max, got init=0.45 min=0.1 max=0.3"),
])
def test_bad_settings_are_refused_with_a_one_line_message_naming_the_key(item, message):
    with pytest.raises(ValueError) as err:
        build_config("paper", overrides=[item])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"csa": {"rate": 0.2}, "learning_rate": 0.1}))
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        build_config("paper", str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON"):
        build_config("paper", str(path))


def test_unknown_setting_at_the_cli_is_a_one_line_error(demo_dir, demo_cache, tmp_path):
    result = invoke(train_main, train_args(demo_dir, demo_cache, tmp_path / "run", "--set", "csa.rat=0.2"))
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: unknown loss setting 'csa.rat' (known under csa.: enabled, rate, tau, mode, form, reduction)"]
    assert not (tmp_path / "run").exists()


def test_a_saved_config_reloads_exactly_including_terms_switched_off_by_hand():
    cfg = build_config("paper", flags={"loss": "cusa"}, overrides=["usa.enabled=false", "csa.rate=0.2"])
    assert cfg.losses.terms == ("contrastive", "csa")
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


# ================================================================================================ a full run
@pytest.fixture(scope="module")
def cli_run(demo_dir, demo_cache, tmp_path_factory) -> tuple[Path, dict]:
    """Four epochs through the installed `cusa-train` script, validated on the demo val split."""
    out = tmp_path_factory.mktemp("train") / "run"
    proc = run_script("cusa-train", train_args(demo_dir, demo_cache, out, "--set", f"contrastive.tau.max={TAU_MAX}",
                                               epochs=4, val=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)


def test_cli_run_writes_checkpoints_metrics_config_and_summary(cli_run):
    out, summary = cli_run
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.json", "summary.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["epochs"] == 4 and summary["train_pairs"] == PAIRS and summary["dropped_pairs"] == 0
    assert summary["steps"] == 4 * 7  # 210 pairs in batches of 32: six full and one of 18
    assert summary["teacher_passes"] == 0 and summary["world_size"] == 1 and summary["device"] == "cpu"
    assert summary["loss_terms"] == ["contrastive", "csa", "usa"]
    assert summary["checkpoint"] == str(out / "best.pt")
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 4 and last["student_spec"] == "frozen:efficientnet-lite0+minilm-l6"
    assert set(last) >= {"student", "loss", "optimizer", "scheduler", "rng", "best", "config"}


def test_best_checkpoint_is_the_epoch_with_the_highest_validation_rsum(cli_run):
    out, summary = cli_run
    epochs = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]  # numbered from 1, as on the console
    rsums = [r["val"]["rsum"] for r in epochs]
    best_epoch = rsums.index(max(rsums)) + 1  # the first of equal maxima: a later tie is not an improvement
    assert summary["best_epoch"] == best_epoch
    assert summary["best_val"] == epochs[best_epoch - 1]["val"]
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == best_epoch and best["best"]["rsum"] == max(rsums)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["best"]["epoch"] == best_epoch
    same_weights = all(torch.equal(best["student"][k], last["student"][k]) for k in last["student"])
    assert same_weights == (best_epoch == 4)
    assert max(rsums) > 300  # the student learned to retrieve (random ranking of 9 images gives ~150)


def test_metrics_log_every_term_temperatures_lr_step_time_and_val_recalls(cli_run):
    out, _ = cli_run
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [0, 6, 7, 13, 14, 20, 21, 27]  # every 10th step and each epoch's last
    for r in steps + epochs:
        assert {"loss", "contrastive", "csa", "usa", "lr", *TEMPERATURE_RANGES, "tau_soft"} <= set(r)
        assert r["loss"] == pytest.approx(r["contrastive"] + r["csa"] + r["usa"], rel=1e-5)
        assert r["contrastive"] > 0 and r["csa"] > 0 and r["usa"] > 0 and r["tau_soft"] == 1.0
    assert all(r["step_time"] > 0 for r in steps) and all(r["epoch_time"] > 0 for r in epochs)
    # cosine from 1e-3 down to the frozen student's min_lr 1e-4, reached at the last step; one group of new parameters
    lrs = [r["lr"] for r in steps]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-3 and lrs[-1] == pytest.approx(1e-4)
    assert all(r["lr_groups"] == {"heads": r["lr"]} for r in steps + epochs)
    for r in epochs:
        val = r["val"]
        assert all(0 <= val[k] <= 100 for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"))
        assert val["rsum"] == pytest.approx(sum(v for k, v in val.items() if k != "rsum"))
    assert epochs[-1]["loss"] < epochs[0]["loss"]


def test_temperatures_stay_inside_their_clamp_ranges(cli_run):
    out, _ = cli_run
    records = read_jsonl(out / "metrics.jsonl")
    ranges = {**TEMPERATURE_RANGES, "tau": (0.01, TAU_MAX)}
    for r in records:
        for name, (lo, hi) in ranges.items():
            assert lo <= r[name] <= hi + 1e-7, (name, r[name])
    # the contrastive temperature rises with lr 1e-3 and is held at its (narrowed) maximum
    assert max(r["tau"] for r in records) == pytest.approx(TAU_MAX)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert 0.01 <= float(last["loss"]["taus.tau.value"]) <= TAU_MAX


def test_resolved_config_is_saved_in_the_run_folder(cli_run, demo_dir):
    out, _ = cli_run
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 1e-3 and saved["epochs"] == 4 and saved["batch_size"] == 32
    assert saved["val_data"] == str(demo_dir / "val.json") and saved["preset"] == "paper"
    assert saved["contrastive"]["tau"]["max"] == TAU_MAX and saved["csa"]["rate"] == 0.1
    assert saved["soft_labels"] == {"mode": "dense", "k": None, "stream": None, "max_memory_mib": 8192.0, "window": 0}
    assert TrainConfig.from_dict(saved).to_dict() == saved


def test_a_new_run_into_a_folder_holding_last_pt_is_refused_without_resume(cli_run, demo_dir, demo_cache):
    out, _ = cli_run
    before = (out / "last.pt").read_bytes()
    result = invoke(train_main, train_args(demo_dir, demo_cache, out, epochs=4, val=True))
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {out}: already holds a run (last.pt); pass --resume to continue it or choose another --out"]
    assert (out / "last.pt").read_bytes() == before


def test_contrastive_plus_csa_run_leaves_usa_off(demo_dir, demo_cache, tmp_path):
    summary = invoke_json(train_main, train_args(demo_dir, demo_cache, tmp_path / "run", "--loss", "csa", epochs=1))
    assert summary["loss_terms"] == ["contrastive", "csa"]
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(r["usa"] == 0.0 and r["csa"] > 0 for r in records)
    assert all("tau_usa_images" not in r and "tau_csa" in r for r in records)


def test_streamed_soft_labels_train_exactly_like_in_memory_ones_and_sparse_ones_stay_finite(demo_dir, demo_cache,
                                                                                         tmp_path):
    def run(name: str, *extra: str) -> list[dict]:
        invoke_json(train_main, train_args(demo_dir, demo_cache, tmp_path / name, *extra, epochs=1))
        return without_timings(read_jsonl(tmp_path / name / "metrics.jsonl"))

    dense = run("dense")
    assert run("stream", "--set", "soft_labels.stream=true") == dense
    sparse = run("sparse", "--set", "soft_labels.mode=sparse", "--set", "soft_labels.k=4")
    assert json.loads((tmp_path / "sparse" / "config.json").read_text())["soft_labels"]["k"] == 4
    assert all(np.isfinite(r[t]) and r[t] > 0 for r in sparse for t in ("loss", "csa", "usa"))
    # same student, same first batch: the contrastive term does not see the teacher, CSA and USA do
    assert sparse[0]["contrastive"] == dense[0]["contrastive"]
    assert sparse[0]["csa"] != pytest.approx(dense[0]["csa"]) and sparse[0]["usa"] != pytest.approx(dense[0]["usa"])


# ================================================================================================ resume
def test_resume_after_a_kill_reproduces_the_uninterrupted_run_bit_for_bit(demo_dir, demo_cache, tmp_path):
    threads = torch.get_num_threads()  # the killed process computes with as many threads as this one
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    invoke_json(train_main, train_args(demo_dir, demo_cache, straight, epochs=4, val=True))

    proc = subprocess.run([sys.executable, "-c", KILLED_IN_THIRD_EPOCH, str(threads),
                           *train_args(demo_dir, demo_cache, resumed, epochs=4, val=True)],
                          capture_output=True, text=True, timeout=300,
                          env=subprocess_env(OMP_NUM_THREADS=str(threads)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = torch.load(resumed / "last.pt", map_location="cpu", weights_only=True)
    assert killed["epoch"] == 2
    assert any(r["epoch"] == 3 for r in read_jsonl(resumed / "metrics.jsonl"))  # logged by the lost epoch

    summary = invoke_json(train_main, train_args(demo_dir, demo_cache, resumed, "--resume", epochs=4, val=True))
    assert summary["steps"] == 28
    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(resumed / "last.pt", map_location="cpu", weights_only=True)
    assert b["epoch"] == 4
    for key in ("student", "loss", "optimizer", "scheduler", "best", "rng"):
        assert_identical(a[key], b[key], key)
    best_a = torch.load(straight / "best.pt", map_location="cpu", weights_only=True)
    best_b = torch.load(resumed / "best.pt", map_location="cpu", weights_only=True)
    assert best_a["epoch"] == best_b["epoch"]
    assert_identical(best_a["student"], best_b["student"], "best.student")
    # the log holds each epoch once, with the same numbers (timings aside)
    assert without_timings(read_jsonl(straight / "metrics.jsonl")) == without_timings(
        read_jsonl(resumed / "metrics.jsonl"))
