"""Students are built and loaded here: `build_student` makes the model a run's settings name, every checkpoint
records what it takes to make it again (`checkpoint_state`), and `load_trained_student` does so from a run folder or a
checkpoint file. Nothing here imports the training loop (train/trainer.py): evaluation, `load_model` and `cusa-eval`
load a trained student without it.

A run folder holds RUN/last.pt, written after every epoch (and every ``--save-every-steps`` optimizer steps), and
RUN/best.pt, the epoch that scored best on validation (without validation data, every epoch is the best so far).
Files are read and written by train/checkpoint.py, which never unpickles arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from train.config import TrainConfig
from train.student_kinds import kind_of
from train.vocab import Vocabulary

CHECKPOINT_LAST = "last.pt"
CHECKPOINT_BEST = "best.pt"


def build_student(cfg: TrainConfig, dims: dict | None = None, vocab: Vocabulary | None = None,
                  weights_from_checkpoint: bool = False) -> torch.nn.Module:
    """The student ``cfg.student`` names (its kind: train/student_kinds.py). ``dims``: the sizes a checkpoint records
    (a frozen student's feature widths, a region student's region width); ``vocab``: a region student's word ids;
    ``weights_from_checkpoint``: its weights are loaded next, so pretrained ones are not fetched first."""
    return kind_of(cfg.student).build(cfg, dims or {}, vocab, weights_from_checkpoint)


def checkpoint_state(cfg: TrainConfig, student: torch.nn.Module, loss_fn: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler: Any, epochs: int,
                     vocab: Vocabulary | None = None) -> dict[str, Any]:
    """What every checkpoint holds: the model, loss temperatures, optimizer and schedule after ``epochs`` finished
    epochs (numbered from 1), the run's settings and what `load_trained_student` needs to build the student again.
    The trainer adds where the run stands: "best", "rng", "seconds", and "pending_validation" or "partial_epoch"."""
    return {"student": student.state_dict(), "loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epochs, "format": CHECKPOINT_FORMAT,
            "config": cfg.to_dict(), "student_spec": cfg.student, "dims": kind_of(cfg.student).dims(student),
            # a region student's word ids: evaluation needs the same ones
            **({"vocab": vocab.to_dict()} if vocab is not None else {})}


def resolve_checkpoint(run: str | Path) -> Path:
    """A run folder means its best checkpoint (chosen on validation; without validation data every epoch is the
    best so far, so best.pt is the last epoch's weights), else its last."""
    p = Path(run)
    if p.is_dir():
        for name in (CHECKPOINT_BEST, CHECKPOINT_LAST):
            if (p / name).is_file():
                return p / name
        raise ValueError(f"{p}: no checkpoint ({CHECKPOINT_BEST} or {CHECKPOINT_LAST}) in this run folder")
    if not p.is_file():
        raise ValueError(f"{p}: no such run folder or checkpoint file")
    return p


def load_trained_student(checkpoint: Path, device: str) -> tuple[torch.nn.Module, TrainConfig, dict[str, Any]]:
    """(the student in eval mode on ``device``, the run's settings, the checkpoint) of a checkpoint file."""
    ckpt = load_checkpoint(checkpoint)  # refuses a file without the keys every checkpoint has
    student, cfg = student_from_checkpoint(ckpt, checkpoint, device)
    return student, cfg, ckpt


def student_from_checkpoint(ckpt: dict[str, Any], checkpoint: Path, device: str) -> tuple[torch.nn.Module, TrainConfig]:
    """(the student in eval mode on ``device``, the run's settings) of a checkpoint already read from ``checkpoint``."""
    cfg = TrainConfig.from_dict(dict(ckpt["config"]))
    vocab = kind_of(cfg.student).recorded_vocab(ckpt, checkpoint)
    student = build_student(cfg, ckpt.get("dims", {}), vocab, weights_from_checkpoint=True)
    student.load_state_dict(ckpt["student"])
    return student.to(device).eval(), cfg
