"""Re-check a store from its bytes: attribute digests, data file sizes, array shapes, chunk checksums, completeness,
row norms, NaN/Inf, neighbor tables. Each problem is reported once, by the first check that finds it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from teacher_cache.store import MODALITIES, Store, chunk_checksum, neighbor_checksums

NORM_TOLERANCE = 2e-2  # float16 rounding of a unit vector stays well inside this


@dataclass
class VerifyReport:
    store: str
    complete: bool
    problems: list[str] = field(default_factory=list)
    chunks_checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.complete and not self.problems

    def to_dict(self) -> dict:
        return {"store": self.store, "ok": self.ok, "complete": self.complete, "problems": self.problems,
                "chunks_checked": self.chunks_checked}


def verify_store(store: Store) -> VerifyReport:
    report = VerifyReport(store=store.location, complete=store.complete)
    if not store.complete:
        report.problems.append("incomplete: the build did not finish (no completion mark)")
    else:
        report.problems += store.integrity_problems()
    # a chunk or table already named (missing or resized file) is not reported again by the byte checks below
    flagged = {p.split(":", 1)[0].split(" (rows")[0] for p in report.problems}
    try:
        _verify_data(store, report, flagged)
    except Exception as exc:  # attributes edited into values the checks cannot even use
        report.problems.append(f"data checks stopped: {type(exc).__name__}: {_short(exc)}")
    return report


def _verify_data(store: Store, report: VerifyReport, flagged: set[str]) -> None:
    recorded = store.attrs.get("checksums") or {}
    progress = store.progress()
    skipped = {int(s["row"]) for s in store.skipped_images} if store.complete else set()
    for modality in MODALITIES:
        if not store.complete:
            skipped |= {int(b["row"]) for c in progress.done[modality].values() for b in c.get("bad_rows", [])}
        sums = recorded.get(modality)
        n_chunks = store.n_chunks(modality)
        if sums is None:
            sums = [progress.done[modality].get(c, {}).get("checksum") for c in range(n_chunks)]
        elif len(sums) != n_chunks and modality not in flagged:
            report.problems.append(f"{modality}: {len(sums)} checksums recorded for {n_chunks} chunks")
        arr = store.array(modality)
        checked = 0
        for c in range(n_chunks):
            start, stop = store.chunk_range(modality, c)
            expected = sums[c] if c < len(sums) else None
            if f"{modality} chunk {c}" in flagged:
                continue
            if expected is None:
                if store.complete:
                    report.problems.append(f"{modality} chunk {c} (rows {start}-{stop - 1}): no checksum recorded")
                continue  # not written yet in an unfinished build
            try:
                rows = np.asarray(arr[start:stop])
            except Exception as exc:  # a damaged chunk file fails to decompress
                report.problems.append(f"{modality} chunk {c} (rows {start}-{stop - 1}): unreadable ({_short(exc)})")
                continue
            checked += 1
            if chunk_checksum(rows) != expected:
                report.problems.append(f"{modality} chunk {c} (rows {start}-{stop - 1}): checksum mismatch")
                continue
            rows32 = rows.astype(np.float32)
            bad = ~np.isfinite(rows32).all(axis=1)
            if bad.any():
                report.problems.append(
                    f"{modality} chunk {c}: NaN/Inf in rows {(np.flatnonzero(bad) + start)[:5].tolist()}")
            norms = np.linalg.norm(np.nan_to_num(rows32), axis=1)
            row_ids = np.arange(start, stop)
            expected_norm = np.ones_like(norms)
            if modality == "images" and skipped:
                expected_norm[np.isin(row_ids, list(skipped))] = 0.0
            off = np.abs(norms - expected_norm) > NORM_TOLERANCE
            off &= ~bad
            if off.any():
                report.problems.append(
                    f"{modality} chunk {c}: rows {row_ids[off][:5].tolist()} are not unit-norm "
                    f"(norms {np.round(norms[off][:3], 3).tolist()})")
        report.chunks_checked[modality] = checked
        if store.complete and not any(f.startswith(f"neighbors/{modality}") for f in flagged):
            _verify_neighbors(store, modality, report)


def _verify_neighbors(store: Store, modality: str, report: VerifyReport) -> None:
    info = (store.attrs.get("neighbors") or {}).get(modality)
    if not info:
        return
    try:
        ids, sims = store.neighbors(modality)
    except Exception as exc:
        report.problems.append(f"neighbors/{modality}: unreadable ({_short(exc)})")
        return
    n = store.counts[modality]
    if ids.shape[0] != n or ids.shape != sims.shape:
        report.problems.append(f"neighbors/{modality}: shape {ids.shape} does not match {n} rows")
        return
    if ids.size and (ids.min() < -1 or ids.max() >= n):
        report.problems.append(f"neighbors/{modality}: ids out of range [0, {n})")
    if (ids == np.arange(n)[:, None]).any():
        report.problems.append(f"neighbors/{modality}: a row lists itself as its own neighbor")
    if not np.isfinite(sims[ids >= 0]).all():
        report.problems.append(f"neighbors/{modality}: NaN/Inf similarities")
    recorded = info.get("checksums")
    if recorded and recorded != neighbor_checksums(ids, sims):
        report.problems.append(f"neighbors/{modality}: checksum mismatch (the table changed after the build)")


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]
