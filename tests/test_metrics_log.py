"""`--report-to tensorboard`: every value of metrics.jsonl as a TensorBoard scalar, read back from the event files;
the event files rebuilt from metrics.jsonl (the source of truth) when a run starts; cusa-ablate's per-seed-pair
gains and one TensorBoard folder per run; and what pairing by seed relies on: a seed's run trains alike whether its
features were cached before or computed during the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers_report import expected_events
from helpers_train import invoke, invoke_json, one_torch_thread, read_jsonl, train_args
from train.ablate import Setting, aggregate, results_markdown
from train.ablate_cli import ablate_main
from train.cli import train_main
from train.metrics_log import MetricsLogger, scalars


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def read_events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same(events: dict, expected: dict) -> None:
    assert set(events) == set(expected)
    for tag, points in expected.items():
        got = events[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert np.allclose([v for _, v in got], [v for _, v in points], rtol=1e-6, atol=1e-7), tag


def test_report_to_tensorboard_writes_every_value_of_metrics_jsonl(demo_dir, demo_cache, tmp_path):
    out = tmp_path / "run"
    invoke_json(train_main, train_args(demo_dir, demo_cache, out, "--report-to", "tensorboard", "--set",
                                       "log_every=2", epochs=2, val=True))
    records = read_jsonl(out / "metrics.jsonl")
    assert {r["kind"] for r in records} == {"step", "epoch"}
    events = read_events(out / "tensorboard")
    expected = expected_events(records)
    assert {"train/loss", "train/csa", "train/usa", "train/tau", "train/lr", "train/step_time", "train/epoch",
            "epoch/loss", "epoch/val/rsum", "epoch/val/t2i_r1", "epoch/tau_csa", "epoch/lr"} <= set(expected)
    assert_same(events, expected)
    assert json.loads((out / "config.json").read_text())["report_to"] == "tensorboard"


def test_without_report_to_no_event_files_are_written(demo_dir, demo_cache, tmp_path):
    out = tmp_path / "run"
    invoke_json(train_main, train_args(demo_dir, demo_cache, out, epochs=1))
    assert not (out / "tensorboard").exists() and (out / "metrics.jsonl").stat().st_size > 0


def test_event_files_are_rebuilt_from_metrics_jsonl_dropping_stale_events(tmp_path):
    records = [{"kind": "step", "epoch": 0, "step": 0, "loss": 2.5, "tau": 0.05, "lr": 1e-3},
               {"kind": "epoch", "epoch": 0, "loss": 2.0, "val": {"rsum": 300.0, "i2t_r1": 40.0}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"torn')
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tensorboard")) as stale:  # an interrupted epoch's events, not in the JSONL
        stale.add_scalar("epoch/loss", 9.0, global_step=1)
        stale.add_scalar("epoch/other", 1.0, global_step=1)
    later = {"kind": "epoch", "epoch": 1, "loss": 1.5, "val": {"rsum": 320.0, "i2t_r1": 45.0}}
    with MetricsLogger(tmp_path, "tensorboard") as logger:
        logger.log(later)
    assert_same(read_events(tmp_path / "tensorboard"), expected_events(records + [later]))
    assert read_jsonl_tolerant(tmp_path / "metrics.jsonl")[-1] == later


def read_jsonl_tolerant(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_scalars_name_nested_values_by_their_path_and_use_the_record_axis():
    prefix, x, values = scalars({"kind": "epoch", "epoch": 3, "loss": 1.0, "val": {"rsum": 2.0}, "note": "x"})
    assert (prefix, x, values) == ("epoch", 3, {"epoch/loss": 1.0, "epoch/val/rsum": 2.0})


def test_an_unknown_report_target_is_a_one_line_error(demo_dir, demo_cache, tmp_path):
    result = invoke(train_main, train_args(demo_dir, demo_cache, tmp_path / "run", "--report-to", "mlflow"))
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: report_to: unknown target 'mlflow' (known: none, tensorboard, wandb)"]


# ================================================================================================ cusa-ablate
def test_paired_gain_is_the_mean_and_std_of_same_seed_differences():
    base = [{"seed": s, **{k: v for k, v in zip(KEYS, row)}} for s, row in enumerate(BASE)]
    cusa = [{"seed": s, **{k: v for k, v in zip(KEYS, row)}} for s, row in enumerate(CUSA)]
    settings = [Setting("loss=contrastive", {"loss": "contrastive"}, base), Setting("loss=cusa", {"loss": "cusa"},
                                                                                    cusa[::-1])]
    rows = aggregate(settings)
    assert rows[0]["paired_gain"] is None  # the baseline itself
    p = rows[1]["paired_gain"]
    diffs = np.array(CUSA) - np.array(BASE)
    assert p["pairs"] == 3 and p["seeds"] == [0, 1, 2]
    for j, k in enumerate(KEYS):
        assert p["mean"][k] == pytest.approx(diffs[:, j].mean())
        assert p["std"][k] == pytest.approx(diffs[:, j].std(ddof=1))
        assert p["positive"][k] == int((diffs[:, j] > 0).sum())
    assert p["per_seed"] == {"0": pytest.approx(diffs[0, -1]), "1": pytest.approx(diffs[1, -1]),
                             "2": pytest.approx(diffs[2, -1])}
    # the unpaired gain of means is the same number; its spread is not
    assert rows[1]["gain"]["rsum"] == pytest.approx(p["mean"]["rsum"])
    md = results_markdown({"settings": rows, "seeds": 3, "eval_split": "test", "eval_data": "t.json", "seconds": 1,
                           "counts": {"runs": 6, "trained": 6, "resumed": 0, "skipped_finished": 0,
                                      "teacher_passes": 0, "backbone_passes": 0}})
    rsum = diffs[:, -1]
    assert f"| {rsum.mean():+.1f} ± {rsum.std(ddof=1):.1f} ({int((rsum > 0).sum())}/3) |" in md
    assert "| loss=cusa | 3 |" in md


KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
BASE = [[40, 70, 80, 30, 60, 70, 350], [50, 75, 85, 35, 65, 75, 385], [45, 72, 82, 33, 62, 72, 366]]
CUSA = [[42, 71, 80, 31, 62, 70, 356], [49, 76, 86, 36, 66, 76, 389], [47, 72, 83, 32, 63, 73, 370]]


def test_ablation_reports_paired_gains_and_writes_one_tensorboard_folder_per_run(demo_dir, demo_cache, tmp_path):
    out = tmp_path / "abl"
    args = ["--data", str(demo_dir / "train.json"), "--eval-data", str(demo_dir / "test.json"),
            "--cache", str(demo_cache), "--grid", "loss=cusa", "--seeds", "1", "--epochs", "1", "--batch-size", "32",
            "--lr", "1e-3", "--device", "cpu", "--workers", "0", "--out", str(out), "--report-to", "tensorboard",
            "--set", "frozen.hidden=64", "--set", "frozen.embed_dim=64", "--json"]
    result = CliRunner().invoke(ablate_main, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    base, cusa = payload["settings"]
    assert base["name"] == "loss=contrastive" and cusa["paired_gain"]["pairs"] == 1
    assert cusa["paired_gain"]["mean"]["rsum"] == pytest.approx(cusa["rsum_per_seed"][0] - base["rsum_per_seed"][0])
    assert cusa["paired_gain"]["std"]["rsum"] is None  # one pair: no spread
    for name in ("loss=contrastive-seed0", "loss=cusa-seed0"):
        run = out / "runs" / name
        assert_same(read_events(run / "tensorboard"), expected_events(read_jsonl(run / "metrics.jsonl")))
    assert "paired rsum gain" in (out / "results.md").read_text()


def test_a_run_trains_alike_whether_its_validation_features_are_computed_now_or_cached(demo_dir, demo_cache,
                                                                                       tmp_path):
    import torch

    features = tmp_path / "features"  # a fresh feature cache: the first run computes the validation features
    outs = [tmp_path / "computing", tmp_path / "cached"]
    for out in outs:
        summary = invoke_json(train_main, train_args(demo_dir, demo_cache, out, "--set",
                                                     f"frozen.feature_cache={features}", epochs=1, val=True))
        assert summary["backbone_passes"] == (1 if out == outs[0] else 0)
    a, b = (torch.load(out / "last.pt", map_location="cpu", weights_only=False)["student"] for out in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)
