"""Write a manifest's images and captions as webdataset shards, the layout `pipeline.shards` reads back.

One sample per image: ``KEY.<image extension>`` (the image file's bytes, unchanged), ``KEY.txt`` (its captions, one
per line) and ``KEY.json`` (``{"image_id": ...}``). Shards are written with webdataset's TarWriter at a fixed member
time, so the same manifest always gives byte-identical shards.

:func:`write_clip_benchmark_split` writes CLIP_benchmark's retrieval layout instead (what its
``clip_benchmark_export_wds`` writes): ``ROOT/dataset_type.txt`` ("retrieval"), ``ROOT/SPLIT/0.tar`` … and
``ROOT/SPLIT/nshards.txt``; a sample is the image and ``txt`` with its captions, one a line, a line break inside a
caption written as a literal ``\\n``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

from pipeline.errors import CusaError
from pipeline.manifest import Manifest
from pipeline.shards import CLIP_BENCHMARK_NSHARDS, CLIP_BENCHMARK_TYPE

SAMPLES_PER_SHARD = 100
_FIXED_MTIME = 946684800  # 2000-01-01: members carry no build time, so output is reproducible
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(image_id: str, row: int) -> str:
    """The sample key of an image: its id when that is a safe key (webdataset keys end at the first dot), else its
    row number."""
    return image_id if image_id and not _KEY_UNSAFE.search(image_id) else f"{row:09d}"


def write_manifest_shards(manifest: Manifest, out_dir: str | os.PathLike[str], prefix: str,
                          samples_per_shard: int = SAMPLES_PER_SHARD) -> dict:
    """Write ``OUT/PREFIX-000000.tar``, ... (``samples_per_shard`` images each) from a manifest of image files.
    Returns {"pattern": brace pattern of the shards, "shards": [paths], "samples": n}."""
    out = Path(out_dir)
    shards = _write_shards(manifest, lambda number: out / f"{prefix}-{number:06d}.tar", samples_per_shard,
                           lambda captions: "\n".join(_one_line(c) for c in captions), with_json=True)
    last = max(len(shards) - 1, 0)
    pattern = str(out / (f"{prefix}-{{000000..{last:06d}}}.tar" if len(shards) > 1 else f"{prefix}-000000.tar"))
    return {"pattern": pattern, "shards": shards, "samples": len(manifest.images)}


def write_clip_benchmark_split(manifest: Manifest, root: str | os.PathLike[str], split: str,
                               samples_per_shard: int = SAMPLES_PER_SHARD) -> dict:
    """Write ``manifest`` as split ``split`` of a CLIP_benchmark retrieval dataset at ``root`` (see the module
    docstring); nshards.txt last, so a split folder that lists shards has them all. Returns {"root", "split",
    "shards": [paths], "samples": n}."""
    root = Path(root)
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    (root / CLIP_BENCHMARK_TYPE).write_text("retrieval\n", encoding="utf-8")
    shards = _write_shards(manifest, lambda number: folder / f"{number}.tar", samples_per_shard,
                           lambda captions: "\n".join(c.replace("\n", "\\n") for c in captions), with_json=False)
    (folder / CLIP_BENCHMARK_NSHARDS).write_text(f"{len(shards)}\n", encoding="utf-8")
    return {"root": str(root), "split": split, "shards": shards, "samples": len(manifest.images)}


def _write_shards(manifest: Manifest, shard_path: Callable[[int], Path], samples_per_shard: int,
                  caption_text: Callable[[list[str]], str], with_json: bool) -> list[str]:
    """Write a manifest of image files as shards of ``samples_per_shard`` samples, shard ``k`` at ``shard_path(k)``;
    a sample's ``txt`` is ``caption_text(its captions)``."""
    import webdataset as wds

    if samples_per_shard < 1:
        raise CusaError(f"samples per shard must be ≥ 1, got {samples_per_shard}")
    captions: list[list[str]] = [[] for _ in manifest.images]
    for caption in manifest.captions:
        captions[caption.image_row].append(caption.text)
    keys = [sample_key(r.image_id, row) for row, r in enumerate(manifest.images)]
    if len(set(keys)) != len(keys):
        keys = [f"{row:09d}" for row in range(len(keys))]
    shards = []
    n = len(manifest.images)
    for number, lo in enumerate(range(0, n, samples_per_shard)):
        path = shard_path(number)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with wds.TarWriter(str(tmp), encoder=False, mtime=_FIXED_MTIME) as sink:
            for row in range(lo, min(lo + samples_per_shard, n)):
                record = manifest.images[row]
                if record.member is not None:
                    raise CusaError(f"{manifest.source}: already shards; write shards from image files")
                image = manifest.image_path(row)
                sample = {"__key__": keys[row], image.suffix.lower().lstrip(".") or "jpg": image.read_bytes(),
                          "txt": caption_text(captions[row]).encode("utf-8")}
                if with_json:
                    sample["json"] = json.dumps({"image_id": record.image_id}).encode("utf-8")
                sink.write(sample)
        os.replace(tmp, path)  # a shard is there whole or not at all
        shards.append(str(path))
    return shards


def _one_line(caption: str) -> str:
    # a caption is one line of KEY.txt: a line break inside one would make it two
    return re.sub(r"[\r\n]+", " ", caption)
