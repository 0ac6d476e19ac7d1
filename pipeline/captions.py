"""Captions as the text teacher reads them and the store keeps them; the build job, caption embeddings made elsewhere
(a ``precomputed:`` text teacher's keys) and the frozen student's text backbone all read them alike."""

from __future__ import annotations

import re

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
