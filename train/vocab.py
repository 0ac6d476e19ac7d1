"""The word vocabulary of region-based students (SGR, SAF): built from the training captions, saved with the run.

Tokenisation is deliberately simple and documented, so that anyone can reproduce a run's token ids: a caption is
lower-cased and split into runs of letters and digits (an apostrophe inside a word is kept: "man's", "don't");
everything else (punctuation, symbols, whitespace) separates tokens. SCAN and SGRAF tokenise with NLTK, which differs
only in how punctuation is kept; punctuation carries little for retrieval.

A word enters the vocabulary when it occurs at least ``min_count`` times in the training captions (SCAN/SGRAF keep
words seen more than 4 times on COCO). Id 0 is padding, id 1 stands for every word outside the vocabulary (and for a
caption without any word). Words are ordered by count, then alphabetically, so the same captions always give the
same ids.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and numbers of a caption (module docstring)."""
    return _TOKEN.findall(text.lower())


@dataclass
class Vocabulary:
    words: list[str]  # index = token id; words[0] = PAD, words[1] = UNK
    min_count: int = 1
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.words[:2] != [PAD, UNK]:
            raise ValueError(f"a vocabulary starts with {PAD!r} and {UNK!r}, got {self.words[:2]}")
        self._index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4) -> "Vocabulary":
        if min_count < 1:
            raise ValueError(f"region.min_count must be ≥ 1, got {min_count}")
        counts = Counter(w for text in captions for w in tokenize(text))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls([PAD, UNK, *kept], min_count)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, max_words: int | None = None) -> list[int]:
        """Token ids of one caption, at least one (a caption without words is one unknown word)."""
        ids = [self._index.get(w, UNK_ID) for w in tokenize(text)] or [UNK_ID]
        return ids[:max_words] if max_words else ids

    def batch(self, texts: Sequence[str], max_words: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids [n, L] padded with 0, lengths [n]) of a list of captions; L is the longest caption."""
        return pad_tokens([self.encode(t, max_words) for t in texts])

    def to_dict(self) -> dict:
        return {"words": list(self.words), "min_count": self.min_count}

    @classmethod
    def from_dict(cls, data: dict) -> "Vocabulary":
        return cls(list(data["words"]), int(data.get("min_count", 1)))


def pad_tokens(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    tokens = torch.full((len(sequences), int(lengths.max()) if len(sequences) else 0), PAD_ID, dtype=torch.int64)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.int64)
    return tokens, lengths


class CaptionTokens:
    """Token ids of every caption of a manifest, padded once, so a batch is a slice (no tokenising per step)."""

    def __init__(self, texts: Sequence[str], vocab: Vocabulary, max_words: int | None = None):
        self.tokens, self.lengths = vocab.batch(texts, max_words)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def take(self, rows, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [b, L_b], lengths [b]) of caption rows, trimmed to the batch's longest caption."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        lengths = self.lengths[rows]
        tokens = self.tokens[rows, :int(lengths.max())]
        return tokens.to(device), lengths
