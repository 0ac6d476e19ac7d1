"""Region-based students: SGR and SAF (Diao et al., "Similarity Reasoning and Filtration for Image-Text Matching",
AAAI 2021), written from the paper's description.

Unlike a dual encoder, these models score an (image, caption) *pair*; there is no caption embedding that retrieval
could compare with a cosine. The pieces, for image regions V [R, D_in] and caption words [L]:

- image side: each region → FC to the joint size d, L2-normalised (``v_r``);
- text side: word embedding (``word_dim``) → dropout → bi-GRU with d units, the two directions averaged,
  L2-normalised (``w_l``);
- global vectors: the paper pools with self-attention guided by the mean (``pooling="attention"``: weights
  softmax_r(FC(tanh(FC v_r) ⊙ tanh(FC mean_r v))) over the regions, likewise over the words). We leave out the
  BatchNorm layers of the authors' pooling so that any region count and padded captions work; ``pooling="mean"`` is
  the plain mean. Both are L2-normalised;
- text-to-image attention, per word: a_lr = softmax_r(λ · ℓ2-norm_over_words(LeakyReLU_0.1(v_r · w_l))), λ = 9,
  attended vector c_l = ℓ2-norm(Σ_r a_lr v_r);
- similarity representations: s_l = ℓ2-norm(W_loc (c_l − w_l)²) per word and s_g = ℓ2-norm(W_glo (v̄ − w̄)²) for the
  global pair, each of ``sim_dim`` (256) values: 1 + L nodes;
- SGR: 3 steps of graph reasoning over the nodes (edges softmax((W_q s_i) · (W_k s_j)), update ReLU(W_g Σ_j e_ij s_j)),
  then the global node → FC → sigmoid;
- SAF: attention filtration, weights sigmoid(BN(W_a s_i)) over the nodes, L1-normalised, the weighted sum
  ℓ2-normalised → FC → sigmoid.

Every pair of a batch is scored at once with tensor operations over [images × captions × words × regions]; padded
words are masked everywhere (the word-axis normalisation of the attention, the graph's edges, the filtration weights
and the BatchNorm statistics). SAF's BatchNorm computes its training statistics over all valid nodes of the batch's
pairs (the authors' loop over captions takes them per caption); in evaluation it uses its running statistics, so the
batched scores equal pair-by-pair scores exactly. ``similarity`` scores large sets in image × caption chunks.

For the uni-modal loss (USA) and uni-modal evaluation, the mean of the region vectors and the mean of the word
vectors each go through two FC layers (the CUSA appendix: "the global image and text representations each go
through two FC layers"), L2-normalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from train.students import REGION_KINDS

if TYPE_CHECKING:
    from train.regions import RegionFeatures
    from train.vocab import CaptionTokens

POOLINGS: tuple[str, ...] = ("attention", "mean")
_EPS = 1e-8


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / (‖x‖ + 1e-8), the normalisation SCAN and SGRAF use (finite for a zero vector)."""
    return x / (x.norm(dim=dim, keepdim=True) + _EPS)


def _xavier(linear: nn.Linear) -> nn.Linear:
    """Uniform(±√6/√(in+out)) weights and zero bias, the SGRAF initialisation."""
    bound = math.sqrt(6.0) / math.sqrt(linear.in_features + linear.out_features)
    nn.init.uniform_(linear.weight, -bound, bound)
    nn.init.zeros_(linear.bias)
    return linear


@dataclass
class ImageSide:
    """A batch of images as the similarity module reads them."""

    regions: torch.Tensor  # [n, R, d] L2-normalised region vectors
    pooled: torch.Tensor  # [n, d] global vector (attention or mean pooling), L2-normalised
    mean: torch.Tensor  # [n, d] plain mean of the region vectors (input of the uni-modal head)

    def __len__(self) -> int:
        return self.regions.shape[0]


@dataclass
class TextSide:
    """A batch of captions as the similarity module reads them."""

    words: torch.Tensor  # [n, L, d] L2-normalised word vectors (padding positions are zero)
    mask: torch.Tensor  # [n, L] bool, True for real words
    pooled: torch.Tensor  # [n, d]
    mean: torch.Tensor  # [n, d]

    def __len__(self) -> int:
        return self.words.shape[0]

    def select(self, rows: torch.Tensor) -> "TextSide":
        """The captions ``rows``, padded only to the longest of them."""
        mask = self.mask[rows]
        longest = int(mask.sum(1).max())
        return TextSide(self.words[rows, :longest], mask[:, :longest], self.pooled[rows], self.mean[rows])


