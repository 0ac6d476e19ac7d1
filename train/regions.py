"""Region features of a dataset for region-based students (SGR, SAF), from one of two sources:

- ``grid:IMAGE_SPEC`` — the cells of a backbone's last feature map (``pipeline/teachers/grid.py``), computed once per
  dataset and backbone by the stage-1 build job into a store in the feature cache (like a frozen student's
  features), and read back by every later run and by evaluation;
- ``precomp:DIR`` — the SCAN/SGRAF release layout: ``DIR/{split}_ims.npy`` [N, 36, 2048] bottom-up features (one
  row per image, memory-mapped) and ``DIR/{split}_caps.txt`` (five captions an image, in order). The rows carry no
  image ids, so the captions are what ties them to the manifest: their count and every caption must match the
  manifest's, in order. The SCAN names of the splits are accepted too: ``dev`` for ``val``, ``testall`` for the
  COCO 5K ``test``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.manifest import Manifest
from train.students import parse_student_spec
from train.vocab import CaptionTokens, Vocabulary

GRID_CHUNK_ROWS = 256  # a grid row is R × D values (49 × 1280 for EfficientNet-Lite0): 64 MB of float32 a chunk
PRECOMP_ALIASES: dict[str, tuple[str, ...]] = {"val": ("dev",), "dev": ("val",), "test": ("testall",)}


@dataclass
class RegionFeatures:
    """The regions of every image of one dataset, row i = manifest image i."""

    array: np.ndarray  # [N, R·D] float16 rows (grid store) or [N, R, D] (precomp, memory-mapped)
    n_regions: int
    region_dim: int
    scale: float  # rows are multiplied by this on the way out
    source: str
    computed: bool = False  # True when this call ran the backbone
    skipped: dict[int, str] = field(default_factory=dict)  # image rows the grid build could not read -> reason

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def take(self, rows, device: str | torch.device = "cpu") -> torch.Tensor:
        """Regions [b, R, D] float32 of image rows."""
        rows = np.asarray(rows, dtype=np.int64)
        block = np.asarray(self.array[rows], dtype=np.float32).reshape(len(rows), self.n_regions, self.region_dim)
        out = torch.from_numpy(block)
        if self.scale != 1.0:
            out.mul_(self.scale)
        return out.to(device)


def region_features(student: str, annotations: str, split: str, manifest: Manifest, feature_cache: str | Path, *,
                    fmt: str = "auto", image_root: str | None = None, device: str = "auto", progress: bool = True,
                    workers: int = 2, shard_layout=None, on_bad_image: str = "fail") -> RegionFeatures:
    """The region features a region student spec names, for the dataset ``annotations`` at ``split``."""
    source, body = parse_student_spec(student).region_source
    if source == "precomp":
        return precomp_regions(body, split, manifest)
    return grid_regions(annotations, split, manifest, body, feature_cache, fmt=fmt,
                        image_root=image_root, device=device, progress=progress, workers=workers,
                        shard_layout=shard_layout, on_bad_image=on_bad_image)


def grid_regions(annotations: str, split: str, manifest: Manifest, image_spec: str, feature_cache: str | Path, *,
                 fmt: str = "auto", image_root: str | None = None, device: str = "auto", progress: bool = True,
                 workers: int = 2, shard_layout=None, on_bad_image: str = "fail") -> RegionFeatures:
    """Grid regions of every image, from the feature cache (built now when no earlier run built it; with
    ``on_bad_image="skip"`` an unreadable image is an all-zero row, listed in ``skipped``)."""
    from pipeline.teachers.grid import GRID_PREFIX, NO_TEXT, region_shape
    from train.features import feature_store, store_skipped_rows

    store, computed = feature_store(annotations, split, manifest, GRID_PREFIX + image_spec, NO_TEXT,
                                    feature_cache, fmt=fmt, image_root=image_root, device=device, progress=progress,
                                    workers=workers, shard_layout=shard_layout, on_bad_image=on_bad_image,
                                    chunk_rows=GRID_CHUNK_ROWS)
    n_regions, region_dim = region_shape(store.teachers["image"])
    image_rows, _ = store.rows_of(manifest, "dataset")
    rows = np.asarray(store.array("images")[:], dtype=np.float16)
    if len(image_rows) != rows.shape[0]:
        rows = rows[image_rows]
    # the store scales each row to unit norm; √R gives the regions a mean squared norm of 1
    # (pipeline/teachers/grid.py)
    return RegionFeatures(rows, n_regions, region_dim, math.sqrt(n_regions), str(store.path), computed,
                          store_skipped_rows(store, image_rows))


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit - 1] + "…")


def precomp_files(directory: str | Path, split: str, n_images: int) -> tuple[Path, Path]:
    """(ims.npy, caps.txt) of ``split`` in a SCAN/SGRAF precomp folder; ValueError (one line) when missing."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"{root}: precomputed region folder not found (expected {{split}}_ims.npy and "
                         "{split}_caps.txt inside)")
    names = (split, *PRECOMP_ALIASES.get(split, ()))
    present = [name for name in names if (root / f"{name}_ims.npy").is_file()]
    if not present:
        wanted = " or ".join(f"{name}_ims.npy" for name in names)
        raise ValueError(f"{root}: no {wanted} for the {split!r} split")
    # with several candidates (COCO's test = 1K and testall = 5K), the one holding the split's images
    name = present[0]
    for candidate in present:
        if _npy_rows(root / f"{candidate}_ims.npy") == n_images:
            name = candidate
            break
    caps = root / f"{name}_caps.txt"
    if not caps.is_file():
        raise ValueError(f"{caps}: missing (the captions of {name}_ims.npy, one a line, five an image, in order)")
    return root / f"{name}_ims.npy", caps


