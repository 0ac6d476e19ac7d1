"""`cusa-cache report`: is a cached teacher worth training with? Its neighbors checked against the captions.

CUSA's soft labels are the teachers' similarity rows, so a teacher helps only if its nearest neighbors are
semantically close. Both checks use only the store and the annotations, before any training:

- text teacher: a caption's nearest captions should describe the same image. precision@k is the fraction of its
  top-k neighbors that do, hit@k whether any does; a caption of an image with n captions has n−1 such partners,
  so precision@k can reach at most mean(min(n−1, k)/k) (the ceiling), and a random ranking scores (n−1)/(N−1);
- image teacher: an image's nearest images should show the same things. Each image's *content words* are the
  lower-cased words of its captions minus a small stopword list; the teacher's agreement at k is the mean Jaccard
  overlap between an image's words and those of its top-k neighbors, compared with random image pairs.

lift = teacher agreement / chance agreement (text: precision@k over its random-ranking value; images: neighbor
Jaccard over random-pair Jaccard), at k = 5 (or the table's K when smaller). The verdict reads it:
"informative" from 1.5, "weak" from 1.1, else "no better than chance".

Plots use matplotlib's object API with the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.manifest import Manifest, read_manifest
from pipeline.shards import ShardLayout
from teacher_cache.remote import redact_text
from teacher_cache.store import Store

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
VERDICT_K = 5
INFORMATIVE_LIFT = 1.5
WEAK_LIFT = 1.1
MAX_EXACT_PAIRS = 50_000  # random-pair baselines: every pair up to this many, else this many sampled pairs
SIMILARITY_PAIRS = 10_000  # random pairs whose teacher similarity is histogrammed
EXAMPLE_NEIGHBORS = 5
THUMBNAIL = 96
STOPWORDS = frozenset("""
a an the and or of in on at to with by for from into onto over under near next up down out off its it this that
these those there here is are was were be been being has have had having do does did some any one two three four
five six seven eight nine ten each other another very as while who whom which what where when his her their them
they he she we you i my our your s
""".split())
_WORD = re.compile(r"[a-z0-9]+")


# ---------------------------------------------------------------------------------------------- measures
def content_words(text: str) -> frozenset[str]:
    """Lower-cased alphanumeric words of ``text`` that are not stopwords."""
    return frozenset(w for w in _WORD.findall(text.lower()) if w not in STOPWORDS)


def jaccard(a: frozenset[str] | set[str], b: frozenset[str] | set[str]) -> float:
    """|a ∩ b| / |a ∪ b|; 0 when both are empty."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def capped_ks(table_k: int, ks: tuple[int, ...] = DEFAULT_KS) -> list[int]:
    """The requested k values, each capped at the neighbor table's K (duplicates dropped)."""
    if table_k < 1:
        raise ValueError(f"the neighbor table keeps {table_k} neighbors per row; the report needs at least 1")
    return sorted({min(k, table_k) for k in ks})


def text_agreement(neighbor_ids: np.ndarray, query_rows: np.ndarray, caption_image_rows: np.ndarray,
                   ks: list[int]) -> dict[str, Any]:
    """precision@k and hit@k of the caption neighbors of ``query_rows`` (same image = correct), with their ceiling
    and their value under a random ranking of the N−1 other captions. Missing neighbors (id −1) count as wrong."""
    ids = np.asarray(neighbor_ids, dtype=np.int64)[query_rows]
    image_of = np.asarray(caption_image_rows, dtype=np.int64)
    own = image_of[query_rows]
    same = (ids >= 0) & (image_of[np.clip(ids, 0, None)] == own[:, None])
    partners = np.bincount(image_of, minlength=int(image_of.max()) + 1)[own] - 1  # other captions of its image
    others = len(image_of) - 1
    out: dict[str, Any] = {"queries": int(len(query_rows)), "precision": {}, "hit": {}, "precision_ceiling": {},
                           "precision_chance": {}, "hit_chance": {}}
    for k in ks:
        out["precision"][k] = float(same[:, :k].sum(axis=1).mean() / k)
        out["hit"][k] = float(same[:, :k].any(axis=1).mean())
        out["precision_ceiling"][k] = float((np.minimum(partners, k) / k).mean())
        out["precision_chance"][k] = float((partners / others).mean())
        values, counts = np.unique(partners, return_counts=True)  # few distinct partner counts, many captions
        out["hit_chance"][k] = float(sum(c * _hit_chance(int(p), others, k) for p, c in zip(values, counts))
                                     / len(partners))
    return out


