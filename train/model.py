"""A trained student as a Python object: ``load_model(run)`` then ``encode_images`` / ``encode_texts``.

```python
from train.model import load_model

model = load_model("runs/coco-cusa", device="cpu")            # a run folder (its best checkpoint), a .pt file
                                                              # or a folder cusa-export wrote
img = model.encode_images(["a.jpg", pil_image])               # float32 [2, D], L2-normalised
txt = model.encode_texts(["a dog on a beach", "two cats"])    # float32 [2, D]
scores = txt @ img.T                                          # cosine similarities
```

The embeddings are the retrieval (cross-modal) ones; ``uni=True`` gives the uni-modal ones that USA trains (image
to image, sentence similarity). A frozen student runs its backbones from the same spec strings it was trained with
(features rounded as its feature cache rounds them); an open_clip student uses its own preprocessing and tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.distributed import resolve_device
from train.config import TrainConfig
from train.embedding import ImageInput, StudentEmbedder


class TrainedModel:
    """A trained student ready to embed; see the module docstring. Build it with ``load_model``."""

    def __init__(self, embedder: StudentEmbedder, checkpoint: Path, epoch: int):
        self.embedder = embedder
        self.checkpoint = checkpoint
        self.epoch = epoch  # 1-based epoch the checkpoint was saved after
        self._identity: str | None = None

    @property
    def config(self) -> TrainConfig:
        """The configuration the run was trained with."""
        return self.embedder.config

    @property
    def spec(self) -> str:
        """The student spec string (``frozen:IMAGE+TEXT`` or ``open_clip:ARCH[:CHECKPOINT]``)."""
        return str(self.embedder.spec)

    @property
    def dim(self) -> int:
        """Width of every embedding this model returns."""
        return self.embedder.dim

    @property
    def device(self) -> str:
        return self.embedder.device

    @property
    def identity(self) -> str:
        """sha256 hex of the student spec and every weight: two models with the same identity embed alike. Keys
        caches of embeddings, so a retrained run never reuses what an older checkpoint computed."""
        if self._identity is None:
            digest = hashlib.sha256(f"cusa-student-v1\n{self.spec}\n".encode())
            for name, tensor in sorted(self.embedder.student.state_dict().items()):
                t = tensor.detach().cpu().contiguous()
                digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, bf16 included
            self._identity = digest.hexdigest()
        return self._identity

    def encode_images(self, images: ImageInput | Sequence[ImageInput], uni: bool = False,
                      batch_size: int | None = None, progress: bool | None = None) -> np.ndarray:
        """Embeddings of image files or PIL images: L2-normalised float32 numpy [N, D].

        ``uni=True``: the uni-modal embeddings. ``progress`` None shows a bar when the input spans several batches.
        An unreadable file is a one-line ``pipeline.errors.ImageError`` naming it and its position.
        """
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        out = self.embedder.images(items, "uni" if uni else "cross", self._show(len(items), progress, batch_size),
                                   _checked(batch_size))
        return _numpy(out, self.dim)

    def encode_texts(self, texts: str | Sequence[str], uni: bool = False, batch_size: int | None = None,
                     progress: bool | None = None) -> np.ndarray:
        """Embeddings of sentences: L2-normalised float32 numpy [N, D] (a single string gives [1, D])."""
        items = [texts] if isinstance(texts, str) else list(texts)
        out = self.embedder.texts(items, "uni" if uni else "cross", self._show(len(items), progress, batch_size),
                                  _checked(batch_size))
        return _numpy(out, self.dim)

    def _show(self, n: int, progress: bool | None, batch_size: int | None) -> bool:
        return n > (batch_size or self.embedder.batch_size) if progress is None else bool(progress)

    def __repr__(self) -> str:
        return f"TrainedModel({self.spec!r}, checkpoint={str(self.checkpoint)!r}, epoch={self.epoch}, dim={self.dim})"


def _checked(batch_size: int | None) -> int | None:
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return batch_size


def _numpy(emb, dim: int) -> np.ndarray:
    out = np.ascontiguousarray(emb.numpy(), dtype=np.float32)
    return out.reshape(0, dim) if out.size == 0 else out


def load_model(run: str | os.PathLike, device: str = "cpu", batch_size: int = 256, workers: int = 0) -> TrainedModel:
    """The student of a cusa-train run folder (its best checkpoint, or its last without validation), of a
    checkpoint file or of a folder that ``cusa-export`` wrote, on ``device`` ("cpu", "cuda", "cuda:1" or "auto"), in eval mode.

    ``batch_size`` inputs go through the model at a time; ``workers`` DataLoader processes decode image files.
    """
    from train.factory import load_trained_student, resolve_checkpoint
    from train.exported import is_exported_folder, load_exported, open_clip_folder_without_heads

    _checked(batch_size)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(device)):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if is_exported_folder(run):  # a folder cusa-export wrote: open_clip's towers and cusa's heads
        device = resolve_device(device)
        student, cfg, epoch = load_exported(run, device)
        embedder = StudentEmbedder(student, cfg.student, device, batch_size, workers, config=cfg)
        return TrainedModel(embedder, Path(run), epoch)
    if open_clip_folder_without_heads(run):
        raise ValueError(f"{run}: an open_clip folder without cusa_heads.safetensors (not written by cusa-export); "
                         f"load it with open_clip.create_model_and_transforms('local-dir:{run}')")
    checkpoint = resolve_checkpoint(run)
    device = resolve_device(device)
    student, cfg, ckpt = load_trained_student(checkpoint, device)
    embedder = StudentEmbedder(student, cfg.student, device, batch_size, workers, config=cfg)
    return TrainedModel(embedder, checkpoint, int(ckpt.get("epoch", 0)))  # checkpoints number epochs from 1
