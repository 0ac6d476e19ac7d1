"""`cusa-train`'s loop: contrastive + CSA + USA, soft labels streamed from the teacher cache.

Read top to bottom: set up (data joined to the cache, soft-label source, student, loss, optimizer),
then per epoch: train, validate, checkpoint. No teacher model is ever built here.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pipeline.distributed import DistContext, autocast, init_distributed, resolve_device, shutdown_distributed
from teacher_cache.soft_labels import SoftLabelSource
from teacher_cache.store import Store
from train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from train.checkpoint import rng_state as _rng_state
from train.checkpoint import set_rng_state as _set_rng_state
from train.chunk_order import chunk_local_batches
from train.config import TrainConfig, resolved_losses
from train.data import (RowNames, TrainingPairs, drop_images, epoch_batches, join_pairs, load_config_split,
                        pair_loader)
from train.evaluation_set import evaluate_retrieval, evaluation_inputs
from train.features import default_feature_cache, run_frozen_features  # noqa: F401 (re-exported)
from train.losses import CusaLoss
from train.optim import describe_lr_plan, group_lrs, lr_plan, parameter_groups
from train.resume import CONFIG_FILE, check_resumable, record_resume, resume_history, run_config
from train.metrics_log import MetricsLogger
from train.regions import region_data
from train.students import REGION_KINDS, FeatureStudent, OpenClipStudent, parse_student_spec
from train.teacher_rows import plan_teacher_rows
from train.vocab import Vocabulary

CHECKPOINT_LAST = "last.pt"
CHECKPOINT_BEST = "best.pt"


# ---------------------------------------------------------------------------------------------- setup
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_student(cfg_student: str, frozen_opts: dict, image_dim: int | None = None,
                  text_dim: int | None = None, weights_from_checkpoint: bool = False, *,
                  region_opts: dict | None = None, vocab: Vocabulary | None = None,
                  cross_head: str = "reference") -> torch.nn.Module:
    """The student a spec names; ``weights_from_checkpoint``: its weights are loaded next, so pretrained ones are
    not fetched first. Frozen students need their feature widths; region students (sgr/saf) the width of a region
    feature (``image_dim``), their sizes (``region_opts``, RegionConfig's fields) and the vocabulary."""
    spec = parse_student_spec(cfg_student)
    if spec.kind in REGION_KINDS:
        from train.region_students import RegionStudent

        opts = region_opts or {}
        sizes = {k: opts[k] for k in ("word_dim", "embed_dim", "sim_dim", "sgr_steps", "smooth", "dropout",
                                      "pooling", "uni_dim", "length_groups") if k in opts}
        student = RegionStudent(spec.kind, image_dim, len(vocab), **sizes)
        student.vocab = vocab
        return student
    if spec.kind == "frozen":
        return FeatureStudent(image_dim, text_dim, embed_dim=frozen_opts["embed_dim"], hidden=frozen_opts["hidden"],
                              dropout=frozen_opts["dropout"])
    return OpenClipStudent.from_spec(spec, weights_from_checkpoint=weights_from_checkpoint, cross_head=cross_head)


# ---------------------------------------------------------------------------------------------- checkpoints
# Checkpoint files and RNG states live in train/checkpoint.py: every reader goes through its load_checkpoint, which
# never unpickles arbitrary objects (a shared run folder must not run its author's code).


def _cosine_lambda(total_steps: int, lr: float, min_lr: float):
    def fn(step: int) -> float:
        t = min(step, total_steps) / max(total_steps, 1)
        return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))) / lr
    return fn


# ---------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig, resume: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Train one run into ``cfg.out``; returns its summary (also written as summary.json)."""
    device_kind = "cuda" if cfg.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    ctx = init_distributed(device_kind)
    try:
        summary = _train(cfg, ctx, resume, show_progress)
    except BaseException:
        # a failing rank must not wait in a shutdown barrier its peers never reach (they would hang on their
        # next collective): leave the group and let torchrun stop the others
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        raise
    shutdown_distributed(ctx)
    return summary