def _hit_chance(partners: int, others: int, k: int) -> float:
    """P(at least one of ``partners`` among k of ``others`` drawn without replacement)."""
    miss = 1.0
    for i in range(min(k, others)):
        miss *= max(others - partners - i, 0) / (others - i)
    return 1.0 - miss


def random_pairs(query_rows: np.ndarray, candidate_rows: np.ndarray, max_pairs: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(query, candidate) pairs with query ≠ candidate: every such pair when there are at most ``max_pairs``,
    otherwise ``max_pairs`` drawn uniformly (with replacement)."""
    q = np.asarray(query_rows, dtype=np.int64)
    c = np.asarray(candidate_rows, dtype=np.int64)
    if len(q) * len(c) <= max_pairs:
        a, b = np.repeat(q, len(c)), np.tile(c, len(q))
        keep = a != b
        return a[keep], b[keep]
    a = q[rng.integers(0, len(q), size=max_pairs)]
    b = c[rng.integers(0, len(c), size=max_pairs)]
    keep = a != b
    return a[keep], b[keep]


def image_agreement(neighbor_ids: np.ndarray, query_rows: np.ndarray, words: list[frozenset[str]], ks: list[int],
                    pairs: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Mean content-word Jaccard between each query image and its top-k neighbor images, per k, and over the
    given random pairs (the baseline)."""
    ids = np.asarray(neighbor_ids, dtype=np.int64)[query_rows]
    kmax = max(ks)
    overlaps = np.full((len(query_rows), kmax), np.nan)
    for i, (row, neighbors) in enumerate(zip(query_rows.tolist(), ids[:, :kmax].tolist())):
        for j, n in enumerate(neighbors):
            if n >= 0:
                overlaps[i, j] = jaccard(words[row], words[n])
    out: dict[str, Any] = {"queries": int(len(query_rows)), "jaccard": {}}
    for k in ks:
        per_query = _nanmean_rows(overlaps[:, :k])
        out["jaccard"][k] = float(np.nanmean(per_query)) if np.isfinite(per_query).any() else 0.0
    a, b = pairs
    out["random_jaccard"] = float(np.mean([jaccard(words[x], words[y]) for x, y in zip(a.tolist(), b.tolist())])) \
        if len(a) else 0.0
    out["random_pairs"] = int(len(a))
    return out


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    counts = np.isfinite(x).sum(axis=1)
    sums = np.where(np.isfinite(x), x, 0.0).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def lift(teacher: float, chance: float) -> float:
    if chance > 0:
        return teacher / chance
    return math.inf if teacher > 0 else 1.0


def verdict(value: float) -> str:
    if value >= INFORMATIVE_LIFT:
        return "informative"
    if value >= WEAK_LIFT:
        return "weak"
    return "no better than chance"


def similarity_stats(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"count": 0}
    return {"count": int(len(v)), "mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
            "min": float(v.min()), "max": float(v.max())}


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class _Modality:
    query_rows: np.ndarray  # store rows of the manifest's items (skipped images left out)
    candidate_rows: np.ndarray  # store rows a neighbor may be
    ids: np.ndarray  # [N, K] neighbor table over the whole store
    sims: np.ndarray
    source: str  # "store" | "computed"


def _neighbors(store: Store, modality: str, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    if store.has_neighbors(modality):
        ids, sims = store.neighbors(modality)
        if ids.shape[1] > 0:
            return ids, sims, "store"
    # no table kept (built with --neighbors 0): exact search over the stored rows now
    from teacher_cache.neighbors import build_neighbor_table

    emb = store.load(modality)
    k = min(max(DEFAULT_KS), len(valid) - 1)
    if k < 1:
        raise ValueError(f"{store.path}: the {modality} need at least two rows for a neighbor report")
    table = build_neighbor_table(emb[valid], k, progress=False)
    ids = np.full((len(emb), k), -1, dtype=np.int64)
    sims = np.full((len(emb), k), -np.inf, dtype=np.float32)
    ids[valid] = np.where(table.ids >= 0, valid[np.clip(table.ids, 0, None)], -1)
    sims[valid] = table.sims
    return ids, sims, "computed"


def _pair_sims(store: Store, modality: str, pairs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    a, b = pairs
    if not len(a):
        return np.zeros(0, dtype=np.float32)
    rows = np.unique(np.concatenate([a, b]))
    emb = store.rows(modality, rows)
    pos = {int(r): i for i, r in enumerate(rows)}
    ia = np.fromiter((pos[int(x)] for x in a), dtype=np.int64, count=len(a))
    ib = np.fromiter((pos[int(x)] for x in b), dtype=np.int64, count=len(b))
    return np.einsum("ij,ij->i", emb[ia], emb[ib])


def default_report_dir(store_path: str | Path, split: str = "all") -> Path:
    """``STORE-report`` next to the store for the whole store, ``STORE-report-SPLIT`` for one split (so that a
    report on another split does not overwrite it)."""
    p = Path(store_path)
    return p.with_name(p.name + "-report" + ("" if split == "all" else f"-{split}"))


def build_report(store_path: str | Path, annotations: str | Path, out: str | Path | None = None, *,
                 fmt: str = "auto", image_root: str | None = None, split: str = "all", examples: int = 4,
                 seed: int = 0, ks: tuple[int, ...] = DEFAULT_KS,
                 shard_layout: ShardLayout | None = None) -> dict[str, Any]:
    """Compute the report for the store and the annotations it was built from (or one of their splits), write
    DIR/report.json, DIR/report.md, DIR/report_hist.png and DIR/report_examples.png, and return the report."""
    store = Store.open(store_path, require_complete=True)
    manifest = read_manifest(annotations, format=fmt, image_root=image_root,
                             shard_layout=shard_layout).select_split(split)
    image_rows, caption_rows = store.rows_of(manifest, f"annotations {annotations}")
    out_dir = Path(out) if out is not None else default_report_dir(store.path, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    skipped = {int(s["row"]) for s in store.skipped_images}
    all_images = np.array([r for r in range(store.counts["images"]) if r not in skipped], dtype=np.int64)
    all_captions = np.arange(store.counts["texts"], dtype=np.int64)
    mods = {}
    for modality, queries, candidates in (("images", np.array([r for r in image_rows if r not in skipped],
                                                                dtype=np.int64), all_images),
                                          ("texts", np.asarray(caption_rows, dtype=np.int64), all_captions)):
        ids, sims, source = _neighbors(store, modality, candidates)
        mods[modality] = _Modality(queries, candidates, ids, sims, source)

    caption_image = store.caption_image_rows
    captions = store.captions
    words: list[set[str]] = [set() for _ in range(store.counts["images"])]
    for text, img in zip(captions.tolist(), caption_image.tolist()):
        words[img] |= content_words(text)
    frozen_words = [frozenset(w) for w in words]

    txt, img = mods["texts"], mods["images"]
    txt_ks, img_ks = capped_ks(txt.ids.shape[1], ks), capped_ks(img.ids.shape[1], ks)
    text_part = text_agreement(txt.ids, txt.query_rows, caption_image, txt_ks)
    image_pairs = random_pairs(img.query_rows, img.candidate_rows, MAX_EXACT_PAIRS, rng)
    image_part = image_agreement(img.ids, img.query_rows, frozen_words, img_ks, image_pairs)

    k_txt, k_img = min(VERDICT_K, txt_ks[-1]), min(VERDICT_K, img_ks[-1])
    text_part["lift"] = lift(text_part["precision"][k_txt], text_part["precision_chance"][k_txt])
    text_part["lift_k"] = k_txt
    text_part["verdict"] = verdict(text_part["lift"])
    image_part["lift"] = lift(image_part["jaccard"][k_img], image_part["random_jaccard"])
    image_part["lift_k"] = k_img
    image_part["verdict"] = verdict(image_part["lift"])

    sim_pairs = {"images": random_pairs(img.query_rows, img.candidate_rows, SIMILARITY_PAIRS, rng),
                 "texts": random_pairs(txt.query_rows, txt.candidate_rows, SIMILARITY_PAIRS, rng)}
    histograms = {}
    similarities = {}
    for modality, m in mods.items():
        neighbor_sims = m.sims[m.query_rows]
        random_sims = _pair_sims(store, modality, sim_pairs[modality])
        histograms[modality] = (neighbor_sims[:, 0], neighbor_sims.ravel(), random_sims)
        similarities[modality] = {"top1": similarity_stats(neighbor_sims[:, 0]),
                                  "neighbors": similarity_stats(neighbor_sims.ravel()),
                                  "random_pairs": similarity_stats(random_sims)}

    picks_img = _spread(img.query_rows, examples)
    picks_txt = _spread(txt.query_rows, examples)
    image_examples = [{
        "row": int(q), "image_id": str(store.image_ids[q]), "path": str(store.image_paths[q]),
        "caption": _first_caption(captions, caption_image, q),
        "neighbors": [{"row": int(n), "image_id": str(store.image_ids[n]), "path": str(store.image_paths[n]),
                       "similarity": round(float(s), 4), "jaccard": round(jaccard(frozen_words[q], frozen_words[n]), 4),
                       "caption": _first_caption(captions, caption_image, n)}
                      for n, s in zip(img.ids[q, :EXAMPLE_NEIGHBORS].tolist(), img.sims[q, :EXAMPLE_NEIGHBORS].tolist())
                      if n >= 0]} for q in picks_img]
    caption_examples = [{
        "row": int(q), "caption": str(captions[q]), "image_row": int(caption_image[q]),
        "neighbors": [{"row": int(n), "caption": str(captions[n]), "similarity": round(float(s), 4),
                       "same_image": bool(caption_image[n] == caption_image[q])}
                      for n, s in zip(txt.ids[q, :EXAMPLE_NEIGHBORS].tolist(), txt.sims[q, :EXAMPLE_NEIGHBORS].tolist())
                      if n >= 0]} for q in picks_txt]

    files = {"json": out_dir / "report.json", "markdown": out_dir / "report.md",
             "histograms": out_dir / "report_hist.png", "examples": out_dir / "report_examples.png"}
    plot_histograms(histograms, files["histograms"])
    plot_examples(image_examples, manifest, files["examples"])
    report = {
        "store": str(store.path), "annotations": redact_text(str(annotations)), "split": split,
        "teachers": {"image": store.teachers.get("image", {}).get("spec"),
                     "text": store.teachers.get("text", {}).get("spec")},
        "counts": {"images": int(len(img.query_rows)), "captions": int(len(txt.query_rows)),
                   "store_images": store.counts["images"], "store_captions": store.counts["texts"]},
        "neighbor_tables": {m: {"k": int(v.ids.shape[1]), "source": v.source} for m, v in mods.items()},
        "text_teacher": _json_keys(text_part),
        "image_teacher": _json_keys(image_part),
        "similarities": similarities,
        "examples": {"images": image_examples, "captions": caption_examples},
        "files": {k: str(v) for k, v in files.items()},
    }
    files["markdown"].write_text(format_markdown(report), encoding="utf-8")
    report = _finite(report)
    files["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return report


def _finite(obj: Any) -> Any:
    """JSON has no infinity: an infinite lift (chance agreement 0) is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _json_keys(part: dict) -> dict:
    """JSON objects need string keys: {1: x} -> {"1": x}, recursively one level."""
    return {k: ({str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in part.items()}


def _spread(rows: np.ndarray, n: int) -> list[int]:
    """n rows evenly spread over ``rows`` (deterministic, so a report is reproducible)."""
    if n <= 0 or not len(rows):
        return []
    picks = np.linspace(0, len(rows) - 1, num=min(n, len(rows))).round().astype(int)
    return [int(rows[i]) for i in dict.fromkeys(picks.tolist())]


def _first_caption(captions: np.ndarray, caption_image: np.ndarray, image_row: int) -> str:
    hits = np.flatnonzero(caption_image == image_row)
    return str(captions[hits[0]]) if len(hits) else ""


# ---------------------------------------------------------------------------------------------- text outputs
def _fmt(x: float | None) -> str:
    return "inf" if x is None or math.isinf(x) else f"{x:.3f}"


def format_summary(report: dict) -> str:
    t, i = report["text_teacher"], report["image_teacher"]
    ks = list(t["precision"])
    lines = [f"store         {report['store']}  ({report['counts']['images']} images, "
             f"{report['counts']['captions']} captions of {report['annotations']} [{report['split']}])",
             f"text teacher  {report['teachers']['text']}: {t['verdict']} (lift {_fmt(t['lift'])} at k={t['lift_k']})",
             "              " + "  ".join(f"P@{k} {_fmt(t['precision'][k])}" for k in ks)
             + "   " + "  ".join(f"hit@{k} {_fmt(t['hit'][k])}" for k in ks),
             "              " + "  ".join(f"P@{k} ceiling {_fmt(t['precision_ceiling'][k])}" for k in ks)
             + f"   chance P {_fmt(t['precision_chance'][ks[0]])}",
             f"image teacher {report['teachers']['image']}: {i['verdict']} (lift {_fmt(i['lift'])} at k={i['lift_k']})",
             "              " + "  ".join(f"Jaccard@{k} {_fmt(v)}" for k, v in i["jaccard"].items())
             + f"   random pairs {_fmt(i['random_jaccard'])}",
             f"written       {Path(report['files']['markdown']).parent}/ (report.json, report.md, report_hist.png, "
             "report_examples.png)"]
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    t, i = report["text_teacher"], report["image_teacher"]
    ks_t, ks_i = list(t["precision"]), list(i["jaccard"])
    md = [f"# Teacher report: {report['store']}", "",
          f"Annotations `{report['annotations']}` (split `{report['split']}`): {report['counts']['images']} images, "
          f"{report['counts']['captions']} captions. Neighbor tables: "
          + ", ".join(f"{m} K={v['k']} ({v['source']})" for m, v in report["neighbor_tables"].items()) + ".", "",
          f"## Text teacher `{report['teachers']['text']}`: {t['verdict']}", "",
          "How often a caption's nearest captions describe the same image (lift = precision over chance "
          f"at k={t['lift_k']}: {_fmt(t['lift'])}).", "",
          "| k | precision@k | ceiling | chance | hit@k | hit chance |", "|---|---|---|---|---|---|"]
    md += [f"| {k} | {_fmt(t['precision'][k])} | {_fmt(t['precision_ceiling'][k])} | "
           f"{_fmt(t['precision_chance'][k])} | {_fmt(t['hit'][k])} | {_fmt(t['hit_chance'][k])} |" for k in ks_t]
    md += ["", f"## Image teacher `{report['teachers']['image']}`: {i['verdict']}", "",
           "Mean Jaccard overlap of caption content words between an image and its nearest images, against random "
           f"image pairs ({i['random_pairs']} pairs): lift at k={i['lift_k']} is {_fmt(i['lift'])}.", "",
           "| k | neighbor Jaccard | random pairs |", "|---|---|---|"]
    md += [f"| {k} | {_fmt(i['jaccard'][k])} | {_fmt(i['random_jaccard'])} |" for k in ks_i]
    md += ["", "## Teacher similarities", "", "| modality | top-1 mean | all-K mean | random pairs mean ± std |",
           "|---|---|---|---|"]
    for m, s in report["similarities"].items():
        r = s["random_pairs"]
        rand = f"{r['mean']:.3f} ± {r['std']:.3f}" if r.get("count") else "-"
        md.append(f"| {m} | {s['top1'].get('mean', float('nan')):.3f} | {s['neighbors'].get('mean', float('nan')):.3f}"
                  f" | {rand} |")
    md += ["", "![similarity histograms](report_hist.png)", "", "## Example neighbors", "",
           "![nearest images](report_examples.png)", ""]
    for ex in report["examples"]["captions"]:
        md.append(f"- **{ex['caption']}** (caption {ex['row']})")
        md += [f"  - {n['similarity']:.3f} {'✓' if n['same_image'] else '✗'} {n['caption']}"
               for n in ex["neighbors"]]
    md.append("")
    md.append("✓ = a caption of the same image.")
    return "\n".join(md) + "\n"


# ---------------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_histograms(histograms: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path) -> None:
    """One panel per modality: teacher similarity of top-1 neighbors, of all K neighbors, and of random pairs."""
    fig = _figure(5.0 * len(histograms), 3.6)
    axes = fig.subplots(1, len(histograms), squeeze=False)[0]
    for ax, (modality, (top1, neighbors, random_sims)) in zip(axes, histograms.items()):
        finite = [v[np.isfinite(v)] for v in (random_sims, neighbors, top1)]
        values = np.concatenate([v for v in finite if len(v)]) if any(len(v) for v in finite) else np.zeros(1)
        bins = np.linspace(float(values.min()), float(values.max()) + 1e-6, 41)
        for v, label, colour in zip(finite, ("random pairs", "all K neighbors", "top-1 neighbor"),
                                    ("#999999", "#4C72B0", "#DD8452")):
            if len(v):
                ax.hist(v, bins=bins, density=True, alpha=0.55, color=colour, label=f"{label} (n={len(v)})")
        ax.set_title(f"{modality}: teacher cosine similarity")
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _thumbnail(manifest: Manifest, row_of_path: dict[str, int], stored_path: str) -> np.ndarray | None:
    """A store image's thumbnail, read through the manifest (files or shard members); an image of another split of
    a shard-built store is not in the manifest and has no thumbnail."""
    from pipeline.errors import ImageError
    from pipeline.images import load_image, open_image

    try:
        if stored_path in row_of_path:
            img = open_image(manifest, row_of_path[stored_path])
        elif manifest.format != "webdataset":
            p = Path(stored_path)
            img = load_image(p if p.is_absolute() else Path(manifest.image_root) / p)
        else:
            return None
    except ImageError:
        return None
    img.thumbnail((THUMBNAIL, THUMBNAIL))
    return np.asarray(img)


def plot_examples(examples: list[dict], manifest: Manifest, path: Path) -> None:
    """For each query image: its thumbnail, then its nearest images titled with their teacher similarity."""
    cols = EXAMPLE_NEIGHBORS + 1
    rows = max(len(examples), 1)
    fig = _figure(1.7 * cols, 1.9 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    row_of_path = {record.path: row for row, record in enumerate(manifest.images)}
    for r in range(rows):
        ex = examples[r] if r < len(examples) else None
        cells = [] if ex is None else [(ex["path"], f"query {ex['image_id']}")] + [
            (n["path"], f"sim {n['similarity']:.2f}\nJ {n['jaccard']:.2f}") for n in ex["neighbors"]]
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            stored, title = cells[c]
            thumb = _thumbnail(manifest, row_of_path, stored)
            if thumb is None:
                ax.text(0.5, 0.5, "image\nunreadable", ha="center", va="center", fontsize=8)
            else:
                ax.imshow(thumb)
            ax.set_title(title, fontsize=8, color="#B00000" if c == 0 else "black")
    fig.tight_layout()
    fig.savefig(path)
