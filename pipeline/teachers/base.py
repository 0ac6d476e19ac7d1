"""What every teacher is: the `Encoder` protocol, the request a registry row's builder receives, the shared encoder
base classes, and the helpers the model builders share (device check, checkpoint reading, dimension probe).

Every encoder returns float32 [n, dim], not normalised (the store normalises). `identity()` names the weights by
content hash (pipeline/teachers/hashing.py).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch

from pipeline.distributed import autocast
from pipeline.errors import EncoderError, pickle_refusal
from pipeline.errors import one_line as _one_line

MODALITIES = ("image", "text")

BARE_STATE_DICT = "save the bare state dict with torch.save(model.state_dict(), path)"


@runtime_checkable
class Encoder(Protocol):
    spec: str
    modality: str
    dim: int

    def identity(self) -> dict: ...

    def encode(self, batch: Any) -> np.ndarray: ...


@dataclass(frozen=True)
class SpecRequest:
    """What a registry row's builder is asked for: ``spec`` whole (the identity records it), ``body`` the part after
    the row's prefix (the whole spec for a kind named by whole strings), one modality, a device name."""

    spec: str
    body: str
    modality: str
    device: str = "cpu"

    def torch_device(self) -> torch.device:
        """The device, checked: "cpu", or "cuda" where CUDA is available."""
        return check_device(self.device)


@dataclass(frozen=True)
class ImagePreprocess:
    """PIL image -> float tensor [3, H, W]; a plain picklable object so DataLoader workers can receive it."""

    transform: Callable[[Any], torch.Tensor]

    def __call__(self, img: Any) -> torch.Tensor:
        if getattr(img, "mode", "RGB") != "RGB":
            img = img.convert("RGB")
        return self.transform(img)


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EncoderError(f"device {device!r} is not a torch device; use 'cpu' or 'cuda'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise EncoderError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def load_state_file(path: Path, spec: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint (torch or safetensors) into a flat state dict, unwrapping common containers."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met an object that could run code when unpickled
        raise EncoderError(f"{path}: refused for {spec!r}: {pickle_refusal(exc)}; {BARE_STATE_DICT}") from None
    except Exception as exc:  # corrupt file, not a torch file, ...
        raise EncoderError(
            f"{path}: cannot read checkpoint for {spec!r} ({_one_line(exc)}); "
            f"{BARE_STATE_DICT}"
        ) from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(f"{path}: not a state dict of tensors (spec {spec!r})")
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def probe_dim(forward: Callable[[], torch.Tensor]) -> int:
    with torch.inference_mode():
        out = forward()
    return int(out.shape[-1])


class EncoderBase:
    """Spec, modality and an identity whose weights hash is computed once, when first asked."""

    spec: str
    modality: str
    dim: int

    def __init__(self, spec: str, modality: str, weights: Callable[[], str], extra: dict | None = None):
        self.spec = spec
        self.modality = modality
        self._weights_fn = weights
        self._weights: str | None = None
        self._extra = dict(extra or {})

    def identity(self) -> dict:
        # Hashing weights can take a moment for big models: do it once, when first asked.
        if self._weights is None:
            self._weights = self._weights_fn()
        return {"spec": self.spec, "modality": self.modality, "dim": self.dim, "weights": self._weights, **self._extra}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, modality={self.modality!r}, dim={self.dim})"


class TorchImageEncoder(EncoderBase):
    """An image model whose forward maps a preprocessed batch [n, 3, H, W] to features [n, dim]."""

    needs_pixels = True

    def __init__(
        self,
        spec: str,
        model: torch.nn.Module,
        forward: Callable[[torch.Tensor], torch.Tensor],
        preprocess: ImagePreprocess,
        input_size: tuple[int, int, int],
        device: torch.device,
        weights: Callable[[], str],
        extra: dict | None = None,
    ):
        super().__init__(spec, "image", weights, extra)
        self.model = model
        self.preprocess = preprocess
        self.input_size = input_size
        self.device = device
        self._forward = forward
        self.dim = probe_dim(lambda: forward(torch.zeros((1, *input_size), device=device)))

    def encode(self, batch: torch.Tensor) -> np.ndarray:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            got = getattr(batch, "shape", type(batch))
            raise ValueError(f"{self.spec}: expected an image tensor [n, 3, H, W], got {got}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode(), autocast(self.device):
            feats = self._forward(batch.to(self.device, non_blocking=True))
        return feats.float().cpu().numpy().reshape(batch.shape[0], -1)