def _npy_rows(path: Path) -> int | None:
    try:
        return int(np.load(path, mmap_mode="r").shape[0])
    except Exception:
        return None


def precomp_regions(directory: str | Path, split: str, manifest: Manifest) -> RegionFeatures:
    """Bottom-up region features of ``manifest`` (one split) from a SCAN/SGRAF precomp folder, checked against the
    manifest: the image count, the caption count (a whole number of captions per image), each caption's image and
    each caption's text (compared lower-cased with runs of whitespace as one space)."""
    n_images, n_captions = len(manifest.images), len(manifest.captions)
    ims_path, caps_path = precomp_files(directory, split, n_images)
    try:
        ims = np.load(ims_path, mmap_mode="r")
    except ValueError:
        raise ValueError(f"{ims_path}: not a plain numeric .npy array (expected [images, regions, dim])") from None
    except OSError as exc:
        raise ValueError(f"{ims_path}: cannot read ({exc.strerror or exc})") from None
    if ims.ndim != 3 or not np.issubdtype(ims.dtype, np.floating):
        raise ValueError(f"{ims_path}: expected a float array [images, regions, dim], got {ims.dtype} "
                         f"{tuple(ims.shape)}")
    if ims.shape[0] != n_images:
        raise ValueError(f"{ims_path}: {ims.shape[0]} image rows, but {manifest.source} [{split}] has {n_images} "
                         "images (one row per image, in the manifest's order)")
    try:
        lines = caps_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{caps_path}: not UTF-8 text (byte {exc.start})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != n_captions:
        raise ValueError(f"{caps_path}: {len(lines)} captions, but {manifest.source} [{split}] has {n_captions} "
                         f"for its {n_images} images")
    if n_captions % n_images:
        raise ValueError(f"{caps_path}: {n_captions} captions for {n_images} images is not a whole number per "
                         "image (the layout keeps the same number, in order, for every image)")
    per_image = n_captions // n_images
    image_of = manifest.caption_image_rows()
    expected = np.arange(n_captions) // per_image
    off = np.flatnonzero(image_of != expected)
    if off.size:
        j = int(off[0])
        raise ValueError(f"{caps_path}: line {j + 1} belongs to image row {int(expected[j])} in this layout "
                         f"({per_image} captions an image, in order), but the manifest's caption {j} describes image "
                         f"row {int(image_of[j])} ({manifest.images[int(image_of[j])].image_id!r})")
    for j, (line, caption) in enumerate(zip(lines, manifest.captions)):
        if _normalised(line) != _normalised(caption.text):
            raise ValueError(f"{caps_path}: line {j + 1} is {_short(line.strip())}, but the manifest's caption {j} "
                             f"(image {manifest.images[int(image_of[j])].image_id!r}) is {_short(caption.text)}")
    return RegionFeatures(ims, int(ims.shape[1]), int(ims.shape[2]), 1.0, str(ims_path))


@dataclass
class RegionData:
    """A region student's inputs for one dataset: the regions of every image, the tokens of every caption, and the
    chunk sizes its pairs are scored in for evaluation."""

    features: RegionFeatures
    captions: CaptionTokens
    image_chunk: int = 128
    caption_chunk: int = 128

    def batch(self, image_rows, caption_rows, device: str | torch.device = "cpu"):
        """(regions [b, R, D], (tokens [b, L], lengths [b])) of the pairs (image_rows[k], caption_rows[k])."""
        return self.features.take(image_rows, device), self.captions.take(caption_rows, device)


def region_data(cfg, annotations: str, split: str, manifest: Manifest, vocab: Vocabulary, progress: bool,
                on_bad_image: str = "fail") -> RegionData:
    """The inputs of the region student of a run's TrainConfig ``cfg`` for a dataset: its region features (grid
    ones computed once into the feature cache, then reused) and the caption tokens by ``vocab``."""
    from train.data import shard_layout_of
    from train.features import default_feature_cache

    features = region_features(cfg.student, annotations, split, manifest,
                               cfg.region.feature_cache or default_feature_cache(cfg.cache), fmt=cfg.format,
                               image_root=cfg.image_root, device=cfg.device, progress=progress, workers=cfg.workers,
                               shard_layout=shard_layout_of(cfg), on_bad_image=on_bad_image)
    captions = CaptionTokens([c.text for c in manifest.captions], vocab, cfg.region.max_words)
    return RegionData(features, captions, cfg.region.eval_images, cfg.region.eval_captions)
