"""Students: models that yield the four embeddings CUSA trains — cross (retrieval, contrastive, CSA) and uni (USA)
for each modality.

Two kinds, named by one spec string:
- "frozen:IMAGE_SPEC+TEXT_SPEC" — `FeatureStudent` on features of two frozen backbones (the encoder registry's spec
  strings, e.g. "frozen:efficientnet-lite0+minilm-l6"); the trainer computes those features once. A small MLP
  adapter per modality is shared by the cross and uni heads: with a frozen backbone and separate heads, the
  uni-modal loss (USA) could otherwise never change the cross embeddings that retrieval uses.
- "sgr:REGIONS", "saf:REGIONS" — region-based students that score (image, caption) pairs instead of embedding each
  side (train/region_students.py); REGIONS is "grid:IMAGE_SPEC" or "precomp:DIR" (train/regions.py).
- "open_clip:ARCH[:CHECKPOINT]" — `OpenClipStudent`, full fine-tuning of an open_clip model as in the paper; the
  heads sit on CLIP's projected embeddings. CHECKPOINT is an open_clip pretrained tag or a local file; without
  it the model is randomly initialised. ARCH may also be open_clip's "local-dir:/path" (a folder holding
  open_clip_config.json and optionally weights) or "hf-hub:ORG/REPO[:TAG]", read as the open_clip teachers read
  them (pipeline/model_names.py).

Every embedding is returned L2-normalised in float32. This module never imports a teacher.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import pickle_refusal
from pipeline.model_names import SCHEMAS as MODEL_SCHEMAS, parse_model_name

DEFAULT_STUDENT = "frozen:efficientnet-lite0+minilm-l6"
EMBEDDING_KEYS: tuple[str, ...] = ("image_cross", "text_cross", "image_uni", "text_uni")
_SPEC_HELP = ("expected 'frozen:IMAGE_SPEC+TEXT_SPEC', 'open_clip:ARCH[:CHECKPOINT]', 'sgr:REGIONS' or 'saf:REGIONS' "
              "(REGIONS: grid:IMAGE_SPEC or precomp:DIR)")
REGION_KINDS: tuple[str, ...] = ("sgr", "saf")  # region-based students (train/region_students.py)
REGION_SOURCES: tuple[str, ...] = ("grid", "precomp")
# an open_clip student's retrieval embedding: CUSA's LayerNorm → Linear head on CLIP's projected embedding
# (reference), or that projected embedding itself (none), which stock open_clip loading reproduces
CROSS_HEADS: tuple[str, ...] = ("reference", "none")


@dataclass(frozen=True)
class StudentSpec:
    """A parsed student spec. Fields not used by a kind are None."""

    kind: str                       # "frozen" | "open_clip" | "sgr" | "saf"
    image_spec: str | None = None   # frozen: encoder registry spec of the image backbone
    text_spec: str | None = None    # frozen: encoder registry spec of the text backbone
    arch: str | None = None         # open_clip: architecture name (or "local-dir:/path", "hf-hub:org/repo")
    pretrained: str | None = None   # open_clip: pretrained tag or checkpoint file; None = random init
    regions: str | None = None      # sgr/saf: "grid:IMAGE_SPEC" or "precomp:DIR"

    @property
    def region_source(self) -> tuple[str, str]:
        """sgr/saf: ("grid", IMAGE_SPEC) or ("precomp", DIR)."""
        source, _, body = (self.regions or "").partition(":")
        return source, body

    def __str__(self) -> str:
        if self.kind in REGION_KINDS:
            return f"{self.kind}:{self.regions}"
        if self.kind == "frozen":
            return f"frozen:{self.image_spec}+{self.text_spec}"
        return f"open_clip:{self.arch}" + (f":{self.pretrained}" if self.pretrained else "")


def parse_student_spec(spec: str) -> StudentSpec:
    """Parse "frozen:IMAGE_SPEC+TEXT_SPEC" or "open_clip:ARCH[:CHECKPOINT]"; ValueError (one line) otherwise.

    The frozen form splits at the first "+", so an image spec must not contain "+" (a text spec may).
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"student spec {spec!r}: {_SPEC_HELP}")
    kind, rest = spec.split(":", 1)
    kind, rest = kind.strip(), rest.strip()
    if kind == "frozen":
        image_spec, plus, text_spec = rest.partition("+")
        image_spec, text_spec = image_spec.strip(), text_spec.strip()
        if not plus or not image_spec or not text_spec:
            raise ValueError(f"student spec {spec!r}: a frozen student needs both backbones, "
                             "as 'frozen:IMAGE_SPEC+TEXT_SPEC' (e.g. 'frozen:efficientnet-lite0+minilm-l6')")
        return StudentSpec(kind="frozen", image_spec=image_spec, text_spec=text_spec)
    if kind in ("open_clip", "open-clip", "openclip"):
        name = parse_model_name(rest)
        if not name.names_a_model:
            raise ValueError(f"student spec {spec!r}: missing the architecture, as 'open_clip:ARCH[:CHECKPOINT]' "
                             "(e.g. 'open_clip:ViT-B-32:openai')")
        return StudentSpec(kind="open_clip", arch=name.model, pretrained=name.weights)
    if kind in REGION_KINDS:
        source, _, body = rest.partition(":")
        source, body = source.strip(), body.strip()
        if source not in REGION_SOURCES or not body:
            raise ValueError(f"student spec {spec!r}: a {kind} student reads regions from 'grid:IMAGE_SPEC' (a "
                             "backbone's last feature map, e.g. 'grid:efficientnet-lite0') or 'precomp:DIR' "
                             "(DIR/{split}_ims.npy and DIR/{split}_caps.txt, the SCAN/SGRAF layout)")
        return StudentSpec(kind=kind, regions=f"{source}:{body}")
    raise ValueError(f"student spec {spec!r}: unknown kind {kind!r}; {_SPEC_HELP}")


