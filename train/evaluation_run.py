"""Evaluate a trained run (its best checkpoint) or a checkpoint file on an annotation split, alone or as an ensemble
of two runs whose similarity matrices are averaged (SGRAF = SGR + SAF; any two students)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pipeline.distributed import resolve_device
from train.checkpoint import load_checkpoint
from train.config import TrainConfig
from train.evaluate import clip_benchmark_names, evaluate_similarity
from train.evaluation_set import RetrievalEvaluation, evaluate_retrieval, evaluation_inputs, run_stores
from train.factory import load_trained_student, resolve_checkpoint
from train.students import REGION_KINDS, parse_student_spec

SOURCE_OPTIONS = ("format", "image_root", "image_key", "caption_key", "id_field", "store_cache", "store_cache_gib")


def with_source_options(cfg: TrainConfig, options: dict | None) -> TrainConfig:
    """The run's config with how to read a dataset (format, image root, shard layout) overridden where ``options``
    gives a value; the run's own values stand for the rest."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = set(given) - set(SOURCE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown source option(s) {', '.join(sorted(unknown))}; known: {', '.join(SOURCE_OPTIONS)}")
    return dataclasses.replace(cfg, **given) if given else cfg


def refuse_region_student(run: str | Path, what: str) -> None:
    """ValueError (one line) when ``run`` holds a region student, for evaluations that need embeddings of both
    modalities (region students score pairs)."""
    checkpoint = resolve_checkpoint(run)
    student = (load_checkpoint(checkpoint).get("config") or {}).get("student", "")
    if student and parse_student_spec(student).kind in REGION_KINDS:
        raise ValueError(f"{checkpoint}: {what}; a region student ({student}) scores image-caption pairs and has "
                         "none")


def _evaluate_checkpoint(checkpoint: Path, data: str, split: str, device: str, batch_size: int, workers: int,
                         progress: bool, uni: bool, on_bad_image: str, source_options: dict | None):
    """(evaluation, inputs, checkpoint dict) of one checkpoint on ``data`` [``split``]."""
    student, cfg, ckpt = load_trained_student(checkpoint, device)
    cfg = with_source_options(cfg, source_options)
    inputs = evaluation_inputs(cfg, data, split, run_stores(cfg), device, progress, on_bad_image,
                               vocab=getattr(student, "vocab", None))
    evaluation = evaluate_retrieval(student, inputs.manifest, device, batch_size, workers, feats=inputs.feats,
                                    known_skipped=inputs.known_skipped, on_bad_image=on_bad_image,
                                    names=inputs.names, uni=uni, regions=inputs.regions, progress=progress)
    return evaluation, inputs, ckpt, cfg


def _ensemble(first: RetrievalEvaluation, second: RetrievalEvaluation, checkpoints: list[Path]) -> dict:
    """The metrics of the mean of two evaluations' similarity matrices (the same images and captions ranked)."""
    same = (np.array_equal(first.kept_images, second.kept_images)
            and np.array_equal(first.kept_captions, second.kept_captions))
    if not same:
        raise ValueError(f"{checkpoints[1]}: ranks other images than {checkpoints[0]} (their runs know of other "
                         "unreadable images); evaluate each run by itself")
    return evaluate_similarity((first.similarity() + second.similarity()) / 2, first.caption_image_rows)


def evaluate_run(run: str | Path, data: str, split: str = "test", device: str = "auto", batch_size: int = 256,
                 workers: int = 2, progress: bool = True, uni: bool = False, on_bad_image: str = "fail",
                 source_options: dict | None = None, ensemble: str | Path | None = None) -> dict:
    """Retrieval recalls of a run's checkpoint on one split of ``data`` (annotations or shards), read as the run's
    config says unless ``source_options`` ({format, image_root, image_key, caption_key, id_field}) overrides it.

    Images a store lists as skipped, and with ``on_bad_image="skip"`` any image that cannot be read, are left out
    with their captions and counted as ``skipped_images``. With ``ensemble`` (a second run), the recalls of the mean
    of the two runs' image × caption similarity matrices, each run's own rsum listed under "ensemble"."""
    device = resolve_device(device)
    checkpoint = resolve_checkpoint(run)
    evaluation, inputs, ckpt, cfg = _evaluate_checkpoint(checkpoint, data, split, device, batch_size, workers,
                                                         progress, uni, on_bad_image, source_options)
    metrics = evaluation.metrics
    members = None
    if ensemble is not None:
        other = resolve_checkpoint(ensemble)
        second, second_inputs, _, second_cfg = _evaluate_checkpoint(other, data, split, device, batch_size, workers,
                                                                    progress, uni, on_bad_image, source_options)
        if second_inputs.manifest.fingerprint() != inputs.manifest.fingerprint():
            raise ValueError(f"{other}: reads {data} [{split}] differently from {checkpoint} (another annotation "
                             "format, image root or shard layout), so their rows cannot be averaged")
        members = [{"checkpoint": str(c), "student": m_cfg.student, "rsum": m.metrics["all"]["rsum"]}
                   for c, m, m_cfg in ((checkpoint, evaluation, cfg), (other, second, second_cfg))]
        metrics = _ensemble(evaluation, second, [checkpoint, other])
        inputs.backbone_passes += second_inputs.backbone_passes
    result = {**metrics["all"], **clip_benchmark_names(metrics["all"]), "split": split, "images": evaluation.images,
              "captions": evaluation.captions,
              "skipped_images": len(evaluation.skipped),
              "skipped_image_details": [s.to_dict() for s in evaluation.skipped],
              "checkpoint": str(checkpoint), "epoch": int(ckpt.get("epoch", 0)),
              "backbone_passes": inputs.backbone_passes, "skipped_samples": len(inputs.manifest.skipped_samples)}
    if members is not None:
        result["ensemble"] = {"members": members, "combination": "mean of the similarity matrices"}
    if "coco_1k" in metrics:
        result["coco_1k"] = metrics["coco_1k"]
    return result
