"""``timm:NAME[:CHECKPOINT]``: a timm backbone as an image teacher, its pooled features (classifier removed)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import EncoderError
from pipeline.errors import one_line as _one_line
from pipeline.model_names import parse_model_name
from pipeline.teachers.base import ImagePreprocess, SpecRequest, TorchImageEncoder, load_state_file
from pipeline.teachers.hashing import file_sha256, state_dict_sha256


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if names is None:
        names = ("classifier", "head", "fc")
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names)


def build_timm(request: SpecRequest) -> TorchImageEncoder:
    """NAME as timm.create_model takes it (hf-hub: and local-dir: included); CHECKPOINT a local weights file,
    without it timm's pretrained weights."""
    spec, device = request.spec, request.torch_device()
    import timm
    from timm.data import create_transform, resolve_data_config

    parsed = parse_model_name(request.body)
    name, checkpoint = parsed.model, parsed.weights
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
        state = load_state_file(ckpt, spec)
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
