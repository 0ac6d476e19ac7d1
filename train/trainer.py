"""`cusa-train`'s loop: contrastive + CSA + USA, soft labels streamed from the teacher cache.

Read top to bottom: set up (data joined to the cache, soft-label source, student, loss, optimizer),
then per epoch: train, validate, checkpoint. No teacher model is ever built here.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pipeline.distributed import DistContext, init_distributed, resolve_device, shutdown_distributed
from teacher_cache.soft_labels import SoftLabelSource
from teacher_cache.store import Store
from train.checkpoint import load_checkpoint, save_checkpoint
from train.checkpoint import rng_state as _rng_state
from train.checkpoint import set_rng_state as _set_rng_state
from train.config import RegionConfig, TrainConfig, resolved_losses
from train.data import TrainingPairs, epoch_batches, join_pairs, load_split, pair_loader
from train.evaluate import retrieval_metrics, similarity_retrieval_metrics
from train.losses import CusaLoss
from train.regions import RegionData
from train.students import REGION_KINDS, FeatureStudent, OpenClipStudent, parse_student_spec
from train.vocab import Vocabulary

CHECKPOINT_LAST = "last.pt"
CHECKPOINT_BEST = "best.pt"


# ---------------------------------------------------------------------------------------------- setup
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_feature_cache(cache: str) -> str:
    p = Path(cache)
    return str(p.with_name(p.name + "-features"))


def build_student(cfg_student: str, frozen_opts: dict, image_dim: int | None = None,
                  text_dim: int | None = None, *, region_opts: dict | None = None,
                  vocab: Vocabulary | None = None) -> torch.nn.Module:
    """The student a spec names. Frozen students need their feature widths; region students (sgr/saf) the width
    of a region feature (``image_dim``), their sizes (``region_opts``, RegionConfig's fields) and the vocabulary."""
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
    return OpenClipStudent.from_spec(spec)


@dataclass
class StudentInputs:
    """How a student gets its batch inputs: cached backbone features, or decoded images and tokens."""

    kind: str
    image_feats: torch.Tensor | None = None
    text_feats: torch.Tensor | None = None


def frozen_inputs(cfg: TrainConfig, annotations: str, split: str, fingerprint: str, stores: list[Store],
                  device: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Backbone features of a dataset for a frozen student (computed once, cached, then reused)."""
    from train.features import frozen_features

    spec = parse_student_spec(cfg.student)
    fs = frozen_features(annotations, split, fingerprint, spec.image_spec, spec.text_spec,
                         cfg.frozen.feature_cache or default_feature_cache(cfg.cache), fmt=cfg.format,
                         image_root=cfg.image_root, reuse=stores, device=cfg.device, progress=progress,
                         workers=cfg.workers)
    return (torch.from_numpy(fs.images).to(device), torch.from_numpy(fs.texts).to(device), fs.computed)


def region_inputs(cfg: TrainConfig, annotations: str, split: str, manifest, vocab: Vocabulary,
                  progress: bool) -> tuple[RegionData, bool]:
    """A region student's inputs for a dataset: its region features (grid ones computed once and cached) and the
    caption tokens by ``vocab``; also says whether a backbone ran."""
    from train.regions import region_features
    from train.vocab import CaptionTokens

    feats = region_features(cfg.student, annotations, split, manifest,
                            cfg.region.feature_cache or default_feature_cache(cfg.cache), fmt=cfg.format,
                            image_root=cfg.image_root, device=cfg.device, progress=progress, workers=cfg.workers)
    captions = CaptionTokens([c.text for c in manifest.captions], vocab, cfg.region.max_words)
    return RegionData(feats, captions), feats.computed


# ---------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def score_for_retrieval(student: torch.nn.Module, data: RegionData, device: str, region: RegionConfig,
                        progress: bool = False) -> torch.Tensor:
    """A region student's scores [N_img, N_txt] of every image with every caption (float32, CPU)."""
    student.eval()
    with _autocast(device):
        return student.similarity(data.features, data.captions, device, region.eval_images, region.eval_captions,
                                  progress)


@torch.no_grad()
def embed_for_retrieval(student: torch.nn.Module, manifest, device: str, batch_size: int, workers: int,
                        feats: tuple[torch.Tensor, torch.Tensor] | None = None, uni: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross (or uni) embeddings of every image and caption of ``manifest``."""
    student.eval()
    enc_img = student.encode_images_uni if uni else student.encode_images
    enc_txt = student.encode_texts_uni if uni else student.encode_texts
    amp = _autocast(device)
    if feats is not None:
        img_f, txt_f = feats
        with amp:
            img = torch.cat([enc_img(img_f[i:i + batch_size]).float() for i in range(0, len(img_f), batch_size)])
            txt = torch.cat([enc_txt(txt_f[i:i + batch_size]).float() for i in range(0, len(txt_f), batch_size)])
        return img, txt
    from torch.utils.data import DataLoader

    from train.data import ManifestImages

    loader = DataLoader(ManifestImages(manifest, student.preprocess_val), batch_size=batch_size,
                        num_workers=workers)
    img_parts = []
    with amp:
        for images in loader:
            img_parts.append(enc_img(images.to(device)).float())
        texts = [c.text for c in manifest.captions]
        txt_parts = [enc_txt(student.tokenize(texts[i:i + batch_size]).to(device)).float()
                     for i in range(0, len(texts), batch_size)]
    return torch.cat(img_parts), torch.cat(txt_parts)


def _autocast(device: str):
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + ctx.rank)

    # data joined to the cache: refuses stores built from other data, other teachers or unfinished builds
    manifest = load_split(cfg.data, cfg.split, cfg.format, cfg.image_root)
    cache = Store.open(cfg.cache, require_complete=True)
    image_store = Store.open(cfg.image_cache, require_complete=True) if cfg.image_cache else cache
    text_store = Store.open(cfg.text_cache, require_complete=True) if cfg.text_cache else cache
    stores = list({str(s.path): s for s in (cache, image_store, text_store)}.values())
    pairs = join_pairs(manifest, stores)
    soft = None
    if cfg.losses.needs_teacher:
        soft = SoftLabelSource(image_store, text_store, mode=cfg.soft_labels.mode, k=cfg.soft_labels.k,
                               stream=cfg.soft_labels.stream, device=device)

    spec = parse_student_spec(cfg.student)
    region = spec.kind in REGION_KINDS
    if region and cfg.gather and ctx.enabled:
        raise ValueError(f"{cfg.student}: --set gather=true is for dual encoders; a region student scores the pairs "
                         "of each rank's own batch")
    train_feats = val_feats = None
    train_regions = val_regions = vocab = None
    backbone_passes = 0
    if spec.kind == "frozen":
        img_f, txt_f, computed = frozen_inputs(cfg, cfg.data, cfg.split, manifest.fingerprint(), [cache], device,
                                               show)
        backbone_passes += int(computed)
        train_feats = (img_f, txt_f)
        student = build_student(cfg.student, vars(cfg.frozen), img_f.shape[1], txt_f.shape[1])
    elif region:
        vocab = Vocabulary.build((c.text for c in manifest.captions), cfg.region.min_count)
        train_regions, computed = region_inputs(cfg, cfg.data, cfg.split, manifest, vocab, show)
        backbone_passes += int(computed)
        student = build_student(cfg.student, vars(cfg.frozen), train_regions.features.region_dim,
                                region_opts=vars(cfg.region), vocab=vocab)
    else:
        student = build_student(cfg.student, vars(cfg.frozen))
    val_manifest = None
    if cfg.val_data:
        val_manifest = load_split(cfg.val_data, cfg.val_split, cfg.format, cfg.image_root)
        if spec.kind == "frozen":
            v_img, v_txt, computed = frozen_inputs(cfg, cfg.val_data, cfg.val_split, val_manifest.fingerprint(),
                                                   [cache], device, show)
            backbone_passes += int(computed)
            val_feats = (v_img, v_txt)
        elif region:
            val_regions, computed = region_inputs(cfg, cfg.val_data, cfg.val_split, val_manifest, vocab, show)
            backbone_passes += int(computed)
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

    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # norms, biases: no weight decay
    temps = [p for p in loss_fn.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay + temps, "weight_decay": 0.0},
    ], lr=cfg.lr)
    if cfg.sampler == "teacher-neighbors":
        from train.samplers import neighbor_batches, pair_neighbor_table

        pair_neighbors = pair_neighbor_table(pairs, text_store)

        def make_batches(epoch: int, rank: int) -> list[np.ndarray]:
            return neighbor_batches(pair_neighbors, cfg.batch_size, cfg.seed, epoch, cfg.sampler_group, rank,
                                    ctx.world_size)
    else:
        def make_batches(epoch: int, rank: int) -> list[np.ndarray]:
            return epoch_batches(len(pairs), cfg.batch_size, cfg.seed, epoch, rank, ctx.world_size)
    steps_per_epoch = len(make_batches(0, ctx.rank))
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data}: {len(pairs)} training pairs cannot fill one batch of {cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_lambda(total_steps, cfg.lr, cfg.min_lr))

    start_epoch, best = 0, {"epoch": None, "rsum": -1.0, "metrics": None}
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        if vocab is not None and ckpt.get("vocab") not in (None, vocab.to_dict()):
            raise ValueError(f"{last_path}: the run's word vocabulary differs from the one these training captions "
                             "give (other --data or region.min_count?); resume with the run's settings")
        student.load_state_dict(ckpt["student"])
        loss_fn.load_state_dict(ckpt["loss"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = ckpt["epoch"] + 1
        best = ckpt["best"]
        rng = ckpt["rng"]
        if isinstance(rng, list):  # one state per rank; a run resumed on fewer or more ranks reuses rank 0's
            rng = rng[ctx.rank] if ctx.rank < len(rng) else rng[0]
        _set_rng_state(rng)
    if ctx.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if vocab is not None:
            (out / "vocab.json").write_text(json.dumps(vocab.to_dict()))
    metrics_path = out / "metrics.jsonl"
    if ctx.is_main and metrics_path.exists():
        # a fresh run starts the log anew; a resumed one drops what the interrupted epoch had logged
        _truncate_jsonl(metrics_path, start_epoch)
    t_run = time.perf_counter()
    history = []

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        batches = make_batches(epoch, ctx.rank)
        if cfg.gather and ctx.enabled:
            # the loss sees every rank's rows in rank order (as all_gather concatenates them): so must the teacher
            every_rank = [make_batches(epoch, r) for r in range(ctx.world_size)]
            loss_batches = [np.concatenate(parts) for parts in zip(*every_rank)]
        else:
            loss_batches = batches
        if spec.kind == "frozen":
            inputs = ((train_feats[0][torch.as_tensor(pairs.image_rows[b])],
                       train_feats[1][torch.as_tensor(pairs.caption_rows[b])]) for b in batches)
        elif region:
            inputs = (train_regions.batch(pairs.image_rows[b], pairs.caption_rows[b], device) for b in batches)
        else:
            inputs = ((im.to(device, non_blocking=True), tok.to(device, non_blocking=True)) for im, tok in
                      pair_loader(pairs, batches, student.preprocess_train, student.tokenize, cfg.workers))
        block_rows = [_store_rows(pairs, image_store, text_store, b) for b in loss_batches]
        blocks = soft.blocks(block_rows) if soft is not None else iter(lambda: (None, None), 0)
        sums: dict[str, float] = {}
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show,
                   dynamic_ncols=True, leave=False)
        t_epoch = time.perf_counter()
        for step, (b, (x_img, x_txt), (t_ii, t_tt)) in enumerate(zip(batches, inputs, blocks)):
            t0 = time.perf_counter()
            image_ids = torch.as_tensor(pairs.image_rows[b], device=device)
            with _autocast(device):
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
            if ctx.is_main and (step % cfg.log_every == 0 or step == len(batches) - 1):
                record = {"kind": "step", "epoch": epoch, "step": epoch * steps_per_epoch + step,
                          **{k: float(v.detach()) for k, v in terms.items()}, **loss_fn.temperatures(),
                          "lr": scheduler.get_last_lr()[0], "step_time": time.perf_counter() - t0}
                _append_jsonl(metrics_path, record)
            bar.update(1)
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.4f}")
        bar.close()
        epoch_record = {"kind": "epoch", "epoch": epoch, **{k: v / max(len(batches), 1) for k, v in sums.items()},
                        **loss_fn.temperatures(), "lr": scheduler.get_last_lr()[0],
                        "epoch_time": time.perf_counter() - t_epoch}
        if val_manifest is not None and ctx.is_main:
            if region:
                val = similarity_retrieval_metrics(score_for_retrieval(student, val_regions, device, cfg.region),
                                                   val_manifest.caption_image_rows())
            else:
                img, txt = embed_for_retrieval(student, val_manifest, device, cfg.eval_batch_size, cfg.workers,
                                               val_feats)
                val = retrieval_metrics(img, txt, val_manifest.caption_image_rows())
            epoch_record["val"] = val
            if val["rsum"] > best["rsum"]:
                best = {"epoch": epoch, "rsum": val["rsum"], "metrics": val}
        elif val_manifest is None:
            best = {"epoch": epoch, "rsum": None, "metrics": None}  # no validation: the last epoch is kept
        rng = _rng_state()
        if ctx.enabled:  # each rank's RNG (dropout, augmentation) continues where it was on resume
            every_rng: list = [None] * ctx.world_size
            dist.all_gather_object(every_rng, rng)
            rng = every_rng
        if ctx.is_main:
            _append_jsonl(metrics_path, epoch_record)
            history.append(epoch_record)
            payload = {"student": student.state_dict(), "loss": loss_fn.state_dict(),
                       "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                       "best": best, "rng": rng, "config": cfg.to_dict(), "student_spec": cfg.student,
                       "dims": _student_dims(student)}
            if vocab is not None:
                payload["vocab"] = vocab.to_dict()  # a region student's word ids: evaluation needs the same ones
            # best.pt first: a kill between the two writes leaves last.pt at the previous epoch, which a resume
            # redoes, so best.pt never lags behind the "best" that last.pt records
            if best["epoch"] == epoch:
                save_checkpoint(out / CHECKPOINT_BEST, payload)
            save_checkpoint(last_path, payload)
            if show:
                msg = f"epoch {epoch + 1}/{cfg.epochs}: loss {epoch_record.get('loss', float('nan')):.4f}"
                if "val" in epoch_record:
                    msg += f"  val rsum {epoch_record['val']['rsum']:.1f} (best {best['rsum']:.1f} @ {best['epoch'] + 1})"
                tqdm.write(msg)
        ctx.barrier()

    summary = {"out": str(out), "epochs": cfg.epochs, "steps": total_steps, "best_epoch": best["epoch"],
               "best_val": best["metrics"], "train_pairs": len(pairs), "dropped_pairs": len(pairs.dropped),
               "seconds": time.perf_counter() - t_run, "backbone_passes": backbone_passes,
               "teacher_passes": 0, "loss_terms": list(cfg.losses.terms), "device": device,
               "world_size": ctx.world_size, "checkpoint": str(out / (CHECKPOINT_BEST if
                                                                    (out / CHECKPOINT_BEST).exists() else
                                                                    CHECKPOINT_LAST))}
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


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


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, first_epoch: int) -> None:
    """Keep only the records of epochs before ``first_epoch`` (0: none), rewritten atomically."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if record.get("epoch", first_epoch) < first_epoch:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
