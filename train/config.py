"""Training configuration: a few plain values with defaults, a named preset, a config file and overrides.

Precedence, lowest first: the preset, then the preset's values for the run's kind of student (the ``paper``
preset trains a frozen-backbone student, whose parameters are all new, at lr 1e-3 and fine-tunes open_clip at the
paper's 1e-5), then a YAML/JSON ``--config`` file, then explicit command-line flags, then ``--set KEY=VALUE``
overrides. Keys are dotted; the loss settings sit at the top level
(``csa.rate``, ``usa.tau_images``, ``contrastive.reduction``, ``tau_soft``), as do ``loss``
(which terms are on) and ``soft_labels.mode``. Every layer goes through the one settings engine (train/settings.py);
the defaults are the paper's (train/paper.py, docs/method.md). The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from teacher_cache.remote import redact_url
from teacher_cache.remote_store import DEFAULT_STORE_CACHE_GIB
from train.losses import LossConfig
from train.metrics_log import parse_report_to
from train.paper import PAPER
from train.settings import apply_settings, coerce_setting, flat_settings
from train.students import CROSS_HEADS, DEFAULT_STUDENT, parse_student_spec

LOSS_CHOICES = ("contrastive", "csa", "usa", "cusa")
_LOSS_TERMS = {
    "contrastive": (True, False, False),
    "csa": (True, True, False),
    "usa": (True, False, True),
    "cusa": (True, True, True),
}
SAMPLERS = ("random", "teacher-neighbors")
_LOCATIONS = ("data", "cache", "val_data", "image_cache", "text_cache")  # settings that may be URLs
ON_BAD_IMAGE = ("fail", "skip")
# a preset's key holding its values per kind of student (parse_student_spec's kinds), applied over the preset
STUDENT_DEFAULTS_KEY = "students"


def _stream_setting(value: Any, key: str = "soft_labels.stream") -> bool | None:
    """soft_labels.stream as True, False or None (auto: chosen from the memory budget)."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("auto", "none", "null", ""):
        return None
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"{key} must be true, false or auto, got {value!r}")


def _optional_number(value: Any, key: str) -> float | None:
    """A number, or None for "not set" (head_lr: the same as lr)."""
    return coerce_setting(value, 0.0, key)


def _cross_head_setting(value: Any, key: str) -> str:
    """A cross head choice; ``--set cross_head=none`` reads as null, which is the choice "none"."""
    return "none" if value is None else coerce_setting(value, "", key)


@dataclass
class SoftLabelConfig:
    mode: str = "dense"  # dense | sparse (top-K cached teacher neighbors only)
    k: int | None = None  # sparse: neighbors used per row (default: all the table keeps)
    # dense: hold every teacher row in memory (false), stream them from the store's chunks in a chunk-local
    # order (true), or choose by max_memory_mib (None, "auto")
    stream: bool | None = field(default=None, metadata={"coerce": _stream_setting})
    max_memory_mib: float = 8192.0  # budget for resident teacher rows: dense when both modalities fit
    window: int = 0  # streamed: stored chunks whose pairs are shuffled together (0: as many as the budget holds)


