"""ECCV Caption evaluation (Chun et al., ECCV 2022) of a trained student on the COCO 5K test images.

COCO's captions describe many more images than the one they were written for; ECCV Caption adds machine- and
human-verified positives for a subset of the 5K test queries and scores rankings with mAP@R, R-Precision and R@1.
The `eccv-caption` package ships the association files (and the 25,000 test caption ids); its own metric code
scores the ranked lists built here.

The association files name captions by COCO *annotation id*, which neither the Karpathy split file nor the
caption-list formats keep. So the captions are read, by id, from COCO's ``captions_val2014.json`` (the 5K test
images are all from val2014), exactly as the package's own example does; the images come from the evaluation
manifest, matched by COCO image id (a numeric image id, or the number in a file name like
``COCO_val2014_000000391895.jpg``).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.distributed import autocast
from pipeline.manifest import Manifest
from train.embedding import StudentEmbedder

RANKED = 50  # list length handed to the metrics: more than the most positives of any query (48 captions, 19 images)
_TRAILING_NUMBER = re.compile(r"(\d+)(?:\.[A-Za-z]+)?$")


def _metrics_module():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the package warns when the optional ujson is absent
            from eccv_caption import Metrics
    except ImportError:
        raise ValueError("ECCV Caption evaluation needs the eccv-caption package (pip install eccv-caption)") from None
    return Metrics


def check_eccv_inputs(coco_captions: str | Path) -> None:
    """Fail early when the package or the COCO captions file is missing (the full check reads the file later)."""
    _metrics_module()
    if not Path(coco_captions).is_file():
        raise ValueError(f"{coco_captions}: COCO captions file not found (captions_val2014.json from the COCO 2014 "
                         "annotations)")


def coco_image_number(image_id: str, path: str) -> int | None:
    """The COCO image id of a manifest image: its id when numeric, else the number ending its file name."""
    if str(image_id).strip().isdigit():
        return int(image_id)
    match = _TRAILING_NUMBER.search(Path(path).name)
    return int(match.group(1)) if match else None


def read_coco_captions(path: str | Path, caption_ids: list[int]) -> list[str]:
    """Caption texts of ``caption_ids`` from a COCO captions file ({"annotations": [{"id", "caption"}, ...]})."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: COCO captions file not found (captions_val2014.json from the COCO 2014 "
                         "annotations)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise ValueError(f"{path}: not a COCO captions file (no \"annotations\" list)")
    by_id = {}
    for ann in annotations:
        if isinstance(ann, dict) and "id" in ann and "caption" in ann:
            by_id[int(ann["id"])] = str(ann["caption"]).strip()
    missing = [c for c in caption_ids if c not in by_id]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of the {len(caption_ids)} COCO 5K test captions are missing "
                         f"(first: annotation id {missing[0]}); pass captions_val2014.json")
    return [by_id[c] for c in caption_ids]


@torch.no_grad()
def _ranked(block, n_queries: int, gallery_ids: np.ndarray, query_ids: np.ndarray, k: int,
            chunk: int = 1024) -> dict[int, list[int]]:
    """Top-k gallery ids of each query, ``block(a, b)`` giving the similarities [b − a, N_gallery] of queries a..b−1."""
    out: dict[int, list[int]] = {}
    k = min(k, len(gallery_ids))
    for lo in range(0, n_queries, chunk):
        top = torch.topk(block(lo, lo + chunk), k, dim=1).indices.cpu().numpy()
        for qid, row in zip(query_ids[lo:lo + chunk].tolist(), top):
            out[int(qid)] = gallery_ids[row].tolist()
    return out


def eccv_metrics(image_ids: list[int], image_emb: torch.Tensor | np.ndarray, caption_ids: list[int],
                 text_emb: torch.Tensor | np.ndarray, progress: bool = False) -> dict:
    """ECCV Caption mAP@R, R-Precision and R@1 (and COCO 5K R@1, to check the id mapping), in percent, both
    directions, from embeddings of the COCO 5K test images and captions named by their COCO ids."""
    image = F.normalize(torch.as_tensor(image_emb, dtype=torch.float32), dim=1)
    text = F.normalize(torch.as_tensor(text_emb, dtype=torch.float32), dim=1)
    iids, cids = np.asarray(image_ids, dtype=np.int64), np.asarray(caption_ids, dtype=np.int64)
    if image.shape[0] != len(iids) or text.shape[0] != len(cids):
        raise ValueError("eccv_metrics: one embedding per image id and per caption id is needed")
    i2t = _ranked(lambda a, b: image[a:b] @ text.T, len(iids), cids, iids, RANKED)
    t2i = _ranked(lambda a, b: text[a:b] @ image.T, len(cids), iids, cids, RANKED)
    return _scored(i2t, t2i, len(iids), len(cids), progress)