class AttentionPooling(nn.Module):
    """Self-attention pooling guided by the mean (SGRAF's VisualSA/TextSA without their BatchNorm layers)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.local = nn.Sequential(_xavier(nn.Linear(dim, dim)), nn.Tanh(), nn.Dropout(dropout))
        self.guide = nn.Sequential(_xavier(nn.Linear(dim, dim)), nn.Tanh(), nn.Dropout(dropout))
        self.score = _xavier(nn.Linear(dim, 1))

    def forward(self, items: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        logits = self.score(self.local(items) * self.guide(mean).unsqueeze(1)).squeeze(-1)
        weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
        return l2norm((weights.unsqueeze(-1) * items).sum(1))


class MaskedBatchNorm(nn.Module):
    """BatchNorm1d(1) over the valid entries of a tensor of scalars: padded nodes neither shift the statistics nor
    get normalised meaningfully. Running statistics with momentum 0.1 (unbiased variance) as nn.BatchNorm1d."""

    def __init__(self, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("running_mean", torch.zeros(()))
        self.register_buffer("running_var", torch.ones(()))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.training:
            m = mask.to(x.dtype)
            count = m.sum()
            mean = (x * m).sum() / count
            var = ((x - mean) ** 2 * m).sum() / count
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class GraphReasoning(nn.Module):
    """One SGR step: edges softmax_j((W_q s_i)·(W_k s_j)) over valid nodes, s_i ← ReLU(W_g Σ_j e_ij s_j)."""

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.query = _xavier(nn.Linear(sim_dim, sim_dim))
        self.key = _xavier(nn.Linear(sim_dim, sim_dim))
        self.update = _xavier(nn.Linear(sim_dim, sim_dim))

    def forward(self, nodes: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
        edges = self.query(nodes) @ self.key(nodes).transpose(-1, -2)  # [..., N, N]
        edges = torch.softmax(edges.masked_fill(~node_mask.unsqueeze(-2), float("-inf")), dim=-1)
        return torch.relu(self.update(edges @ nodes))


class AttentionFiltration(nn.Module):
    """SAF: weights sigmoid(BN(W_a s_i)) over valid nodes, L1-normalised; the weighted sum, L2-normalised."""

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.attention = _xavier(nn.Linear(sim_dim, 1))
        self.norm = MaskedBatchNorm()

    def forward(self, nodes: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
        logits = self.attention(nodes).squeeze(-1)  # [..., N]
        weights = torch.sigmoid(self.norm(logits, node_mask)) * node_mask.to(nodes.dtype)
        weights = weights / (weights.abs().sum(-1, keepdim=True) + _EPS)
        return l2norm((weights.unsqueeze(-1) * nodes).sum(-2))


class RegionStudent(nn.Module):
    """SGR (``kind="sgr"``) or SAF (``kind="saf"``) on region features [n, R, region_dim] and token ids.

    ``forward(regions, (tokens, lengths))`` gives {"sims": [B, B] pair scores in (0, 1) (rows images, columns
    captions), "image_uni", "text_uni": L2-normalised [B, uni_dim] float32}. ``similarity`` scores every image
    against every caption in chunks; ``encode_images_uni``/``encode_texts_uni`` give the uni-modal embeddings.
    """

    def __init__(self, kind: str, region_dim: int, vocab_size: int, word_dim: int = 300, embed_dim: int = 1024,
                 sim_dim: int = 256, sgr_steps: int = 3, smooth: float = 9.0, dropout: float = 0.4,
                 pooling: str = "attention", uni_dim: int = 1024, length_groups: int = 8) -> None:
        super().__init__()
        if kind not in REGION_KINDS:
            raise ValueError(f"region student kind must be one of {', '.join(REGION_KINDS)}, got {kind!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"region.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        for name, value in (("word_dim", word_dim), ("embed_dim", embed_dim), ("sim_dim", sim_dim),
                            ("uni_dim", uni_dim), ("sgr_steps", sgr_steps)):
            if value < 1:
                raise ValueError(f"region.{name} must be ≥ 1, got {value}")
        self.kind, self.smooth, self.length_groups = kind, float(smooth), int(length_groups)
        self.region_dim, self.vocab_size, self.embed_dim, self.uni_dim = region_dim, vocab_size, embed_dim, uni_dim
        self.vocab = None  # the train.vocab.Vocabulary, attached by the trainer or when a checkpoint is loaded

        self.region_fc = _xavier(nn.Linear(region_dim, embed_dim))
        self.word_embedding = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        nn.init.uniform_(self.word_embedding.weight, -0.1, 0.1)
        with torch.no_grad():
            self.word_embedding.weight[0].zero_()
        self.word_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(word_dim, embed_dim, batch_first=True, bidirectional=True)
        if pooling == "attention":
            self.image_pool: nn.Module | None = AttentionPooling(embed_dim, dropout)
            self.text_pool: nn.Module | None = AttentionPooling(embed_dim, dropout)
        else:
            self.image_pool = self.text_pool = None
        self.local_sim = _xavier(nn.Linear(embed_dim, sim_dim))
        self.global_sim = _xavier(nn.Linear(embed_dim, sim_dim))
        if kind == "sgr":
            self.reasoning = nn.ModuleList(GraphReasoning(sim_dim) for _ in range(sgr_steps))
        else:
            self.filtration = AttentionFiltration(sim_dim)
        self.score = _xavier(nn.Linear(sim_dim, 1))
        self.uni_head_v = nn.Sequential(_xavier(nn.Linear(embed_dim, embed_dim)), nn.ReLU(),
                                        _xavier(nn.Linear(embed_dim, uni_dim)))
        self.uni_head_t = nn.Sequential(_xavier(nn.Linear(embed_dim, embed_dim)), nn.ReLU(),
                                        _xavier(nn.Linear(embed_dim, uni_dim)))

    # ------------------------------------------------------------------------------------------ the two sides
    def encode_image_side(self, regions: torch.Tensor) -> ImageSide:
        if regions.ndim != 3 or regions.shape[2] != self.region_dim:
            raise ValueError(f"region features: expected [batch, regions, {self.region_dim}], got shape "
                             f"{tuple(regions.shape)}")
        vectors = l2norm(self.region_fc(regions.to(self.region_fc.weight.dtype)))
        mean = vectors.mean(1)
        if self.image_pool is None:
            pooled = l2norm(mean)
        else:
            pooled = self.image_pool(vectors, torch.ones(vectors.shape[:2], dtype=torch.bool,
                                                         device=vectors.device), mean)
        return ImageSide(vectors, pooled, mean)

    def encode_text_side(self, tokens: torch.Tensor, lengths: torch.Tensor) -> TextSide:
        if tokens.ndim != 2 or lengths.ndim != 1 or lengths.shape[0] != tokens.shape[0]:
            raise ValueError(f"captions: expected token ids [batch, words] and lengths [batch], got "
                             f"{tuple(tokens.shape)} and {tuple(lengths.shape)}")
        lengths_cpu = lengths.detach().to("cpu", torch.int64)
        if int(lengths_cpu.min()) < 1:
            raise ValueError("captions: every caption needs at least one token")
        embedded = self.word_dropout(self.word_embedding(tokens))
        packed = pack_padded_sequence(embedded, lengths_cpu, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        half = out.shape[-1] // 2
        words = l2norm((out[..., :half] + out[..., half:]) / 2)  # padding rows stay exactly zero
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        mask = positions.unsqueeze(0) < lengths_cpu.to(tokens.device).unsqueeze(1)
        mean = words.sum(1) / lengths_cpu.to(words.device, words.dtype).unsqueeze(1)
        pooled = l2norm(mean) if self.text_pool is None else self.text_pool(words, mask, mean)
        return TextSide(words, mask, pooled, mean)

    # ------------------------------------------------------------------------------------------ pair scores
    def pair_scores(self, images: ImageSide, texts: TextSide) -> torch.Tensor:
        """Scores [n_images, n_captions] of every image with every caption, in (0, 1)."""
        v, w, mask = images.regions, texts.words, texts.mask
        # text-to-image attention for every (image, caption, word, region)
        attn = F.leaky_relu(torch.einsum("ird,cld->iclr", v, w), 0.1)
        attn = attn * mask.to(attn.dtype)[None, :, :, None]
        attn = attn / (attn.norm(dim=2, keepdim=True) + _EPS)  # over the caption's words, as SCAN does
        attn = torch.softmax(attn * self.smooth, dim=-1)
        context = l2norm(torch.einsum("iclr,ird->icld", attn, v))  # [nI, nC, L, d]
        local = l2norm(self.local_sim((context - w.unsqueeze(0)) ** 2))
        glob = l2norm(self.global_sim((images.pooled[:, None] - texts.pooled[None]) ** 2))
        nodes = torch.cat([glob.unsqueeze(2), local], dim=2)  # [nI, nC, 1 + L, sim_dim]
        node_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)[None].expand(nodes.shape[0], -1, -1)
        if self.kind == "sgr":
            for step in self.reasoning:
                nodes = step(nodes, node_mask)
            vector = nodes[:, :, 0]
        else:
            vector = self.filtration(nodes, node_mask)
        return torch.sigmoid(self.score(vector)).squeeze(-1)

    # ------------------------------------------------------------------------------------------ the student API
    def uni_image(self, side: ImageSide) -> torch.Tensor:
        return F.normalize(self.uni_head_v(side.mean).float(), dim=-1)

    def uni_text(self, side: TextSide) -> torch.Tensor:
        return F.normalize(self.uni_head_t(side.mean).float(), dim=-1)

    def scores_by_length(self, images: ImageSide, texts: TextSide, groups: int) -> torch.Tensor:
        """`pair_scores` with the captions sorted by length and cut into ``groups`` groups, each padded to its own
        longest caption: the [pairs × words] work shrinks from B × the longest caption of the batch towards B × the
        mean length. Scores equal `pair_scores` exactly in evaluation mode; in training, SAF's BatchNorm takes its
        statistics per group (the authors' loop takes them per caption)."""
        if groups <= 1 or len(texts) <= 1:
            return self.pair_scores(images, texts)
        lengths = texts.mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        parts = [self.pair_scores(images, texts.select(rows)) for rows in torch.tensor_split(order, groups)
                 if len(rows)]
        return torch.cat(parts, dim=1)[:, torch.argsort(order)]

    def forward(self, regions: torch.Tensor, texts: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        image_side = self.encode_image_side(regions)
        text_side = self.encode_text_side(*texts)
        sims = self.scores_by_length(image_side, text_side, self.length_groups)
        return {"sims": sims.float(), "image_uni": self.uni_image(image_side), "text_uni": self.uni_text(text_side)}

    def encode_images_uni(self, regions: torch.Tensor) -> torch.Tensor:
        return self.uni_image(self.encode_image_side(regions))

    def encode_texts_uni(self, texts: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.uni_text(self.encode_text_side(*texts))

    def tokenize(self, texts: list[str], max_words: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.vocab is None:
            raise ValueError("the region student has no vocabulary attached")
        return self.vocab.batch(texts, max_words)

    @torch.no_grad()
    def similarity(self, regions: "RegionFeatures", captions: "CaptionTokens", device: str | torch.device = "cpu",
                   image_chunk: int = 128, caption_chunk: int = 128, progress: bool = False,
                   image_rows: np.ndarray | None = None, caption_rows: np.ndarray | None = None) -> torch.Tensor:
        """Scores [n_images, n_captions] (float32, on the CPU) of the images ``image_rows`` of ``regions`` (default:
        all) with the captions ``caption_rows`` of ``captions`` (default: all), image_chunk × caption_chunk pairs at a
        time so that the [pairs × words × d] intermediates stay bounded (5K × 25K pairs on one GPU). Each side is
        encoded once; captions are grouped by length so that a chunk pads to its own longest caption. Call in eval
        mode (dropout off, running BatchNorm statistics)."""
        from tqdm.auto import tqdm

        if image_chunk < 1 or caption_chunk < 1:
            raise ValueError("region.eval_images and region.eval_captions must be ≥ 1")
        image_rows = np.arange(len(regions)) if image_rows is None else np.asarray(image_rows, dtype=np.int64)
        caption_rows = torch.arange(len(captions)) if caption_rows is None else torch.as_tensor(caption_rows)
        n_images, n_captions = len(image_rows), len(caption_rows)
        image_sides = [self.encode_image_side(regions.take(image_rows[i:i + image_chunk], device))
                       for i in range(0, n_images, image_chunk)]
        order = torch.argsort(captions.lengths[caption_rows], stable=True)
        text_sides = []
        for c in range(0, n_captions, caption_chunk):
            columns = order[c:c + caption_chunk]
            text_sides.append((columns, self.encode_text_side(*captions.take(caption_rows[columns], device))))
        out = torch.empty((n_images, n_captions), dtype=torch.float32)
        bar = tqdm(total=len(image_sides) * len(text_sides), desc="pair scores", unit="block", disable=not progress,
                   dynamic_ncols=True, leave=False)
        for i, image_side in zip(range(0, n_images, image_chunk), image_sides):
            for columns, text_side in text_sides:
                out[i:i + len(image_side), columns] = self.pair_scores(image_side, text_side).float().cpu()
                bar.update(1)
        bar.close()
        return out

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)
