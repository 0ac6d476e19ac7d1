"""How a run holds its teacher rows: dense in memory, or streamed from the store's chunks in a chunk-local order.

``plan_teacher_rows`` decides from the settings (``soft_labels.stream``: true, false or auto;
``soft_labels.max_memory_mib``; ``soft_labels.window``) and the stores. Auto picks dense when every float16 row of
both modalities fits the budget and streams otherwise; a streamed run shuffles the pairs of W stored chunks at a
time (``train.chunk_order``) with W as large as the budget holds, and its chunk cache keeps at most the budget.
The plan is written to the run's log and ``summary.json`` (``soft_labels_mode``, ``teacher_rows_mib``).
"""

from __future__ import annotations

from dataclasses import dataclass

from teacher_cache.soft_labels import dense_bytes, read_ahead_bytes
from teacher_cache.store import Store
from train.chunk_order import ChunkUnits, pair_units
from train.config import SoftLabelConfig
from train.data import TrainingPairs

MIB = 1 << 20


@dataclass
class TeacherRowsPlan:
    mode: str  # "dense" | "stream" | "sparse" | "none" (no soft-label term)
    budget_bytes: int
    dense_bytes: int
    reason: str
    units: ChunkUnits | None = None  # streamed: the chunk unit of every training pair
    window: int | None = None  # streamed: units shuffled together

    @property
    def stream(self) -> bool:
        return self.mode == "stream"

    def note_short_window(self, batch_size: int, at_least: int = 20) -> None:
        """Say so when a window holds fewer than ``at_least`` batches: a shuffle that local changes what batches
        hold (on the demo, windows of ~4 and ~8 batches cost CUSA about 9 and 3 points of test rsum)."""
        if not self.stream or self.window >= self.units.n_units:
            return
        per_window = len(self.units.unit_of_pair) * self.window / self.units.n_units / batch_size
        if per_window < at_least:
            self.reason += (f"; a window holds only ~{per_window:.0f} batches, far from a full shuffle: raise "
                            "soft_labels.max_memory_mib if you can")

    def describe(self) -> str:
        if self.mode != "stream":
            return f"soft labels: {self.mode} ({self.reason})"
        whole = " = every chunk: the full shuffle" if self.window >= self.units.n_units else ""
        return (f"soft labels: stream ({self.reason}); chunk-local order, the pairs of {self.window} of "
                f"{self.units.n_units} {self.units.name} shuffled together{whole}")

    def summary(self, peak_bytes: int | None, chunk_stats: dict | None, sampler: str, epochs_read: int) -> dict:
        """The summary.json entries: soft_labels_mode, teacher_rows_mib and how the rows were held (streamed: how
        often each stored chunk was decoded per epoch this process trained)."""
        resident = {"dense": self.dense_bytes, "none": 0}.get(self.mode, peak_bytes or 0)
        out = {"soft_labels_mode": self.mode, "teacher_rows_mib": round(resident / MIB, 3),
               "soft_labels_plan": {"reason": self.reason, "max_memory_mib": self.budget_bytes / MIB,
                                    "dense_mib": round(self.dense_bytes / MIB, 3)}}
        if self.stream:
            out["soft_labels_plan"].update(
                window=self.window, units=self.units.n_units, unit_modality=self.units.modality,
                order="chunk-local" if sampler == "random" else sampler, chunk_reads=chunk_stats)
            if chunk_stats and epochs_read > 0:
                out["soft_labels_plan"]["decodes_per_chunk_per_epoch"] = {
                    m: round(chunk_stats["decoded"].get(m, 0) / (n * epochs_read), 3)
                    for m, n in self.units.chunks_read.items()}
        return out


def plan_teacher_rows(settings: SoftLabelConfig, needs_teacher: bool, pairs: TrainingPairs, image_store: Store,
                      text_store: Store) -> TeacherRowsPlan:
    budget = int(settings.max_memory_mib * MIB)
    dense = dense_bytes(image_store, text_store)
    if not needs_teacher:
        return TeacherRowsPlan("none", budget, dense, "no soft-label term")
    if settings.mode == "sparse":
        return TeacherRowsPlan("sparse", budget, dense, "top-K neighbor tables only")
    fits = dense <= budget
    if settings.stream is False or (settings.stream is None and fits):
        why = "soft_labels.stream=false" if settings.stream is False else "auto"
        return TeacherRowsPlan("dense", budget, dense,
                               f"{why}: {dense / MIB:.1f} MiB of teacher rows, budget {settings.max_memory_mib:g} MiB")
    why = "soft_labels.stream=true" if settings.stream else \
        f"auto: {dense / MIB:.1f} MiB of teacher rows exceed soft_labels.max_memory_mib={settings.max_memory_mib:g}"
    units = pair_units(pairs, image_store, text_store)
    reserved = read_ahead_bytes(image_store, text_store)
    fitting = units.window_for(budget, reserved)
    if fitting < 1:
        need = 1.25 * int(units.unit_bytes.max()) + reserved
        raise ValueError(
            f"soft_labels.max_memory_mib={settings.max_memory_mib:g} cannot hold one window of stored chunks "
            f"({need / MIB:.2f} MiB: one of its {len(units.unit_bytes)} {units.name} with the chunks its pairs "
            "read, room for the next and the chunks decoded ahead); raise it, or build the store with a smaller "
            "--chunk-rows"
            + (" (or write smaller shards)" if units.modality == "shards" else ""))
    window = settings.window or fitting
    if settings.window and settings.window > fitting:
        why += (f"; soft_labels.window={settings.window} needs more than the budget holds ({fitting}): chunks "
                "will be decoded more than once an epoch")
    return TeacherRowsPlan("stream", budget, dense, why, units, window)
