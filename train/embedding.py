"""Embeddings of arbitrary images and sentences by a trained student (the Python API, search, uni-modal and ECCV
evaluations).

Retrieval evaluation on an annotation split goes through the manifest and, for a frozen student, the cached
backbone features. The callers here take inputs that have no feature cache (image files or PIL images, free text,
a labelled image folder, STS sentence pairs, the COCO caption file), so a frozen student's backbones run directly:
the encoder registry builds them from the same spec strings the features were cached with, captions are cleaned as
the build cleans them, and features are rounded exactly as the store rounds them (unit norm, float16), so the
student sees what it saw in training.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline.distributed import autocast
from pipeline.errors import ImageError
from pipeline.images import as_rgb, load_image
from pipeline.shard_read_ahead import DATALOADER_PREFETCH, ShardReadAhead, consecutive_batches
from train.students import REGION_KINDS, StudentSpec, parse_student_spec

EMBEDDING_CHOICES: tuple[str, ...] = ("uni", "cross")
ImageInput = Union[str, os.PathLike, Image.Image]


class _ImageInputs(Dataset):
    """Image files (decoded here, in DataLoader workers when there are any) or PIL images already in memory.

    An item is (tensor, message): a file that cannot be decoded gives a blank placeholder and the error's one-line
    message (empty for a good image). With ``skip_unreadable`` the file is left out, so one bad file does not lose
    a whole folder; without, the main process raises the message (raised inside a DataLoader worker, the error would
    reach the user as "Caught ImageError in DataLoader worker process 0", its cause buried in a traceback).
    """

    def __init__(self, images: Sequence[ImageInput], preprocess: Callable, skip_unreadable: bool = False):
        self.images = list(images)
        self.preprocess = preprocess
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return self._load(i), ""
        except ImageError as e:
            return self.preprocess(Image.new("RGB", (32, 32))), str(e)

    def _load(self, i: int) -> torch.Tensor:
        item = self.images[i]
        if isinstance(item, Image.Image):
            return self.preprocess(as_rgb(item))
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"image {i}: expected a file path or a PIL image, got {type(item).__name__}")
        return self.preprocess(load_image(item, row=i))


class _ManifestRowInputs(Dataset):
    """A manifest's images by row (files or shard members), as (tensor, message) like ``_ImageInputs``: an unreadable
    image travels as its one-line message, naming the file and row, and the main process raises it."""

    skip_unreadable = False

    def __init__(self, manifest, preprocess: Callable, rows: Sequence[int] | None = None):
        from train.data import ManifestImageRows

        self.rows = ManifestImageRows(manifest, preprocess, rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def manifest_rows(self) -> tuple:
        """(the manifest, the image row of each item): what a read-ahead of its shards needs."""
        return self.rows.manifest, self.rows.rows

    def __getitem__(self, i: int):
        from train.data import BadImage

        _, item = self.rows[i]
        if isinstance(item, BadImage):
            return self.rows.preprocess(Image.new("RGB", (32, 32))), item.message
        return item, ""


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
        from train.factory import load_trained_student

        student, cfg, _ = load_trained_student(Path(checkpoint), device)
        return cls(student, cfg.student, device, batch_size, workers, config=cfg)

    def _backbone(self, modality: str):
        """The frozen student's backbone for one modality, built once (deferred import: only this path runs one)."""
        if modality not in self._backbones:
            from pipeline.teachers.registry import build_encoder

            if self.region:
                source, body = self.spec.region_source
                if source != "grid":
                    raise ValueError(f"{self.spec}: regions precomputed for the dataset's own images cannot embed other "
                                     "image files; this needs a grid:IMAGE_SPEC region student")
                spec = f"grid:{body}"
            else:
                spec = self.spec.image_spec if modality == "image" else self.spec.text_spec
            encoder = build_encoder(spec, modality, device=self.device)
            if modality == "image" and not getattr(encoder, "needs_pixels", True):
                raise ValueError(f"the student's image backbone {spec!r} reads precomputed features by image id; "
                                 "it cannot embed other image files")
            self._backbones[modality] = encoder
        return self._backbones[modality]

    def manifest_images(self, manifest, rows: Sequence[int] | None = None, embedding: str = "uni",
                        progress: bool = False) -> torch.Tensor:
        """Embeddings of a manifest's images by row (every row without ``rows``), whether files or members of
        webdataset shards; an unreadable image is a one-line ImageError naming it."""
        return self.image_dataset(lambda preprocess: _ManifestRowInputs(manifest, preprocess, rows), embedding,
                                  progress)

    @property
    def dim(self) -> int:
        return int(self.student.uni_dim if self.region else self.student.embed_dim)

    @property
    def region(self) -> bool:
        """A region student (SGR/SAF): uni-modal embeddings only, images through its grid backbone."""
        return self.spec.kind in REGION_KINDS

    def _check_region_embedding(self, embedding: str, side: str) -> None:
        if self.region and embedding != "uni":
            raise ValueError(f"{self.spec}: a region student scores image-caption pairs and has no cross-modal "
                             f"{side} embedding; use the uni-modal one")

    def _regions(self, features: np.ndarray) -> torch.Tensor:
        """Grid regions [n, R, D] of a batch, rounded as the region store keeps them (pipeline/teachers/grid.py)."""
        from pipeline.teachers.grid import region_shape

        n_regions, region_dim = region_shape(self._backbone("image").identity())
        rows = _store_precision(features)
        return rows.view(rows.shape[0], n_regions, region_dim) * math.sqrt(n_regions)

    def images(self, images: Sequence[ImageInput], embedding: str = "uni", progress: bool = False,
               batch_size: int | None = None) -> torch.Tensor:
        """Embeddings of image files or PIL images, ``batch_size`` at a time: float32 [n, dim]."""
        return self.image_dataset(lambda preprocess: _ImageInputs(images, preprocess), embedding, progress,
                                  batch_size)

    def images_skipping_unreadable(self, images: Sequence[ImageInput], embedding: str = "uni",
                                   progress: bool = False, batch_size: int | None = None
                                   ) -> tuple[torch.Tensor, np.ndarray, dict[int, str]]:
        """Embeddings of the images that decode: (float32 [n_ok, dim], their int64 positions in ``images``,
        {position: one-line reason} of the ones that do not)."""
        emb, errors = self._embed_dataset(
            lambda preprocess: _ImageInputs(images, preprocess, skip_unreadable=True), embedding, progress,
            batch_size)
        keep = np.array([i for i in range(len(emb)) if i not in errors], dtype=np.int64)
        return emb[torch.from_numpy(keep)], keep, errors

    def image_dataset(self, make_dataset: Callable[[Callable], Dataset], embedding: str = "uni",
                      progress: bool = False, batch_size: int | None = None) -> torch.Tensor:
        """Embeddings of a dataset of preprocessed images, built by ``make_dataset(preprocess)`` with the
        student's own preprocessing (an open_clip student's, or a frozen student's backbone's)."""
        return self._embed_dataset(make_dataset, embedding, progress, batch_size)[0]

    @torch.no_grad()
    def _embed_dataset(self, make_dataset: Callable[[Callable], Dataset], embedding: str, progress: bool,
                       batch_size: int | None) -> tuple[torch.Tensor, dict[int, str]]:
        _check_embedding(embedding)
        self._check_region_embedding(embedding, "image")
        dataset = make_dataset(self.image_preprocess)
        size = batch_size or self.batch_size
        loader = DataLoader(dataset, batch_size=size, num_workers=self.workers)
        parts: list[torch.Tensor] = []
        errors: dict[int, str] = {}
        manifest_rows = getattr(dataset, "manifest_rows", None)  # images of shards: fetched ahead of the workers
        ahead = ShardReadAhead([])
        if manifest_rows:
            ahead = ShardReadAhead.for_rows(manifest_rows[0], consecutive_batches(manifest_rows[1], size),
                                            in_flight=self.workers * DATALOADER_PREFETCH, readers=self.workers)
        with autocast(self.device), tqdm(total=len(dataset), desc="images", unit="img", disable=not progress,
                               dynamic_ncols=True, leave=False) as bar, ahead:
            for batch in ahead.follow(loader):
                if isinstance(batch, (list, tuple)):  # (images, messages): a dataset that reports unreadable files
                    batch, messages = batch
                    unreadable = next((m for m in messages if m), None)
                    if unreadable and not getattr(dataset, "skip_unreadable", True):
                        raise ImageError(unreadable)
                    seen = sum(len(p) for p in parts)
                    errors.update({seen + j: m for j, m in enumerate(messages) if m})
                parts.append(self.image_batch(batch, embedding))
                bar.update(len(batch))
        return (torch.cat(parts) if parts else torch.zeros((0, self.dim))), errors

    @torch.no_grad()
    def texts(self, sentences: Sequence[str], embedding: str = "uni", progress: bool = False,
              batch_size: int | None = None) -> torch.Tensor:
        """Embeddings of sentences, ``batch_size`` at a time: float32 [n, dim]."""
        _check_embedding(embedding)
        self._check_region_embedding(embedding, "text")
        sentences = list(sentences)
        for i, text in enumerate(sentences):
            if not isinstance(text, str):
                raise ValueError(f"text {i}: expected a string, got {type(text).__name__}")
        step = batch_size or self.batch_size
        parts = []
        with autocast(self.device), tqdm(total=len(sentences), desc="captions", unit="cap", disable=not progress,
                               dynamic_ncols=True, leave=False) as bar:
            for lo in range(0, len(sentences), step):
                chunk = sentences[lo:lo + step]
                parts.append(self.text_batch(chunk, embedding))
                bar.update(len(chunk))
        return torch.cat(parts) if parts else torch.zeros((0, self.dim))

    @property
    def image_preprocess(self) -> Callable:
        """PIL image → input tensor: an open_clip student's own preprocessing, or its frozen backbone's."""
        if self.spec.kind == "frozen" or self.region:
            return self._backbone("image").preprocess
        return self.student.preprocess_val

    @torch.no_grad()
    def image_batch(self, batch: torch.Tensor, embedding: str = "cross") -> torch.Tensor:
        """Embeddings of one batch of images already put through ``image_preprocess``: float32 [n, dim] on the CPU."""
        encode = self.student.encode_images_uni if embedding == "uni" else self.student.encode_images
        if self.region:
            inputs = self._regions(self._backbone("image").encode(batch))
        elif self.spec.kind == "frozen":
            inputs = _store_precision(self._backbone("image").encode(batch))
        else:
            inputs = batch
        return encode(inputs.to(self.device)).float().cpu()

    @torch.no_grad()
    def text_batch(self, sentences: list[str], embedding: str = "cross") -> torch.Tensor:
        """Embeddings of one batch of sentences: float32 [n, dim] on the CPU."""
        encode = self.student.encode_texts_uni if embedding == "uni" else self.student.encode_texts
        if self.spec.kind == "frozen":
            from pipeline.captions import teacher_captions

            # what the backbone read when the features were cached
            inputs = _store_precision(self._backbone("text").encode(teacher_captions(sentences)[0])).to(self.device)
        elif self.region:  # token ids and lengths, as the run's vocabulary gives them
            tokens, lengths = self.student.tokenize(sentences, self.config.region.max_words if self.config else None)
            inputs = (tokens.to(self.device), lengths)
        else:
            inputs = self.student.tokenize(sentences).to(self.device)
        return encode(inputs).float().cpu()


def _check_embedding(embedding: str) -> None:
    if embedding not in EMBEDDING_CHOICES:
        raise ValueError(f"embedding must be one of {', '.join(EMBEDDING_CHOICES)}, got {embedding!r}")
