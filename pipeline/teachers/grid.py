"""Region features from a backbone's last feature map ("grid" regions), and the empty text encoder of an
image-only store.

Region-based students (SGR, SAF) read a set of region vectors per image. Their original input is 36 bottom-up
detector regions; ``grid:IMAGE_SPEC`` uses the cells of a registry backbone's last feature map instead (the registry
builds the backbone and hands it here), e.g. ``grid:efficientnet-lite0``: 224 px in, a 7×7 map of 1280 channels
out, so 49 regions × 1280. They are computed by the ordinary build job into an ordinary store, one row per image
holding the R regions region-major (``[R × D]`` flattened), so that resuming, checksums and verification work
unchanged. The store scales each row to unit norm as it does every row: readers multiply by √R, which makes the mean
squared region norm 1 and keeps the regions' relative magnitudes.

``none`` is the text side of such a store: one constant value per caption, so that nothing is computed for captions
(region students read words, not caption features).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.errors import EncoderError
from pipeline.teachers.base import Encoder, TorchImageEncoder

GRID_PREFIX = "grid:"
NO_TEXT = "none"


def _feature_map(model: torch.nn.Module, spec: str):
    """A function images → [n, R, D] regions: CNN maps [n, D, H, W] become H·W cells, ViT tokens stay tokens
    (without the class and register tokens)."""
    if not hasattr(model, "forward_features"):
        raise EncoderError(f"{spec!r}: the backbone has no feature map to read regions from (grid regions need an "
                           "EfficientNet-Lite or a timm backbone)")
    prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)

    def regions(images: torch.Tensor) -> torch.Tensor:
        out = model.forward_features(images)
        if out.ndim == 4:
            return out.flatten(2).transpose(1, 2)
        if out.ndim == 3:
            return out[:, prefix_tokens:]
        raise EncoderError(f"{spec!r}: the backbone's features have shape {tuple(out.shape)}, not a map or tokens")

    return regions


def grid_backbone_spec(body: str, spec: str) -> str:
    """The IMAGE_SPEC of ``grid:IMAGE_SPEC`` (``body``), refused before anything is built when its kind has no
    feature map to read."""
    inner_spec = body.strip()
    if not inner_spec or inner_spec.startswith((GRID_PREFIX, "precomputed:", "open_clip:")):
        raise EncoderError(f"encoder spec {spec!r}: grid regions need an EfficientNet-Lite or timm image backbone, "
                           "e.g. 'grid:efficientnet-lite0' or 'grid:timm:resnet50:/path/weights.pth'")
    return inner_spec


def grid_encoder(spec: str, backbone: Encoder, device: torch.device) -> TorchImageEncoder:
    """``grid:IMAGE_SPEC``: the last feature map of ``backbone`` (the registry's encoder for IMAGE_SPEC) as regions,
    flattened to one row of R × D values per image. Its identity records ``regions`` and ``region_dim``."""
    if not isinstance(backbone, TorchImageEncoder):
        raise EncoderError(f"encoder spec {spec!r}: {backbone.spec!r} has no feature map to read regions from")
    regions = _feature_map(backbone.model, spec)
    with torch.inference_mode():
        probe = regions(torch.zeros((1, *backbone.input_size), device=device))
    n_regions, region_dim = int(probe.shape[1]), int(probe.shape[2])
    return TorchImageEncoder(spec, backbone.model, lambda x: regions(x).flatten(1), backbone.preprocess,
                             backbone.input_size, device, lambda: backbone.identity()["weights"],
                             extra={"regions": n_regions, "region_dim": region_dim, "backbone": backbone.spec})


def region_shape(identity: dict) -> tuple[int, int]:
    """(R, D) of a grid encoder's identity (as a store records it)."""
    try:
        return int(identity["regions"]), int(identity["region_dim"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"image encoder {identity.get('spec')!r} does not record regions and region_dim; "
                         "not a grid region store") from None


def unflatten_regions(rows: np.ndarray, n_regions: int, region_dim: int) -> np.ndarray:
    """Stored grid rows [n, R·D] (unit norm) → regions [n, R, D], rescaled by √R (mean squared region norm 1)."""
    return rows.reshape(rows.shape[0], n_regions, region_dim) * np.asarray(math.sqrt(n_regions), dtype=rows.dtype)


class NoTextEncoder:
    """The ``none`` text encoder: a constant 1-d vector per caption, for stores that hold image features only."""

    needs_pixels = False

    def __init__(self) -> None:
        self.spec, self.modality, self.dim = NO_TEXT, "text", 1

    def identity(self) -> dict:
        return {"spec": self.spec, "modality": self.modality, "dim": self.dim, "weights": "none"}

    def encode(self, batch) -> np.ndarray:
        return np.ones((len(list(batch)), 1), dtype=np.float32)
