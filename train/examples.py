"""Retrieval examples, the qualitative figure of retrieval papers: test captions with each run's top images (the
ground truth framed), and test images with each run's top captions.

With two runs, the examples are drawn (seeded) from the queries where the runs disagree: one ranks the ground truth
first and the other does not; when there are fewer such queries than asked, queries whose top result differs fill
up the rest. Embeddings come from the runs' search caches (``train.search``), so a later ``cusa-search`` on the same
split reuses them, and the other way round.
"""

from __future__ import annotations

import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.data import ManifestImages, shard_layout_of
from train.evaluation_run import with_source_options
from train.evaluation_set import run_stores
from train.model import TrainedModel, load_model
from train.search import Collection, collection_index, read_collection, run_labels

TOP = 5
_CHUNK = 1024
IMAGES_DIR = "images"  # beside examples.md: the pictured images that are members of shards


@dataclass
class Rankings:
    """One run's rankings of a split: top-``TOP`` per query and the ground truth's rank by ``cusa-eval``'s rule
    (0-based: the number of candidates strictly more similar)."""

    t2i_top: np.ndarray  # int64 [N_txt, TOP] image rows
    t2i_scores: np.ndarray  # float32 [N_txt, TOP]
    t2i_gt_rank: np.ndarray  # int64 [N_txt]
    i2t_top: np.ndarray  # int64 [N_img, TOP] caption rows
    i2t_scores: np.ndarray
    i2t_gt_rank: np.ndarray  # int64 [N_img]: best rank among the image's captions

    def recall_at_1(self) -> tuple[float, float]:
        return 100.0 * float(np.mean(self.i2t_gt_rank == 0)), 100.0 * float(np.mean(self.t2i_gt_rank == 0))


@torch.no_grad()
def rank_split(images: np.ndarray, texts: np.ndarray, caption_image_rows: np.ndarray) -> Rankings:
    img, txt = torch.from_numpy(images), torch.from_numpy(texts)
    rows = torch.tensor(np.asarray(caption_image_rows, dtype=np.int64))
    k_img, k_txt = min(TOP, len(img)), min(TOP, len(txt))
    t_top, t_scores, t_rank = [], [], []
    for lo in range(0, len(txt), _CHUNK):
        sims = txt[lo:lo + _CHUNK] @ img.T
        gt = sims.gather(1, rows[lo:lo + _CHUNK, None])
        t_rank.append((sims > gt).sum(1))
        s, i = _top(sims, k_img)
        t_top.append(i)
        t_scores.append(s)
    i_top, i_scores, i_rank = [], [], []
    for lo in range(0, len(img), _CHUNK):
        sims = img[lo:lo + _CHUNK] @ txt.T
        own = rows[None, :] == torch.arange(lo, lo + len(sims))[:, None]
        best = sims.masked_fill(~own, -torch.inf).amax(1, keepdim=True)
        i_rank.append((sims > best).sum(1))
        s, i = _top(sims, k_txt)
        i_top.append(i)
        i_scores.append(s)
    cat = lambda parts: torch.cat(parts).numpy()  # noqa: E731
    return Rankings(cat(t_top), cat(t_scores), cat(t_rank), cat(i_top), cat(i_scores), cat(i_rank))


