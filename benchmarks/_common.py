"""Small shared pieces of the benchmark scripts: machine description, medians, peak memory, realistic captions."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from teacher_cache.store import Store, StoreLayout


def machine() -> dict:
    """What the numbers were measured on; printed with every result because ratios depend on it."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_at_start": [round(x, 2) for x in load],
        "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }


def machine_line(info: dict) -> str:
    gpu = info["gpu"] or "no GPU"
    return (f"machine: {info['cores']}-core CPU ({info['cpu']}), {gpu}, torch {info['torch']} with "
            f"{info['torch_threads']} threads (OMP_WAIT_POLICY {info['omp_wait_policy']}); load average at start {info['load_avg_at_start'][0]} "
            "(other processes share the cores: compare ratios measured side by side, not absolute times "
            "across runs)")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    """min..max of repeated timings, to show how much the shared machine disturbed them."""
    return f"{min(values):.3g}..{max(values):.3g}" if values else "-"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rotated(items: list, shift: int) -> list:
    """The same items in a different order per repetition, so no variant always runs first (or after a
    particular other one) while the machine's load drifts."""
    shift %= max(len(items), 1)
    return items[shift:] + items[:shift]


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


_SUBJECTS = ("A man", "A woman", "Two children", "A small dog", "A group of people", "An old man", "A young girl",
             "A black cat", "Several cows", "A skateboarder", "A chef", "A couple", "A brown horse", "A surfer",
             "A little boy", "Three friends", "A waiter", "A giraffe", "A baseball player", "A bus driver")
_ACTIONS = ("is riding a bicycle", "is standing", "are sitting", "is holding an umbrella", "is eating a sandwich",
            "is walking", "are playing frisbee", "is looking at a laptop", "is carrying a surfboard",
            "is cutting a cake", "are waiting", "is jumping", "is talking on a phone", "is feeding a bird",
            "is throwing a ball", "is reading a newspaper")
_PLACES = ("down a busy city street", "on a sandy beach", "in a grassy field", "next to a red fire hydrant",
           "in a crowded kitchen", "near a wooden bench", "at a train station", "in front of a large building",
           "under a cloudy sky", "beside a calm lake", "in a snowy park", "inside a small restaurant",
           "on a tennis court", "by the side of the road", "in a living room with a couch")


def captions(n: int, seed: int = 0) -> list[str]:
    """COCO-like captions (subject, action, place; 8 to 16 words): what a text teacher would see per batch."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}." for _ in range(n)]


def make_store(path: Path, n_images: int, image_dim: int, n_captions: int, text_dim: int, chunk_rows: int,
               seed: int = 0, grouped_captions: bool = False, progress: bool = False) -> Store:
    """A complete store of random unit rows (what a build writes, minus the teachers), for read-path timing.

    Caption j shows image j % n_images, or with ``grouped_captions`` image j * n_images // n_captions: each image's
    captions side by side, as every manifest reader lays them out.
    """
    j = np.arange(n_captions, dtype=np.int64)
    layout = StoreLayout(
        fingerprint=f"synthetic-{n_images}x{image_dim}-{n_captions}x{text_dim}-{seed}-{int(grouped_captions)}",
        split_fingerprints={},
        image_ids=[f"img{i}" for i in range(n_images)],
        image_paths=[f"images/img{i}.jpg" for i in range(n_images)],
        image_splits=["train"] * n_images,
        captions=[f"caption {k}" for k in range(n_captions)],
        caption_image_rows=j * n_images // max(n_captions, 1) if grouped_captions else j % max(n_images, 1),
        teachers={"image": {"spec": "synthetic", "modality": "image", "dim": image_dim, "weights": "random"},
                  "text": {"spec": "synthetic", "modality": "text", "dim": text_dim, "weights": "random"}},
        dims={"images": image_dim, "texts": text_dim},
        chunk_rows=chunk_rows,
    )
    store = Store.create_or_resume(path, layout, overwrite=True)
    rng = np.random.default_rng(seed)
    total = sum(store.n_chunks(m) for m in ("images", "texts"))
    with tqdm(total=total, desc=f"synthetic store {path.name}", unit="chunk", disable=not progress) as bar:
        for modality in ("images", "texts"):
            for c in range(store.n_chunks(modality)):
                start, stop = store.chunk_range(modality, c)
                rows = rng.standard_normal((stop - start, store.dims[modality]), dtype=np.float32)
                rows /= np.linalg.norm(rows, axis=1, keepdims=True)
                store.write_chunk(modality, c, rows)
                bar.update(1)
    store.finalize({"synthetic": True})
    return Store.open(path, require_complete=True)


@contextlib.contextmanager
def scratch_folder(workdir: str | None, prefix: str) -> Iterator[Path]:
    """``workdir`` (created, kept) when given, else a temporary folder removed afterwards."""
    if workdir:
        root = Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        yield root
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
