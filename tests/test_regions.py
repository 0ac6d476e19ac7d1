"""Inputs of region students: the word vocabulary and its tokenisation, grid regions from a backbone's last feature map
(the registry's `grid:` encoder and the store rows it leaves), and the image-only store's `none` text side."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import EncoderError
from pipeline.teachers.grid import region_shape, unflatten_regions
from pipeline.teachers.registry import build_encoder
from train.vocab import PAD_ID, UNK_ID, CaptionTokens, Vocabulary, tokenize


# ------------------------------------------------------------------------------------------ vocabulary
def test_tokenize_lower_cases_and_splits_on_everything_but_letters_digits_and_inner_apostrophes():
    assert tokenize("A man's DOG, 2 cats & a café--outside!") == ["a", "man's", "dog", "2", "cats", "a", "café",
                                                                 "outside"]
    assert tokenize("  ...  ") == [] and tokenize("'quoted' words_with_underscores") == ["quoted", "words", "with",
                                                                                         "underscores"]


def test_vocabulary_keeps_words_seen_min_count_times_ordered_by_count_then_alphabet():
    captions = ["a red ball", "a blue ball", "a red cube", "the red ball", "Ball!"]
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.words == ["<pad>", "<unk>", "ball", "a", "red"]  # ball 4, then a 3 and red 3 alphabetically
    assert vocab.encode("A red pyramid") == [3, 4, UNK_ID]
    assert vocab.encode("!!!") == [UNK_ID]  # a caption without words is one unknown word
    assert vocab.encode("red ball red ball", max_words=3) == [4, 2, 4]
    assert Vocabulary.from_dict(vocab.to_dict()).words == vocab.words
    with pytest.raises(ValueError, match="min_count must be ≥ 1"):
        Vocabulary.build(captions, min_count=0)


def test_batches_are_padded_with_zeros_to_the_longest_caption_of_the_batch():
    vocab = Vocabulary.build(["one two three four", "one two"], min_count=1)
    tokens, lengths = vocab.batch(["one two three four", "two", "three one"])
    assert lengths.tolist() == [4, 1, 2] and tokens.shape == (3, 4)
    assert (tokens[1, 1:] == PAD_ID).all() and (tokens[2, 2:] == PAD_ID).all() and (tokens[0] != PAD_ID).all()
    all_tokens = CaptionTokens(["one two three four", "two", "three one"], vocab)
    sub, sub_lengths = all_tokens.take([2, 1])
    assert sub.shape == (2, 2) and sub_lengths.tolist() == [2, 1]  # trimmed to this batch's longest caption
    assert sub.tolist() == [tokens[2, :2].tolist(), tokens[1, :2].tolist()]


# ------------------------------------------------------------------------------------------ grid regions
@pytest.fixture(scope="module")
def grid_encoder():
    return build_encoder("grid:efficientnet-lite0", "image", device="cpu")


def test_grid_encoder_gives_the_last_feature_map_cells_as_regions(grid_encoder):
    assert grid_encoder.dim == 49 * 1280
    identity = grid_encoder.identity()
    assert identity["spec"] == "grid:efficientnet-lite0" and region_shape(identity) == (49, 1280)
    # the same weights as the pooled encoder: the identity names them the same way
    assert identity["weights"] == build_encoder("efficientnet-lite0", "image").identity()["weights"]
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    rows = grid_encoder.encode(images)
    with torch.no_grad():
        fmap = grid_encoder.model.forward_features(images)  # [2, 1280, 7, 7]
    cell = fmap[1, :, 3, 5]  # row 3, column 5 of the map is region 3·7 + 5
    assert rows.shape == (2, 49 * 1280)
    assert np.allclose(rows[1].reshape(49, 1280)[3 * 7 + 5], cell.numpy(), atol=1e-5)
    # pooled features are the mean of the regions (timm's global average pool of the same map)
    pooled = build_encoder("efficientnet-lite0", "image").encode(images)
    assert np.allclose(rows.reshape(2, 49, 1280).mean(1), pooled, atol=1e-4)


def test_stored_rows_unflatten_to_regions_with_a_mean_squared_norm_of_one():
    rng = np.random.default_rng(0)
    regions = rng.gamma(1.0, 1.0, size=(3, 4, 5)).astype(np.float32)
    stored = regions.reshape(3, -1) / np.linalg.norm(regions.reshape(3, -1), axis=1, keepdims=True)
    back = unflatten_regions(stored, 4, 5)
    assert back.shape == (3, 4, 5)
    assert np.allclose((back ** 2).sum(-1).mean(-1), 1.0)
    # proportional to the original regions, image by image: relative region magnitudes are kept
    ratio = back / regions
    assert np.allclose(ratio, ratio[:, :1, :1])
    assert math.isclose(float(ratio[0, 0, 0]), 2 / float(np.linalg.norm(regions[0])), rel_tol=1e-5)


def test_grid_and_none_specs_refuse_the_other_modality_and_unusable_backbones():
    for spec, modality, message in (("grid:efficientnet-lite0", "text", "cannot encode text"),
                                    ("none", "image", "cannot encode image"),
                                    ("grid:minilm-l6", "image", "cannot encode image"),
                                    ("grid:precomputed:x.npy", "image", "grid regions need"),
                                    ("grid:", "image", "grid regions need")):
        with pytest.raises(EncoderError, match=message):
            build_encoder(spec, modality)
    none = build_encoder("none", "text")
    assert none.dim == 1 and none.encode(["a", "b"]).tolist() == [[1.0], [1.0]]
