"""`--report-to wandb`: the records of ``metrics.jsonl`` as one Weights & Biases run, continued by every resume.

Every number of a record is logged under the tag :func:`train.metrics_log.scalars` gives it (``train/loss``,
``epoch/val/rsum``), with the record's axis beside it: step records carry ``step`` (the run-wide optimizer step) and
epoch records ``epoch``, and W&B plots ``train/*`` against ``step`` and ``epoch/*`` against ``epoch``.

``RUN/wandb_run.json`` keeps the W&B run id and project, how many records of ``metrics.jsonl`` the W&B run held when
it last closed, and W&B's next step. A ``--resume`` continues that W&B run (``resume="allow"``) and first sends the
records of ``metrics.jsonl`` it may lack: those logged while the run reported elsewhere, and those of a process that
was killed, as W&B writes its files in blocks and loses the unwritten part. W&B's step goes on from the largest one
used, never back, so an offline run and its resumes sync into one history. A resume drops the records of the
interrupted epoch from ``metrics.jsonl``, but W&B keeps what it was sent: the retrained epoch logs the same steps
again, and a step's later value is the one ``metrics.jsonl`` holds. A run started afresh, or moved to another
project, gets a new W&B run.

W&B's own settings apply as usual (``WANDB_MODE=offline``, ``WANDB_ENTITY``, ``WANDB_API_KEY``); its files go to
``RUN/wandb/`` unless ``WANDB_DIR`` names another folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

STATE_FILE = "wandb_run.json"
DEFAULT_PROJECT = "cusa"
MISSING = "report_to wandb needs the wandb package, which is not installed: pip install 'cusa[wandb]'"


def import_wandb():
    """The wandb module, or one line saying which extra brings it."""
    try:
        import wandb
    except ImportError:
        raise ValueError(MISSING) from None
    return wandb


@dataclass
class WandbState:
    """What ``RUN/wandb_run.json`` holds: the W&B run a run reports to and how far it got."""

    project: str
    run_id: str
    records: int = 0  # the W&B run held the first ``records`` records of metrics.jsonl when it last closed
    step: int = 0  # W&B's step of the next record: past every one used, whatever metrics.jsonl drops

    @classmethod
    def read(cls, run_dir: Path) -> "WandbState | None":
        try:
            d = json.loads((run_dir / STATE_FILE).read_text())
            return cls(str(d["project"]), str(d["run_id"]), int(d["records"]), int(d["step"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # none yet, or unreadable: a new W&B run

    def write(self, run_dir: Path) -> None:
        tmp = run_dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self)) + "\n")
        os.replace(tmp, run_dir / STATE_FILE)


Scalars = tuple[str, int, dict[str, float]]  # one record as train.metrics_log.scalars gives it


class WandbReporter:
    """One W&B run for the run in ``run_dir``: opened (or continued) with the records it may lack, then sent each
    new one. ``records`` are those metrics.jsonl holds already, each as its scalars."""

    def __init__(self, run_dir: Path, settings: Mapping[str, Any], records: list[Scalars], resumed: bool):
        wandb = import_wandb()
        self.run_dir = run_dir
        project = str(settings.get("wandb_project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT)
        state = WandbState.read(run_dir) if resumed else None
        if state is not None and state.project != project:
            state = None  # a run id names a run within its project: a new W&B run there, sent every record
        name = settings.get("wandb_name")
        group = settings.get("wandb_group")
        init: dict[str, Any] = {
            "project": project, "name": str(name) if name else run_dir.resolve().name,
            "group": str(group) if group else None, "job_type": "train",
            # progress bars make a poor log; metrics.jsonl and config.json are the record
            "settings": wandb.Settings(console="off"),
            # explicit: W&B reads its environment once per process, and cusa-ablate starts many runs in one
            "dir": os.environ.get("WANDB_DIR") or str(run_dir)}
        if state is not None:
            init.update(id=state.run_id, resume="allow")
        try:
            self._run = wandb.init(**init)
        except Exception as exc:  # no API key, no network in online mode, ...: one line, before any training
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"W&B: the run could not start ({reason}); WANDB_MODE=offline logs without a network "
                             "(wandb sync uploads it later)") from None
        # a resume may change settings (--epochs, --device): the W&B config follows
        self._run.config.update(dict(settings), allow_val_change=True)
        self._run.define_metric("step")
        self._run.define_metric("epoch")
        self._run.define_metric("train/*", step_metric="step")
        self._run.define_metric("epoch/*", step_metric="epoch")
        if state is None:
            state = WandbState(project, self._run.id)
        # online, W&B knows its next step; offline, each resume starts a file of its own at 0
        state.step = max(state.step, int(self._run.step or 0))
        self.state = state
        # a resume keeps a prefix of metrics.jsonl's records: as many of them as W&B held are not sent again
        self._sent = min(state.records, len(records))
        state.records = self._sent
        for record in records[self._sent:]:
            self._send(record)
        state.write(run_dir)

    def _send(self, record: Scalars) -> None:
        prefix, x, values = record
        self._run.log({**values, "step" if prefix == "train" else "epoch": x}, step=self.state.step)
        self.state.step += 1
        self._sent += 1

    def log(self, record: Scalars) -> None:
        self._send(record)
        self.state.write(self.run_dir)  # the step used: a resume after a kill starts past it

    def close(self) -> None:
        self._run.finish()  # everything sent is written (and, online, uploaded)
        # W&B's service keeps a finished run's id and its own settings while it lives: a later run of the same
        # process (cusa-ablate, a resume called from Python) starts a fresh one
        import_wandb().teardown()
        self.state.records = self._sent
        self.state.write(self.run_dir)
