"""Training configuration: a few plain values with defaults, a named preset, a config file and overrides.

Precedence, lowest first: the preset, then a YAML/JSON ``--config`` file, then explicit command-line
flags, then ``--set KEY=VALUE`` overrides. Keys are dotted; the loss settings sit at the top level
(``csa.rate``, ``usa.tau_images``, ``contrastive.reduction``, ``tau_soft``), as do ``loss``
(which terms are on) and ``soft_labels.mode``. The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from train.losses import LossConfig
from train.students import DEFAULT_STUDENT, parse_student_spec

LOSS_CHOICES = ("contrastive", "csa", "usa", "cusa")
_LOSS_TERMS = {
    "contrastive": (True, False, False),
    "csa": (True, True, False),
    "usa": (True, False, True),
    "cusa": (True, True, True),
}
_LOSS_KEYS = ("contrastive", "itr", "csa", "usa", "tau_soft")
SAMPLERS = ("random", "teacher-neighbors")


@dataclass
class SoftLabelConfig:
    mode: str = "dense"  # dense | sparse (top-K cached teacher neighbors only)
    k: int | None = None  # sparse: neighbors used per row (default: all the table keeps)
    stream: bool = False  # dense: read rows from the store chunk-wise instead of holding them in memory


@dataclass
class FrozenConfig:
    """The trainable part of a frozen-backbone student (see METHOD.md's note on frozen backbones)."""

    embed_dim: int = 256
    hidden: int = 512
    dropout: float = 0.1
    feature_cache: str | None = None  # where backbone features are cached [default: next to the teacher cache]


@dataclass
class RegionConfig:
    """Sizes and settings of a region-based student (SGR/SAF); the defaults are the SGRAF paper's."""

    word_dim: int = 300
    embed_dim: int = 1024  # the joint size of region and word vectors
    sim_dim: int = 256  # similarity representation size
    uni_dim: int = 1024  # uni-modal (USA) embedding size
    sgr_steps: int = 3
    smooth: float = 9.0  # λ of the text-to-image attention softmax
    dropout: float = 0.4  # on word embeddings and inside the attention pooling
    pooling: str = "attention"  # global vectors: attention (the paper, without its BatchNorm layers) | mean
    min_count: int = 4  # vocabulary: words seen at least this often in the training captions
    max_words: int = 64  # longer captions are cut (pair scoring memory grows with the longest caption)
    length_groups: int = 8  # training: a batch's captions are scored in groups of similar length (less padding)
    eval_images: int = 128  # pair scoring in evaluation: images per chunk
    eval_captions: int = 128  # and captions per chunk
    feature_cache: str | None = None  # where grid region features are cached [default: next to the teacher cache]


@dataclass
class TrainConfig:
    data: str = ""
    cache: str = ""
    student: str = DEFAULT_STUDENT
    val_data: str | None = None
    out: str = "runs/cusa"
    preset: str = "paper"
    loss: str = "cusa"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-5
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    grad_clip: float = 0.0
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    format: str = "auto"
    image_root: str | None = None
    split: str = "train"
    val_split: str = "val"
    sampler: str = "random"  # random | teacher-neighbors (batches of teacher-neighbor groups)
    sampler_group: int = 8  # teacher-neighbors: pairs per neighbor group
    gather: bool = False  # DDP: all-gather features, image ids and teacher rows across ranks
    log_every: int = 10
    eval_batch_size: int = 256
    image_cache: str | None = None  # soft labels for images from another store (default: --cache)
    text_cache: str | None = None  # soft labels for captions from another store (default: --cache)
    soft_labels: SoftLabelConfig = field(default_factory=SoftLabelConfig)
    frozen: FrozenConfig = field(default_factory=FrozenConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    losses: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "losses"}
        d["soft_labels"] = dataclasses.asdict(self.soft_labels)
        d["frozen"] = dataclasses.asdict(self.frozen)
        d["region"] = dataclasses.asdict(self.region)
        d.update(self.losses.to_dict())  # loss settings live at the top level: csa.rate, usa.rate, ...
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        return apply_overrides(cls(), d)


# Named presets. "paper" is the reference configuration for CLIP ViT-B/32 on COCO and Flickr30K (METHOD.md).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "lr": 1e-5, "min_lr": 1e-6, "weight_decay": 1e-4, "batch_size": 128, "epochs": 30,
        "contrastive": {"rate": 1.0, "reduction": "mean", "tau": {"init": 0.05, "min": 0.01, "max": 0.10,
                                                                     "learnable": True}},
        "csa": {"rate": 0.1, "mode": "each", "form": "kl",
                "tau": {"init": 0.45, "min": 0.10, "max": 0.99, "learnable": True}},
        "usa": {"rate": 0.5, "form": "kl",
                "tau_images": {"init": 0.45, "min": 0.10, "max": 1.00, "learnable": True},
                "tau_texts": {"init": 0.45, "min": 0.10, "max": 1.00, "learnable": True}},
        "tau_soft": 1.0,
    },
    # SGR/SAF with CUSA, the paper's appendix (Table 7 and text); the rates by student are in PRESET_BY_STUDENT.
    # grad_clip 2.0 is SGRAF's own training setting. Learning rates are explicit: nothing here falls back to a
    # default that depends on the student.
    "sgraf-paper": {
        "lr": 2e-4, "min_lr": 1e-5, "weight_decay": 1e-4, "batch_size": 128, "epochs": 40, "grad_clip": 2.0,
        "contrastive": {"rate": 1.0, "reduction": "mean", "tau": {"init": 0.05, "min": 0.01, "max": 0.10,
                                                                     "learnable": True}},
        "itr": {"loss": "auto", "margin": 0.2, "max_violation": True, "reduction": "mean"},
        "csa": {"mode": "each", "form": "kl", "tau": {"init": 0.45, "min": 0.10, "max": 0.99, "learnable": True}},
        "usa": {"form": "kl",
                "tau_images": {"init": 0.45, "min": 0.10, "max": 1.00, "learnable": True},
                "tau_texts": {"init": 0.45, "min": 0.10, "max": 1.00, "learnable": True}},
        "tau_soft": 1.0,
    },
}
# Preset settings that depend on the student kind, applied right after the preset (so a config file, a flag or
# --set still wins). A preset listed here refuses students of other kinds.
PRESET_BY_STUDENT: dict[str, dict[str, dict[str, Any]]] = {
    "sgraf-paper": {
        "sgr": {"csa": {"rate": 0.60}, "usa": {"rate": 0.75}},
        "saf": {"csa": {"rate": 1.00}, "usa": {"rate": 0.75}},
    },
}


