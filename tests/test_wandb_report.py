"""`--report-to wandb` (offline, never a network): every value of metrics.jsonl in the W&B run files, read back with
wandb's own reader; a resumed run, a killed one too, continues the same W&B run and the files still hold every value;
a run that starts reporting on resume sends what it logged before; cusa-ablate makes one W&B run per grid run,
grouped by the grid; without the wandb package the option is refused in one line naming the extra."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers_report import assert_wandb_holds, wandb_offline, wandb_runs  # noqa: F401 (wandb_offline: a fixture)
from helpers_train import (KILLED_IN_THIRD_EPOCH, invoke, invoke_json, one_torch_thread, read_jsonl, subprocess_env,
                           train_args)
from train.ablate_cli import ablate_main
from train.cli import train_main
from train.metrics_log import MetricsLogger

MISSING = "Error: report_to wandb needs the wandb package, which is not installed: pip install 'cusa[wandb]'"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def only_run(folder: Path) -> tuple[str, dict]:
    runs = wandb_runs(folder)
    assert len(runs) == 1, sorted(runs)
    return next(iter(runs.items()))


def test_report_to_wandb_offline_logs_every_value_of_metrics_jsonl_to_one_run_in_the_run_folder(
        demo_dir, demo_cache, tmp_path, wandb_offline, monkeypatch):
    monkeypatch.delenv("WANDB_DIR")  # W&B's files then go to the run folder
    out = tmp_path / "run"
    invoke_json(train_main, train_args(demo_dir, demo_cache, out, "--report-to", "tensorboard,wandb",
                                       "--wandb-project", "cusa-tests", "--wandb-name", "first run", "--set",
                                       "log_every=2", epochs=2, val=True))
    records = read_jsonl(out / "metrics.jsonl")
    assert {r["kind"] for r in records} == {"step", "epoch"}
    run_id, run = only_run(out / "wandb")
    assert_wandb_holds(run["history"], records)
    assert [item["_step"] for item in run["history"]] == list(range(len(records)))
    (meta,) = run["run"]
    assert (meta["project"], meta["display_name"]) == ("cusa-tests", "first run")
    config = json.loads((out / "config.json").read_text())
    assert (config["report_to"], config["wandb_project"], config["wandb_name"]) == ("tensorboard,wandb",
                                                                                  "cusa-tests", "first run")
    assert json.loads((out / "wandb_run.json").read_text()) == {"project": "cusa-tests", "run_id": run_id,
                                                                "records": len(records), "step": len(records)}
    assert (out / "tensorboard").is_dir()  # both targets
    assert not any(wandb_offline.iterdir())


def test_resumes_continue_the_same_wandb_run_and_after_a_kill_it_still_holds_every_value(demo_dir, demo_cache,
                                                                                          tmp_path, wandb_offline):
    out = tmp_path / "run"
    args = train_args(demo_dir, demo_cache, out, "--report-to", "wandb", "--set", "log_every=1", epochs=1, val=True)
    invoke_json(train_main, args)
    first_id, run = only_run(wandb_offline)
    assert_wandb_holds(run["history"], read_jsonl(out / "metrics.jsonl"))  # before any resume

    # killed in epoch 3: the W&B service of the process goes with it, and what it had not written to its files yet
    # (epoch 2's records, which metrics.jsonl keeps) is lost
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_THIRD_EPOCH, "1", *args, "--resume", "--epochs", "3"],
                            capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    summary = invoke_json(train_main, ["--out", out, "--resume", "--wandb-name", "renamed", "--json"])
    assert summary["epochs"] == 3 and summary["resumes"] == 2

    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3]
    run_id, run = only_run(wandb_offline)
    assert run_id == first_id and run["files"] >= 2  # one W&B run: the first process's file and the last's
    assert_wandb_holds(run["history"], records)
    steps = [item["_step"] for item in run["history"]]
    assert steps == sorted(set(steps))  # W&B's step never went back, across the processes
    assert run["run"][-1]["display_name"] == "renamed"
    assert json.loads((out / "resumes.jsonl").read_text().splitlines()[-1])["changed"] == {
        "wandb_name": [None, "renamed"]}
    assert json.loads((out / "wandb_run.json").read_text())["records"] == len(records)


def test_a_run_that_reports_to_wandb_from_a_resume_on_sends_what_it_logged_before(demo_dir, demo_cache, tmp_path,
                                                                                   wandb_offline):
    out = tmp_path / "run"
    invoke_json(train_main, train_args(demo_dir, demo_cache, out, epochs=1))
    assert not (out / "wandb_run.json").exists() and not any(wandb_offline.iterdir())
    invoke_json(train_main, ["--out", out, "--resume", "--epochs", "2", "--report-to", "wandb", "--json"])
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    _, run = only_run(wandb_offline)
    assert_wandb_holds(run["history"], records)


def test_a_wandb_run_is_continued_only_on_resume_in_its_project_and_a_new_one_gets_every_record(tmp_path,
                                                                                               wandb_offline):
    logged = [{"kind": "step", "epoch": 1, "step": 0, "loss": 2.5, "lr_groups": {"heads": 1e-3}},
              {"kind": "epoch", "epoch": 1, "loss": 2.0, "val": {"rsum": 300.0}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
    more = [{"kind": "step", "epoch": 2, "step": 1, "loss": 1.5}, {"kind": "step", "epoch": 2, "step": 2, "loss": 1.0}]

    def session(project: str, resumed: bool, record: dict) -> str:
        with MetricsLogger(tmp_path, "wandb", {"wandb_project": project}, resumed=resumed) as logger:
            logger.log(record)
        return json.loads((tmp_path / "wandb_run.json").read_text())["run_id"]

    first = session("a", True, more[0])  # no W&B run yet: a new one, sent the records logged before
    assert session("a", True, more[1]) == first  # continued, nothing sent twice
    moved = session("b", True, {"kind": "epoch", "epoch": 2, "loss": 1.2})  # another project: a new run there
    records = read_jsonl(tmp_path / "metrics.jsonl")
    fresh = session("b", False, {"kind": "step", "epoch": 3, "step": 3, "loss": 0.9})  # not a resume: a new run
    runs = wandb_runs(wandb_offline)
    assert len({first, moved, fresh}) == 3 and set(runs) == {first, moved, fresh}
    assert runs[first]["files"] == 2 and {r["project"] for r in runs[first]["run"]} == {"a"}
    assert [item["_step"] for item in runs[first]["history"]] == [0, 1, 2, 3]
    assert_wandb_holds(runs[first]["history"], logged + more)
    assert_wandb_holds(runs[moved]["history"], records)
    assert_wandb_holds(runs[fresh]["history"], read_jsonl(tmp_path / "metrics.jsonl"))


def test_without_the_wandb_package_report_to_wandb_is_refused_in_one_line_naming_the_extra(demo_dir, demo_cache,
                                                                                           tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python sees a package that is not installed
    out = tmp_path / "run"
    result = invoke(train_main, train_args(demo_dir, demo_cache, out, "--report-to", "tensorboard,wandb"))
    assert result.exit_code == 1 and result.output.strip().splitlines() == [MISSING]
    assert not out.exists()
    result = invoke(ablate_main, ["--data", demo_dir / "train.json", "--eval-data", demo_dir / "test.json",
                                  "--cache", demo_cache, "--out", tmp_path / "abl", "--report-to", "wandb"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [MISSING]
    assert not (tmp_path / "abl" / "runs").exists()


def test_ablation_reports_one_wandb_run_per_grid_run_grouped_by_the_grid(demo_dir, demo_cache, tmp_path,
                                                                          wandb_offline):
    out = tmp_path / "grid-a"
    args = ["--data", str(demo_dir / "train.json"), "--eval-data", str(demo_dir / "test.json"),
            "--cache", str(demo_cache), "--grid", "loss=cusa", "--seeds", "1", "--epochs", "1", "--batch-size", "32",
            "--lr", "1e-3", "--device", "cpu", "--workers", "0", "--out", str(out), "--report-to", "wandb",
            "--wandb-project", "ablations", "--set", "frozen.hidden=64", "--set", "frozen.embed_dim=64", "--json"]
    result = CliRunner().invoke(ablate_main, args)
    assert result.exit_code == 0, result.output
    runs = wandb_runs(wandb_offline)
    by_name = {run["run"][0]["display_name"]: run for run in runs.values()}
    assert set(by_name) == {"loss=contrastive-seed0", "loss=cusa-seed0"} and len(runs) == 2
    for name, run in by_name.items():
        (meta,) = run["run"]
        assert (meta["project"], meta["run_group"]) == ("ablations", "grid-a")
        assert_wandb_holds(run["history"], read_jsonl(out / "runs" / name / "metrics.jsonl"))