def _top(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by descending score, ties by column (as cusa-search lists them)."""
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order), order


def choose(n: int, size: int, hit: list[np.ndarray], top1: list[np.ndarray], seed: int) -> tuple[np.ndarray, dict]:
    """``n`` query rows out of ``size``, seeded; with two runs, first from those where exactly one run hits at 1,
    then from those whose top results differ, then from the rest. Returned in row order."""
    rng = np.random.default_rng(seed)
    if len(hit) == 1:
        picked = rng.choice(size, size=min(n, size), replace=False)
        return np.sort(picked), {}
    hit_differs = hit[0] != hit[1]
    top_differs = (top1[0] != top1[1]) & ~hit_differs
    rest = ~hit_differs & ~top_differs
    picked: list[int] = []
    for pool in (hit_differs, top_differs, rest):
        rows = np.flatnonzero(pool)
        take = min(n - len(picked), len(rows))
        if take > 0:
            picked.extend(rng.choice(rows, size=take, replace=False).tolist())
    pools = {"hit_differs": int(hit_differs.sum()), "top1_differs": int(top_differs.sum()),
             "first_run_only": int((hit[0] & ~hit[1]).sum()), "second_run_only": int((hit[1] & ~hit[0]).sum())}
    return np.sort(np.asarray(picked, dtype=np.int64)), pools


def write_examples(runs: list[str], data: str, split: str, n: int, out: str | os.PathLike, seed: int = 0,
                   device: str = "auto", batch_size: int = 256, workers: int = 0, progress: bool = True,
                   source_options: dict | None = None) -> dict[str, Any]:
    """``out/examples_t2i.png`` and ``out/examples.md`` for one run or two (side by side), and the images the
    markdown links to in ``out/images/`` when they are members of shards; returns what was written and which queries
    were chosen. ``data`` is read as the first run's config says, ``source_options`` (format, image_root, image_key,
    caption_key, id_field) overriding it as in :func:`train.evaluation_run.evaluate_run`."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    models: list[TrainedModel] = [load_model(r, device=device, batch_size=batch_size, workers=workers) for r in runs]
    cfg = with_source_options(models[0].config, source_options)
    col = read_collection(data, split=split, fmt=cfg.format, image_root=cfg.image_root,
                          shard_layout=shard_layout_of(cfg))
    if col.kind != "annotations":
        raise ValueError(f"{data}: examples need captions with their images (an annotation file)")
    for model in models:  # every run ranks the same images: none that a run's stores list as unreadable
        col = col.without_images_skipped_by(run_stores(model.config))
    rankings = []
    cached = []
    for model in models:
        ci = collection_index(model, col, progress=progress)
        cached.append(ci.cached)
        rankings.append(rank_split(ci.images, ci.texts, col.caption_image_rows))
    captions, t2i_pools = choose(n, len(col.captions), [r.t2i_gt_rank == 0 for r in rankings],
                                 [r.t2i_top[:, 0] for r in rankings], seed)
    images, i2t_pools = choose(n, len(col.image_ids), [r.i2t_gt_rank == 0 for r in rankings],
                               [r.i2t_top[:, 0] for r in rankings], seed)
    labels = run_labels(runs)
    png = out_dir / "examples_t2i.png"
    md = out_dir / "examples.md"
    draw_t2i(png, col, rankings, labels, captions)
    pictured = np.unique(np.concatenate([col.caption_image_rows[captions], images,
                                         *(r.t2i_top[captions].ravel() for r in rankings)]))
    links = image_links(col, pictured, out_dir)
    md.write_text(examples_markdown(col, rankings, labels, captions, images, data, split, seed, t2i_pools,
                                    i2t_pools, links))
    return {"png": str(png), "md": str(md), "n": int(len(captions)), "seed": seed, "runs": labels,
            "image_files": sorted(link for link in links.values() if link.startswith(f"{IMAGES_DIR}/")),
            "caption_rows": captions.tolist(), "image_rows": images.tolist(),
            "recall_at_1": {lab: dict(zip(("i2t", "t2i"), r.recall_at_1())) for lab, r in zip(labels, rankings)},
            "t2i_pools": t2i_pools, "i2t_pools": i2t_pools, "collection_cached": all(cached)}