def _train(cfg: TrainConfig, ctx: DistContext, resume: bool, show_progress: bool) -> dict[str, Any]:
    device = resolve_device(cfg.device, ctx)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    out = Path(cfg.out)
    show = show_progress and ctx.is_main
    last_path = out / CHECKPOINT_LAST
    # checked on every rank (one shared folder), so no rank goes on to wait for a peer that refused
    if not resume and last_path.exists():
        raise ValueError(f"{out}: already holds a run (last.pt); pass --resume to continue it or choose another --out")
    # a resume keeps the run's settings: anything else the command asks for is refused before any work
    resume_changes = check_resumable(out, run_config(out), cfg) if resume else {}
    seed_everything(cfg.seed + ctx.rank)

    # data joined to the cache: refuses stores built from other data, other teachers or unfinished builds
    manifest = load_config_split(cfg, cfg.data, cfg.split, progress=show)
    cache = Store.open(cfg.cache, require_complete=True)
    image_store = Store.open(cfg.image_cache, require_complete=True) if cfg.image_cache else cache
    text_store = Store.open(cfg.text_cache, require_complete=True) if cfg.text_cache else cache
    stores = list({str(s.path): s for s in (cache, image_store, text_store)}.values())
    pairs = join_pairs(manifest, stores)
    soft = None
    # teacher rows dense in memory or streamed chunk-locally, by the memory budget (train/teacher_rows.py)
    rows_plan = plan_teacher_rows(cfg.soft_labels, cfg.losses.needs_teacher, pairs, image_store, text_store)
    rows_plan.note_short_window(cfg.batch_size * ctx.world_size)
    if rows_plan.stream and cfg.sampler != "random":
        rows_plan.reason += f"; the {cfg.sampler} sampler's batches are not chunk-local, expect slower reads"
    if show:  # (with --json the plan is in summary.json only)
        tqdm.write(rows_plan.describe(), file=sys.stderr)
    if cfg.losses.needs_teacher:
        soft = SoftLabelSource(image_store, text_store, mode=cfg.soft_labels.mode, k=cfg.soft_labels.k,
                               stream=rows_plan.stream, device=device, max_memory_bytes=rows_plan.budget_bytes)

    spec = parse_student_spec(cfg.student)
    region = spec.kind in REGION_KINDS
    if region and cfg.gather and ctx.enabled:
        raise ValueError(f"{cfg.student}: --set gather=true is for dual encoders; a region student scores the pairs "
                         "of each rank's own batch")
    train_feats = train_regions = vocab = None
    backbone_passes = 0
    if spec.kind == "frozen":
        # images the cache skipped are skipped by the backbones too; pairs of any image they cannot read are dropped
        fs = run_frozen_features(cfg, cfg.data, cfg.split, manifest, [cache], cfg.device, show,
                                 "skip" if pairs.dropped else cfg.on_bad_image)
        pairs = drop_images(pairs, fs.skipped)
        backbone_passes += int(fs.computed)
        img_f, txt_f = torch.from_numpy(fs.images).to(device), torch.from_numpy(fs.texts).to(device)
        train_feats = (img_f, txt_f)
        student = build_student(cfg.student, vars(cfg.frozen), img_f.shape[1], txt_f.shape[1])
    elif region:
        vocab = Vocabulary.build((c.text for c in manifest.captions), cfg.region.min_count)
        # images the cache skipped are skipped by the grid backbone too; pairs of any image it cannot read are dropped
        train_regions = region_data(cfg, cfg.data, cfg.split, manifest, vocab, show,
                                    "skip" if pairs.dropped else cfg.on_bad_image)
        pairs = drop_images(pairs, train_regions.features.skipped)
        backbone_passes += int(train_regions.features.computed)
        student = build_student(cfg.student, vars(cfg.frozen), train_regions.features.region_dim,
                                region_opts=vars(cfg.region), vocab=vocab)
    else:
        student = build_student(cfg.student, vars(cfg.frozen), weights_from_checkpoint=resume and last_path.exists(),
                                cross_head=cfg.cross_head)
    val = None
    if cfg.val_data:
        # images a store lists as skipped (and, for a frozen student, those its features lack) are left out
        val = evaluation_inputs(cfg, cfg.val_data, cfg.val_split, [cache, image_store], device, show,
                                cfg.on_bad_image, vocab=vocab)
        backbone_passes += val.backbone_passes
    if not cfg.losses.usa.enabled:
        # without USA nothing reaches the uni heads; frozen, they keep DDP from waiting for their gradients
        for head in (student.uni_head_v, student.uni_head_t):
            head.requires_grad_(False)
    student.to(device)
    loss_fn = CusaLoss(resolved_losses(cfg)).to(device)
    model = student
    if ctx.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)

    # pretrained backbone and new parameters (adapters, heads, temperatures) each at their own lr (train/optim.py)
    # the fused kernel updates every tensor in one pass: on a CPU it makes a frozen student's whole step ~40% faster
    optimizer = torch.optim.AdamW(parameter_groups(student, loss_fn, cfg), lr=cfg.lr, fused=True)
    temps = [p for p in loss_fn.parameters() if p.requires_grad]
    if cfg.sampler == "teacher-neighbors":
        from train.samplers import neighbor_batches, pair_neighbor_table

        pair_neighbors = pair_neighbor_table(pairs, text_store)

        def make_batches(epoch: int, rank: int) -> list[np.ndarray]:
            return neighbor_batches(pair_neighbors, cfg.batch_size, cfg.seed, epoch, cfg.sampler_group, rank,
                                    ctx.world_size)
    elif rows_plan.stream:
        def make_batches(epoch: int, rank: int) -> list[np.ndarray]:
            return chunk_local_batches(rows_plan.units.unit_of_pair, cfg.batch_size, cfg.seed, epoch,
                                       rows_plan.window, rank, ctx.world_size, image_of_pair=pairs.image_rows)
    else:
        def make_batches(epoch: int, rank: int) -> list[np.ndarray]:
            return epoch_batches(len(pairs), cfg.batch_size, cfg.seed, epoch, rank, ctx.world_size)
    steps_per_epoch = len(make_batches(0, ctx.rank))
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data}: {len(pairs)} training pairs cannot fill one batch of {cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs  # a run extended on resume: its cosine runs on to the new end
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_lambda(total_steps, cfg.lr, cfg.min_lr))
    lrs = lr_plan(optimizer, cfg)

    # epochs are numbered from 1 everywhere (console, metrics.jsonl, checkpoints, summary.json): "epoch" in a
    # checkpoint is the number of epochs it has finished
    epochs_done, best, seconds_before, pending = 0, {"epoch": None, "rsum": -1.0, "metrics": None}, 0.0, None
    partial: dict | None = None  # a mid-epoch checkpoint's place: {"epoch" (its number), "steps" done, "sums"}
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        if vocab is not None and ckpt.get("vocab") not in (None, vocab.to_dict()):
            raise ValueError(f"{last_path}: the run's word vocabulary differs from the one these training captions "
                             "give (other --data or region.min_count?); resume with the run's settings")
        student.load_state_dict(ckpt["student"])
        loss_fn.load_state_dict(ckpt["loss"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        epochs_done = ckpt["epoch"]
        if cfg.epochs < epochs_done:
            raise ValueError(f"{out}: the run has trained {epochs_done} epochs; --epochs {cfg.epochs} cannot "
                             "shorten it")
        best = ckpt["best"]
        pending = ckpt.get("pending_validation")  # the epoch trained, its validation not finished
        partial = ckpt.get("partial_epoch")  # --save-every-steps: part of the next epoch trained
        seconds_before = float(ckpt.get("seconds", 0.0))
        rng = ckpt["rng"]
        if isinstance(rng, list):  # one state per rank; a run resumed on fewer or more ranks reuses rank 0's
            rng = rng[ctx.rank] if ctx.rank < len(rng) else rng[0]
        _set_rng_state(rng)
    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            record_resume(out, epochs_done, resume_changes)
        else:
            _write_json(out / CONFIG_FILE, cfg.to_dict())
        if vocab is not None:
            _write_json(out / "vocab.json", vocab.to_dict())
        if metrics_path.exists():
            # a fresh run starts the log anew; a resumed one drops what the interrupted epoch had logged
            _truncate_jsonl(metrics_path, epochs_done, keep_steps_of_last=pending is not None,
                            resume_step=epochs_done * steps_per_epoch + partial["steps"] if partial else None)
    if show:
        tqdm.write(f"lr        {describe_lr_plan(lrs)}, cosine over {cfg.epochs} epochs", file=sys.stderr)
    logger = MetricsLogger(out, cfg.report_to) if ctx.is_main else None
    t_run = time.perf_counter()
    val_skipped: list = []

    def state(epochs_finished: int) -> dict:
        """What every checkpoint holds: the model, optimizer and schedule after ``epochs_finished`` epochs (and,
        for a mid-epoch one, the steps its "partial_epoch" says)."""
        return {"student": student.state_dict(), "loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epochs_finished, "format": CHECKPOINT_FORMAT,
                "config": cfg.to_dict(), "student_spec": cfg.student, "dims": _student_dims(student),
                # a region student's word ids: evaluation needs the same ones
                **({"vocab": vocab.to_dict()} if vocab is not None else {})}

    def finish_epoch(number: int, record: dict, saved: bool = False) -> None:
        """Validate (when there is validation data) and checkpoint the epoch ``number`` that has trained."""
        nonlocal best, val_skipped
        base = state(number)
        if val is not None and not saved:
            # last.pt first: a failure while validating (an unreadable image, say) loses no training, and a resume
            # redoes only the validation
            rng = _every_rank_rng(ctx)
            if ctx.is_main:
                save_checkpoint(last_path, {**base, "best": best, "rng": rng, "pending_validation": record,
                                            "seconds": seconds_before + time.perf_counter() - t_run})
        if val is not None and ctx.is_main:
            result = evaluate_retrieval(student, val.manifest, device, cfg.eval_batch_size, cfg.workers,
                                        feats=val.feats, known_skipped=val.known_skipped,
                                        on_bad_image=cfg.on_bad_image, names=val.names, coco_1k=False,
                                        regions=val.regions)
            record["val"] = result.metrics["all"]
            if result.skipped and len(result.skipped) != len(val_skipped) and show:
                tqdm.write(f"validation leaves out {len(result.skipped)} unreadable image(s): "
                           f"{result.skipped[0].path} ({result.skipped[0].reason})", file=sys.stderr)
            val_skipped = result.skipped
            if record["val"]["rsum"] > best["rsum"]:
                best = {"epoch": number, "rsum": record["val"]["rsum"], "metrics": record["val"]}
        elif val is None:
            best = {"epoch": number, "rsum": None, "metrics": None}  # no validation: the last epoch is kept
        rng = _every_rank_rng(ctx)  # each rank's RNG (dropout, augmentation) continues where it was on resume
        if ctx.is_main:
            logger.log(record)
            payload = {**base, "best": best, "rng": rng, "seconds": seconds_before + time.perf_counter() - t_run}
            # best.pt first: a kill between the two writes leaves last.pt at the previous epoch (or its validation),
            # which a resume redoes, so best.pt never lags behind the "best" that last.pt records
            if best["epoch"] == number:
                save_checkpoint(out / CHECKPOINT_BEST, payload)
            save_checkpoint(last_path, payload)
            if show:
                msg = f"epoch {number}/{cfg.epochs}: loss {record.get('loss', float('nan')):.4f}"
                if "val" in record:
                    msg += f"  val rsum {record['val']['rsum']:.1f} (best {best['rsum']:.1f} @ {best['epoch']})"
                tqdm.write(msg, file=sys.stderr)
        ctx.barrier()

    if pending is not None:
        finish_epoch(epochs_done, pending, saved=True)
    for epoch in range(epochs_done, cfg.epochs):
        number = epoch + 1
        model.train()
        batches = make_batches(epoch, ctx.rank)
        n_batches = len(batches)
        if cfg.gather and ctx.enabled:
            # the loss sees every rank's rows in rank order (as all_gather concatenates them): so must the teacher
            every_rank = [make_batches(epoch, r) for r in range(ctx.world_size)]
            loss_batches = [np.concatenate(parts) for parts in zip(*every_rank)]
        else:
            loss_batches = batches
        # resumed from a mid-epoch checkpoint: the batches it had trained on are skipped, its loss sums go on
        skip = partial["steps"] if partial is not None and partial["epoch"] == number else 0
        batches, loss_batches = batches[skip:], loss_batches[skip:]
        if spec.kind == "frozen":
            inputs = ((train_feats[0][torch.as_tensor(pairs.image_rows[b])],
                       train_feats[1][torch.as_tensor(pairs.caption_rows[b])]) for b in batches)
        elif region:
            inputs = (train_regions.batch(pairs.image_rows[b], pairs.caption_rows[b], device) for b in batches)
        else:
            names = RowNames(pairs.store_image_rows[str(cache.path)], f"store {cache.path}")
            # each pair's augmentation drawn from (seed, epoch, pair): the same wherever the epoch (re)started
            inputs = ((im.to(device, non_blocking=True), tok.to(device, non_blocking=True)) for im, tok in
                      pair_loader(pairs, batches, student.preprocess_train, student.tokenize, cfg.workers, names,
                                  sample_seed=(cfg.seed * 1_000_003 + epoch) * 64 + ctx.rank))
        block_rows = [_store_rows(pairs, image_store, text_store, b) for b in loss_batches]
        blocks = soft.blocks(block_rows) if soft is not None else iter(lambda: (None, None), 0)
        sums: dict[str, float] = dict(partial["sums"]) if skip else {}
        bar = tqdm(total=n_batches, initial=skip, desc=f"epoch {number}/{cfg.epochs}", disable=not show,
                   dynamic_ncols=True, leave=False)
        t_epoch = time.perf_counter()
        for step, (b, (x_img, x_txt), (t_ii, t_tt)) in enumerate(zip(batches, inputs, blocks), start=skip):
            t0 = time.perf_counter()
            image_ids = torch.as_tensor(pairs.image_rows[b], device=device)
            with autocast(device):
                emb = model(x_img, x_txt)
            if region:  # the student scored the batch's pairs itself
                terms = loss_fn.forward_similarity(emb["sims"], emb["image_uni"], emb["text_uni"], image_ids, t_ii,
                                                   t_tt)
            else:
                if cfg.gather and ctx.enabled:
                    emb, image_ids = _gather(emb, image_ids)
                terms = loss_fn(emb["image_cross"], emb["text_cross"], emb["image_uni"], emb["text_uni"], image_ids,
                                t_ii, t_tt)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if ctx.enabled:
                _average_gradients(temps, ctx.world_size)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_fn.clamp_()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if ctx.is_main and (step % cfg.log_every == 0 or step == n_batches - 1):
                record = {"kind": "step", "epoch": number, "step": epoch * steps_per_epoch + step,
                          **{k: float(v.detach()) for k, v in terms.items()}, **loss_fn.temperatures(),
                          "lr": scheduler.get_last_lr()[0], "lr_groups": group_lrs(optimizer),
                          "step_time": time.perf_counter() - t0}
                logger.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.4f}")
            if cfg.save_every_steps and (epoch * steps_per_epoch + step + 1) % cfg.save_every_steps == 0 \
                    and step + 1 < n_batches:  # (an epoch's last step is checkpointed by finish_epoch)
                rng = _every_rank_rng(ctx)
                if ctx.is_main:
                    save_checkpoint(last_path, {
                        **state(epoch), "best": best, "rng": rng, "seconds": seconds_before + time.perf_counter() - t_run,
                        "partial_epoch": {"epoch": number, "steps": step + 1, "sums": dict(sums)}})
        bar.close()
        epoch_record = {"kind": "epoch", "epoch": number, **{k: v / max(n_batches, 1) for k, v in sums.items()},
                        **loss_fn.temperatures(), "lr": scheduler.get_last_lr()[0], "lr_groups": group_lrs(optimizer),
                        "epoch_time": time.perf_counter() - t_epoch}
        finish_epoch(number, epoch_record)
    if logger is not None:
        logger.close()

    history = resume_history(out) if ctx.is_main else []
    summary = {"out": str(out), "epochs": cfg.epochs, "steps": total_steps, "best_epoch": best["epoch"],
               "best_val": best["metrics"], "train_pairs": len(pairs), "dropped_pairs": len(pairs.dropped),
               "skipped_samples": len(manifest.skipped_samples),
               "seconds": seconds_before + time.perf_counter() - t_run, "backbone_passes": backbone_passes,
               "teacher_passes": 0, "loss_terms": list(cfg.losses.terms), "lr_groups": lrs, "device": device,
               "world_size": ctx.world_size, "resumes": len(history),
               "checkpoint": str(out / (CHECKPOINT_BEST if (out / CHECKPOINT_BEST).exists() else CHECKPOINT_LAST))}
    if val is not None:
        summary["val_skipped_images"] = len(val_skipped)
    summary.update(rows_plan.summary(soft.peak_memory_bytes() if soft is not None else None,
                                     soft.chunk_stats() if soft is not None else None, cfg.sampler,
                                     cfg.epochs - epochs_done))
    if ctx.is_main:
        _write_json(out / "summary.json", summary)
    return summary


def _every_rank_rng(ctx: DistContext):
    """This process's RNG state, or under DDP every rank's (a collective: every rank calls it)."""
    rng = _rng_state()
    if ctx.enabled:
        every_rng: list = [None] * ctx.world_size
        dist.all_gather_object(every_rng, rng)
        return every_rng
    return rng


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _student_dims(student) -> dict:
    if isinstance(student, FeatureStudent):
        return {"image_dim": student.image_dim, "text_dim": student.text_dim}
    if getattr(student, "vocab", None) is not None:  # a region student: region feature width and vocabulary size
        return {"image_dim": student.region_dim, "vocab_size": student.vocab_size}
    return {}


def _store_rows(pairs: TrainingPairs, image_store: Store, text_store: Store, b: np.ndarray):
    return (pairs.store_image_rows[str(image_store.path)][pairs.image_rows[b]],
            pairs.store_caption_rows[str(text_store.path)][pairs.caption_rows[b]])


class _AllGather(torch.autograd.Function):
    """Concatenate equal-sized rows of every rank; the backward pass returns each rank the gradient of its own
    rows summed over every rank's loss (every rank computes the loss on the gathered batch)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * n:(rank + 1) * n]


def _gather(emb: dict[str, torch.Tensor], image_ids: torch.Tensor):
    """All-gather embeddings (with gradient) and image ids across ranks."""
    gathered = {k: _AllGather.apply(v) for k, v in emb.items()}
    ids = [torch.empty_like(image_ids) for _ in range(dist.get_world_size())]
    dist.all_gather(ids, image_ids.contiguous())
    return gathered, torch.cat(ids)


def _average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average the temperatures' gradients over ranks: DDP syncs only the student's, and ranks whose losses
    differ would otherwise drift apart."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)


def _truncate_jsonl(path: Path, epochs_done: int, keep_steps_of_last: bool = False,
                    resume_step: int | None = None) -> None:
    """Keep only the records of the first ``epochs_done`` epochs (0: none), rewritten atomically. With
    ``keep_steps_of_last`` the last of them trained but was not validated: its step records stay and its epoch
    record (written after validation) goes. With ``resume_step`` (a mid-epoch checkpoint) the next epoch's step
    records before that run-wide step stay too."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        epoch = record.get("epoch", epochs_done + 1)
        unvalidated = keep_steps_of_last and epoch == epochs_done and record.get("kind") == "epoch"
        trained_before_checkpoint = (resume_step is not None and epoch == epochs_done + 1
                                     and record.get("kind") == "step" and record.get("step", resume_step) < resume_step)
        if (epoch <= epochs_done and not unvalidated) or trained_before_checkpoint:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