class ProjectionHead(nn.Module):
    """LayerNorm(d) → Linear(d, d_out), the CUSA head; Linear weights N(0, 0.02), bias 0 as in the reference."""

    def __init__(self, d: int, d_out: int | None = None, init_std: float = 0.02) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d_out if d_out is not None else d)
        nn.init.normal_(self.proj.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class Adapter(nn.Module):
    """LayerNorm(d_in) → Linear(d_in, hidden) → GELU → [Dropout] → Linear(hidden, d_out).

    The trainable trunk on frozen features that both heads of a modality share; the LayerNorm also makes the
    student indifferent to the scale of whatever backbone produced the features.
    """

    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_in),
            nn.Linear(d_in, hidden),
            nn.GELU(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(hidden, d_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    # Heads may run in bf16 under autocast; similarities and losses want float32.
    return F.normalize(x.float(), dim=-1)


class _TwoHeadStudent(nn.Module):
    """Cross and uni heads for both modalities on top of modality features `_image_features`/`_text_features`."""

    cross_head_v: nn.Module  # a ProjectionHead, or nn.Identity for an open_clip student without cross heads
    cross_head_t: nn.Module
    uni_head_v: ProjectionHead
    uni_head_t: ProjectionHead

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, texts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"image_cross", "text_cross", "image_uni", "text_uni"}: each [B, embed_dim], L2-normalised float32."""
        f_v = self._image_features(images)
        f_t = self._text_features(texts)
        return {
            "image_cross": _normalized(self.cross_head_v(f_v)),
            "text_cross": _normalized(self.cross_head_t(f_t)),
            "image_uni": _normalized(self.uni_head_v(f_v)),
            "text_uni": _normalized(self.uni_head_t(f_t)),
        }

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Cross-modal image embeddings (the ones retrieval uses)."""
        return _normalized(self.cross_head_v(self._image_features(images)))

    def encode_texts(self, texts: torch.Tensor) -> torch.Tensor:
        """Cross-modal text embeddings (the ones retrieval uses)."""
        return _normalized(self.cross_head_t(self._text_features(texts)))

    def encode_images_uni(self, images: torch.Tensor) -> torch.Tensor:
        """Uni-modal image embeddings (image-image retrieval)."""
        return _normalized(self.uni_head_v(self._image_features(images)))

    def encode_texts_uni(self, texts: torch.Tensor) -> torch.Tensor:
        """Uni-modal text embeddings (text-text similarity)."""
        return _normalized(self.uni_head_t(self._text_features(texts)))

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters an optimizer should update."""
        return (p for p in self.parameters() if p.requires_grad)


class FeatureStudent(_TwoHeadStudent):
    """Student on precomputed features of frozen backbones: per modality an adapter, then cross and uni heads."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 256, hidden: int = 512,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.image_dim, self.text_dim, self.embed_dim = image_dim, text_dim, embed_dim
        self.adapter_v = Adapter(image_dim, hidden, embed_dim, dropout)
        self.adapter_t = Adapter(text_dim, hidden, embed_dim, dropout)
        self.cross_head_v = ProjectionHead(embed_dim)
        self.cross_head_t = ProjectionHead(embed_dim)
        self.uni_head_v = ProjectionHead(embed_dim)
        self.uni_head_t = ProjectionHead(embed_dim)

    def _check(self, feats: torch.Tensor, dim: int, name: str) -> torch.Tensor:
        if feats.ndim != 2 or feats.shape[1] != dim:
            raise ValueError(f"{name}: expected [batch, {dim}] features, got shape {tuple(feats.shape)}")
        # Cached features are float16; compute in the adapter's dtype (autocast may lower it further).
        return feats.to(next(self.adapter_v.parameters()).dtype)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.adapter_v(self._check(images, self.image_dim, "image features"))

    def _text_features(self, texts: torch.Tensor) -> torch.Tensor:
        return self.adapter_t(self._check(texts, self.text_dim, "text features"))


class OpenClipStudent(_TwoHeadStudent):
    """An open_clip CLIP model, fully fine-tuned, with CUSA's cross and uni heads on its projected embeddings.

    CLIP's own `logit_scale` (and `logit_bias`) are frozen and unused: CUSA's temperatures live in the loss
    module. Freezing them (rather than only leaving them out of the optimizer) also keeps DistributedDataParallel
    from waiting for gradients that never come.
    """

    def __init__(self, arch: str, pretrained: str | None = None, aug_cfg: dict[str, Any] | None = None,
                 cache_dir: str | None = None, weights_from_checkpoint: bool = False,
                 cross_head: str = "reference") -> None:
        """``weights_from_checkpoint``: a cusa checkpoint's weights are loaded next (evaluation, resume), so the
        pretrained ones are neither fetched nor loaded, and open_clip's "initialized randomly" note is not shown.
        ``cross_head="none"``: no cross heads; CLIP's own projected embedding (what open_clip's ``encode_image`` /
        ``encode_text`` give) is the retrieval embedding, so the towers alone reproduce the student."""
        super().__init__()
        import open_clip  # deferred: only this student needs it

        self.arch, self.pretrained = arch, pretrained
        label = f"open_clip:{arch}" + (f":{pretrained}" if pretrained else "")
        if not arch.startswith(MODEL_SCHEMAS) and arch.replace("/", "-") not in open_clip.list_models():
            raise ValueError(f"{label}: unknown open_clip architecture {arch!r} "
                             "(open_clip.list_models() lists them, e.g. 'ViT-B-32')")
        try:
            with _open_clip_log(quiet_random_init=weights_from_checkpoint):
                model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                    arch, pretrained=None if weights_from_checkpoint else pretrained, aug_cfg=aug_cfg,
                    cache_dir=cache_dir,
                    # Random init means random: never fetch default tower weights from a hub.
                    pretrained_image=False, pretrained_text=False,
                )
            self.tokenizer = open_clip.get_tokenizer(arch, cache_dir=cache_dir)
        except pickle.UnpicklingError as e:  # open_clip reads a local file with weights_only=True
            raise ValueError(f"{label}: refused: {pickle_refusal(e)}; save the bare state dict with "
                             "torch.save(model.state_dict(), path)") from None
        except (RuntimeError, ValueError, FileNotFoundError, OSError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            if _needs_hub(detail):
                raise ValueError(_hub_message(label, pretrained)) from None
            raise ValueError(f"{label}: cannot build the open_clip model ({detail})") from e
        self.model = model
        self.preprocess_train = preprocess_train
        self.preprocess_val = preprocess_val
        for name in ("logit_scale", "logit_bias"):
            param = getattr(model, name, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(False)

        self.embed_dim = self._projected_dim()
        self.cross_head = cross_head
        if cross_head not in CROSS_HEADS:
            raise ValueError(f"{label}: cross_head must be one of {', '.join(CROSS_HEADS)}, got {cross_head!r}")
        with_heads = cross_head == "reference"
        self.cross_head_v = ProjectionHead(self.embed_dim) if with_heads else nn.Identity()
        self.cross_head_t = ProjectionHead(self.embed_dim) if with_heads else nn.Identity()
        self.uni_head_v = ProjectionHead(self.embed_dim)
        self.uni_head_t = ProjectionHead(self.embed_dim)

    @property
    def pretrained_backbone(self) -> nn.Module:
        """CLIP's towers: the optimizer's "backbone" group (lr), apart from the new heads (head_lr)."""
        return self.model

    @classmethod
    def from_spec(cls, spec: StudentSpec | str, **kwargs: Any) -> "OpenClipStudent":
        spec = parse_student_spec(spec) if isinstance(spec, str) else spec
        if spec.kind != "open_clip":
            raise ValueError(f"student spec {str(spec)!r} is not an open_clip student")
        return cls(spec.arch, pretrained=spec.pretrained, **kwargs)

    def _projected_dim(self) -> int:
        dim = getattr(self.model.visual, "output_dim", None)
        if isinstance(dim, int):
            return dim
        # Towers without the attribute (timm image towers): one short text forward tells the projected width.
        with torch.no_grad():
            tokens = self.tokenizer([""])
            return int(self.model.encode_text(tokens, normalize=False).shape[-1])

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [len(texts), context_length] for `forward`/`encode_texts`."""
        return self.tokenizer(texts)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=False)

    def _text_features(self, texts: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(texts, normalize=False)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _needs_hub(detail: str) -> bool:
    low = detail.lower()
    return any(s in low for s in ("failed to download", "hub", "internet connection", "offline"))


def _hub_message(label: str, pretrained: str | None) -> str:
    where = f"open_clip's pretrained weights {pretrained!r}" if pretrained else "its files"
    if _hub_offline():
        return (f"{label}: {where} are not in the local Hugging Face cache and the hub is switched off "
                "(HF_HUB_OFFLINE=1); run once with HF_HUB_OFFLINE=0 to download them, or name a local file "
                "(open_clip:ARCH:/path/to/weights.pt)")
    return (f"{label}: cannot download {where} from the Hugging Face hub (no network?); name a local file instead "
            "(open_clip:ARCH:/path/to/weights.pt)")


class _OpenClipNotes(logging.Filter):
    """Drops open_clip's log lines that a one-line error (or a checkpoint loaded next) makes redundant."""

    def __init__(self, quiet_random_init: bool) -> None:
        super().__init__()
        self.quiet_random_init = quiet_random_init

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Failed to download weights"):
            return False  # reported as the error itself
        if self.quiet_random_init and ("initialized randomly" in message or "no CLIP weights found" in message):
            return False
        return True


@contextlib.contextmanager
def _open_clip_log(quiet_random_init: bool) -> Iterator[None]:
    """open_clip logs through the root logger; filter its notes there (a root logger without handlers gets a
    stand-in, so that logging.error() does not install a console handler of its own)."""
    root = logging.getLogger()
    notes = _OpenClipNotes(quiet_random_init)
    stand_in = None
    if not root.handlers:
        stand_in = logging.StreamHandler()
        stand_in.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        # only what is logged to the root logger itself: other libraries' loggers (huggingface_hub) print their own
        stand_in.addFilter(lambda record: record.name == "root")
        root.addHandler(stand_in)
    root.addFilter(notes)
    try:
        yield
    finally:
        root.removeFilter(notes)
        if stand_in is not None:
            root.removeHandler(stand_in)
