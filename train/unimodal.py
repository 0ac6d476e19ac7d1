"""The paper's uni-modal evaluations of a trained student: image→image retrieval and sentence similarity.

- Image retrieval on a labelled image set (CUB, SOP, In-Shop, iNaturalist in the paper): every image queries all
  the others (never itself); mAP@R and R@1 as in Musgrave et al., "A Metric Learning Reality Check" (2020). For a
  query with R other images of its class, AP@R = (1/R) Σ_{i=1..R} P(i)·rel(i) over its top-R results, where
  rel(i) says whether result i shares the class and P(i) is the precision of the top i. Images that are alone in
  their class have no answer and are not queries. Equal similarities are ordered by row (a stable sort).
- Semantic textual similarity (STS-B, SICK-R): Spearman correlation between the cosine of the two sentences'
  embeddings and the gold score, ties given their average rank.

Both use the uni-modal embeddings by default (the heads USA trains) and the cross-modal ones on request. Scores
are percentages (mAP@R, R@1) or ×100 (Spearman), as papers print them.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train.embedding import StudentEmbedder

IMAGE_LABEL_COLUMNS: tuple[str, str] = ("image", "label")
STS_LAYOUTS: dict[str, tuple[str, str, str]] = {
    "sts-b": ("sentence1", "sentence2", "score"),
    "sick-r": ("sentence_A", "sentence_B", "relatedness_score"),
}
_SORT_BUDGET = 1 << 24  # query rows × candidates sorted at once (128 MiB of int64 indices)


# ---------------------------------------------------------------------------------------------- input files
@dataclass(frozen=True)
class LabelledImages:
    paths: list[Path]  # resolved against the label file's folder
    labels: list[str]
    source: str


@dataclass(frozen=True)
class StsPairs:
    first: list[str]
    second: list[str]
    scores: np.ndarray  # float64 gold similarity of each pair
    layout: str  # "sts-b" | "sick-r"
    source: str


def _delimited_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, fields) of a CSV or TSV file; TSV when the header holds a tab.

    TSV is read without quote handling: the STS-B and SICK files have unbalanced quotes inside sentences.
    """
    text = path.read_text(encoding="utf-8-sig")
    first_line = text.split("\n", 1)[0]
    if not first_line.strip():
        raise ValueError(f"{path}: empty first line (expected a header line)")
    stream = io.StringIO(text, newline="")
    if "\t" in first_line:
        reader = csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(stream)
    rows = [(reader.line_num, fields) for fields in reader]
    header = [h.strip() for h in rows[0][1]]
    return header, [(n, f) for n, f in rows[1:] if any(x.strip() for x in f)]


def _column(path: Path, header: list[str], name: str, expected: str) -> int:
    lowered = [h.lower() for h in header]
    if name.lower() not in lowered:
        raise ValueError(f"{path}: missing column {name!r} (expected columns {expected}; found: "
                         f"{', '.join(header) or 'none'})")
    return lowered.index(name.lower())


