"""Image-text retrieval metrics: Recall@K in both directions, rsum, the COCO 1K 5-fold protocol, a text table.

Conventions (the ones the CUSA paper and its predecessors VSE++/SCAN/CLIP report):
- similarities are cosine: both sides are L2-normalised here again, in float32, so callers may pass float16 rows
  straight from a cache or unnormalised features;
- image→text: the rank of an image is the best (smallest) rank among all of its captions, so with five captions
  per image a hit needs only one of them in the top K;
- text→image: the rank of a caption is the rank of its single image;
- ties: a rank counts only the candidates whose similarity is *strictly greater* than the ground truth's, so a
  negative with exactly the same similarity does not push the ground truth down (an exact tie usually means a
  duplicate image or caption, which should not count as an error);
- values are percentages; rsum is the sum of the six recalls (max 600).

Two inputs, one ranking code path: embeddings (the cosine matrix is computed chunk by chunk) or a precomputed
similarity matrix [N_img, N_txt] (students that score pairs, ensembles of runs); both hand the rankers blocks of
the same matrix.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

RECALL_KS: tuple[int, ...] = (1, 5, 10)
METRIC_KEYS: tuple[str, ...] = (
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
)
COCO_FOLDS = 5
COCO_FOLD_SIZE = 1000
DEFAULT_CHUNK = 1024


def _as_float32(emb: torch.Tensor | np.ndarray, name: str, device: torch.device | None) -> torch.Tensor:
    """One [N, D] float32 tensor, L2-normalised; refuses shapes and values that would give meaningless ranks."""
    t = torch.as_tensor(emb)
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [N, D], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: no rows")
    t = t.to(device=device, dtype=torch.float32)
    # NaN compares false with everything, which would silently give rank 0 (a hit); refuse it instead.
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return F.normalize(t, dim=1)


def _writable(rows: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """A read-only array (a memory-mapped manifest column) copied: torch shares memory only with writable arrays."""
    return rows.copy() if isinstance(rows, np.ndarray) and not rows.flags.writeable else rows


def _as_rows(text_image_row: torch.Tensor | np.ndarray, n_texts: int, n_images: int,
             device: torch.device) -> torch.Tensor:
    rows = torch.as_tensor(_writable(text_image_row))
    if rows.ndim != 1 or rows.shape[0] != n_texts:
        raise ValueError(f"text_image_row: expected shape [{n_texts}] (one image row per caption), "
                         f"got {tuple(rows.shape)}")
    if rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise ValueError(f"text_image_row: expected integer image rows, got dtype {rows.dtype}")
    rows = rows.to(device=device, dtype=torch.int64)
    lo, hi = int(rows.min()), int(rows.max())
    if lo < 0 or hi >= n_images:
        bad = lo if lo < 0 else hi
        raise ValueError(f"text_image_row: image row {bad} is out of range for {n_images} images")
    counts = torch.bincount(rows, minlength=n_images)
    missing = torch.nonzero(counts == 0).flatten()
    if missing.numel():
        raise ValueError(f"{missing.numel()} image(s) have no caption (first: image row {int(missing[0])}); "
                         "image-to-text recall is undefined for them")
    return rows


def _recalls(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    n = ranks.numel()
    # Count hits as integers and divide in float64 so 1/3 prints as 33.3, not 33.299999.
    return {f"{prefix}_r{k}": 100.0 * int((ranks < k).sum()) / n for k in RECALL_KS}


# A block of a similarity matrix: rows [start, stop) of queries against every candidate.
SimilarityBlock = Callable[[int, int], torch.Tensor]


def ranks_image_to_text(image_block: SimilarityBlock, n_images: int, rows: torch.Tensor,
                        chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Best rank (0 = top) of each image's captions among all captions, ``image_block(a, b)`` giving the
    similarities [b − a, N_txt] of images a..b−1 with every caption."""
    ranks = torch.empty(n_images, dtype=torch.int64, device=rows.device)
    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        sims = image_block(start, stop).to(rows.device)                    # [q, N_txt]
        in_chunk = torch.nonzero((rows >= start) & (rows < stop)).flatten()
        local = rows[in_chunk] - start
        # The best-ranked caption is the one with the highest similarity; the number of captions strictly above
        # it is its rank (other ground-truth captions are never strictly above the maximum).
        best = torch.full((stop - start,), -torch.inf, device=sims.device, dtype=sims.dtype)
        best.scatter_reduce_(0, local, sims[local, in_chunk], reduce="amax")
        ranks[start:stop] = (sims > best[:, None]).sum(dim=1)
    return ranks


