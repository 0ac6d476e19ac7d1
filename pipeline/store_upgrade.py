"""Stores built before fingerprint format 2 brought up to date without running a teacher: the rows are the same, only
the way the dataset's fingerprints are computed changed (``pipeline.manifest_table``)."""

from __future__ import annotations

import os

from pipeline.errors import CusaError
from pipeline.manifest import FINGERPRINT_VERSION, Manifest
from pipeline.manifest_index import keep_copy
from teacher_cache.store import Store


def upgrade_store(store_path: str | os.PathLike, source: Manifest) -> dict:
    """Rewrite the fingerprints of the store at ``store_path``, built from ``source`` (the whole source as read, or
    one of its splits), in the current format, and keep the source's manifest index in it. A store already in the
    current format is left as it is."""
    store = Store.open(store_path, require_complete=True)
    result = {"store": str(store_path), "fingerprint_format": FINGERPRINT_VERSION, "upgraded": False}
    if store.fingerprint_format >= FINGERPRINT_VERSION:
        return {**result, "fingerprint": store.fingerprint}
    candidates = [("all", source)] + [(s, source.select_split(s)) for s in source.splits() if s]
    built = next(((split, m) for split, m in candidates if m.fingerprint(1) == store.fingerprint), None)
    if built is None:
        raise CusaError(f"{store_path}: not built from {source.source} (its fingerprint {store.fingerprint[:12]}… is "
                        "neither the whole source's nor one of its splits'); give --data the annotations or shards "
                        "the store was built from, read with the same options")
    split, manifest = built
    fingerprints = {}
    for label, legacy in store.split_fingerprints.items():
        part = manifest.select_split(label)
        if part.fingerprint(1) != legacy:
            raise CusaError(f"{store_path}: split {label!r} of {source.source} is not the one the store recorded")
        fingerprints[label] = part.fingerprint()
    store.rewrite_fingerprints(manifest.fingerprint(), fingerprints, FINGERPRINT_VERSION)
    kept = keep_copy(source, store_path)
    return {**result, "upgraded": True, "split": split, "fingerprint": manifest.fingerprint(),
            "manifest_index_kept": kept}
