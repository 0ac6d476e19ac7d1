"""Resuming a run: its settings come from its folder, and a command that contradicts them is refused.

``RUN/config.json`` holds the settings a run was started with and is never rewritten. A resume may change only the
settings that say how a run is computed, not what: ``device``, ``workers``, ``eval_batch_size``, ``log_every``,
``save_every_steps``, ``report_to`` and where it reports (``wandb_project``, ``wandb_name``, ``wandb_group``);
``on_bad_image``, so that a run whose validation met an unreadable image can go on leaving it out; and ``epochs`` to
extend a run (the cosine schedule is then stretched to the new end from where the run stands; a run is never
shortened). Each resume appends the changes it made to ``RUN/resumes.jsonl``, so a later resume continues with
them and `cusa-ablate` can tell an extended run from one trained for that many epochs from the start.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from train.config import TrainConfig, apply_overrides, check_schedule, explicit_settings
from train.settings import flat_settings

CONFIG_FILE = "config.json"
RESUMES_FILE = "resumes.jsonl"
# settings a resume may change; "out" is where the run is, whatever path reaches it
RESUMABLE = ("epochs", "device", "workers", "eval_batch_size", "log_every", "report_to", "on_bad_image",
             "save_every_steps", "wandb_project", "wandb_name", "wandb_group", "store_cache", "store_cache_gib")
# settings that do not change what a run computes (its numbers): ignored when a finished run is compared with a request
HOW_NOT_WHAT = ("out", "device", "workers", "eval_batch_size", "log_every", "report_to", "save_every_steps",
                "wandb_project", "wandb_name", "wandb_group", "store_cache", "store_cache_gib")
_PATH_SETTINGS = ("data", "cache", "val_data", "image_cache", "text_cache", "image_root", "frozen.feature_cache")


def _same(key: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if key in _PATH_SETTINGS and isinstance(a, str) and isinstance(b, str):
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False
    return False


def differences(have: TrainConfig, want: TrainConfig, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """(setting, value in ``have``, value in ``want``) for every setting that differs, in config order."""
    a, b = flat_settings(have.to_dict()), flat_settings(want.to_dict())
    return [(k, a.get(k), b.get(k)) for k in a if k not in ignore and not _same(k, a.get(k), b.get(k))]


def has_run(out: str | Path) -> bool:
    return (Path(out) / CONFIG_FILE).is_file()


def run_config(out: str | Path) -> TrainConfig:
    """The settings a run now trains with: config.json plus the changes its resumes made."""
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{out}: no run to resume here (no {CONFIG_FILE}); start it without --resume")
    try:
        cfg = TrainConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}); the run's settings cannot be read") from None
    for record in resume_history(out):
        cfg = apply_overrides(cfg, {k: new for k, (_, new) in record.get("changed", {}).items()})
    return apply_overrides(cfg, {"out": str(out)})


def resume_history(out: str | Path) -> list[dict]:
    path = Path(out) / RESUMES_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    return records


def extended_epochs(out: str | Path) -> int | None:
    """The epochs a run was started with when a resume has changed them since (None: never changed)."""
    for record in resume_history(out):
        if "epochs" in record.get("changed", {}):
            return int(record["changed"]["epochs"][0])
    return None


def resume_config(out: str, preset: str | None = None, config_file: str | None = None,
                  flags: Mapping[str, Any] | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The run in ``out`` with what the command asks for on top; refused (one line naming the first setting) when
    the command contradicts a setting a resume cannot change."""
    saved = run_config(out)
    if preset is not None and preset != saved.preset:
        raise ValueError(_refusal(out, "preset", saved.preset, preset))
    cfg = saved
    for layer in explicit_settings(config_file, flags, overrides):
        cfg = apply_overrides(cfg, {k: v for k, v in layer.items() if k != "out"})
    check_resumable(out, saved, check_schedule(cfg))
    return cfg


def check_resumable(out: str | Path, saved: TrainConfig, cfg: TrainConfig) -> dict[str, list]:
    """The resumable settings ``cfg`` changes ({key: [old, new]}); ValueError for any other difference."""
    changed = {}
    for key, old, new in differences(saved, cfg, ignore=("out",)):
        if key not in RESUMABLE:
            raise ValueError(_refusal(out, key, old, new))
        changed[key] = [old, new]
    return changed


def _refusal(out: str | Path, key: str, old: Any, new: Any) -> str:
    return (f"{out}: --resume continues the run with its own settings, and {key} is {json.dumps(old)} there but "
            f"{json.dumps(new)} in this command; leave it out (the settings are in {Path(out) / CONFIG_FILE}) or "
            "start a new run in another --out")


def record_resume(out: str | Path, epochs_done: int, changed: dict[str, list]) -> None:
    with open(Path(out) / RESUMES_FILE, "a") as f:
        f.write(json.dumps({"epochs_done": epochs_done, "changed": changed}) + "\n")
