"""Students: the four normalised embeddings, head initialisation, the shared adapter, a tiny real open_clip model,
and spec parsing."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from train.students import (
    DEFAULT_STUDENT,
    EMBEDDING_KEYS,
    Adapter,
    FeatureStudent,
    OpenClipStudent,
    ProjectionHead,
    StudentSpec,
    parse_student_spec,
)

# A CLIP small enough to build and train a step on CPU in well under a second.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """An open_clip "local-dir:" model folder: the config only, so the model is randomly initialised."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir) -> OpenClipStudent:
    torch.manual_seed(0)
    return OpenClipStudent.from_spec(f"open_clip:local-dir:{tiny_clip_dir}")


# --- heads and adapter --------------------------------------------------------------------------------------------

def test_projection_head_init_is_normal_002_with_zero_bias():
    torch.manual_seed(0)
    head = ProjectionHead(512, 256)
    w = head.proj.weight.detach()
    assert w.shape == (256, 512)
    assert w.std().item() == pytest.approx(0.02, rel=0.02)
    assert abs(w.mean().item()) < 1e-3
    assert torch.count_nonzero(head.proj.bias) == 0
    assert torch.all(head.norm.weight == 1) and torch.count_nonzero(head.norm.bias) == 0
    assert ProjectionHead(48).proj.weight.shape == (48, 48)   # d_out defaults to d


def test_adapter_maps_dimensions_and_applies_dropout_only_in_training():
    torch.manual_seed(0)
    adapter = Adapter(20, 64, 8, dropout=0.5)
    x = torch.randn(4, 20)
    assert adapter(x).shape == (4, 8)
    adapter.eval()
    assert torch.equal(adapter(x), adapter(x))
    adapter.train()
    assert not torch.equal(adapter(x), adapter(x))


# --- FeatureStudent -----------------------------------------------------------------------------------------------

def _feature_student(**kwargs) -> FeatureStudent:
    torch.manual_seed(0)
    return FeatureStudent(image_dim=20, text_dim=12, embed_dim=16, hidden=32, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_feature_student_yields_four_normalised_float32_embeddings(dtype):
    student = _feature_student()
    out = student(torch.randn(5, 20).to(dtype), torch.randn(5, 12).to(dtype))
    assert tuple(out) == EMBEDDING_KEYS
    for key, emb in out.items():
        assert emb.shape == (5, 16), key
        assert emb.dtype == torch.float32, key
        assert torch.allclose(emb.norm(dim=1), torch.ones(5), atol=1e-5), key


def test_feature_student_encoders_match_forward_in_eval_mode():
    student = _feature_student().eval()
    img, txt = torch.randn(3, 20), torch.randn(3, 12)
    out = student(img, txt)
    assert torch.allclose(student.encode_images(img), out["image_cross"])
    assert torch.allclose(student.encode_texts(txt), out["text_cross"])
    assert torch.allclose(student.encode_images_uni(img), out["image_uni"])
    assert torch.allclose(student.encode_texts_uni(txt), out["text_uni"])
    # Cross and uni heads are distinct parameters, so the two embeddings differ.
    assert not torch.allclose(out["image_cross"], out["image_uni"])


def test_feature_student_rejects_features_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"image features: expected \[batch, 20\].*\(5, 19\)"):
        _feature_student()(torch.randn(5, 19), torch.randn(5, 12))


def test_feature_student_under_bf16_autocast_still_returns_float32():
    student = _feature_student()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = student(torch.randn(4, 20), torch.randn(4, 12))
    assert all(v.dtype == torch.float32 for v in out.values())


def test_uni_loss_reaches_the_adapter_and_moves_cross_embeddings():
    # The reason the adapter exists: USA touches only the uni heads, yet must change what retrieval uses.
    student = _feature_student(dropout=0.0)
    img, txt = torch.randn(6, 20), torch.randn(6, 12)
    before = student(img, txt)
    out = student(img, txt)
    uni_loss = (out["image_uni"] @ out["image_uni"].T).sum() + (out["text_uni"] @ out["text_uni"].T).sum()
    uni_loss.backward()
    for adapter in (student.adapter_v, student.adapter_t):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None for p in student.cross_head_v.parameters())
    assert all(p.grad is None for p in student.cross_head_t.parameters())

    torch.optim.SGD(student.trainable_parameters(), lr=0.5).step()
    after = student(img, txt)
    assert not torch.allclose(after["image_cross"], before["image_cross"])
    assert not torch.allclose(after["text_cross"], before["text_cross"])


def test_cross_loss_reaches_the_adapter_but_not_the_uni_heads():
    student = _feature_student()
    out = student(torch.randn(6, 20), torch.randn(6, 12))
    (out["image_cross"] @ out["text_cross"].T).diagonal().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.adapter_v.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.adapter_t.parameters())
    assert all(p.grad is None for p in student.uni_head_v.parameters())


# --- OpenClipStudent ----------------------------------------------------------------------------------------------

def test_open_clip_student_forward_backward_on_cpu(tiny_clip):
    student = tiny_clip
    student.train()
    student.zero_grad(set_to_none=True)
    tokens = student.tokenize(["a dog on a mat", "two cats", "a red bus"])
    assert tokens.shape == (3, 16) and tokens.dtype == torch.long
    images = torch.randn(3, 3, 32, 32)
    out = student(images, tokens)
    assert tuple(out) == EMBEDDING_KEYS
    for key, emb in out.items():
        assert emb.shape == (3, 32) and emb.dtype == torch.float32, key
        assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5), key

    loss = sum((emb @ emb.T).sum() for emb in out.values()) + (out["image_cross"] @ out["text_cross"].T).sum()
    loss.backward()
    no_grad = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []   # full fine-tuning: every trainable parameter, backbone included, gets a gradient
    assert student.model.logit_scale.grad is None