@dataclass
class FrozenConfig:
    """The trainable part of a frozen-backbone student (docs/method.md, "Students with frozen backbones")."""

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
    # reference | none (open_clip students: CLIP's own embedding serves retrieval)
    cross_head: str = field(default="reference", metadata={"coerce": _cross_head_setting})
    val_data: str | None = None
    out: str = "runs/cusa"
    preset: str = "paper"
    loss: str = "cusa"
    epochs: int = PAPER["epochs"]
    batch_size: int = PAPER["batch_size"]
    lr: float = PAPER["lr"]
    min_lr: float = PAPER["min_lr"]
    # newly initialised parameters (adapters, cross/uni heads, loss temperatures); None: the same as lr. Decays by
    # the same cosine factor as lr.
    head_lr: float | None = field(default=None, metadata={"coerce": _optional_number})
    weight_decay: float = PAPER["weight_decay"]
    grad_clip: float = 0.0
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    format: str = "auto"
    image_root: str | None = None
    image_key: str | None = None  # webdataset shards: image member extension(s) [default: jpg;jpeg;png;webp]
    caption_key: str = "txt"  # webdataset shards: caption member (one caption per line), or json:FIELD
    id_field: str | None = None  # webdataset shards: json field holding the image id [default: the sample key]
    split: str = "train"
    val_split: str = "val"
    sampler: str = "random"  # random | teacher-neighbors (batches of teacher-neighbor groups)
    sampler_group: int = 8  # teacher-neighbors: pairs per neighbor group
    gather: bool = False  # DDP: all-gather features, image ids and teacher rows across ranks
    log_every: int = 10
    save_every_steps: int = 0  # also write last.pt every N optimizer steps, mid-epoch (0: at epoch ends only)
    report_to: str = "none"  # none | tensorboard | wandb (or both, comma-separated): metrics.jsonl's values also there
    wandb_project: str | None = None  # W&B project [default: WANDB_PROJECT, else cusa]
    wandb_name: str | None = None  # W&B run name [default: the run folder's name]
    wandb_group: str | None = None  # W&B group (cusa-ablate: its grid's)
    eval_batch_size: int = 256
    on_bad_image: str = "fail"  # validation images that cannot be read: fail, or leave out (skipped_images)
    image_cache: str | None = None  # soft labels for images from another store (default: --cache)
    text_cache: str | None = None  # soft labels for captions from another store (default: --cache)
    store_cache: str | None = None  # where files of stores read from URLs are kept [default: $CUSA_CACHE_DIR/stores]
    store_cache_gib: float = DEFAULT_STORE_CACHE_GIB  # the most that folder holds (least recently used files go)
    soft_labels: SoftLabelConfig = field(default_factory=SoftLabelConfig)
    frozen: FrozenConfig = field(default_factory=FrozenConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    # the loss settings, at the top level of the keys as in to_dict (csa.rate; losses.csa.rate works too)
    losses: LossConfig = field(default_factory=LossConfig, metadata={"inline": True})

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "losses"}
        d["soft_labels"] = dataclasses.asdict(self.soft_labels)
        d["frozen"] = dataclasses.asdict(self.frozen)
        d["region"] = dataclasses.asdict(self.region)
        d.update(self.losses.to_dict())  # loss settings live at the top level: csa.rate, usa.rate, ...
        for key in _LOCATIONS:  # config.json and checkpoints never hold a URL's secrets
            d[key] = redact_url(d[key]) if isinstance(d[key], str) else d[key]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        return check_schedule(apply_overrides(cls(), d))


# Named presets. "paper" is the reference configuration for CLIP ViT-B/32 on COCO and Flickr30K (train/paper.py,
# docs/method.md): lr 1e-5 for the whole fine-tuned CLIP, heads included, as the reference code does. A frozen-backbone
# student has only new parameters (adapters and heads), which learn next to nothing at 1e-5: its own values sit under
# "students". A preset may equally set one lr for every student (no "students" entry). Every preset starts from the
# defaults, which are the paper's values.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {**PAPER, STUDENT_DEFAULTS_KEY: {"frozen": {"lr": 1e-3, "min_lr": 1e-4}}},
    # SGR/SAF with CUSA, the paper's appendix (Table 7 and text), with α (CSA) / β (USA) by student; the temperatures
    # are the paper's. grad_clip 2.0 is SGRAF's own training setting. The triplet loss is averaged over the batch:
    # summed (VSE++, SGRAF), it leaves the appendix rates' soft-label terms inert (docs/region-students.md, "Reduction").
    # The lr is explicit and the same for both students.
    "sgraf-paper": {
        "lr": 2e-4, "min_lr": 1e-5, "weight_decay": 1e-4, "batch_size": 128, "epochs": 40, "grad_clip": 2.0,
        STUDENT_DEFAULTS_KEY: {"sgr": {"csa": {"rate": 0.60}, "usa": {"rate": 0.75}},
                               "saf": {"csa": {"rate": 1.00}, "usa": {"rate": 0.75}}},
        "itr": {"reduction": "mean"},
    },
}

# presets made for the kinds of student they list under STUDENT_DEFAULTS_KEY: any other kind is refused
PRESETS_FOR_LISTED_STUDENTS = frozenset({"sgraf-paper"})


