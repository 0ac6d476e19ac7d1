"""Captions as the text teacher reads them and the store keeps them; the build job, caption embeddings made elsewhere
(a ``precomputed:`` text teacher's keys) and the frozen student's text backbone all read them alike."""

from __future__ import annotations

import re
from typing import Sequence

# control characters other than tab and line breaks (which tokenizers read as spaces), and lone surrogates (which
# neither tokenizers nor the store's UTF-8 strings accept)
_CAPTION_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def teacher_captions(texts: list[str]) -> tuple[list[str], list[int]]:
    """Captions as the text teacher reads them and the store keeps them: control characters (other than tab and line
    breaks) become spaces, lone surrogates U+FFFD, and the ends are trimmed. Also returns the rows that changed."""
    out, changed = [], []
    for row, text in enumerate(texts):
        clean = _SURROGATE.sub("\ufffd", _CAPTION_CONTROL.sub(" ", text)).strip()
        if clean != text:
            changed.append(row)
        out.append(clean)
    return out, changed


class TeacherCaptions(Sequence[str]):
    """The captions of a manifest column as the text teacher reads them, cleaned a slice at a time as they are asked
    for: a build of millions of captions never holds them all as Python strings."""

    def __init__(self, texts: Sequence[str]):
        self._texts = texts

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return teacher_captions(self._texts[i])[0]
        return teacher_captions([self._texts[i]])[0][0]

    def cleaned_rows(self, step: int = 65536) -> list[int]:
        """The rows whose text cleaning changed (one pass, a slice at a time)."""
        rows: list[int] = []
        for lo in range(0, len(self), step):
            rows.extend(lo + r for r in teacher_captions(self._texts[lo:lo + step])[1])
        return rows
