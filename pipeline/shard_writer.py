"""Write a manifest's images and captions as webdataset shards, the layout `pipeline.shards` reads back.

One sample per image: ``KEY.<image extension>`` (the image file's bytes, unchanged), ``KEY.txt`` (its captions, one
per line) and ``KEY.json`` (``{"image_id": ...}``). Shards are written with webdataset's TarWriter at a fixed member
time, so the same manifest always gives byte-identical shards.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pipeline.errors import CusaError
from pipeline.manifest import Manifest

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
    import webdataset as wds

    if samples_per_shard < 1:
        raise CusaError(f"samples per shard must be ≥ 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    captions: list[list[str]] = [[] for _ in manifest.images]
    for caption in manifest.captions:
        captions[caption.image_row].append(caption.text)
    keys = [sample_key(r.image_id, row) for row, r in enumerate(manifest.images)]
    if len(set(keys)) != len(keys):
        keys = [f"{row:09d}" for row in range(len(keys))]
    shards = []
    n = len(manifest.images)
    for number, lo in enumerate(range(0, n, samples_per_shard)):
        path = out / f"{prefix}-{number:06d}.tar"
        tmp = path.with_name(f".{path.name}.tmp")
        with wds.TarWriter(str(tmp), encoder=False, mtime=_FIXED_MTIME) as sink:
            for row in range(lo, min(lo + samples_per_shard, n)):
                record = manifest.images[row]
                if record.member is not None:
                    raise CusaError(f"{manifest.source}: already shards; write shards from image files")
                image = manifest.image_path(row)
                sink.write({"__key__": keys[row],
                            image.suffix.lower().lstrip(".") or "jpg": image.read_bytes(),
                            "txt": "\n".join(_one_line(c) for c in captions[row]).encode("utf-8"),
                            "json": json.dumps({"image_id": record.image_id}).encode("utf-8")})
        os.replace(tmp, path)  # a shard is there whole or not at all
        shards.append(str(path))
    last = max(len(shards) - 1, 0)
    pattern = str(out / (f"{prefix}-{{000000..{last:06d}}}.tar" if len(shards) > 1 else f"{prefix}-000000.tar"))
    return {"pattern": pattern, "shards": shards, "samples": n}


def _one_line(caption: str) -> str:
    # a caption is one line of KEY.txt: a line break inside one would make it two
    return re.sub(r"[\r\n]+", " ", caption)