def ranks_text_to_image(text_block: SimilarityBlock, n_texts: int, rows: torch.Tensor,
                        chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Rank (0 = top) of each caption's image among all images, ``text_block(a, b)`` giving the similarities
    [b − a, N_img] of captions a..b−1 with every image."""
    ranks = torch.empty(n_texts, dtype=torch.int64, device=rows.device)
    for start in range(0, n_texts, chunk_size):
        stop = min(start + chunk_size, n_texts)
        sims = text_block(start, stop).to(rows.device)                     # [q, N_img]
        # Read the ground truth from the same matrix, so a tie is an exact tie and not a rounding difference.
        gt = sims.gather(1, rows[start:stop, None])
        ranks[start:stop] = (sims > gt).sum(dim=1)
    return ranks


def image_to_text_ranks(image: torch.Tensor, text: torch.Tensor, rows: torch.Tensor,
                        chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Best rank (0 = top) of each image's captions among all captions; normalised float32 inputs."""
    return ranks_image_to_text(lambda a, b: image[a:b] @ text.T, image.shape[0], rows, chunk_size)


def text_to_image_ranks(image: torch.Tensor, text: torch.Tensor, rows: torch.Tensor,
                        chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Rank (0 = top) of each caption's image among all images; normalised float32 inputs."""
    return ranks_text_to_image(lambda a, b: text[a:b] @ image.T, text.shape[0], rows, chunk_size)


def _metrics_from_ranks(i2t: torch.Tensor, t2i: torch.Tensor) -> dict[str, float]:
    metrics = _recalls(i2t, "i2t")
    metrics.update(_recalls(t2i, "t2i"))
    metrics["rsum"] = sum(metrics[k] for k in METRIC_KEYS[:-1])
    return metrics


@torch.no_grad()
def retrieval_metrics(image_emb: torch.Tensor | np.ndarray, text_emb: torch.Tensor | np.ndarray,
                      text_image_row: torch.Tensor | np.ndarray,
                      chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:
    """R@1/5/10 for image→text and text→image, and rsum, in percent.

    image_emb [N_img, D], text_emb [N_txt, D] (torch on any device, or numpy; any float dtype);
    text_image_row [N_txt] gives each caption's image row. Every image needs at least one caption.
    A rank counts only strictly more similar candidates, so ties never hurt the ground truth (module docstring).
    Queries are processed `chunk_size` at a time, so memory is chunk_size × max(N_img, N_txt) floats.
    """
    device = image_emb.device if isinstance(image_emb, torch.Tensor) else None
    image = _as_float32(image_emb, "image_emb", device)
    text = _as_float32(text_emb, "text_emb", image.device)
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"image_emb has dimension {image.shape[1]} but text_emb has {text.shape[1]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    rows = _as_rows(text_image_row, text.shape[0], image.shape[0], image.device)
    return _metrics_from_ranks(image_to_text_ranks(image, text, rows, chunk_size),
                               text_to_image_ranks(image, text, rows, chunk_size))


def _as_similarity(sim: torch.Tensor | np.ndarray) -> torch.Tensor:
    s = torch.as_tensor(sim)
    if s.ndim != 2 or 0 in s.shape:
        raise ValueError(f"similarity: expected a non-empty [N_img, N_txt] matrix, got shape {tuple(s.shape)}")
    s = s.to(torch.float32)
    if not torch.isfinite(s).all():
        raise ValueError("similarity: contains NaN or infinite values")
    return s


@torch.no_grad()
def similarity_retrieval_metrics(sim: torch.Tensor | np.ndarray, text_image_row: torch.Tensor | np.ndarray,
                                 chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:
    """The same metrics as `retrieval_metrics`, from a precomputed similarity matrix ``sim`` [N_img, N_txt] (rows
    images, columns captions; any scores where larger means more similar, e.g. a region student's pair scores or
    an ensemble's average). Same rank conventions: best caption rank for image→text, strict ties."""
    s = _as_similarity(sim)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    rows = _as_rows(text_image_row, s.shape[1], s.shape[0], s.device)
    return _metrics_from_ranks(ranks_image_to_text(lambda a, b: s[a:b], s.shape[0], rows, chunk_size),
                               ranks_text_to_image(lambda a, b: s[:, a:b].T, s.shape[1], rows, chunk_size))


@torch.no_grad()
def coco_1k_5fold(image_emb: torch.Tensor | np.ndarray, text_emb: torch.Tensor | np.ndarray,
                  text_image_row: torch.Tensor | np.ndarray,
                  chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:
    """COCO 1K protocol: the 5000 test images in 5 consecutive folds of 1000, each searched only among its own
    images and captions; every metric (rsum too) is the mean over the folds."""
    image = torch.as_tensor(image_emb)
    text = torch.as_tensor(text_emb)
    return _five_folds(len(image_emb), text.shape[0], text_image_row, text.device,
                       lambda lo, hi, keep, rows: retrieval_metrics(image[lo:hi], text[keep], rows,
                                                                    chunk_size=chunk_size))


@torch.no_grad()
def similarity_coco_1k_5fold(sim: torch.Tensor | np.ndarray, text_image_row: torch.Tensor | np.ndarray,
                             chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:
    """`coco_1k_5fold` from a precomputed similarity matrix [5000, N_txt]."""
    s = torch.as_tensor(sim)
    return _five_folds(s.shape[0], s.shape[1], text_image_row, s.device,
                       lambda lo, hi, keep, rows: similarity_retrieval_metrics(s[lo:hi][:, keep], rows,
                                                                               chunk_size=chunk_size))


def _five_folds(n_images: int, n_texts: int, text_image_row, device, fold_metrics) -> dict[str, float]:
    """Mean over the 5 folds of ``fold_metrics(lo, hi, caption_indices, their_image_rows_within_the_fold)``."""
    expected = COCO_FOLDS * COCO_FOLD_SIZE
    if n_images != expected:
        raise ValueError(f"COCO 1K 5-fold evaluation needs exactly {expected} images, got {n_images}")
    rows = torch.as_tensor(_writable(text_image_row)).to(torch.int64)
    if rows.ndim != 1 or rows.shape[0] != n_texts:
        raise ValueError(f"text_image_row: expected shape [{n_texts}] (one image row per caption), "
                         f"got {tuple(rows.shape)}")
    rows = rows.to(device)
    folds = []
    for fold in range(COCO_FOLDS):
        lo, hi = fold * COCO_FOLD_SIZE, (fold + 1) * COCO_FOLD_SIZE
        keep = torch.nonzero((rows >= lo) & (rows < hi)).flatten()
        folds.append(fold_metrics(lo, hi, keep, rows[keep] - lo))
    return {key: sum(f[key] for f in folds) / COCO_FOLDS for key in METRIC_KEYS}


def evaluate_embeddings(image_emb: torch.Tensor | np.ndarray, text_emb: torch.Tensor | np.ndarray,
                        text_image_row: torch.Tensor | np.ndarray,
                        chunk_size: int = DEFAULT_CHUNK) -> dict[str, dict[str, float]]:
    """{"all": metrics over every image}, plus {"coco_1k": 5-fold metrics} when there are exactly 5000 images
    (the COCO Karpathy test split, where papers report both 5K and 1K)."""
    results = {"all": retrieval_metrics(image_emb, text_emb, text_image_row, chunk_size=chunk_size)}
    if len(image_emb) == COCO_FOLDS * COCO_FOLD_SIZE:
        results["coco_1k"] = coco_1k_5fold(image_emb, text_emb, text_image_row, chunk_size=chunk_size)
    return results


def evaluate_similarity(sim: torch.Tensor | np.ndarray, text_image_row: torch.Tensor | np.ndarray,
                        chunk_size: int = DEFAULT_CHUNK) -> dict[str, dict[str, float]]:
    """`evaluate_embeddings` from a precomputed similarity matrix [N_img, N_txt]."""
    results = {"all": similarity_retrieval_metrics(sim, text_image_row, chunk_size=chunk_size)}
    if len(sim) == COCO_FOLDS * COCO_FOLD_SIZE:
        results["coco_1k"] = similarity_coco_1k_5fold(sim, text_image_row, chunk_size=chunk_size)
    return results


def clip_benchmark_names(metrics: dict[str, float]) -> dict[str, float]:
    """The recalls under CLIP_benchmark's zeroshot_retrieval names and scale (fractions in [0, 1]):
    ``image_retrieval_recall@K`` is text→image (a caption finds its image), ``text_retrieval_recall@K`` image→text."""
    out: dict[str, float] = {}
    for k in RECALL_KS:
        out[f"image_retrieval_recall@{k}"] = metrics[f"t2i_r{k}"] / 100.0
        out[f"text_retrieval_recall@{k}"] = metrics[f"i2t_r{k}"] / 100.0
    return out


def gain(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """b − a for every metric key (e.g. a = contrastive baseline, b = CUSA)."""
    missing = [k for k in METRIC_KEYS if k not in a or k not in b]
    if missing:
        raise ValueError(f"gain: both results need the metric keys, missing {missing[0]!r}")
    return {k: float(b[k]) - float(a[k]) for k in METRIC_KEYS}


def format_table(results: dict[str, dict[str, float]], title: str | None = None) -> str:
    """A fixed-width text table: one row per run, columns R@1 R@5 R@10 for each direction and rsum.

    Values have one decimal; rows whose name starts with "gain" are printed with an explicit sign.
    """
    name_width = max([len("run")] + [len(name) for name in results])
    cell = 6
    sep = " | "

    def group(cells: list[str]) -> str:
        return " ".join(c.rjust(cell) for c in cells)

    header1 = (" " * name_width + sep + "image->text".center(3 * cell + 2) + sep
               + "text->image".center(3 * cell + 2) + sep + "".rjust(cell))
    header2 = ("run".ljust(name_width) + sep + group(["R@1", "R@5", "R@10"]) + sep
               + group(["R@1", "R@5", "R@10"]) + sep + "rsum".rjust(cell))
    lines = [header1.rstrip(), header2, "-" * len(header2)]
    for name, metrics in results.items():
        missing = [k for k in METRIC_KEYS if k not in metrics]
        if missing:
            raise ValueError(f"format_table: run {name!r} has no metric {missing[0]!r}")
        fmt = "{:+.1f}" if name.startswith("gain") else "{:.1f}"
        cells = [fmt.format(float(metrics[k])) for k in METRIC_KEYS]
        lines.append(name.ljust(name_width) + sep + group(cells[0:3]) + sep + group(cells[3:6])
                     + sep + cells[6].rjust(cell))
    if title:
        lines.insert(0, title)
    return "\n".join(lines)
