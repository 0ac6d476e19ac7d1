"""Caption embeddings computed elsewhere, used as the text teacher: ``precomputed:FEATURES.npy[:KEYS]``.

Two layouts of an ``[N, D]`` array (any float dtype, memory-mapped, never unpickled):

- **in manifest caption order**: row j is caption j of the manifest being built, so N must equal its caption
  count (a store built with ``--split all`` serves every split, so give the array in the whole file's order);
- **with a keys file** (``precomputed:FEATURES.npy:KEYS.txt``, or ``FEATURES.keys.txt`` / ``.keys.json`` beside
  the array): one caption text per row, a line of a ``.txt`` file or an entry of a ``.json`` list. Captions are
  looked up by their text as the build's text teacher reads it (control characters as spaces, ends trimmed), in
  any order, with any extra rows; a text given twice takes its first row. This layout also embeds a free-text
  query when it is one of the keys, and serves a split built on its own.

The store records the spec, the dimension and a sha256 over the array and keys files as the teacher's identity, so a
store built from other embeddings is refused rather than mixed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.captions import teacher_captions
from pipeline.errors import EncoderError
from pipeline.errors import one_line as _one_line
from pipeline.feature_files import FeatureFileError, read_plain_matrix, sibling_file
from pipeline.teachers.base import EncoderBase, SpecRequest
from pipeline.teachers.hashing import files_sha256
from pipeline.teachers.precomputed import precomputed_paths

KEYS_SUFFIXES = (".keys.txt", ".keys.json")


def load_plain_array(path: Path, what: str = "caption embeddings") -> np.ndarray:
    """``feature_files.read_plain_matrix`` with its refusal as an encoder error."""
    try:
        return read_plain_matrix(path, what)
    except FeatureFileError as exc:
        raise EncoderError(str(exc)) from None


def _read_keys(path: Path) -> list[str]:
    try:
        if path.suffix == ".json":
            keys = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise EncoderError(f"{path}: expected a JSON list of caption texts")
            return keys
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EncoderError(f"{path}: cannot read caption keys ({_one_line(exc)})") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _as_teacher_reads(texts: Sequence[str]) -> list[str]:
    return teacher_captions(list(texts))[0]  # the build's own normalisation of caption texts


class PrecomputedTextEncoder(EncoderBase):
    """Caption embeddings looked up by caption row (manifest order) or by caption text (a keys file)."""

    def __init__(self, spec: str, features: np.ndarray, keys: list[str] | None, source: str, weights,
                 extra: dict | None = None):
        super().__init__(spec, "text", weights, {"order": "keys" if keys is not None else "manifest",
                                                 **(extra or {})})
        if features.ndim != 2 or features.shape[1] == 0:
            raise EncoderError(f"{source}: expected an [N, D] array of caption embeddings, got shape "
                               f"{tuple(features.shape)}")
        self.source = source
        self._features = features
        self.dim = int(features.shape[1])
        self._row_of: dict[str, int] | None = None
        if keys is not None:
            if len(keys) != features.shape[0]:
                raise EncoderError(f"{source}: {len(keys)} caption keys for {features.shape[0]} embedding rows")
            self._row_of = {}
            for row, text in enumerate(_as_teacher_reads(keys)):
                self._row_of.setdefault(text, row)

    @property
    def by_row(self) -> bool:
        """True when rows follow the manifest's caption order (the build then asks by row, not by text)."""
        return self._row_of is None

    def check_captions(self, texts: Sequence[str], what: str = "the manifest") -> None:
        """Refuse, before anything is embedded, a manifest whose captions this array cannot give."""
        if self._row_of is None:
            if len(texts) != self._features.shape[0]:
                raise EncoderError(
                    f"{self.source}: {self._features.shape[0]} caption rows, but {what} has {len(texts)} captions; "
                    "an array without a keys file must follow the manifest's caption order (build with --split all "
                    "when it covers the whole annotation file), or name the caption of each row in a keys file")
            return
        for row, text in enumerate(texts):
            if text not in self._row_of:
                raise EncoderError(f"{self.source}: no embedding for caption {row} of {what} ({text[:80]!r}); its "
                                   f"keys file lists {len(self._row_of)} captions")

    def encode_rows(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings of manifest caption rows (the in-order layout)."""
        if self._row_of is not None:
            raise EncoderError(f"{self.source}: keyed by caption text; look captions up with encode(texts)")
        rows = np.asarray(rows, dtype=np.int64)
        return np.asarray(self._features[rows], dtype=np.float32)

    def encode(self, batch: Sequence[str]) -> np.ndarray:
        if self._row_of is None:
            raise EncoderError(f"{self.source}: caption embeddings in manifest order cannot embed free text; give a "
                               "keys file (precomputed:FEATURES.npy:KEYS.txt) to look captions up by text")
        texts = _as_teacher_reads(batch)
        rows = []
        for text in texts:
            row = self._row_of.get(text)
            if row is None:
                raise EncoderError(f"{self.source}: no embedding for caption {text[:80]!r}")
            rows.append(row)
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self._features[np.asarray(rows)], dtype=np.float32)


def build_precomputed_text(request: SpecRequest) -> PrecomputedTextEncoder:
    """The encoder ``precomputed:FEATURES.npy[:KEYS]`` names for captions (see the module docstring)."""
    spec, body = request.spec, request.body
    features_path, keys_path = precomputed_paths(body)
    if keys_path is not None and not keys_path.is_file():
        raise EncoderError(f"{keys_path}: caption keys file not found (spec {spec!r})")
    if not features_path.is_file():
        raise EncoderError(f"{features_path}: precomputed caption embeddings not found (spec {spec!r})")
    keys_path = keys_path or sibling_file(features_path, KEYS_SUFFIXES)
    features = load_plain_array(features_path, "caption embeddings")
    keys = _read_keys(keys_path) if keys_path is not None else None
    hashed = [features_path] + ([keys_path] if keys_path is not None else [])

    def weights() -> str:
        return f"sha256:{files_sha256(hashed)}"

    return PrecomputedTextEncoder(spec, features, keys, str(features_path), weights)
