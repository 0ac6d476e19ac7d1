"""Evaluate a trained run (its best checkpoint) or a checkpoint file on an annotation split."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.distributed import resolve_device
from teacher_cache.errors import StoreError
from teacher_cache.store import Store
from train.config import TrainConfig
from train.data import load_config_split
from train.evaluate import evaluate_embeddings
from train.students import parse_student_spec
from train.trainer import (CHECKPOINT_BEST, CHECKPOINT_LAST, build_student, embed_for_retrieval, frozen_inputs,
                           load_checkpoint)


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
    student = build_student(cfg.student, vars(cfg.frozen), dims.get("image_dim"), dims.get("text_dim"))
    student.load_state_dict(ckpt["student"])
    return student.to(device).eval(), cfg, ckpt


SOURCE_OPTIONS = ("format", "image_root", "image_key", "caption_key", "id_field")


def with_source_options(cfg: TrainConfig, options: dict | None) -> TrainConfig:
    """The run's config with how to read a dataset (format, image root, shard layout) overridden where ``options``
    gives a value; the run's own values stand for the rest."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = set(given) - set(SOURCE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown source option(s) {', '.join(sorted(unknown))}; known: {', '.join(SOURCE_OPTIONS)}")
    return dataclasses.replace(cfg, **given) if given else cfg


def evaluate_run(run: str | Path, data: str, split: str = "test", device: str = "auto", batch_size: int = 256,
                 workers: int = 2, progress: bool = True, uni: bool = False,
                 source_options: dict | None = None) -> dict:
    """Retrieval recalls of a run's checkpoint on one split of ``data`` (annotations or shards), read as the run's
    config says unless ``source_options`` ({format, image_root, image_key, caption_key, id_field}) overrides it."""
    device = resolve_device(device)
    checkpoint = resolve_checkpoint(run)
    student, cfg, ckpt = load_trained_student(checkpoint, device)
    cfg = with_source_options(cfg, source_options)
    manifest = load_config_split(cfg, data, split)
    feats = None
    backbone_passes = 0  # frozen backbones run only when their features are not cached yet
    if parse_student_spec(cfg.student).kind == "frozen":
        reuse = []
        try:
            reuse.append(Store.open(cfg.cache))
        except StoreError:
            pass  # the training cache may not travel with the checkpoint; features are then computed
        img_f, txt_f, computed = frozen_inputs(cfg, data, split, manifest.fingerprint(), reuse, device, progress)
        backbone_passes = int(computed)
        feats = (img_f, txt_f)
    img, txt = embed_for_retrieval(student, manifest, device, batch_size, workers, feats, uni=uni)
    metrics = evaluate_embeddings(img, txt, manifest.caption_image_rows())
    result = {**metrics["all"], "split": split, "images": len(manifest.images), "captions": len(manifest.captions),
              "checkpoint": str(checkpoint), "epoch": int(ckpt.get("epoch", -1)) + 1,
              "backbone_passes": backbone_passes, "skipped_samples": len(manifest.skipped_samples)}
    if "coco_1k" in metrics:
        result["coco_1k"] = metrics["coco_1k"]
    return result