def build_config(preset: str = "paper", config_file: str | None = None, flags: Mapping[str, Any] | None = None,
                 overrides: list[str] | None = None) -> TrainConfig:
    """Resolve a TrainConfig from a preset, an optional config file, explicit flags and KEY=VALUE overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    file_values = load_config_file(config_file) if config_file else None

    def resolve(preset_layers: list[Mapping[str, Any]]) -> TrainConfig:
        cfg = TrainConfig(preset=preset)
        for layer in preset_layers:
            cfg = apply_overrides(cfg, layer)
        if file_values:
            cfg = apply_overrides(cfg, file_values)
        if flags:
            cfg = apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None})
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. csa.rate=0.2")
            key, value = item.split("=", 1)
            cfg = apply_overrides(cfg, {key.strip(): _parse_scalar(value.strip())})
        return cfg

    cfg = resolve([PRESETS[preset]])
    by_student = PRESET_BY_STUDENT.get(preset)
    if by_student:
        # the student may come from any layer above the preset, so it is known only now
        kind = parse_student_spec(cfg.student).kind
        if kind not in by_student:
            raise ValueError(f"preset {preset!r} holds settings for {', '.join(k + ':' for k in by_student)} "
                             f"students, not for {cfg.student!r}")
        cfg = resolve([PRESETS[preset], by_student[kind]])
    return cfg


def load_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the config file ({exc.strerror})") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ValueError(f"{path}: not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                         f"({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of settings")
    return data


def _parse_scalar(text: str) -> Any:
    low = text.lower()
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and name.split(".")[0] not in _LOSS_KEYS:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def apply_overrides(cfg: TrainConfig, updates: Mapping[str, Any]) -> TrainConfig:
    """A copy of ``cfg`` with (possibly dotted, possibly nested) ``updates`` applied and validated."""
    cfg = dataclasses.replace(cfg, soft_labels=dataclasses.replace(cfg.soft_labels),
                              frozen=dataclasses.replace(cfg.frozen), region=dataclasses.replace(cfg.region))
    loss_updates: dict[str, Any] = {}
    for key, value in _flatten(updates).items():
        head, _, rest = key.partition(".")
        if head in _LOSS_KEYS:
            loss_updates[key] = value
        elif head in ("soft_labels", "frozen", "region"):
            sub = getattr(cfg, head)
            if rest not in {f.name for f in dataclasses.fields(sub)}:
                raise ValueError(f"unknown setting {key!r} (known under {head}: "
                                 f"{', '.join(f.name for f in dataclasses.fields(sub))})")
            setattr(sub, rest, _coerce(value, getattr(sub, rest), key))
        elif head == "losses":
            loss_updates[rest] = value
        elif key in {f.name for f in dataclasses.fields(TrainConfig)} and not rest:
            setattr(cfg, key, _coerce(value, getattr(cfg, key), key))
        else:
            raise ValueError(f"unknown setting {key!r}")
    if cfg.loss not in LOSS_CHOICES:
        raise ValueError(f"loss must be one of {', '.join(LOSS_CHOICES)}, got {cfg.loss!r}")
    if "loss" in _flatten(updates):
        # the named term set first, so that explicit ``*.enabled`` settings given alongside it win (a saved
        # config.json, which holds both, then reloads exactly as it was run)
        con, csa, usa = _LOSS_TERMS[cfg.loss]
        cfg.losses = cfg.losses.updated({"contrastive.enabled": con, "csa.enabled": csa, "usa.enabled": usa})
    if loss_updates:
        cfg.losses = cfg.losses.updated(loss_updates)
    _validate(cfg)
    return cfg


def _coerce(value: Any, current: Any, key: str) -> Any:
    if value is None or current is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"setting {key} must be true or false, got {value!r}")
    if isinstance(current, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"setting {key} must be an integer, got {value!r}") from None
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"setting {key} must be a number, got {value!r}") from None
    return str(value)


def _validate(cfg: TrainConfig) -> None:
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {cfg.epochs}")
    if cfg.batch_size < 2:
        raise ValueError(f"batch size must be ≥ 2 (in-batch negatives), got {cfg.batch_size}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if cfg.soft_labels.mode not in ("dense", "sparse"):
        raise ValueError(f"soft_labels.mode must be dense or sparse, got {cfg.soft_labels.mode!r}")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {cfg.sampler!r}")
    region = cfg.region
    if region.pooling not in ("attention", "mean"):
        raise ValueError(f"region.pooling must be attention or mean, got {region.pooling!r}")
    for name in ("word_dim", "embed_dim", "sim_dim", "uni_dim", "sgr_steps", "min_count", "max_words",
                 "eval_images", "eval_captions", "length_groups"):
        if getattr(region, name) < 1:
            raise ValueError(f"region.{name} must be ≥ 1, got {getattr(region, name)}")
    if not 0 <= region.dropout < 1:
        raise ValueError(f"region.dropout must be in [0, 1), got {region.dropout}")


def resolved_losses(cfg: TrainConfig) -> LossConfig:
    """The loss settings with ``itr.loss=auto`` made concrete: each student's own ITR loss, the hardest-negative
    triplet ranking loss for region students (SGR/SAF), InfoNCE for dual encoders."""
    if cfg.losses.itr.loss != "auto":
        return cfg.losses
    from train.students import REGION_KINDS

    region = parse_student_spec(cfg.student).kind in REGION_KINDS
    return cfg.losses.updated({"itr.loss": "triplet" if region else "contrastive"})
