"""Image features computed elsewhere, looked up by image id: ``precomputed:FEATURES.npy[:IDS.txt]``,
``precomputed:FEATURES.npz``, and the CUSA authors' pickled ``{image_id: vector}`` dict only as
``precomputed:FILE.npy?trust_pickle=1`` (the files themselves: pipeline/feature_files.py). Also the spec's own
syntax, which caption embeddings (pipeline/teachers/precomputed_text.py) share: "FILE[:SIDE_FILE]" and options.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.errors import EncoderError
from pipeline.feature_files import PICKLE_REFUSE, PICKLE_TRUST, FeatureFileError, read_feature_file
from pipeline.teachers.base import EncoderBase, SpecRequest
from pipeline.teachers.hashing import file_sha256, files_sha256


class PrecomputedEncoder(EncoderBase):
    """Features computed elsewhere, looked up by image id; no pixels are decoded."""

    needs_pixels = False

    def __init__(self, spec: str, features: np.ndarray, ids: list[str], source: str, weights: Callable[[], str],
                 extra: dict | None = None):
        super().__init__(spec, "image", weights, extra)
        self.source = source
        self._features = features
        self._row_of: dict[str, int] = {}
        for row, image_id in enumerate(ids):
            if image_id in self._row_of:
                raise EncoderError(f"{source}: image id {image_id!r} appears twice")
            self._row_of[image_id] = row
        # Ids written as zero-padded numbers ("000000391895") also answer to their integer form ("391895").
        self._row_of_number: dict[str, int] = {}
        for image_id, row in self._row_of.items():
            if image_id.isdigit():
                self._row_of_number.setdefault(str(int(image_id)), row)
        self.dim = int(features.shape[1])

    def __len__(self) -> int:
        return len(self._row_of)

    def _find(self, key: str) -> int | None:
        row = self._row_of.get(key)
        if row is None and key.isdigit():
            row = self._row_of_number.get(str(int(key)))
        return row

    def row_of(self, image_id: str, path: str | None = None) -> int | None:
        """Row of an image's features: by id, then by the file name's stem, then by the stem's trailing number
        (COCO files are named COCO_val2014_000000391895.jpg while feature files key them by 391895)."""
        candidates = [str(image_id)]
        if path:
            stem = Path(path).stem
            candidates.append(stem)
            match = re.search(r"(\d+)$", stem)
            if match:
                candidates.append(match.group(1))
        for key in candidates:
            row = self._find(key)
            if row is not None:
                return row
        return None

    def encode_ids(self, ids: Sequence[str], paths: Sequence[str] | None = None) -> np.ndarray:
        rows = []
        for i, image_id in enumerate(ids):
            row = self.row_of(image_id, paths[i] if paths is not None else None)
            if row is None:
                example = ", ".join(repr(k) for k in list(self._row_of)[:3])
                raise EncoderError(
                    f"{self.source}: no features for image id {image_id!r} "
                    f"({len(self._row_of)} ids in the file, e.g. {example})"
                )
            rows.append(row)
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self._features[np.asarray(rows)], dtype=np.float32)

    def encode(self, batch: Sequence[str]) -> np.ndarray:
        """Same as encode_ids: a precomputed encoder's batch is a list of image ids."""
        return self.encode_ids(batch)


PRECOMPUTED_OPTIONS = ("trust_pickle",)


def _precomputed_options(spec: str, body: str) -> tuple[str, dict[str, bool]]:
    """"PATH[:IDS][?trust_pickle=1]" -> ("PATH[:IDS]", {"trust_pickle": True}); a file whose name has a "?" is kept."""
    if "?" not in body or Path(body).expanduser().exists():
        return body, {}
    body, _, query = body.rpartition("?")
    options: dict[str, bool] = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in PRECOMPUTED_OPTIONS:
            raise EncoderError(f"encoder spec {spec!r}: unknown option {key!r}; accepted: "
                               f"{', '.join(o + '=1' for o in PRECOMPUTED_OPTIONS)}")
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise EncoderError(f"encoder spec {spec!r}: {key} must be 1 or 0, got {value!r}")
        options[key] = value.lower() in ("1", "true", "yes")
    return body, options


def precomputed_paths(body: str) -> tuple[Path, Path | None]:
    """"FILE[:SIDE_FILE]" of a ``precomputed:`` spec: the array and the ids or keys file named after it, if any (a
    path that exists as a whole is one path, colons and all)."""
    path = Path(body).expanduser()
    if not path.exists() and ":" in body:
        head, tail = body.rsplit(":", 1)
        return Path(head).expanduser(), Path(tail).expanduser()
    return path, None


def build_precomputed_images(request: SpecRequest) -> PrecomputedEncoder:
    """The encoder ``precomputed:FEATURES[:IDS][?trust_pickle=1]`` names for images (see the module docstring)."""
    spec, body = request.spec, request.body
    body, options = _precomputed_options(spec, body)
    features_path, ids_path = precomputed_paths(body)
    if not features_path.is_file():
        raise EncoderError(f"{features_path}: precomputed features file not found (spec {spec!r})")
    # The CUSA authors ship {image_id: vector} dicts pickled with np.save; unpickling runs whatever a file names,
    # so that format is read only on request (or converted once by `cusa-cache import-features`).
    hint = (f"convert it once with `cusa-cache import-features {features_path} --out FEATURES.npz` and use "
            f"precomputed:FEATURES.npz, or, if you trust its author, read it as is with "
            f"precomputed:{features_path}?trust_pickle=1")
    try:
        table = read_feature_file(features_path, ids_path,
                                  pickled=PICKLE_TRUST if options.get("trust_pickle") else PICKLE_REFUSE,
                                  refusal_hint=hint)
    except FeatureFileError as exc:
        raise EncoderError(str(exc)) from None
    hashed = table.files

    def weights() -> str:
        return f"sha256:{file_sha256(hashed[0]) if len(hashed) == 1 else files_sha256(hashed)}"

    return PrecomputedEncoder(spec, table.features, table.ids, str(features_path), weights)