def test_open_clip_uni_loss_alone_reaches_the_backbone(tiny_clip):
    # With a fine-tuned backbone, USA changes the shared features retrieval uses (the paper's setting).
    student = tiny_clip
    student.zero_grad(set_to_none=True)
    out = student(torch.randn(2, 3, 32, 32), student.tokenize(["a", "b"]))
    (out["image_uni"] @ out["image_uni"].T).sum().backward()
    assert student.model.visual.conv1.weight.grad.abs().sum() > 0
    assert student.cross_head_v.proj.weight.grad is None


def test_open_clip_logit_scale_is_frozen_and_left_out_of_trainable_parameters(tiny_clip):
    trainable = {id(p) for p in tiny_clip.trainable_parameters()}
    assert id(tiny_clip.model.logit_scale) not in trainable
    assert not tiny_clip.model.logit_scale.requires_grad
    others = [p for n, p in tiny_clip.named_parameters() if n != "model.logit_scale"]
    assert all(id(p) in trainable for p in others)
    heads = [tiny_clip.cross_head_v, tiny_clip.cross_head_t, tiny_clip.uni_head_v, tiny_clip.uni_head_t]
    assert all(id(p) in trainable for h in heads for p in h.parameters())


def test_open_clip_encoders_and_transforms(tiny_clip):
    from PIL import Image

    student = tiny_clip.eval()
    img = Image.new("RGB", (50, 40), (200, 30, 30))
    train_x, val_x = student.preprocess_train(img), student.preprocess_val(img)
    assert train_x.shape == val_x.shape == (3, 32, 32)
    pickle.dumps(student.preprocess_train)   # DataLoader workers need picklable transforms
    images = torch.stack([val_x, val_x])
    tokens = student.tokenize(["red", "a red square"])
    with torch.no_grad():
        out = student(images, tokens)
        assert torch.allclose(student.encode_images(images), out["image_cross"], atol=1e-6)
        assert torch.allclose(student.encode_texts(tokens), out["text_cross"], atol=1e-6)
        assert torch.allclose(student.encode_images_uni(images), out["image_uni"], atol=1e-6)
        assert torch.allclose(student.encode_texts_uni(tokens), out["text_uni"], atol=1e-6)
    student.train()


def test_open_clip_checkpoint_file_is_loaded(tmp_path, tiny_clip):
    import open_clip

    config = tmp_path / "configs" / "cusa-test-tiny.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), checkpoint)
    loaded = OpenClipStudent.from_spec(f"open_clip:cusa-test-tiny:{checkpoint}")
    assert loaded.pretrained == str(checkpoint)
    assert torch.equal(loaded.model.visual.conv1.weight, tiny_clip.model.visual.conv1.weight)


@pytest.mark.parametrize("spec, match", [
    ("open_clip:no-such-arch-xyz", "open_clip:no-such-arch-xyz: unknown open_clip architecture"),
    ("open_clip:ViT-S-32:no-such-tag", "open_clip:ViT-S-32:no-such-tag: cannot build"),
])
def test_open_clip_unknown_arch_or_weights_is_a_one_line_error(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        OpenClipStudent.from_spec(spec)
    assert "\n" not in str(info.value)


def test_open_clip_from_spec_refuses_a_frozen_spec():
    with pytest.raises(ValueError, match="not an open_clip student"):
        OpenClipStudent.from_spec(DEFAULT_STUDENT)


# --- spec parsing -------------------------------------------------------------------------------------------------

def test_default_spec_is_a_frozen_efficientnet_minilm_student():
    spec = parse_student_spec(DEFAULT_STUDENT)
    assert spec == StudentSpec(kind="frozen", image_spec="efficientnet-lite0", text_spec="minilm-l6")
    assert str(spec) == DEFAULT_STUDENT


@pytest.mark.parametrize("text, expected", [
    ("open_clip:ViT-B-32", StudentSpec(kind="open_clip", arch="ViT-B-32")),
    ("open_clip:ViT-B-32:openai", StudentSpec(kind="open_clip", arch="ViT-B-32", pretrained="openai")),
    ("open_clip:ViT-B-32:/ckpt/epoch_5.pt",
     StudentSpec(kind="open_clip", arch="ViT-B-32", pretrained="/ckpt/epoch_5.pt")),
    ("open_clip:local-dir:/models/tiny", StudentSpec(kind="open_clip", arch="local-dir:/models/tiny")),
    ("frozen:open_clip:ViT-B-32+sentence-transformers:/m/mpnet",
     StudentSpec(kind="frozen", image_spec="open_clip:ViT-B-32", text_spec="sentence-transformers:/m/mpnet")),
])
def test_spec_parsing_round_trips(text, expected):
    spec = parse_student_spec(text)
    assert spec == expected
    assert parse_student_spec(str(spec)) == spec


@pytest.mark.parametrize("text, match", [
    ("", "expected 'frozen:"),
    ("efficientnet-lite0", "expected 'frozen:"),
    ("frozen:efficientnet-lite0", "needs both backbones"),
    ("frozen:+minilm-l6", "needs both backbones"),
    ("frozen:efficientnet-lite0+", "needs both backbones"),
    ("open_clip:", "missing the architecture"),
    ("open_clip::openai", "missing the architecture"),
    ("open_clip:local-dir:", "missing the architecture"),
    ("timm:resnet50", "unknown kind 'timm'"),
])
def test_malformed_specs_are_one_line_value_errors(text, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_student_spec(text)
    assert "\n" not in str(info.value)