def read_image_labels(path: str | Path) -> LabelledImages:
    """Images and class labels from a CSV/TSV with columns image,label or a JSON list of {"image", "label"}.

    Relative image paths are relative to the file's folder. Raises ValueError (one line, naming the file and the
    row) for a missing column or key, an empty value or an image that does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: image label file not found")
    entries: list[tuple[str, str, str]] = []  # (where, image, label)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of {{\"image\": path, \"label\": ...}} entries")
        for i, entry in enumerate(data):
            if not isinstance(entry, dict):
                raise ValueError(f"{path}: entry {i}: expected an object with keys image and label")
            for key in IMAGE_LABEL_COLUMNS:
                if entry.get(key) is None:
                    raise ValueError(f"{path}: entry {i}: missing key {key!r}")
            entries.append((f"entry {i}", str(entry["image"]), str(entry["label"])))
    else:
        header, rows = _delimited_rows(path)
        expected = ",".join(IMAGE_LABEL_COLUMNS)
        image_col, label_col = (_column(path, header, c, expected) for c in IMAGE_LABEL_COLUMNS)
        for number, fields in rows:
            if len(fields) <= max(image_col, label_col):
                raise ValueError(f"{path}: line {number}: expected {len(header)} fields, found {len(fields)}")
            entries.append((f"line {number}", fields[image_col], fields[label_col]))
    root = path.parent
    paths, labels = [], []
    for where, image, label in entries:
        image, label = image.strip(), label.strip()
        if not image or not label:
            raise ValueError(f"{path}: {where}: empty {'image path' if not image else 'label'}")
        p = Path(image)
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise ValueError(f"{path}: {where}: image {image!r} not found (looked at {p})")
        paths.append(p)
        labels.append(label)
    if len(paths) < 2:
        raise ValueError(f"{path}: needs at least two labelled images, found {len(paths)}")
    return LabelledImages(paths, labels, str(path))


def read_sts(path: str | Path) -> StsPairs:
    """Sentence pairs and gold scores: STS-B layout (sentence1, sentence2, score) or SICK-R layout (sentence_A,
    sentence_B, relatedness_score), told apart by the header; tab- or comma-separated."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: STS file not found")
    header, rows = _delimited_rows(path)
    lowered = {h.lower() for h in header}
    found = {name: [c for c in cols if c.lower() in lowered] for name, cols in STS_LAYOUTS.items()}
    layout = next((name for name, cols in STS_LAYOUTS.items() if len(found[name]) == len(cols)), None)
    if layout is None:
        closest = max(STS_LAYOUTS, key=lambda name: len(found[name]))
        missing = next(c for c in STS_LAYOUTS[closest] if c not in found[closest])
        raise ValueError(f"{path}: missing column {missing!r} (STS-B layout: sentence1, sentence2, score; "
                         f"SICK-R layout: sentence_A, sentence_B, relatedness_score; found: {', '.join(header)})")
    expected = ", ".join(STS_LAYOUTS[layout])
    cols = [_column(path, header, c, expected) for c in STS_LAYOUTS[layout]]
    first, second, scores = [], [], []
    for number, fields in rows:
        if len(fields) <= max(cols):
            raise ValueError(f"{path}: line {number}: expected {len(header)} fields, found {len(fields)}")
        a, b, score = (fields[c].strip() for c in cols)
        try:
            value = float(score)
        except ValueError:
            raise ValueError(f"{path}: line {number}: score {score!r} is not a number") from None
        if not np.isfinite(value):
            raise ValueError(f"{path}: line {number}: score {score!r} is not a finite number")
        first.append(a)
        second.append(b)
        scores.append(value)
    if len(scores) < 2:
        raise ValueError(f"{path}: needs at least two sentence pairs, found {len(scores)}")
    return StsPairs(first, second, np.asarray(scores, dtype=np.float64), layout, str(path))


# ---------------------------------------------------------------------------------------------- metrics
def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of the positions they occupy."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {v.shape}")
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # position of each distinct value's last occurrence (1-based)
    first = last - counts + 1
    return ((first + last) / 2.0)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation in [-1, 1]: Pearson's correlation of the average ranks."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman: expected two 1-D arrays of one length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError("spearman: needs at least two pairs")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("spearman: values contain NaN or infinity")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    if denom == 0:
        raise ValueError("spearman: undefined when one side is constant")
    return float((rx * ry).sum() / denom)


