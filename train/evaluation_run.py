"""Evaluate a trained run (its best checkpoint) or a checkpoint file on an annotation split."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.distributed import resolve_device
from teacher_cache.errors import StoreError
from teacher_cache.store import Store
from train.config import TrainConfig
from train.evaluation_set import evaluate_retrieval, evaluation_inputs
from train.trainer import CHECKPOINT_BEST, CHECKPOINT_LAST, build_student, load_checkpoint


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


def load_trained_student(checkpoint: Path, device: str):
    ckpt = load_checkpoint(checkpoint)
    if "student" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{checkpoint}: not a cusa-train checkpoint")
    cfg = TrainConfig.from_dict({k: v for k, v in ckpt["config"].items()})
    dims = ckpt.get("dims", {})
    student = build_student(cfg.student, vars(cfg.frozen), dims.get("image_dim"), dims.get("text_dim"),
                            weights_from_checkpoint=True)
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


def _run_stores(cfg: TrainConfig) -> list[Store]:
    """The run's image stores, when they travelled with the checkpoint: their lists of skipped images, and a frozen
    student's features when its backbones are their teachers."""
    stores = []
    for path in dict.fromkeys(p for p in (cfg.cache, cfg.image_cache) if p):
        try:
            stores.append(Store.open(path))
        except StoreError:
            pass  # the training cache may not travel with the checkpoint; features are then computed
    return stores


def evaluate_run(run: str | Path, data: str, split: str = "test", device: str = "auto", batch_size: int = 256,
                 workers: int = 2, progress: bool = True, uni: bool = False, on_bad_image: str = "fail",
                 source_options: dict | None = None) -> dict:
    """Retrieval recalls of a run's checkpoint on one split of ``data`` (annotations or shards), read as the run's
    config says unless ``source_options`` ({format, image_root, image_key, caption_key, id_field}) overrides it.

    Images a store lists as skipped, and with ``on_bad_image="skip"`` any image that cannot be read, are left out
    with their captions and counted as ``skipped_images``."""
    device = resolve_device(device)
    checkpoint = resolve_checkpoint(run)
    student, cfg, ckpt = load_trained_student(checkpoint, device)
    cfg = with_source_options(cfg, source_options)
    inputs = evaluation_inputs(cfg, data, split, _run_stores(cfg), device, progress, on_bad_image)
    evaluation = evaluate_retrieval(student, inputs.manifest, device, batch_size, workers, feats=inputs.feats,
                                    known_skipped=inputs.known_skipped, on_bad_image=on_bad_image,
                                    names=inputs.names, uni=uni)
    metrics = evaluation.metrics
    result = {**metrics["all"], "split": split, "images": evaluation.images, "captions": evaluation.captions,
              "skipped_images": len(evaluation.skipped),
              "skipped_image_details": [s.to_dict() for s in evaluation.skipped],
              "checkpoint": str(checkpoint), "epoch": int(ckpt.get("epoch", 0)),
              "backbone_passes": inputs.backbone_passes, "skipped_samples": len(inputs.manifest.skipped_samples)}
    if "coco_1k" in metrics:
        result["coco_1k"] = metrics["coco_1k"]
    return result
