"""`cusa-train`'s loop: contrastive + CSA + USA, soft labels streamed from the teacher cache.

Read top to bottom; `train` runs these steps in this order:
1. `set_up`: the data joined to the cache, the soft-label source, the student with its inputs (its kind,
   train/student_kinds.py), the loss, the optimizer and its schedule, and how each epoch is cut into batches;
2. `restore`: a resumed run's last checkpoint — weights, optimizer, schedule, random state and where it stopped;
3. `open_run_folder`: config.json (or the resume's record) and the metrics log;
4. per epoch, `train_one_epoch` (its steps and mid-epoch checkpoints), then `finish_epoch` (validate, checkpoint);
5. `summarise`: summary.json.
The student's kind turns batches into its inputs and calls the loss, so nothing here branches on it. No teacher
model is ever built here.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pipeline.distributed import DistContext, init_distributed, resolve_device, shutdown_distributed
from pipeline.manifest import FINGERPRINT_VERSION, Manifest
from teacher_cache.soft_labels import SoftLabelSource
from teacher_cache.store import Store
from train.checkpoint import load_checkpoint, save_checkpoint
from train.checkpoint import rng_state as _rng_state
from train.checkpoint import set_rng_state as _set_rng_state
from train.chunk_order import chunk_local_batches
from train.config import TrainConfig, resolved_losses
from train.data import TrainingPairs, epoch_batches, join_pairs, load_config_split, open_run_store
from train.evaluation_set import EvaluationInputs, evaluate_retrieval, evaluation_inputs
from train.factory import CHECKPOINT_BEST, CHECKPOINT_LAST, checkpoint_state
from train.features import default_feature_cache  # noqa: F401 (re-exported)
from train.losses import CusaLoss
from train.metrics_log import MetricsLogger
from train.optim import cosine_schedule, describe_lr_plan, group_lrs, lr_plan, parameter_groups
from train.resume import CONFIG_FILE, check_resumable, record_resume, resume_history, run_config
from train.samplers import neighbor_batches, pair_neighbor_table
from train.student_kinds import StudentKind, TrainingData, kind_of
from train.teacher_rows import TeacherRowsPlan, plan_teacher_rows

EpochBatches = Callable[[int, int], list[np.ndarray]]  # (epoch, rank) -> that rank's batches of pair indices


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
    run = set_up(cfg, ctx, resume, show_progress)
    progress = restore(run) if resume and run.last_path.exists() else Progress()
    logger = open_run_folder(run, progress, resume)
    progress.started = time.perf_counter()
    if progress.pending is not None:  # the last epoch trained, its validation not finished
        finish_epoch(run, progress, logger, progress.epochs_done, progress.pending, saved=True)
    for epoch in range(progress.epochs_done, cfg.epochs):
        record = train_one_epoch(run, progress, logger, epoch)
        finish_epoch(run, progress, logger, epoch + 1, record)
    if logger is not None:
        logger.close()
    return summarise(run, progress)


# ---------------------------------------------------------------------------------------------- 1. set-up
@dataclass
class Run:
    """What `set_up` builds once and every later step reads."""

    cfg: TrainConfig
    ctx: DistContext
    device: str
    show: bool  # progress on this rank's console
    manifest: Manifest
    image_store: Store  # soft labels of images come from here
    text_store: Store  # and of captions from here
    rows_plan: TeacherRowsPlan  # teacher rows in memory or streamed
    soft: SoftLabelSource | None  # None: no term needs a teacher
    kind: StudentKind  # the student, its training pairs and inputs, and how it calls the loss
    val: EvaluationInputs | None
    model: torch.nn.Module  # the student, or its DDP wrapper
    loss_fn: CusaLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: EpochBatches
    steps_per_epoch: int
    lrs: dict[str, dict]  # each parameter group's lr plan
    resume_changes: dict[str, list]  # the settings a resume changes ({key: [old, new]})

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def last_path(self) -> Path:
        return self.out / CHECKPOINT_LAST

    @property
    def student(self) -> torch.nn.Module:
        return self.kind.student

    @property
    def pairs(self) -> TrainingPairs:
        return self.kind.pairs

    @property
    def backbone_passes(self) -> int:
        return self.kind.backbone_passes + (self.val.backbone_passes if self.val is not None else 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_up(cfg: TrainConfig, ctx: DistContext, resume: bool, show_progress: bool) -> Run:
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
    cache = open_run_store(cfg, cfg.cache)  # a folder or a URL
    image_store = open_run_store(cfg, cfg.image_cache) if cfg.image_cache else cache
    text_store = open_run_store(cfg, cfg.text_cache) if cfg.text_cache else cache
    stores = list({str(s.path): s for s in (cache, image_store, text_store)}.values())
    pairs = join_pairs(manifest, stores)
    # teacher rows dense in memory or streamed chunk-locally, by the memory budget (train/teacher_rows.py)
    rows_plan = plan_teacher_rows(cfg.soft_labels, cfg.losses.needs_teacher, pairs, image_store, text_store)
    rows_plan.note_short_window(cfg.batch_size * ctx.world_size)
    if rows_plan.stream and cfg.sampler != "random":
        rows_plan.reason += f"; the {cfg.sampler} sampler's batches are not chunk-local, expect slower reads"
    if show:  # (with --json the plan is in summary.json only)
        tqdm.write(rows_plan.describe(), file=sys.stderr)
        for store in stores:
            if store.fingerprint_format < FINGERPRINT_VERSION:
                tqdm.write(f"note: {store.path} was built by an earlier cusa; `cusa-cache upgrade {store.path} --data "
                           f"{cfg.data}` spares every later command a pass over the data's rows", file=sys.stderr)
    soft = None
    if cfg.losses.needs_teacher:
        soft = SoftLabelSource(image_store, text_store, mode=cfg.soft_labels.mode, k=cfg.soft_labels.k,
                               stream=rows_plan.stream, device=device, max_memory_bytes=rows_plan.budget_bytes)

    kind = kind_of(cfg.student).for_training(TrainingData(
        cfg, manifest, pairs, cache, device, show, distributed=ctx.enabled,
        weights_from_checkpoint=resume and last_path.exists()))
    val = None
    if cfg.val_data:
        # images a store lists as skipped (and, for a frozen student, those its features lack) are left out
        val = evaluation_inputs(cfg, cfg.val_data, cfg.val_split, [cache, image_store], device, show,
                                cfg.on_bad_image, vocab=kind.vocab)
    student = kind.student
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
    batches = epoch_batch_plan(cfg, ctx.world_size, kind.pairs, rows_plan, text_store)
    steps_per_epoch = len(batches(0, ctx.rank))
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data}: {len(kind.pairs)} training pairs cannot fill one batch of {cfg.batch_size}")
    # a run extended on resume: its cosine runs on to the new end
    scheduler = cosine_schedule(optimizer, steps_per_epoch * cfg.epochs, cfg.lr, cfg.min_lr)
    return Run(cfg, ctx, device, show, manifest, image_store, text_store, rows_plan, soft, kind, val, model, loss_fn,
               optimizer, scheduler, batches, steps_per_epoch, lr_plan(optimizer, cfg), resume_changes)


def epoch_batch_plan(cfg: TrainConfig, world_size: int, pairs: TrainingPairs, rows_plan: TeacherRowsPlan,
                     text_store: Store) -> EpochBatches:
    """How an epoch is cut into batches: groups of teacher neighbors (``sampler=teacher-neighbors``), chunk-local
    random batches (streamed teacher rows), or random batches. Each depends only on (seed, epoch, rank)."""
    if cfg.sampler == "teacher-neighbors":
        neighbors = pair_neighbor_table(pairs, text_store)
        return lambda epoch, rank: neighbor_batches(neighbors, cfg.batch_size, cfg.seed, epoch, cfg.sampler_group,
                                                    rank, world_size)
    if rows_plan.stream:
        return lambda epoch, rank: chunk_local_batches(rows_plan.units.unit_of_pair, cfg.batch_size, cfg.seed, epoch,
                                                       rows_plan.window, rank, world_size,
                                                       image_of_pair=pairs.image_rows)
    return lambda epoch, rank: epoch_batches(len(pairs), cfg.batch_size, cfg.seed, epoch, rank, world_size)


# ---------------------------------------------------------------------------------------------- 2. resume
@dataclass
class Progress:
    """Where the run stands: what a checkpoint records beyond the model, and what a resume starts from. Epochs are
    numbered from 1 everywhere (console, metrics.jsonl, checkpoints, summary.json)."""

    epochs_done: int = 0  # epochs finished when this process started
    best: dict = field(default_factory=lambda: {"epoch": None, "rsum": -1.0, "metrics": None})
    seconds_before: float = 0.0  # training time of the processes before this one
    pending: dict | None = None  # the epoch record of an epoch trained whose validation did not finish
    partial: dict | None = None  # a mid-epoch checkpoint's place: {"epoch" (its number), "steps" done, "sums"}
    val_skipped: list = field(default_factory=list)  # validation images left out as unreadable
    started: float = 0.0  # perf_counter() when this process began training

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started


def restore(run: Run) -> Progress:
    """Load the run's last checkpoint into the student, loss, optimizer and schedule; where it stood."""
    ckpt = load_checkpoint(run.last_path)
    run.kind.check_checkpoint(ckpt, run.last_path)
    run.student.load_state_dict(ckpt["student"])
    run.loss_fn.load_state_dict(ckpt["loss"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    epochs_done = ckpt["epoch"]
    if run.cfg.epochs < epochs_done:
        raise ValueError(f"{run.out}: the run has trained {epochs_done} epochs; --epochs {run.cfg.epochs} cannot "
                         "shorten it")
    rng = ckpt["rng"]
    if isinstance(rng, list):  # one state per rank; a run resumed on fewer or more ranks reuses rank 0's
        rng = rng[run.ctx.rank] if run.ctx.rank < len(rng) else rng[0]
    _set_rng_state(rng)
    return Progress(epochs_done, ckpt["best"], float(ckpt.get("seconds", 0.0)),
                    pending=ckpt.get("pending_validation"),  # the epoch trained, its validation not finished
                    partial=ckpt.get("partial_epoch"))  # --save-every-steps: part of the next epoch trained


# ---------------------------------------------------------------------------------------------- 3. the run folder
def open_run_folder(run: Run, progress: Progress, resume: bool) -> MetricsLogger | None:
    """Write the run's settings (a resume: its record of changes) and open the metrics log (rank 0 only)."""
    cfg, out = run.cfg, run.out
    metrics_path = out / "metrics.jsonl"
    if run.ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            record_resume(out, progress.epochs_done, run.resume_changes)
        else:
            _write_json(out / CONFIG_FILE, cfg.to_dict())
        if run.kind.vocab is not None:
            _write_json(out / "vocab.json", run.kind.vocab.to_dict())
        if metrics_path.exists():
            # a fresh run starts the log anew; a resumed one drops what the interrupted epoch had logged
            partial = progress.partial
            _truncate_jsonl(metrics_path, progress.epochs_done, keep_steps_of_last=progress.pending is not None,
                            resume_step=progress.epochs_done * run.steps_per_epoch + partial["steps"] if partial
                            else None)
    if run.show:
        tqdm.write(f"lr        {describe_lr_plan(run.lrs)}, cosine over {cfg.epochs} epochs", file=sys.stderr)
    return MetricsLogger(out, cfg.report_to, cfg.to_dict(), resumed=resume) if run.ctx.is_main else None


# ---------------------------------------------------------------------------------------------- 4. epochs
def train_one_epoch(run: Run, progress: Progress, logger: MetricsLogger | None, epoch: int) -> dict[str, Any]:
    """Train epoch ``epoch`` (numbered ``epoch + 1``), from a mid-epoch checkpoint's step when it stopped in this
    one; its epoch record (mean loss terms, temperatures, lr)."""
    cfg, ctx, pairs = run.cfg, run.ctx, run.pairs
    number = epoch + 1
    run.model.train()
    batches = run.batches(epoch, ctx.rank)
    n_batches = len(batches)
    if cfg.gather and ctx.enabled:
        # the loss sees every rank's rows in rank order (as all_gather concatenates them): so must the teacher
        every_rank = [run.batches(epoch, r) for r in range(ctx.world_size)]
        loss_batches = [np.concatenate(parts) for parts in zip(*every_rank)]
    else:
        loss_batches = batches
    # resumed from a mid-epoch checkpoint: the batches it had trained on are skipped, its loss sums go on
    partial = progress.partial
    skip = partial["steps"] if partial is not None and partial["epoch"] == number else 0
    batches, loss_batches = batches[skip:], loss_batches[skip:]
    inputs = run.kind.inputs(batches, epoch, ctx.rank)
    block_rows = [_store_rows(pairs, run.image_store, run.text_store, b) for b in loss_batches]
    blocks = run.soft.blocks(block_rows) if run.soft is not None else iter(lambda: (None, None), 0)
    temperatures = [p for p in run.loss_fn.parameters() if p.requires_grad]
    sums: dict[str, float] = dict(partial["sums"]) if skip else {}
    bar = tqdm(total=n_batches, initial=skip, desc=f"epoch {number}/{cfg.epochs}", disable=not run.show,
               dynamic_ncols=True, leave=False)
    t_epoch = time.perf_counter()
    for step, (b, x, (t_ii, t_tt)) in enumerate(zip(batches, inputs, blocks), start=skip):
        t0 = time.perf_counter()
        image_ids = torch.as_tensor(pairs.image_rows[b], device=run.device)
        terms = run.kind.loss(run.model, run.loss_fn, x, image_ids, t_ii, t_tt)
        run.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if ctx.enabled:
            _average_gradients(temperatures, ctx.world_size)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.student.parameters(), cfg.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.loss_fn.clamp_()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        if ctx.is_main and (step % cfg.log_every == 0 or step == n_batches - 1):
            logger.log({"kind": "step", "epoch": number, "step": epoch * run.steps_per_epoch + step,
                        **{k: float(v.detach()) for k, v in terms.items()}, **run.loss_fn.temperatures(),
                        "lr": run.scheduler.get_last_lr()[0], "lr_groups": group_lrs(run.optimizer),
                        "step_time": time.perf_counter() - t0})
        bar.update(1)
        bar.set_postfix(loss=f"{float(terms['loss'].detach()):.4f}")
        if cfg.save_every_steps and (epoch * run.steps_per_epoch + step + 1) % cfg.save_every_steps == 0 \
                and step + 1 < n_batches:  # (an epoch's last step is checkpointed by finish_epoch)
            rng = _every_rank_rng(ctx)
            if ctx.is_main:
                save_checkpoint(run.last_path, {
                    **_state(run, epoch), "best": progress.best, "rng": rng, "seconds": progress.seconds(),
                    "partial_epoch": {"epoch": number, "steps": step + 1, "sums": dict(sums)}})
    bar.close()
    return {"kind": "epoch", "epoch": number, **{k: v / max(n_batches, 1) for k, v in sums.items()},
            **run.loss_fn.temperatures(), "lr": run.scheduler.get_last_lr()[0], "lr_groups": group_lrs(run.optimizer),
            "epoch_time": time.perf_counter() - t_epoch}


def finish_epoch(run: Run, progress: Progress, logger: MetricsLogger | None, number: int, record: dict,
                 saved: bool = False) -> None:
    """Validate (when there is validation data) and checkpoint the epoch ``number`` that has trained; ``saved``: its
    training was checkpointed already (a resume that redoes the validation)."""
    ctx, val = run.ctx, run.val
    base = _state(run, number)
    if val is not None and not saved:
        # last.pt first: a failure while validating (an unreadable image, say) loses no training, and a resume
        # redoes only the validation
        rng = _every_rank_rng(ctx)
        if ctx.is_main:
            save_checkpoint(run.last_path, {**base, "best": progress.best, "rng": rng, "pending_validation": record,
                                            "seconds": progress.seconds()})
    if val is not None and ctx.is_main:
        cfg = run.cfg
        result = evaluate_retrieval(run.student, val.manifest, run.device, cfg.eval_batch_size, cfg.workers,
                                    feats=val.feats, known_skipped=val.known_skipped, on_bad_image=cfg.on_bad_image,
                                    names=val.names, coco_1k=False, regions=val.regions)
        record["val"] = result.metrics["all"]
        if result.skipped and len(result.skipped) != len(progress.val_skipped) and run.show:
            tqdm.write(f"validation leaves out {len(result.skipped)} unreadable image(s): "
                       f"{result.skipped[0].path} ({result.skipped[0].reason})", file=sys.stderr)
        progress.val_skipped = result.skipped
        if record["val"]["rsum"] > progress.best["rsum"]:
            progress.best = {"epoch": number, "rsum": record["val"]["rsum"], "metrics": record["val"]}
    elif val is None:
        progress.best = {"epoch": number, "rsum": None, "metrics": None}  # no validation: the last epoch is kept
    rng = _every_rank_rng(ctx)  # each rank's RNG (dropout, augmentation) continues where it was on resume
    if ctx.is_main:
        logger.log(record)
        payload = {**base, "best": progress.best, "rng": rng, "seconds": progress.seconds()}
        # best.pt first: a kill between the two writes leaves last.pt at the previous epoch (or its validation),
        # which a resume redoes, so best.pt never lags behind the "best" that last.pt records
        if progress.best["epoch"] == number:
            save_checkpoint(run.out / CHECKPOINT_BEST, payload)
        save_checkpoint(run.last_path, payload)
        if run.show:
            best = progress.best
            msg = f"epoch {number}/{run.cfg.epochs}: loss {record.get('loss', float('nan')):.4f}"
            if "val" in record:
                msg += f"  val rsum {record['val']['rsum']:.1f} (best {best['rsum']:.1f} @ {best['epoch']})"
            tqdm.write(msg, file=sys.stderr)
    ctx.barrier()


# ---------------------------------------------------------------------------------------------- 5. summary
def summarise(run: Run, progress: Progress) -> dict[str, Any]:
    """The run's summary, written to summary.json by rank 0."""
    cfg, out, soft = run.cfg, run.out, run.soft
    history = resume_history(out) if run.ctx.is_main else []
    best_path = out / CHECKPOINT_BEST
    summary = {"out": str(out), "epochs": cfg.epochs, "steps": run.steps_per_epoch * cfg.epochs,
               "best_epoch": progress.best["epoch"], "best_val": progress.best["metrics"],
               "train_pairs": len(run.pairs), "dropped_pairs": len(run.pairs.dropped),
               "skipped_samples": len(run.manifest.skipped_samples), "seconds": progress.seconds(),
               "backbone_passes": run.backbone_passes, "teacher_passes": 0, "loss_terms": list(cfg.losses.terms),
               "lr_groups": run.lrs, "device": run.device, "world_size": run.ctx.world_size, "resumes": len(history),
               "checkpoint": str(best_path if best_path.exists() else run.last_path)}
    if run.val is not None:
        summary["val_skipped_images"] = len(progress.val_skipped)
    summary.update(run.rows_plan.summary(soft.peak_memory_bytes() if soft is not None else None,
                                         soft.chunk_stats() if soft is not None else None, cfg.sampler,
                                         cfg.epochs - progress.epochs_done))
    if run.ctx.is_main:
        _write_json(out / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------- helpers
def _state(run: Run, epochs_finished: int) -> dict[str, Any]:
    """The checkpoint of the model, optimizer and schedule after ``epochs_finished`` epochs (train/factory.py)."""
    return checkpoint_state(run.cfg, run.student, run.loss_fn, run.optimizer, run.scheduler, epochs_finished,
                            run.kind.vocab)


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


def _store_rows(pairs: TrainingPairs, image_store: Store, text_store: Store, b: np.ndarray):
    return (pairs.store_image_rows[str(image_store.path)][pairs.image_rows[b]],
            pairs.store_caption_rows[str(text_store.path)][pairs.caption_rows[b]])


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
