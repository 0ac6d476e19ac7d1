"""Evaluate a trained run (its best checkpoint) or a checkpoint file on an annotation split, alone or as an ensemble
of two runs whose similarity matrices are averaged (SGRAF = SGR + SAF; any two students)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.distributed import resolve_device
from pipeline.manifest import Manifest
from teacher_cache.errors import StoreError
from teacher_cache.store import Store
from train.config import TrainConfig
from train.data import load_split
from train.evaluate import evaluate_embeddings, evaluate_similarity
from train.students import REGION_KINDS, parse_student_spec
from train.trainer import (CHECKPOINT_BEST, CHECKPOINT_LAST, build_student, embed_for_retrieval, frozen_inputs,
                           load_checkpoint, region_inputs, score_for_retrieval)
from train.vocab import Vocabulary


def resolve_checkpoint(run: str | Path) -> Path:
    """A run folder means its best checkpoint (chosen on validation), or its last without validation data."""
    p = Path(run)
    if p.is_dir():
        for name in (CHECKPOINT_BEST, CHECKPOINT_LAST):
            if (p / name).is_file():
                return p / name
        raise ValueError(f"{p}: no checkpoint ({CHECKPOINT_BEST} or {CHECKPOINT_LAST}) in this run folder")
    if not p.is_file():
        raise ValueError(f"{p}: no such run folder or checkpoint file")
    return p


def load_trained_student(checkpoint: Path, device: str):
    ckpt = load_checkpoint(checkpoint)
    if "student" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{checkpoint}: not a cusa-train checkpoint")
    cfg = TrainConfig.from_dict({k: v for k, v in ckpt["config"].items()})
    dims = ckpt.get("dims", {})
    vocab = None
    if parse_student_spec(cfg.student).kind in REGION_KINDS:
        if "vocab" not in ckpt:
            raise ValueError(f"{checkpoint}: a region student's checkpoint without its word vocabulary")
        vocab = Vocabulary.from_dict(ckpt["vocab"])
    student = build_student(cfg.student, vars(cfg.frozen), dims.get("image_dim"), dims.get("text_dim"),
                            region_opts=vars(cfg.region), vocab=vocab)
    student.load_state_dict(ckpt["student"])
    return student.to(device).eval(), cfg, ckpt


def refuse_region_student(run: str | Path, what: str) -> None:
    """ValueError (one line) when ``run`` holds a region student, for evaluations that need embeddings of both
    modalities (region students score pairs)."""
    checkpoint = resolve_checkpoint(run)
    student = (load_checkpoint(checkpoint).get("config") or {}).get("student", "")
    if parse_student_spec(student).kind in REGION_KINDS if student else False:
        raise ValueError(f"{checkpoint}: {what}; a region student ({student}) scores image-caption pairs and has "
                         "none")


@dataclass
class ScoredRun:
    """One checkpoint's view of an evaluation split: embeddings (dual encoders) or pair scores (region students)."""

    checkpoint: Path
    ckpt: dict
    cfg: TrainConfig
    manifest: Manifest
    backbone_passes: int
    image_emb: torch.Tensor | None = None
    text_emb: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # [N_img, N_txt]

    def similarity(self) -> torch.Tensor:
        """The image × caption similarity matrix (float32, CPU): the cosine matrix of a dual encoder's embeddings."""
        if self.scores is None:
            self.scores = (self.image_emb.float() @ self.text_emb.float().T).cpu()
        return self.scores

    def metrics(self) -> dict:
        rows = self.manifest.caption_image_rows()
        if self.image_emb is not None:
            return evaluate_embeddings(self.image_emb, self.text_emb, rows)
        return evaluate_similarity(self.scores, rows)


def score_run(run: str | Path, data: str, split: str, device: str, batch_size: int = 256, workers: int = 2,
              progress: bool = True, uni: bool = False) -> ScoredRun:
    """Load a run's checkpoint and embed (or, for region students, score every pair of) the split."""
    checkpoint = resolve_checkpoint(run)
    student, cfg, ckpt = load_trained_student(checkpoint, device)
    manifest = load_split(data, split, cfg.format, cfg.image_root)
    kind = parse_student_spec(cfg.student).kind
    if kind in REGION_KINDS:
        if uni:
            raise ValueError(f"{checkpoint}: a region student has no uni-modal caption-to-image ranking")
        regions, computed = region_inputs(cfg, data, split, manifest, student.vocab, progress)
        scores = score_for_retrieval(student, regions, device, cfg.region, progress)
        return ScoredRun(checkpoint, ckpt, cfg, manifest, int(computed), scores=scores)
    feats = None
    backbone_passes = 0  # frozen backbones run only when their features are not cached yet
    if kind == "frozen":
        reuse = []
        try:
            reuse.append(Store.open(cfg.cache))
        except StoreError:
            pass  # the training cache may not travel with the checkpoint; features are then computed
        img_f, txt_f, computed = frozen_inputs(cfg, data, split, manifest.fingerprint(), reuse, device, progress)
        backbone_passes = int(computed)
        feats = (img_f, txt_f)
    img, txt = embed_for_retrieval(student, manifest, device, batch_size, workers, feats, uni=uni)
    return ScoredRun(checkpoint, ckpt, cfg, manifest, backbone_passes, image_emb=img, text_emb=txt)


def evaluate_run(run: str | Path, data: str, split: str = "test", device: str = "auto", batch_size: int = 256,
                 workers: int = 2, progress: bool = True, uni: bool = False,
                 ensemble: str | Path | None = None) -> dict:
    """Recalls of a run on ``data`` [``split``]; with ``ensemble`` (a second run), of the average of the two runs'
    similarity matrices, with each member's own rsum under "ensemble"."""
    device = resolve_device(device)
    first = score_run(run, data, split, device, batch_size, workers, progress, uni)
    if ensemble is None:
        metrics = first.metrics()
        backbone_passes = first.backbone_passes
    else:
        second = score_run(ensemble, data, split, device, batch_size, workers, progress, uni)
        if second.manifest.fingerprint() != first.manifest.fingerprint():
            raise ValueError(f"{second.checkpoint}: reads {data} [{split}] differently from {first.checkpoint} "
                             "(another annotation format or image root), so their rows cannot be averaged")
        members = [{"checkpoint": str(m.checkpoint), "student": m.cfg.student, "rsum": m.metrics()["all"]["rsum"]}
                   for m in (first, second)]
        metrics = evaluate_similarity((first.similarity() + second.similarity()) / 2,
                                      first.manifest.caption_image_rows())
        backbone_passes = first.backbone_passes + second.backbone_passes
    manifest = first.manifest
    result = {**metrics["all"], "split": split, "images": len(manifest.images), "captions": len(manifest.captions),
              "checkpoint": str(first.checkpoint), "epoch": int(first.ckpt.get("epoch", -1)) + 1,
              "backbone_passes": backbone_passes}
    if ensemble is not None:
        result["ensemble"] = {"members": members, "combination": "mean of the similarity matrices"}
    if "coco_1k" in metrics:
        result["coco_1k"] = metrics["coco_1k"]
    return result
