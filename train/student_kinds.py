"""The kinds of student, one object each: how the model is built from a run's settings (and what a checkpoint records
to build it again), what it needs from the training data, how a batch of training pairs becomes its inputs, and how
its outputs reach the loss.

- ``frozen``: `FeatureStudent` on the features of two frozen backbones, computed once into the feature cache;
- ``open_clip``: `OpenClipStudent` on decoded, augmented images and token ids (the pair loader of train/data.py);
- ``sgr``, ``saf``: `RegionStudent` on region features and word ids (train/regions.py); it scores every pair of a
  batch itself, and the loss takes that score matrix.

`KINDS` maps a spec's kind to its class. train/factory.py builds and loads students through it, and the training loop
(train/trainer.py) calls only what `StudentKind` declares, so neither branches on a kind. Never imports a teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from pipeline.distributed import autocast
from pipeline.manifest import Manifest
from teacher_cache.store import Store
from train.config import TrainConfig
from train.data import RowNames, TrainingPairs, drop_images, pair_loader
from train.features import run_frozen_features
from train.losses import CusaLoss
from train.region_students import RegionStudent
from train.regions import RegionData, region_data
from train.students import REGION_KINDS, FeatureStudent, OpenClipStudent, parse_student_spec
from train.vocab import Vocabulary


@dataclass
class TrainingData:
    """What a student kind prepares its training from: the run's settings and its training pairs, joined to the
    teacher cache."""

    cfg: TrainConfig
    manifest: Manifest
    pairs: TrainingPairs
    cache: Store
    device: str
    show: bool  # progress bars
    distributed: bool  # several ranks (torchrun)
    weights_from_checkpoint: bool  # a resumed run: the student's weights come from its checkpoint

    @property
    def on_bad_image(self) -> str:
        # images the cache skipped are skipped by a backbone too; pairs of any image it cannot read are then dropped
        return "skip" if self.pairs.dropped else self.cfg.on_bad_image


@dataclass
class StudentKind:
    """A student with its training inputs. The defaults are a dual encoder's (frozen, open_clip): it embeds images and
    captions, and the loss compares the embeddings (all-gathered over ranks with ``gather``)."""

    student: torch.nn.Module
    pairs: TrainingPairs  # the training pairs it trains on (less any whose image its backbone cannot read)
    device: str
    gather: bool = False
    backbone_passes: int = 0  # datasets its backbones embedded for this run (0: all read from the feature cache)
    vocab: Vocabulary | None = None  # its word ids, when it has its own (checkpointed, needed to evaluate)

    # ------------------------------------------------------------------------------------------ the model
    @staticmethod
    def build(cfg: TrainConfig, dims: dict, vocab: Vocabulary | None = None,
              weights_from_checkpoint: bool = False) -> torch.nn.Module:
        """The student ``cfg`` names, with the sizes ``dims`` (what a checkpoint records: `dims`) and ``vocab``;
        ``weights_from_checkpoint``: its weights are loaded next, so pretrained ones are not fetched first."""
        raise NotImplementedError

    @staticmethod
    def dims(student: torch.nn.Module) -> dict:
        """What a checkpoint records to build ``student`` again (beyond the run's settings)."""
        return {}

    @staticmethod
    def recorded_vocab(checkpoint: dict[str, Any], path: Any) -> Vocabulary | None:
        """The word ids a checkpoint recorded for the student, when its kind has them."""
        return None

    # ------------------------------------------------------------------------------------------ training
    @classmethod
    def for_training(cls, data: TrainingData) -> "StudentKind":
        raise NotImplementedError

    def inputs(self, batches: list[np.ndarray], epoch: int, rank: int) -> Iterator[tuple]:
        """The model's inputs for each batch of pair indices of ``epoch`` on ``rank``, in order."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, loss_fn: CusaLoss, inputs: tuple, image_ids: torch.Tensor,
             teacher_images: torch.Tensor | None, teacher_texts: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The loss terms of one batch; ``model`` is the student, or its DDP wrapper."""
        with autocast(self.device):
            emb = model(*inputs)
        if self.gather:
            emb, image_ids = _gather(emb, image_ids)
        return loss_fn(emb["image_cross"], emb["text_cross"], emb["image_uni"], emb["text_uni"], image_ids,
                       teacher_images, teacher_texts)

    def check_checkpoint(self, checkpoint: dict[str, Any], path: Any) -> None:
        """ValueError (one line) when a checkpoint to resume from does not fit this student's training data."""


@dataclass
class FrozenKind(StudentKind):
    """``frozen:IMAGE_SPEC+TEXT_SPEC``: the trainable part on features the two backbones computed once."""

    features: tuple[torch.Tensor, torch.Tensor] | None = None  # [N_img, D_i], [N_txt, D_t] on the device

    @staticmethod
    def build(cfg: TrainConfig, dims: dict, vocab: Vocabulary | None = None,
              weights_from_checkpoint: bool = False) -> torch.nn.Module:
        return FeatureStudent(dims.get("image_dim"), dims.get("text_dim"), embed_dim=cfg.frozen.embed_dim,
                              hidden=cfg.frozen.hidden, dropout=cfg.frozen.dropout)

    @staticmethod
    def dims(student: torch.nn.Module) -> dict:
        return {"image_dim": student.image_dim, "text_dim": student.text_dim}

    @classmethod
    def for_training(cls, data: TrainingData) -> "FrozenKind":
        cfg = data.cfg
        fs = run_frozen_features(cfg, cfg.data, cfg.split, data.manifest, [data.cache], cfg.device,
                                 data.show, data.on_bad_image)
        images, texts = torch.from_numpy(fs.images).to(data.device), torch.from_numpy(fs.texts).to(data.device)
        student = cls.build(cfg, {"image_dim": images.shape[1], "text_dim": texts.shape[1]})
        return cls(student, drop_images(data.pairs, fs.skipped), data.device, cfg.gather and data.distributed,
                   int(fs.computed), features=(images, texts))

    def inputs(self, batches: list[np.ndarray], epoch: int, rank: int) -> Iterator[tuple]:
        images, texts = self.features
        return ((images[torch.as_tensor(self.pairs.image_rows[b])], texts[torch.as_tensor(self.pairs.caption_rows[b])])
                for b in batches)


@dataclass
class OpenClipKind(StudentKind):
    """``open_clip:ARCH[:CHECKPOINT]``: images decoded and augmented in DataLoader workers, captions tokenized."""

    names: RowNames | None = None  # how an unreadable image is named (by its row in the teacher cache)
    workers: int = 0
    seed: int = 0

    @staticmethod
    def build(cfg: TrainConfig, dims: dict, vocab: Vocabulary | None = None,
              weights_from_checkpoint: bool = False) -> torch.nn.Module:
        return OpenClipStudent.from_spec(parse_student_spec(cfg.student),
                                         weights_from_checkpoint=weights_from_checkpoint, cross_head=cfg.cross_head)

    @classmethod
    def for_training(cls, data: TrainingData) -> "OpenClipKind":
        cfg, cache = data.cfg, data.cache
        student = cls.build(cfg, {}, weights_from_checkpoint=data.weights_from_checkpoint)
        names = RowNames(data.pairs.store_image_rows[str(cache.path)], f"store {cache.location}")
        return cls(student, data.pairs, data.device, cfg.gather and data.distributed, names=names,
                   workers=cfg.workers, seed=cfg.seed)

    def inputs(self, batches: list[np.ndarray], epoch: int, rank: int) -> Iterator[tuple]:
        # each pair's augmentation drawn from (seed, epoch, pair): the same wherever the epoch (re)started
        loader = pair_loader(self.pairs, batches, self.student.preprocess_train, self.student.tokenize, self.workers,
                             self.names, sample_seed=(self.seed * 1_000_003 + epoch) * 64 + rank)
        return ((images.to(self.device, non_blocking=True), tokens.to(self.device, non_blocking=True))
                for images, tokens in loader)


@dataclass
class RegionKind(StudentKind):
    """``sgr:REGIONS`` / ``saf:REGIONS``: region features and word ids; the student scores every pair of a batch."""

    regions: RegionData | None = None

    @staticmethod
    def build(cfg: TrainConfig, dims: dict, vocab: Vocabulary | None = None,
              weights_from_checkpoint: bool = False) -> torch.nn.Module:
        sizes = {k: getattr(cfg.region, k) for k in ("word_dim", "embed_dim", "sim_dim", "sgr_steps", "smooth",
                                                      "dropout", "pooling", "uni_dim", "length_groups")}
        student = RegionStudent(parse_student_spec(cfg.student).kind, dims.get("image_dim"), len(vocab), **sizes)
        student.vocab = vocab
        return student

    @staticmethod
    def dims(student: torch.nn.Module) -> dict:
        return {"image_dim": student.region_dim, "vocab_size": student.vocab_size}

    @staticmethod
    def recorded_vocab(checkpoint: dict[str, Any], path: Any) -> Vocabulary | None:
        if "vocab" not in checkpoint:
            raise ValueError(f"{path}: a region student's checkpoint without its word vocabulary")
        return Vocabulary.from_dict(checkpoint["vocab"])

    @classmethod
    def for_training(cls, data: TrainingData) -> "RegionKind":
        cfg = data.cfg
        if cfg.gather and data.distributed:
            raise ValueError(f"{cfg.student}: --set gather=true is for dual encoders; a region student scores the "
                             "pairs of each rank's own batch")
        vocab = Vocabulary.build((c.text for c in data.manifest.captions), cfg.region.min_count)
        regions = region_data(cfg, cfg.data, cfg.split, data.manifest, vocab, data.show, data.on_bad_image)
        student = cls.build(cfg, {"image_dim": regions.features.region_dim}, vocab)
        return cls(student, drop_images(data.pairs, regions.features.skipped), data.device,
                   backbone_passes=int(regions.features.computed), vocab=vocab, regions=regions)

    def inputs(self, batches: list[np.ndarray], epoch: int, rank: int) -> Iterator[tuple]:
        return (self.regions.batch(self.pairs.image_rows[b], self.pairs.caption_rows[b], self.device)
                for b in batches)

    def loss(self, model: torch.nn.Module, loss_fn: CusaLoss, inputs: tuple, image_ids: torch.Tensor,
             teacher_images: torch.Tensor | None, teacher_texts: torch.Tensor | None) -> dict[str, torch.Tensor]:
        with autocast(self.device):
            out = model(*inputs)
        # the student scored the batch's pairs itself
        return loss_fn.forward_similarity(out["sims"], out["image_uni"], out["text_uni"], image_ids, teacher_images,
                                          teacher_texts)

    def check_checkpoint(self, checkpoint: dict[str, Any], path: Any) -> None:
        if checkpoint.get("vocab") not in (None, self.vocab.to_dict()):
            raise ValueError(f"{path}: the run's word vocabulary differs from the one these training captions give "
                             "(other --data or region.min_count?); resume with the run's settings")


KINDS: dict[str, type[StudentKind]] = {"frozen": FrozenKind, "open_clip": OpenClipKind,
                                       **{kind: RegionKind for kind in REGION_KINDS}}


def kind_of(student: str) -> type[StudentKind]:
    """The kind of the student a spec string names (ValueError, one line, for a malformed spec)."""
    return KINDS[parse_student_spec(student).kind]


# ---------------------------------------------------------------------------------------------- DDP: --set gather=true
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
