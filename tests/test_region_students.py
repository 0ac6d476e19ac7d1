"""Region-based students (SGR, SAF): batched pair scoring against a pair-by-pair loop written from the paper's
equations, masks of padded captions, chunked scoring for evaluation, masked BatchNorm, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.region_students import MaskedBatchNorm, RegionStudent
from train.regions import RegionFeatures
from train.vocab import CaptionTokens, Vocabulary

REGION_DIM, N_REGIONS, VOCAB = 12, 5, 40
SIZES = dict(word_dim=8, embed_dim=16, sim_dim=6, uni_dim=10, sgr_steps=3)


def tiny(kind: str, pooling: str = "attention", seed: int = 0) -> RegionStudent:
    torch.manual_seed(seed)
    model = RegionStudent(kind, REGION_DIM, VOCAB, pooling=pooling, **SIZES).double()
    if kind == "saf":  # running statistics away from (0, 1), so that using them is visible
        model.filtration.norm.running_mean.fill_(0.3)
        model.filtration.norm.running_var.fill_(2.0)
    return model.eval()


def batch(n_images: int = 3, lengths=(4, 1, 6, 3), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(n_images, N_REGIONS, REGION_DIM, generator=g, dtype=torch.float64)
    lengths = torch.tensor(lengths)
    tokens = torch.randint(2, VOCAB, (len(lengths), int(lengths.max())), generator=g)
    tokens[torch.arange(tokens.shape[1])[None] >= lengths[:, None]] = 0
    return regions, tokens, lengths


# ------------------------------------------------------------------------------------------ the per-pair oracle
def unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm() + 1e-8)


def pooled(pool, items: torch.Tensor) -> torch.Tensor:
    """Attention pooling of one item set [n, d], written out."""
    mean = items.mean(0)
    guide = torch.tanh(pool.guide[0](mean))
    logits = torch.stack([pool.score(torch.tanh(pool.local[0](x)) * guide)[0] for x in items])
    weights = torch.softmax(logits, dim=0)
    return unit(sum(w * x for w, x in zip(weights, items)))


def one_pair_score(model: RegionStudent, regions: torch.Tensor, tokens: list[int]) -> float:
    """The score of one image [R, D] and one unpadded caption, one word and one region at a time."""
    v = [unit(model.region_fc(r)) for r in regions]
    emb = model.word_embedding(torch.tensor([tokens]))
    out, _ = model.gru(emb)  # one caption: no packing, no padding
    d = model.embed_dim
    w = [unit((o[:d] + o[d:]) / 2) for o in out[0]]
    if model.image_pool is None:
        v_glob, w_glob = unit(sum(v) / len(v)), unit(sum(w) / len(w))
    else:
        v_glob, w_glob = pooled(model.image_pool, torch.stack(v)), pooled(model.text_pool, torch.stack(w))
    raw = [[F.leaky_relu(torch.dot(vr, wl), 0.1) for vr in v] for wl in w]  # [word][region]
    word_norm = [math.sqrt(sum(float(raw[l][r]) ** 2 for l in range(len(w)))) + 1e-8 for r in range(len(v))]
    nodes = [unit(model.global_sim((v_glob - w_glob) ** 2))]
    for l, wl in enumerate(w):
        attn = torch.softmax(torch.stack([model.smooth * raw[l][r] / word_norm[r] for r in range(len(v))]), 0)
        context = unit(sum(a * vr for a, vr in zip(attn, v)))
        nodes.append(unit(model.local_sim((context - wl) ** 2)))
    nodes = torch.stack(nodes)
    if model.kind == "sgr":
        for step in model.reasoning:
            q, k = step.query(nodes), step.key(nodes)
            edges = torch.softmax(torch.stack([torch.stack([torch.dot(q[i], k[j]) for j in range(len(nodes))])
                                               for i in range(len(nodes))]), dim=1)
            nodes = torch.relu(step.update(edges @ nodes))
        vector = nodes[0]
    else:
        bn = model.filtration.norm
        logits = model.filtration.attention(nodes)[:, 0]
        normed = (logits - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        weights = torch.sigmoid(normed)
        weights = weights / (weights.sum() + 1e-8)
        vector = unit((weights[:, None] * nodes).sum(0))
    return float(torch.sigmoid(model.score(vector))[0])


@pytest.mark.parametrize("kind", ["sgr", "saf"])
@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_batched_scores_of_every_pair_equal_a_pair_by_pair_loop(kind, pooling):
    model = tiny(kind, pooling)
    regions, tokens, lengths = batch()
    with torch.no_grad():
        sims = model(regions, (tokens, lengths))["sims"]
        expected = [[one_pair_score(model, regions[i], tokens[c, :lengths[c]].tolist()) for c in range(len(lengths))]
                    for i in range(len(regions))]
    assert sims.shape == (3, 4) and sims.dtype == torch.float32
    assert sims.double().numpy() == pytest.approx(np.array(expected), abs=1e-6)
    assert ((sims > 0) & (sims < 1)).all()
    assert float(sims.std()) > 1e-4  # distinct pairs get distinct scores: the comparison is not vacuous


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_padding_never_changes_a_captions_scores_or_embeddings(kind):
    model = tiny(kind)
    regions, tokens, lengths = batch()
    wider = torch.cat([tokens, torch.randint(2, VOCAB, (4, 3))], dim=1)  # garbage ids past every caption's end
    with torch.no_grad():
        a = model(regions, (tokens, lengths))
        b = model(regions, (wider, lengths))
        alone = model(regions, (tokens[2:3, :6], lengths[2:3]))  # the longest caption by itself, unpadded
        side = model.encode_text_side(tokens, lengths)
    for key in ("sims", "image_uni", "text_uni"):
        assert torch.allclose(a[key], b[key], atol=1e-12), key
    assert torch.allclose(a["sims"][:, 2:3], alone["sims"], atol=1e-12)
    assert torch.allclose(a["text_uni"][2:3], alone["text_uni"], atol=1e-12)
    assert side.mask.tolist() == [[i < n for i in range(6)] for n in (4, 1, 6, 3)]
    assert (side.words[~side.mask] == 0).all()


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_uni_embeddings_are_two_fc_layers_on_the_mean_of_regions_and_of_words(kind):
    model = tiny(kind)
    regions, tokens, lengths = batch()
    with torch.no_grad():
        out = model(regions, (tokens, lengths))
        v = F.normalize(model.region_fc(regions), dim=-1).mean(1)
        expected_image = F.normalize(model.uni_head_v[2](torch.relu(model.uni_head_v[0](v))), dim=-1)
        side = model.encode_text_side(tokens, lengths)
        w = side.words.sum(1) / lengths[:, None]
        expected_text = F.normalize(model.uni_head_t[2](torch.relu(model.uni_head_t[0](w))), dim=-1)
    assert out["image_uni"].shape == (3, 10) and out["text_uni"].shape == (4, 10)
    assert torch.allclose(out["image_uni"].double(), expected_image, atol=1e-6)
    assert torch.allclose(out["text_uni"].double(), expected_text, atol=1e-6)
    assert torch.allclose(model.encode_images_uni(regions).double(), expected_image, atol=1e-6)


@pytest.mark.parametrize("kind", ["sgr", "saf"])
@pytest.mark.parametrize("chunks", [(1, 1), (2, 3), (128, 128)])
def test_chunked_similarity_of_a_whole_set_equals_one_batched_call(kind, chunks):
    model = tiny(kind)
    rng = np.random.default_rng(3)
    features = RegionFeatures(rng.normal(size=(7, N_REGIONS, REGION_DIM)).astype(np.float32), N_REGIONS,
                              REGION_DIM, 1.0, "random")
    words = [f"w{i}" for i in range(VOCAB - 2)]
    vocab = Vocabulary(["<pad>", "<unk>", *words])
    texts = [" ".join(rng.choice(words, size=n)) for n in (3, 9, 1, 5, 2, 7, 4, 6, 8, 2, 3)]
    captions = CaptionTokens(texts, vocab)
    with torch.no_grad():
        got = model.similarity(features, captions, image_chunk=chunks[0], caption_chunk=chunks[1])
        tokens, lengths = captions.take(np.arange(len(texts)))
        want = model(features.take(np.arange(7)).double(), (tokens, lengths))["sims"]
    assert got.shape == (7, 11)
    assert torch.allclose(got, want, atol=1e-6)


def test_masked_batchnorm_normalises_with_statistics_of_the_valid_entries_only():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6)
    mask = torch.rand(4, 3, 6) > 0.3
    ours, reference = MaskedBatchNorm(), torch.nn.BatchNorm1d(1)
    with torch.no_grad():
        ours.weight.fill_(1.5), ours.bias.fill_(-0.2), reference.weight.fill_(1.5), reference.bias.fill_(-0.2)
    x_padded = x.masked_fill(~mask, 1e3)  # wild padded values must not move the statistics
    got = ours.train()(x_padded, mask)
    want = reference.train()(x[mask].view(-1, 1, 1)).flatten()
    assert torch.allclose(got[mask], want, atol=1e-5)
    assert ours.running_mean.item() == pytest.approx(reference.running_mean.item(), abs=1e-6)
    assert ours.running_var.item() == pytest.approx(reference.running_var.item(), abs=1e-5)
    evaluated = ours.eval()(x, mask)
    assert torch.allclose(evaluated[mask], reference.eval()(x[mask].view(-1, 1, 1)).flatten(), atol=1e-5)


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_training_mode_gives_every_parameter_a_gradient(kind):
    model = tiny(kind).train()
    regions, tokens, lengths = batch(n_images=4)
    out = model(regions, (tokens, lengths))
    (out["sims"].diagonal().sum() - out["sims"].sum() / 4 + out["image_uni"].sum() * out["text_uni"].sum()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    # except the padding row of the word embedding, which never carries a word
    assert model.word_embedding.weight.grad[0].abs().sum() == 0


def test_bad_inputs_are_one_line_errors():
    model = tiny("sgr")
    regions, tokens, lengths = batch()
    with pytest.raises(ValueError, match=r"expected \[batch, regions, 12\]"):
        model(regions[..., :5], (tokens, lengths))
    with pytest.raises(ValueError, match="at least one token"):
        model(regions, (tokens, torch.tensor([4, 0, 6, 3])))
    with pytest.raises(ValueError, match="kind must be one of sgr, saf"):
        RegionStudent("vsepp", 4, 10)
    with pytest.raises(ValueError, match="region.pooling"):
        RegionStudent("sgr", 4, 10, pooling="max")


@pytest.mark.parametrize("kind", ["sgr", "saf"])
@pytest.mark.parametrize("groups", [1, 3, 11, 20])
def test_scoring_captions_in_length_groups_equals_scoring_them_all_at_once(kind, groups):
    model = tiny(kind)
    regions, tokens, lengths = batch(n_images=4, lengths=(3, 9, 1, 5, 2, 7, 4, 6, 8, 2, 3))
    with torch.no_grad():
        images, texts = model.encode_image_side(regions), model.encode_text_side(tokens, lengths)
        grouped = model.scores_by_length(images, texts, groups)
        whole = model.pair_scores(images, texts)
    assert grouped.shape == (4, 11)
    assert torch.allclose(grouped, whole, atol=1e-12)  # every column back in its caption's place
