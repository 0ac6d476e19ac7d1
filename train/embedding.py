"""Embeddings of arbitrary image files and sentences by a trained student (uni-modal and ECCV evaluations).

Retrieval evaluation on an annotation split goes through the manifest and, for a frozen student, the cached
backbone features. The evaluations here take inputs that have no manifest (a labelled image folder, STS sentence
pairs, the COCO caption file), so a frozen student's backbones run directly: the encoder registry builds them from
the same spec strings the features were cached with, and their features are rounded exactly as the store rounds
them (unit norm, float16), so the student sees what it saw in training.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.images import load_image, open_image
from train.students import StudentSpec, parse_student_spec

EMBEDDING_CHOICES: tuple[str, ...] = ("uni", "cross")


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], preprocess: Callable):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(load_image(self.paths[i], row=i))


class _ManifestRows(Dataset):
    def __init__(self, manifest, rows: Sequence[int], preprocess: Callable):
        self.manifest = manifest
        self.rows = [int(r) for r in rows]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(open_image(self.manifest, self.rows[i]))


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

            spec = self.spec.image_spec if modality == "image" else self.spec.text_spec
            encoder = build_encoder(spec, modality, device=self.device)
            if modality == "image" and not getattr(encoder, "needs_pixels", True):
                raise ValueError(f"the student's image backbone {spec!r} reads precomputed features by image id; "
                                 "it cannot embed other image files")
            self._backbones[modality] = encoder
        return self._backbones[modality]

    def images(self, paths: Sequence[Path], embedding: str = "uni") -> torch.Tensor:
        return self._images(lambda preprocess: _ImageFiles(paths, preprocess), embedding)

    def manifest_images(self, manifest, rows: Sequence[int], embedding: str = "uni") -> torch.Tensor:
        """Embeddings of a manifest's images by row, whether files or members of webdataset shards."""
        return self._images(lambda preprocess: _ManifestRows(manifest, rows, preprocess), embedding)

    @torch.no_grad()
    def _images(self, dataset: Callable[[Callable], Dataset], embedding: str) -> torch.Tensor:
        _check_embedding(embedding)
        encode = self.student.encode_images_uni if embedding == "uni" else self.student.encode_images
        frozen = self.spec.kind == "frozen"
        preprocess = self._backbone("image").preprocess if frozen else self.student.preprocess_val
        loader = DataLoader(dataset(preprocess), batch_size=self.batch_size, num_workers=self.workers)
        parts = []
        with self._amp():
            for batch in loader:
                inputs = _store_precision(self._backbone("image").encode(batch)) if frozen else batch
                parts.append(encode(inputs.to(self.device)).float().cpu())
        return torch.cat(parts) if parts else torch.zeros((0, 0))

    @torch.no_grad()
    def texts(self, sentences: Sequence[str], embedding: str = "uni") -> torch.Tensor:
        _check_embedding(embedding)
        encode = self.student.encode_texts_uni if embedding == "uni" else self.student.encode_texts
        sentences = list(sentences)
        parts = []
        with self._amp():
            for lo in range(0, len(sentences), self.batch_size):
                chunk = sentences[lo:lo + self.batch_size]
                if self.spec.kind == "frozen":
                    inputs = _store_precision(self._backbone("text").encode(chunk))
                else:
                    inputs = self.student.tokenize(chunk)
                parts.append(encode(inputs.to(self.device)).float().cpu())
        return torch.cat(parts) if parts else torch.zeros((0, 0))


def _check_embedding(embedding: str) -> None:
    if embedding not in EMBEDDING_CHOICES:
        raise ValueError(f"embedding must be one of {', '.join(EMBEDDING_CHOICES)}, got {embedding!r}")