# ---------------------------------------------------------------------------------------------- figure
def draw_t2i(path: Path, col: Collection, rankings: list[Rankings], labels: list[str], captions: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    thumbs = ManifestImages(col.manifest, _thumbnail, col.manifest_rows)
    n_runs = len(rankings)
    ratios = [2.4]
    for r in range(n_runs):
        ratios += ([0.25] if r else []) + [1.0] * TOP
    height = 0.5 + 1.45 * len(captions)
    fig = plt.figure(figsize=(2.4 + 1.25 * TOP * n_runs + 0.3 * (n_runs - 1), height))
    grid = GridSpec(len(captions), len(ratios), figure=fig, width_ratios=ratios, wspace=0.08, hspace=0.35,
                    left=0.01, right=0.99, top=1 - 0.5 / height, bottom=0.01)
    for r, label in enumerate(labels):
        first = 1 + r * (TOP + 1)
        left = grid[0, first].get_position(fig).x0
        right = grid[0, first + TOP - 1].get_position(fig).x1
        fig.text((left + right) / 2, 1 - 0.12 / height, label, ha="center", va="top", fontsize=10,
                 fontweight="bold")
    for i, row in enumerate(captions):
        gt = int(col.caption_image_rows[row])
        text_ax = fig.add_subplot(grid[i, 0])
        text_ax.axis("off")
        ranks = ", ".join(f"{lab}: {int(r.t2i_gt_rank[row]) + 1}" for lab, r in zip(labels, rankings))
        text_ax.text(0, 0.5, textwrap.fill(col.captions[row], 30) + f"\n\nground truth rank\n{ranks}",
                     fontsize=7.5, va="center", ha="left", wrap=True)
        for r, ranking in enumerate(rankings):
            first = 1 + r * (TOP + 1)
            for j, (image_row, score) in enumerate(zip(ranking.t2i_top[row], ranking.t2i_scores[row])):
                ax = fig.add_subplot(grid[i, first + j])
                ax.imshow(thumbs[int(image_row)])
                ax.set_xticks([])
                ax.set_yticks([])
                is_gt = int(image_row) == gt
                for spine in ax.spines.values():
                    spine.set_edgecolor("#1a9c3a" if is_gt else "#cccccc")
                    spine.set_linewidth(4 if is_gt else 0.5)
                ax.set_title(f"{j + 1}. {score:.3f}" + (" ✓" if is_gt else ""), fontsize=7,
                             color="#1a9c3a" if is_gt else "black", pad=2)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _thumbnail(image):
    image = image.copy()
    image.thumbnail((160, 160))
    return image


# ---------------------------------------------------------------------------------------------- markdown
def image_links(col: Collection, rows: np.ndarray, out_dir: Path) -> dict[int, str]:
    """Where examples.md links each image ``rows`` of the collection, relative to ``out_dir``: an image file where it
    is; a member of a shard, which no link can open, written as a file of its own bytes to ``out_dir/images/``,
    named by its image id."""
    from pipeline.shards import read_member

    links: dict[int, str] = {}
    used: set[str] = set()
    for row in (int(r) for r in rows):
        record = col.manifest.images[int(col.manifest_rows[row]) if col.manifest_rows is not None else row]
        member = record.member
        if member is None or member.missing:
            links[row] = _rel(col.image_paths[row], out_dir)
            continue
        name = re.sub(r"[^A-Za-z0-9._-]", "_", col.image_ids[row]) + Path(member.name).suffix.lower()
        if name in used:  # two ids alike once made safe for a file name
            name = f"{row}-{name}"
        used.add(name)
        path = out_dir / IMAGES_DIR / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(read_member(member.shard, member.offset, member.size, member.stat))
        links[row] = f"{IMAGES_DIR}/{name}"
    return links


def examples_markdown(col: Collection, rankings: list[Rankings], labels: list[str], captions: np.ndarray,
                      images: np.ndarray, data: str, split: str, seed: int, t2i_pools: dict, i2t_pools: dict,
                      links: dict[int, str]) -> str:
    """The markdown of the examples; ``links``: where each pictured image row is, relative to the markdown."""
    lines = [f"# Retrieval examples: {' vs '.join(labels)}", "",
             f"{len(col.image_ids)} images and {len(col.captions)} captions of `{data}` [{split}]; seed {seed}. "
             "Ranks count the candidates strictly more similar than the ground truth, as cusa-eval does.", ""]
    lines += ["| run | i2t R@1 | t2i R@1 |", "|---|---|---|"]
    lines += [f"| {lab} | {r.recall_at_1()[0]:.1f} | {r.recall_at_1()[1]:.1f} |" for lab, r in zip(labels, rankings)]
    if len(rankings) == 2:
        lines += ["", _pool_line("Captions", t2i_pools, labels), _pool_line("Images", i2t_pools, labels)]
    lines += ["", f"## Text → image ({len(captions)} captions, top {TOP}; ✓ = the ground truth)", "",
              "![text to image examples](examples_t2i.png)", ""]
    for row in captions:
        gt = int(col.caption_image_rows[row])
        ranks = ", ".join(f"{lab} {int(r.t2i_gt_rank[row]) + 1}" for lab, r in zip(labels, rankings))
        lines += [f"### “{col.captions[row]}”", "",
                  f"Caption row {int(row)}; ground truth `{col.image_ids[gt]}` "
                  f"([image]({links[gt]})), ranked: {ranks}.", "",
                  "| # | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for j in range(rankings[0].t2i_top.shape[1]):
            cells = []
            for r in rankings:
                image_row, score = int(r.t2i_top[row, j]), float(r.t2i_scores[row, j])
                mark = " ✓" if image_row == gt else ""
                cells.append(f"[`{col.image_ids[image_row]}`]({links[image_row]}) "
                             f"{score:.3f}{mark}")
            lines.append(f"| {j + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"## Image → text ({len(images)} images, top {TOP}; ✓ = a caption of the image)", ""]
    for row in images:
        ranks = ", ".join(f"{lab} {int(r.i2t_gt_rank[row]) + 1}" for lab, r in zip(labels, rankings))
        own = [c for c in np.flatnonzero(col.caption_image_rows == row)]
        lines += [f"### `{col.image_ids[row]}`", "",
                  f"[image]({links[int(row)]}); its captions: "
                  + "; ".join(f"“{col.captions[c]}”" for c in own) + f". Best caption ranked: {ranks}.", "",
                  "| # | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for j in range(rankings[0].i2t_top.shape[1]):
            cells = []
            for r in rankings:
                caption_row, score = int(r.i2t_top[row, j]), float(r.i2t_scores[row, j])
                mark = " ✓" if int(col.caption_image_rows[caption_row]) == row else ""
                cells.append(f"{score:.3f}{mark} {_cell(col.captions[caption_row])}")
            lines.append(f"| {j + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _pool_line(what: str, pools: dict, labels: list[str]) -> str:
    return (f"{what} where the runs disagree at rank 1: {pools['hit_differs']} ({labels[0]} right only: "
            f"{pools['first_run_only']}, {labels[1]} right only: {pools['second_run_only']}); top result differs "
            f"otherwise: {pools['top1_differs']}. Examples are drawn from these first.")


def _rel(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir.resolve())).as_posix()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
