"""Small shared pieces of the benchmark scripts: machine description, medians, peak memory, realistic captions."""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import random
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

import torch


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