def eccv_metrics_from_similarity(image_ids: list[int], caption_ids: list[int], sim: torch.Tensor | np.ndarray,
                                 progress: bool = False) -> dict:
    """`eccv_metrics` from a similarity matrix [images, captions] (a region student's pair scores), ranked the
    same way."""
    s = torch.as_tensor(sim, dtype=torch.float32)
    iids, cids = np.asarray(image_ids, dtype=np.int64), np.asarray(caption_ids, dtype=np.int64)
    if tuple(s.shape) != (len(iids), len(cids)):
        raise ValueError(f"eccv_metrics: a similarity matrix [{len(iids)}, {len(cids)}] is needed, got "
                         f"{tuple(s.shape)}")
    i2t = _ranked(lambda a, b: s[a:b], len(iids), cids, iids, RANKED)
    t2i = _ranked(lambda a, b: s[:, a:b].T, len(cids), iids, cids, RANKED)
    return _scored(i2t, t2i, len(iids), len(cids), progress)


def _scored(i2t: dict[int, list[int]], t2i: dict[int, list[int]], n_images: int, n_captions: int,
            progress: bool) -> dict:
    """The package's metrics of ranked lists, in percent."""
    Metrics = _metrics_module()
    metric = Metrics()
    missing_i = [i for i in metric.coco_gts["i2t"] if i not in i2t]
    missing_c = [c for c in metric.coco_gts["t2i"] if c not in t2i]
    if missing_i or missing_c:
        what = f"image id {missing_i[0]}" if missing_i else f"caption id {missing_c[0]}"
        raise ValueError(f"ECCV Caption needs every COCO 5K test image and caption; {len(missing_i)} images and "
                         f"{len(missing_c)} captions are missing (first: {what})")
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:  # the package draws a progress bar regardless of its verbose flag
        scores = metric.compute_all_metrics(i2t, t2i, target_metrics=("eccv_r1", "eccv_map_at_r",
                                                                      "eccv_rprecision", "coco_5k_r1"),
                                            verbose=progress)
    names = {"eccv_map_at_r": "map_at_r", "eccv_rprecision": "r_precision", "eccv_r1": "r1",
             "coco_5k_r1": "coco_5k_r1"}
    result = {ours: {d: 100.0 * float(scores[theirs][d]) for d in ("i2t", "t2i")} for theirs, ours in names.items()}
    result.update({"images": n_images, "captions": n_captions, "queries": {
        "i2t": len(metric.eccv_gts["i2t"]), "t2i": len(metric.eccv_gts["t2i"])}})
    return result


def evaluate_eccv(embedder: StudentEmbedder, manifest: Manifest, coco_captions: str | Path,
                  progress: bool = False, regions=None) -> dict:
    """ECCV Caption metrics of the student's cross-modal embeddings: images from ``manifest`` (the COCO Karpathy
    test split), captions by COCO annotation id from ``coco_captions``. A region student scores every test image
    (its regions in ``regions``, a train.regions.RegionData of ``manifest``) with every caption instead."""
    Metrics = _metrics_module()
    metric = Metrics()
    test_images = list(metric.coco_gts["i2t"])
    caption_ids = [int(c) for c in metric.coco_ids]
    rows = {}
    for row, record in enumerate(manifest.images):
        number = coco_image_number(record.image_id, record.path)
        if number is not None:
            rows.setdefault(number, row)
    missing = [i for i in test_images if i not in rows]
    if missing:
        raise ValueError(f"{manifest.source}: {len(missing)} of the {len(test_images)} COCO 5K test images are not "
                         f"in the evaluated split (first: COCO image id {missing[0]}); --eccv needs the Karpathy "
                         "COCO test split")
    texts = read_coco_captions(coco_captions, caption_ids)
    if getattr(embedder, "region", False):
        from train.vocab import CaptionTokens

        student, cfg = embedder.student, embedder.config
        captions = CaptionTokens(texts, student.vocab, cfg.region.max_words)
        with autocast(embedder.device):
            scores = student.similarity(regions.features, captions, embedder.device, regions.image_chunk,
                                        regions.caption_chunk, progress, [rows[i] for i in test_images])
        return eccv_metrics_from_similarity(test_images, caption_ids, scores, progress=progress)
    image_emb = embedder.manifest_images(manifest, [rows[i] for i in test_images], "cross")
    text_emb = embedder.texts(texts, "cross")
    return eccv_metrics(test_images, image_emb, caption_ids, text_emb, progress=progress)


def format_eccv(result: dict) -> str:
    lines = ["ECCV Caption (%)   i2t    t2i"]
    for key, label in (("map_at_r", "mAP@R"), ("r_precision", "R-P"), ("r1", "R@1"), ("coco_5k_r1", "COCO 5K R@1")):
        lines.append(f"{label:<16} {result[key]['i2t']:5.1f}  {result[key]['t2i']:5.1f}")
    return "\n".join(lines)