def build_config(preset: str = "paper", config_file: str | None = None, flags: Mapping[str, Any] | None = None,
                 overrides: list[str] | None = None) -> TrainConfig:
    """Resolve a TrainConfig from a preset, an optional config file, explicit flags and KEY=VALUE overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    layers = explicit_settings(config_file, flags, overrides)
    base = {k: v for k, v in PRESETS[preset].items() if k != STUDENT_DEFAULTS_KEY}
    cfg = apply_overrides(TrainConfig(preset=preset), base)
    student = cfg.student
    for layer in layers:  # the student decides which of the preset's per-student values apply
        student = layer.get("student", student)
    kind = parse_student_spec(str(student)).kind
    if preset in PRESETS_FOR_LISTED_STUDENTS and kind not in PRESETS[preset][STUDENT_DEFAULTS_KEY]:
        raise ValueError(f"preset {preset!r} holds settings for "
                         f"{', '.join(k + ':' for k in PRESETS[preset][STUDENT_DEFAULTS_KEY])} students, not for "
                         f"{student!r}")
    per_student = PRESETS[preset].get(STUDENT_DEFAULTS_KEY, {}).get(kind)
    if per_student:
        cfg = apply_overrides(cfg, per_student)
    ratio = cfg.min_lr / cfg.lr  # the preset's schedule floor, relative to its peak
    for layer in layers:
        cfg = apply_overrides(cfg, layer)
    given = set().union(*(flat_settings(layer) for layer in layers)) if layers else set()
    if "lr" in given and "min_lr" not in given:
        # an lr asked for without a floor keeps the preset's shape: the cosine ends at the same fraction of it
        cfg = apply_overrides(cfg, {"min_lr": cfg.lr * ratio})
    return check_schedule(cfg)


def explicit_settings(config_file: str | None = None, flags: Mapping[str, Any] | None = None,
                      overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """What a command asks for beyond its preset, lowest precedence first: the config file, the flags that were
    given (None: not given), then each ``--set KEY=VALUE``."""
    layers: list[dict[str, Any]] = []
    if config_file:
        layers.append(load_config_file(config_file))
    if flags:
        layers.append({k: v for k, v in flags.items() if v is not None})
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. csa.rate=0.2")
        key, value = item.split("=", 1)
        layers.append({key.strip(): _parse_scalar(value.strip())})
    return layers


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


def apply_overrides(cfg: TrainConfig, updates: Mapping[str, Any]) -> TrainConfig:
    """A copy of ``cfg`` with (possibly dotted, possibly nested) ``updates`` applied and validated."""
    updates = dict(updates)
    if "loss" in updates:
        # the named term set first, so that explicit ``*.enabled`` settings given alongside it win (a saved
        # config.json, which holds both, then reloads exactly as it was run)
        cfg = apply_settings(cfg, {"loss": updates.pop("loss")})
        if cfg.loss not in LOSS_CHOICES:
            raise ValueError(f"loss must be one of {', '.join(LOSS_CHOICES)}, got {cfg.loss!r}")
        con, csa, usa = _LOSS_TERMS[cfg.loss]
        cfg = apply_settings(cfg, {"contrastive.enabled": con, "csa.enabled": csa, "usa.enabled": usa})
    cfg = apply_settings(cfg, updates)
    _validate(cfg)
    return cfg


def check_schedule(cfg: TrainConfig) -> TrainConfig:
    """The checks between settings, made once every layer is applied (a later layer may fix an earlier one's lr)."""
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise ValueError(f"min_lr must lie in [0, lr = {cfg.lr:g}], got {cfg.min_lr:g}; set it with --set min_lr=X")
    if cfg.cross_head == "none" and parse_student_spec(cfg.student).kind != "open_clip":
        raise ValueError(f"cross_head=none is for open_clip students (CLIP's projected embedding then serves "
                         f"retrieval); {cfg.student!r} keeps its cross heads")
    return cfg


def _validate(cfg: TrainConfig) -> None:
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {cfg.epochs}")
    if cfg.batch_size < 2:
        raise ValueError(f"batch size must be ≥ 2 (in-batch negatives), got {cfg.batch_size}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if cfg.save_every_steps < 0:
        raise ValueError(f"save_every_steps must be ≥ 0 (0: checkpoints at epoch ends only), got {cfg.save_every_steps}")
    if cfg.head_lr is not None and not cfg.head_lr > 0:
        raise ValueError(f"head_lr must be > 0 (or none: the same as lr), got {cfg.head_lr}")
    if not cfg.store_cache_gib > 0:
        raise ValueError(f"store_cache_gib must be > 0, got {cfg.store_cache_gib}")
    if cfg.cross_head not in CROSS_HEADS:
        raise ValueError(f"cross_head must be one of {', '.join(CROSS_HEADS)}, got {cfg.cross_head!r}")
    if cfg.on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {cfg.on_bad_image!r}")
    if cfg.soft_labels.mode not in ("dense", "sparse"):
        raise ValueError(f"soft_labels.mode must be dense or sparse, got {cfg.soft_labels.mode!r}")
    if not cfg.soft_labels.max_memory_mib > 0:
        raise ValueError(f"soft_labels.max_memory_mib must be > 0, got {cfg.soft_labels.max_memory_mib}")
    if cfg.soft_labels.window < 0:
        raise ValueError(f"soft_labels.window must be ≥ 0 (0: as many chunks as the budget holds), "
                         f"got {cfg.soft_labels.window}")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {cfg.sampler!r}")
    parse_report_to(cfg.report_to)
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

