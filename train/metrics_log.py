"""Where a run's metrics go: ``metrics.jsonl`` (the record every tool reads) and, on request, TensorBoard and
Weights & Biases (``report_to="wandb"``, train/wandb_log.py; ``"tensorboard,wandb"`` for both).

Each record is one line of ``metrics.jsonl``; with ``report_to="tensorboard"`` every number in it is also a
TensorBoard scalar in ``RUN/tensorboard/``. Step records (``"kind": "step"``) are plotted against the global step
as ``train/<key>``; epoch records against the epoch as ``epoch/<key>``, nested values by their path
(``epoch/val/i2t_r1``). The x-axis value itself (``step`` or ``epoch``) is the scalar's step, not a scalar.

The event files are always rewritten from ``metrics.jsonl`` when a run starts or resumes, so they hold exactly what
the JSONL holds (a resumed run drops the records of its interrupted epoch from both).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

from train.wandb_log import WandbReporter, import_wandb

REPORT_CHOICES: tuple[str, ...] = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"


def parse_report_to(value: str) -> tuple[str, ...]:
    """``none``, ``tensorboard`` (or a comma-separated list, as open_clip's ``--report-to`` takes): the targets."""
    targets = tuple(t.strip() for t in str(value).split(",") if t.strip() and t.strip() != "none")
    unknown = [t for t in targets if t not in REPORT_CHOICES]
    if unknown:
        raise ValueError(f"report_to: unknown target {unknown[0]!r} (known: {', '.join(REPORT_CHOICES)})")
    return targets


def require_report_targets(value: str) -> None:
    """Refuse in one line, before any work, a target whose package is not installed (W&B is an extra)."""
    if "wandb" in parse_report_to(value):
        import_wandb()


def scalars(record: dict[str, Any]) -> tuple[str, int, dict[str, float]]:
    """(prefix, x, {tag: value}) of one metrics record: every number in it, nested keys joined with "/", under
    ``train/`` (step records) or ``epoch/`` (epoch records)."""
    step_record = record.get("kind") == "step"
    axis = "step" if step_record else "epoch"
    prefix = "train" if step_record else "epoch"
    values = {f"{prefix}/{key}": value for key, value in _numbers(record) if key not in ("kind", axis)}
    return prefix, int(record.get(axis, 0)), values


def _numbers(record: dict[str, Any], path: str = "") -> Iterator[tuple[str, float]]:
    for key, value in record.items():
        name = f"{path}{key}"
        if isinstance(value, dict):
            yield from _numbers(value, f"{name}/")
        elif isinstance(value, bool):
            yield name, float(value)
        elif isinstance(value, (int, float)):
            yield name, float(value)



def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a metrics.jsonl, in order (none when it does not exist); a line torn by a kill is left out."""
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue

class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and mirrors them to the requested reporting targets.

    ``run_config`` (the run's settings, config.json) names the W&B project, run name and group (``wandb_project``,
    ``wandb_name``, ``wandb_group``) and is the W&B run's config; ``resumed``: the run goes on, and so does its W&B
    run."""

    def __init__(self, run_dir: str | os.PathLike, report_to: str = "none",
                 run_config: Mapping[str, Any] | None = None, resumed: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.targets = parse_report_to(report_to)
        self._writer = None
        self._wandb: WandbReporter | None = None
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # a line torn by a kill stays one bad line instead of spoiling the next record
        logged = [scalars(r) for r in read_records(self.path)] if self.targets else []
        if "tensorboard" in self.targets:
            self._open_tensorboard(logged)
        if "wandb" in self.targets:
            self._wandb = WandbReporter(self.run_dir, run_config or {}, logged, resumed)

    def _open_tensorboard(self, logged: list[tuple[str, int, dict[str, float]]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.run_dir / TENSORBOARD_DIR
        if log_dir.exists():
            shutil.rmtree(log_dir)  # rebuilt from metrics.jsonl below: no stale events of an interrupted epoch
        self._writer = SummaryWriter(str(log_dir), flush_secs=30)
        for _, x, values in logged:
            self._add_scalars(x, values)
        self._writer.flush()

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.targets:
            return
        prefix, x, values = scalars(record)
        if self._writer is not None:
            self._add_scalars(x, values)
            if record.get("kind") != "step":
                self._writer.flush()  # an epoch's values are on disk when its checkpoint is
        if self._wandb is not None:
            self._wandb.log((prefix, x, values))

    def _add_scalars(self, x: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=x)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