@torch.no_grad()
def map_at_r(embeddings: torch.Tensor | np.ndarray, labels: list | np.ndarray) -> dict[str, float | int]:
    """mAP@R and R@1 (percent) of image→image retrieval by cosine similarity, each image querying all others.

    Returns {"map_at_r", "r1", "queries", "singletons"}: queries are the images with at least one other image of
    their class; singletons (alone in their class) are left out of both means but still serve as distractors.
    """
    x = torch.as_tensor(embeddings)
    if x.ndim != 2 or x.shape[0] != len(labels):
        raise ValueError(f"expected embeddings [{len(labels)}, D] for {len(labels)} labels, got {tuple(x.shape)}")
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    x = F.normalize(x, dim=1)
    n = x.shape[0]
    codes = torch.as_tensor(np.unique(np.asarray(labels, dtype=str), return_inverse=True)[1].reshape(-1))
    codes = codes.to(x.device)
    r_of = torch.bincount(codes)[codes] - 1  # other images of each image's class
    queries = torch.nonzero(r_of > 0).flatten()
    if queries.numel() == 0:
        raise ValueError("no class has two images: mAP@R needs at least one image with a same-class neighbor")
    k = int(r_of.max())
    ap_sum, hits = 0.0, 0
    step = max(1, _SORT_BUDGET // n)
    for lo in range(0, queries.numel(), step):
        q = queries[lo:lo + step]
        sims = x[q] @ x.T
        sims[torch.arange(len(q), device=x.device), q] = -torch.inf  # a query never retrieves itself
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
        relevant = codes[order] == codes[q][:, None]                   # [q, k]
        r = r_of[q][:, None]
        position = torch.arange(1, k + 1, device=x.device)[None, :]
        counted = relevant & (position <= r)                          # hits within each query's own top R
        precision = counted.cumsum(dim=1) / position
        ap_sum += float(((precision * counted).sum(dim=1) / r[:, 0]).double().sum())
        hits += int(relevant[:, 0].sum())
    m = queries.numel()
    return {"map_at_r": 100.0 * ap_sum / m, "r1": 100.0 * hits / m, "queries": int(m), "singletons": int(n - m)}


# ---------------------------------------------------------------------------------------------- evaluations
def evaluate_image_retrieval(embedder: StudentEmbedder, labels: LabelledImages | str | Path,
                             embedding: str = "uni") -> dict:
    """{"map_at_r", "r1", "queries", "embedding", ...} of the student on a labelled image set (a file or its
    parsed contents)."""
    data = labels if isinstance(labels, LabelledImages) else read_image_labels(labels)
    emb = embedder.images(data.paths, embedding)
    result = map_at_r(emb, data.labels)
    return {"map_at_r": result["map_at_r"], "r1": result["r1"], "queries": result["queries"],
            "embedding": embedding, "images": len(data.paths), "classes": len(set(data.labels)),
            "file": data.source}


def evaluate_sts(embedder: StudentEmbedder, pairs: StsPairs | str | Path, embedding: str = "uni") -> dict:
    """{"spearman" (×100), "pairs", "embedding", ...} of the student on STS-B or SICK-R sentence pairs (a file or
    its parsed contents)."""
    data = pairs if isinstance(pairs, StsPairs) else read_sts(pairs)
    a = embedder.texts(data.first, embedding)
    b = embedder.texts(data.second, embedding)
    cosine = F.cosine_similarity(a.double(), b.double(), dim=1).numpy()
    return {"spearman": 100.0 * spearman(cosine, data.scores), "pairs": len(data.scores), "embedding": embedding,
            "layout": data.layout, "file": data.source}


def format_unimodal(result: dict) -> str:
    """Human lines for the uni-modal results present in a cusa-eval result."""
    lines = []
    if "image_retrieval" in result:
        r = result["image_retrieval"]
        lines.append(f"image→image retrieval ({r['embedding']} embeddings, {r['queries']} queries, "
                     f"{r['classes']} classes): mAP@R {r['map_at_r']:.1f}  R@1 {r['r1']:.1f}")
    if "sts" in result:
        r = result["sts"]
        lines.append(f"sentence similarity ({r['embedding']} embeddings, {r['pairs']} {r['layout']} pairs): "
                     f"Spearman ×100 {r['spearman']:.1f}")
    return "\n".join(lines)


def read_extra_inputs(image_labels: str | None, sts: str | None, eccv_captions: str | None
                      ) -> tuple[LabelledImages | None, StsPairs | None]:
    """Parse the label and STS files and check the ECCV inputs before anything is embedded."""
    if eccv_captions:
        from train.eccv import check_eccv_inputs

        check_eccv_inputs(eccv_captions)
    return (read_image_labels(image_labels) if image_labels else None, read_sts(sts) if sts else None)


def run_extra_evaluations(result: dict, data: str, split: str, device: str, batch_size: int, workers: int,
                          image_labels: LabelledImages | str | None, image_embedding: str,
                          sts: StsPairs | str | None, text_embedding: str,
                          eccv_captions: str | None, progress: bool = False) -> tuple[dict, str]:
    """The optional `cusa-eval` evaluations of the checkpoint ``result`` was computed with: {"image_retrieval",
    "sts", "eccv"} (those asked for) and their human lines."""
    from pipeline.distributed import resolve_device

    embedder = StudentEmbedder.from_checkpoint(result["checkpoint"], resolve_device(device), batch_size, workers)
    extra: dict = {}
    if image_labels:
        extra["image_retrieval"] = evaluate_image_retrieval(embedder, image_labels, image_embedding)
    if sts:
        extra["sts"] = evaluate_sts(embedder, sts, text_embedding)
    human = format_unimodal(extra)
    if eccv_captions:
        from train.data import load_config_split
        from train.eccv import evaluate_eccv, format_eccv

        cfg = embedder.config
        manifest = load_config_split(cfg, data, split)
        regions = None
        if embedder.region:  # a region student scores the test images' regions (cached by the retrieval evaluation)
            from train.regions import region_data

            regions = region_data(cfg, data, split, manifest, embedder.student.vocab, progress)
        extra["eccv"] = evaluate_eccv(embedder, manifest, eccv_captions, progress=progress, regions=regions)
        human = "\n".join(x for x in (human, format_eccv(extra["eccv"])) if x)
    return extra, human
