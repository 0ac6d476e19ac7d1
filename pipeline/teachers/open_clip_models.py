"""``open_clip:ARCH[:CHECKPOINT_OR_TAG]``: either tower of an open_clip model as a teacher; the model name is read
as the open_clip student reads it (pipeline/model_names.py)."""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipeline.distributed import autocast
from pipeline.errors import EncoderError, pickle_refusal
from pipeline.errors import one_line as _one_line
from pipeline.model_names import parse_model_name
from pipeline.teachers.base import (
    BARE_STATE_DICT,
    EncoderBase,
    ImagePreprocess,
    SpecRequest,
    TorchImageEncoder,
    probe_dim,
)
from pipeline.teachers.hashing import file_sha256, state_dict_sha256

# Seed used for models built without weights, so that "random init" names one reproducible set of weights.
_RANDOM_INIT_SEED = 0


class OpenClipTextEncoder(EncoderBase):
    def __init__(self, spec: str, model: Any, tokenizer: Any, device: torch.device, weights: Callable[[], str]):
        super().__init__(spec, "text", weights, {"context_length": int(getattr(tokenizer, "context_length", 0) or 0)})
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dim = probe_dim(lambda: model.encode_text(tokenizer(["dimension probe"]).to(device)))

    def encode(self, batch: Sequence[str]) -> np.ndarray:
        batch = list(batch)
        if not batch:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenizer(batch).to(self.device)
        with torch.inference_mode(), autocast(self.device):
            feats = self.model.encode_text(tokens)
        return feats.float().cpu().numpy()


@contextlib.contextmanager
def _seeded_init(seed: int):
    """Deterministic weight init without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_open_clip(request: SpecRequest) -> EncoderBase:
    """The image or text tower (``request.modality``) of the open_clip model the body names."""
    spec, modality, device = request.spec, request.modality, request.torch_device()
    parsed = parse_model_name(request.body)
    arch, pretrained = parsed.model, parsed.weights
    try:
        import open_clip
    except ImportError as exc:
        raise EncoderError(f"{spec!r} needs the package open_clip_torch ({_one_line(exc)})") from exc
    ckpt: Path | None = None
    if pretrained:
        candidate = Path(pretrained).expanduser()
        if candidate.is_file():
            ckpt = candidate
        elif "/" in pretrained or os.sep in pretrained or candidate.suffix in (".pt", ".pth", ".bin", ".safetensors"):
            raise EncoderError(f"{candidate}: checkpoint file for {spec!r} not found")
    try:
        with _seeded_init(_RANDOM_INIT_SEED):
            model, _, preprocess_val = open_clip.create_model_and_transforms(
                arch, pretrained=str(ckpt) if ckpt else pretrained, device=device
            )
        tokenizer = open_clip.get_tokenizer(arch) if modality == "text" else None
    except pickle.UnpicklingError as exc:  # open_clip reads local files with weights_only=True
        raise EncoderError(f"{ckpt}: refused for {spec!r}: {pickle_refusal(exc)}; {BARE_STATE_DICT}") from None
    except Exception as exc:
        if pretrained:
            fix = f"without network pass a local checkpoint: open_clip:{arch}:/path/to/weights.pt"
        else:
            fix = "see open_clip.list_models()"
        raise EncoderError(f"cannot build open_clip model {arch!r} ({_one_line(exc)}); {fix}") from exc
    model.eval()

    if ckpt is not None:
        weights = lambda: f"sha256:{file_sha256(ckpt)}"  # noqa: E731
    elif pretrained or parsed.schema:
        weights = lambda: f"open_clip-pretrained:{pretrained or arch}:sha256:{state_dict_sha256(model)}"  # noqa: E731
    else:
        weights = lambda: f"random-init:seed={_RANDOM_INIT_SEED}:sha256:{state_dict_sha256(model)}"  # noqa: E731

    if modality == "text":
        return OpenClipTextEncoder(spec, model, tokenizer, device, weights)
    preprocess = ImagePreprocess(preprocess_val)
    # The transform knows the input size whatever the vision tower (ViT, ResNet, timm trunk) calls it.
    from PIL import Image

    input_size = tuple(preprocess(Image.new("RGB", (32, 32))).shape)
    return TorchImageEncoder(spec, model, model.encode_image, preprocess, input_size, device, weights)
