"""What a run's reporting targets should hold, derived from metrics.jsonl independently of train/metrics_log.py, and
W&B's offline run files read back with wandb's own reader of its transaction log (`wandb leet inspect --json`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def expected_events(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Every number of every record, by the tags the logger documents: {tag: [(x, value), ...]} in record order,
    x being a step record's ``step`` and an epoch record's ``epoch``."""
    out: dict[str, list[tuple[int, float]]] = {}

    def walk(prefix: str, step: int, d: dict, skip: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}/{k}", step, v, "")
            elif isinstance(v, (int, float)) and k not in ("kind", skip):
                out.setdefault(f"{prefix}/{k}", []).append((step, float(v)))

    for r in records:
        if r["kind"] == "step":
            walk("train", r["step"], r, "step")
        else:
            walk("epoch", r["epoch"], r, "epoch")
    return out


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch) -> Path:
    """W&B kept off every network and out of the home folder: offline mode, its folders under tmp; the folder its
    run files go to (WANDB_DIR) is returned."""
    wandb_dir = tmp_path / "wandb-dir"
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", wandb_dir), ("WANDB_CONFIG_DIR", tmp_path / "wb-cfg"),
                        ("WANDB_CACHE_DIR", tmp_path / "wb-cache"), ("WANDB_DATA_DIR", tmp_path / "wb-data"),
                        ("WANDB_ERROR_REPORTING", "false"), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(name, str(value))
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME",
                 "WANDB_RUN_GROUP"):
        monkeypatch.delenv(name, raising=False)
    wandb_dir.mkdir()
    return wandb_dir


def wandb_runs(folder: Path) -> dict[str, dict]:
    """Every W&B run whose offline files lie under ``folder``: run id -> {"files": how many .wandb files (one per
    process that logged to it and got as far as writing), "run": its run records (project, display_name,
    run_group, config), "history": its history rows across the files, in W&B step order}."""
    runs: dict[str, dict] = {}
    for path in sorted(folder.rglob("*.wandb")):
        proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "WANDB_MODE": "offline"})
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        run_records = [r["run"] for r in lines if r["type"] == "run"]
        if not run_records:
            continue  # a killed process whose W&B service wrote nothing but the file's header
        (run_record,) = run_records
        run = runs.setdefault(run_record["run_id"], {"files": 0, "run": [], "history": []})
        run["files"] += 1
        run["run"].append(run_record)
        run["history"] += [r["history"]["item"] for r in lines if r["type"] == "history"]
    for run in runs.values():
        run["history"].sort(key=lambda item: item["_step"])
    return runs


def wandb_values(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(x, value), ...]} of the metrics in W&B history rows (train/* against ``step``, epoch/* against
    ``epoch``), a later value of the same x replacing the earlier (a resume logs its interrupted epoch again)."""
    latest: dict[str, dict[int, float]] = {}
    for item in history:
        for tag, value in item.items():
            axis = "step" if tag.startswith("train/") else "epoch" if tag.startswith("epoch/") else None
            if axis is not None:
                latest.setdefault(tag, {})[int(item[axis])] = value
    return {tag: sorted(points.items()) for tag, points in latest.items()}


def assert_wandb_holds(history: list[dict], records: list[dict]) -> None:
    """The W&B history holds every value of ``records`` (metrics.jsonl) at its x, exactly, and nothing else."""
    expected = {tag: sorted(points) for tag, points in expected_events(records).items()}
    got = wandb_values(history)
    assert set(got) == set(expected)
    for tag, points in expected.items():
        assert got[tag] == points, tag
