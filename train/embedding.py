"""Embeddings of arbitrary image files and sentences by a trained student (uni-modal and ECCV evaluations).

Retrieval evaluation on an annotation split goes through the manifest and, for a frozen student, the cached
backbone features. The evaluations here take inputs that have no manifest (a labelled image folder, STS sentence
pairs, the COCO caption file), so a frozen student's backbones run directly: the encoder registry builds them from
the same spec strings the features were cached with, and their features are rounded exactly as the store rounds
them (unit norm, float16), so the student sees what it saw in training.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.images import load_image
from train.students import REGION_KINDS, StudentSpec, parse_student_spec

EMBEDDING_CHOICES: tuple[str, ...] = ("uni", "cross")


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], preprocess: Callable):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(load_image(self.paths[i], row=i))


def _store_precision(features: np.ndarray) -> torch.Tensor:
    """Unit-norm float16 rows, as a feature store keeps them (then float32 for the student)."""
    feats = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    if (norms == 0).any() or not np.isfinite(feats).all():
        raise ValueError("the frozen backbone returned zero or non-finite features")
    return torch.from_numpy((feats / norms).astype(np.float16).astype(np.float32))


class StudentEmbedder:
    """``images(paths, "uni"|"cross")`` and ``texts(sentences, "uni"|"cross")``: L2-normalised float32 [n, d]."""

    def __init__(self, student: torch.nn.Module, spec: StudentSpec | str, device: str = "cpu",
                 batch_size: int = 256, workers: int = 0, config=None):
        self.student = student.eval()
        self.config = config  # the run's TrainConfig when loaded from a checkpoint (annotation format, image root)
        self.spec = parse_student_spec(spec) if isinstance(spec, str) else spec
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self._backbones: dict[str, object] = {}

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str = "cpu", batch_size: int = 256,
                        workers: int = 0) -> "StudentEmbedder":
        from train.evaluation_run import load_trained_student

        student, cfg, _ = load_trained_student(Path(checkpoint), device)
        return cls(student, cfg.student, device, batch_size, workers, config=cfg)

    def _amp(self):
        if str(self.device).startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _backbone(self, modality: str):
        """The frozen student's backbone for one modality, built once (deferred import: only this path runs one)."""
        if modality not in self._backbones:
            from pipeline.encoders import build_encoder

            if self.region:
                source, body = self.spec.region_source
                if source != "grid":
                    raise ValueError(f"{self.spec}: regions precomputed for the dataset's own images cannot embed other "
                                     "image files; --image-labels needs a grid:IMAGE_SPEC region student")
                spec = f"grid:{body}"
            else:
                spec = self.spec.image_spec if modality == "image" else self.spec.text_spec
            encoder = build_encoder(spec, modality, device=self.device)
            if modality == "image" and not getattr(encoder, "needs_pixels", True):
                raise ValueError(f"the student's image backbone {spec!r} reads precomputed features by image id; "
                                 "it cannot embed other image files")
            self._backbones[modality] = encoder
        return self._backbones[modality]

    @property
    def region(self) -> bool:
        return self.spec.kind in REGION_KINDS

    def _check_region_embedding(self, embedding: str, side: str) -> None:
        if self.region and embedding != "uni":
            raise ValueError(f"{self.spec}: a region student scores image-caption pairs and has no cross-modal "
                             f"{side} embedding; use --{side}-embedding uni")

    def _regions(self, features: np.ndarray) -> torch.Tensor:
        """Grid regions [n, R, D] of a batch, rounded as the region store keeps them (pipeline/grid.py)."""
        from pipeline.grid import region_shape

        n_regions, region_dim = region_shape(self._backbone("image").identity())
        rows = _store_precision(features)
        return rows.view(rows.shape[0], n_regions, region_dim) * math.sqrt(n_regions)

    @torch.no_grad()
    def images(self, paths: Sequence[Path], embedding: str = "uni") -> torch.Tensor:
        _check_embedding(embedding)
        self._check_region_embedding(embedding, "image")
        encode = self.student.encode_images_uni if embedding == "uni" else self.student.encode_images
        backbone = self.spec.kind == "frozen" or self.region
        preprocess = self._backbone("image").preprocess if backbone else self.student.preprocess_val
        loader = DataLoader(_ImageFiles(paths, preprocess), batch_size=self.batch_size, num_workers=self.workers)
        parts = []
        with self._amp():
            for batch in loader:
                if self.region:
                    inputs = self._regions(self._backbone("image").encode(batch))
                else:
                    inputs = _store_precision(self._backbone("image").encode(batch)) if backbone else batch
                parts.append(encode(inputs.to(self.device)).float().cpu())
        return torch.cat(parts) if parts else torch.zeros((0, 0))

    @torch.no_grad()
    def texts(self, sentences: Sequence[str], embedding: str = "uni") -> torch.Tensor:
        _check_embedding(embedding)
        self._check_region_embedding(embedding, "text")
        encode = self.student.encode_texts_uni if embedding == "uni" else self.student.encode_texts
        sentences = list(sentences)
        parts = []
        with self._amp():
            for lo in range(0, len(sentences), self.batch_size):
                chunk = sentences[lo:lo + self.batch_size]
                if self.spec.kind == "frozen":
                    inputs = _store_precision(self._backbone("text").encode(chunk))
                elif self.region:
                    tokens, lengths = self.student.tokenize(chunk, self.config.region.max_words if self.config
                                                            else None)
                    parts.append(encode((tokens.to(self.device), lengths)).float().cpu())
                    continue
                else:
                    inputs = self.student.tokenize(chunk)
                parts.append(encode(inputs.to(self.device)).float().cpu())
        return torch.cat(parts) if parts else torch.zeros((0, 0))


def _check_embedding(embedding: str) -> None:
    if embedding not in EMBEDDING_CHOICES:
        raise ValueError(f"embedding must be one of {', '.join(EMBEDDING_CHOICES)}, got {embedding!r}")
