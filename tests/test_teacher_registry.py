"""The teacher registry as a table: the builds, the accepted-spec message and docs/teachers.md all come from its rows;
`pipeline.encoders` still answers with the same objects; open_clip model names are read alike by teachers and the
open_clip student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import pipeline.encoders
from pipeline.errors import EncoderError
from pipeline.model_names import ModelName, parse_model_name
from pipeline.teachers import registry
from pipeline.teachers.base import EncoderBase, SpecRequest
from pipeline.teachers.registry import (
    ACCEPTED_SPECS,
    TEACHERS,
    SpecForm,
    TeacherKind,
    accepted_specs,
    build_encoder,
    spec_list_markdown,
)
from train.students import OpenClipStudent, StudentSpec, parse_student_spec

DOCS = Path(__file__).resolve().parents[1] / "docs" / "teachers.md"

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


# ------------------------------------------------------------------------------------------------ the table
def test_docs_teachers_md_is_what_the_registry_renders():
    assert DOCS.read_text(encoding="utf-8") == spec_list_markdown(), (
        "docs/teachers.md differs from the registry; run: python -m pipeline.teachers.registry > docs/teachers.md")


def test_every_form_of_every_row_is_in_the_accepted_message_and_the_docs_under_its_modality():
    text_part, image_part = ACCEPTED_SPECS.split("; image: ")
    docs = spec_list_markdown()
    text_docs, image_docs = docs.split("## Image")
    for kind in TEACHERS:
        for form in kind.accepts:
            message_part, docs_part = (text_part, text_docs) if form.modality == "text" else (image_part, image_docs)
            assert f'"{form.form}"' in message_part
            assert f"- `{form.form}`: {form.help}" in docs_part
    assert text_part.startswith("text: ") and '"none"' in text_part and '"grid:IMAGE_SPEC"' in image_part


@pytest.mark.parametrize("kind", TEACHERS, ids=lambda k: k.prefix or k.names[0])
def test_each_row_refuses_the_modality_it_does_not_accept_before_building_anything(kind):
    refused = [m for m in ("image", "text") if m not in kind.modalities]
    spec = kind.prefix + "/no/such/model" if kind.prefix else kind.names[0]
    for modality in refused:
        with pytest.raises(EncoderError, match=f"cannot encode {modality}; accepted: text: ") as err:
            build_encoder(spec, modality)
        assert "\n" not in str(err.value)
    assert kind.modalities  # every row encodes something


class _ConstantEncoder(EncoderBase):
    """A teacher made up for the test: every caption gets the vector the spec's body names."""

    def __init__(self, request: SpecRequest):
        super().__init__(request.spec, "text", lambda: "none")
        self.value = [float(v) for v in request.body.split(",")]
        self.dim = len(self.value)

    def encode(self, batch) -> np.ndarray:
        return np.tile(np.asarray(self.value, dtype=np.float32), (len(list(batch)), 1))


def test_a_teacher_added_as_one_row_is_built_listed_and_documented(monkeypatch):
    row = TeacherKind(_ConstantEncoder, prefix="constant:", accepts=(
        SpecForm("constant:V1,V2,...", "text", "the same vector for every caption"),))
    monkeypatch.setattr(registry, "TEACHERS", (*TEACHERS, row))
    encoder = build_encoder(" constant:1,2,3 ", "text")
    assert encoder.spec == "constant:1,2,3" and encoder.dim == 3
    assert encoder.encode(["a", "b"]).tolist() == [[1.0, 2.0, 3.0]] * 2
    assert encoder.identity() == {"spec": "constant:1,2,3", "modality": "text", "dim": 3, "weights": "none"}
    with pytest.raises(EncoderError, match=r'cannot encode image; accepted: .*"constant:V1,V2,\.\.\."'):
        build_encoder("constant:1", "image")
    with pytest.raises(EncoderError, match="names no model after 'constant:'"):
        build_encoder("constant:", "text")
    assert '"constant:V1,V2,..."' in accepted_specs()
    assert "- `constant:V1,V2,...`: the same vector for every caption" in spec_list_markdown()


def test_unknown_spec_lists_every_form_of_the_registry():
    with pytest.raises(EncoderError) as err:
        build_encoder("resnet-9000", "image")
    assert str(err.value) == f"unknown encoder spec 'resnet-9000'; accepted: {ACCEPTED_SPECS}"


def test_pipeline_encoders_only_re_exports_the_teachers_packages_objects():
    for name in pipeline.encoders.__all__:
        obj = getattr(pipeline.encoders, name)
        home = getattr(obj, "__module__", None)
        if home is not None and not isinstance(obj, (str, tuple)):
            assert home.startswith("pipeline.teachers."), name
    assert pipeline.encoders.build_encoder is registry.build_encoder
    assert pipeline.encoders.ACCEPTED_SPECS == ACCEPTED_SPECS
    assert (pipeline.encoders.DEFAULT_TEXT_TEACHER, pipeline.encoders.DEFAULT_IMAGE_TEACHER) == (
        "minilm-l6", "efficientnet-lite0")
    assert pipeline.encoders.build_encoder("none", "text").identity()["weights"] == "none"


# ------------------------------------------------------------------------------------------------ model names
@pytest.mark.parametrize("text, expected", [
    ("ViT-B-32", ModelName("ViT-B-32")),
    ("ViT-B-32:openai", ModelName("ViT-B-32", "openai")),
    (" ViT-B-32 : /ckpt/epoch_5.pt ", ModelName("ViT-B-32", "/ckpt/epoch_5.pt")),
    ("hf-hub:timm/ViT-B-16-SigLIP", ModelName("hf-hub:timm/ViT-B-16-SigLIP")),
    ("hf-hub:org/repo:v1.0", ModelName("hf-hub:org/repo", "v1.0")),
    ("local-dir:/models/a:b/tiny", ModelName("local-dir:/models/a:b/tiny")),
    ("ViT-B-32:", ModelName("ViT-B-32")),
])
def test_model_names_split_off_weights_but_keep_a_local_dir_path_whole(text, expected):
    parsed = parse_model_name(text)
    assert parsed == expected
    assert parse_model_name(str(parsed)) == parsed


@pytest.mark.parametrize("text", ["", "hf-hub:", "local-dir:", ":openai"])
def test_a_schema_or_weights_without_a_model_names_no_model(text):
    assert not parse_model_name(text).names_a_model


def test_student_and_teacher_read_an_hf_hub_tag_as_the_weights_part():
    spec = parse_student_spec("open_clip:hf-hub:org/repo:v1")
    assert spec == StudentSpec(kind="open_clip", arch="hf-hub:org/repo", pretrained="v1")
    assert str(spec) == "open_clip:hf-hub:org/repo:v1"
    # offline, the teacher's one-line error names the repository it asked open_clip for: without the tag
    with pytest.raises(EncoderError, match=r"cannot build open_clip model 'hf-hub:org/repo' \(") as err:
        build_encoder("open_clip:hf-hub:org/repo:v1", "image")
    assert "\n" not in str(err.value)


def test_teacher_and_student_build_the_same_local_dir_model_from_a_path_with_a_colon(tmp_path):
    folder = tmp_path / "clip:tiny"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    teacher = build_encoder(f"open_clip:local-dir:{folder}", "text")
    student = OpenClipStudent.from_spec(f"open_clip:local-dir:{folder}")
    assert student.arch == f"local-dir:{folder}" and student.pretrained is None
    assert teacher.dim == student.embed_dim == TINY_CLIP["embed_dim"]
    assert teacher.identity()["weights"].startswith(f"open_clip-pretrained:local-dir:{folder}:sha256:")
