"""Shared pieces of the reliability suite: the client of build_server.py, the tiny dataset, and the store comparisons
that every fault-injection test ends with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from teacher_cache.store import MODALITIES, Store
from teacher_cache.verify import verify_store

SERVER = Path(__file__).with_name("build_server.py")
N_IMAGES = 7
CAPTIONS_PER_IMAGE = 3
CHUNK_ROWS = 3  # images: chunks of 3, 3, 1 rows; captions: 7 chunks of 3
IMAGE_DIM = 16
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white"]
SHAPES = ["circle", "square", "triangle", "cross", "ring", "bar", "dot"]


@dataclass
class TinyData:
    root: Path
    annotations: Path
    features: Path  # precomputed image features, so most builds decode no pixels at all
    pixel_teacher: str  # timm test_efficientnet with saved random weights: a real, fast image model
    text_teacher: str = "minilm-l6"  # the server replaces it with a one-layer model of the same tokenizer

    @property
    def precomputed(self) -> str:
        return f"precomputed:{self.features}"

    def build_args(self, out: Path, *, pixels: bool = False, workers: int = 0, neighbors: int = 3,
                   text_teacher: str | None = None, annotations: Path | None = None,
                   extra: tuple = ()) -> list[str]:
        teacher = self.pixel_teacher if pixels else self.precomputed
        return ["build", str(annotations or self.annotations), "--out", str(out), "--image-teacher", teacher,
                "--text-teacher", text_teacher or self.text_teacher,
                "--chunk-rows", str(CHUNK_ROWS), "--batch-size", "2", "--neighbors", str(neighbors),
                "--workers", str(workers), "--device", "cpu", "--json", *map(str, extra)]


def make_tiny_data(root: Path) -> TinyData:
    """7 small drawn pictures, 3 captions each, their precomputed features, and a saved tiny timm teacher."""
    import timm
    import torch

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(N_IMAGES):
        img = Image.new("RGB", (40, 32), tuple(int(v) for v in rng.integers(0, 255, 3)))
        ImageDraw.Draw(img).ellipse((5 + i, 4, 25 + i, 24), fill=COLOURS[i])
        img.save(root / "images" / f"img{i}.png")
        for j in range(CAPTIONS_PER_IMAGE):
            entries.append({"image": f"images/img{i}.png", "image_id": f"img{i}", "split": "train",
                            "caption": f"a {COLOURS[i]} {SHAPES[(i + j) % len(SHAPES)]} on a plain background, "
                                       f"view {j}"})
    annotations = root / "ann.json"
    annotations.write_text(json.dumps(entries, indent=1))
    features = root / "features.npy"
    np.save(features, rng.normal(size=(N_IMAGES, IMAGE_DIM)).astype(np.float32))
    (root / "features.ids.txt").write_text("".join(f"img{i}\n" for i in range(N_IMAGES)))
    weights = root / "tiny_teacher.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet", pretrained=False, num_classes=0).state_dict(), weights)
    return TinyData(root, annotations, features, f"timm:test_efficientnet:{weights}")


class BuildServer:
    """Client of build_server.py: `cusa-cache` commands run as forked, killable processes."""

    def __init__(self, log: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(sys.path),
               # the children's output files live beside the log, inside this test session's own tmp folder
               "CUSA_BUILD_SERVER_TMP": str(log.parent)}
        env.pop("CUSA_FAULT_AT", None)
        self._log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env=env, cwd=str(Path(__file__).parents[2]))

    def _call(self, **cmd) -> dict:
        assert self.proc.poll() is None, "the build server died; see its log"
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the build server closed its output; see its log"
        answer = json.loads(line)
        assert "error" not in answer, answer.get("traceback", answer["error"])
        return answer

    def warm(self, teachers: list[tuple[str, str]]) -> None:
        self._call(op="warm", teachers=teachers)

    def make_tiny_text_teacher(self, path: Path) -> str:
        return self._call(op="make_tiny_text_teacher", path=str(path))["spec"]

    def run(self, args: list[str], *, fault: str | None = None, kill_after: float | None = None,
            fsize_limit: int | None = None, timeout: float = 120) -> dict:
        env = {"CUSA_FAULT_AT": fault} if fault else {"CUSA_FAULT_AT": ""}
        return self._call(op="run", args=args, env=env, kill_after=kill_after, fsize_limit=fsize_limit,
                          timeout=timeout)

    def start(self, args: list[str], *, fault: str | None = None) -> int:
        return self._call(op="start", args=args, env={"CUSA_FAULT_AT": fault or ""})["pid"]

    def wait(self, pid: int, timeout: float = 300) -> dict:
        return self._call(op="wait", pid=pid, timeout=timeout)

    def kill(self, pid: int) -> dict:
        return self._call(op="kill", pid=pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------------------------------------- checks


def one_error_line(result: dict) -> str:
    """The single `Error: ...` line of a command that failed cleanly: exit 1, no traceback, nothing else said."""
    assert result["rc"] == 1, result
    assert "Traceback" not in result["stderr"] and "Traceback" not in result["stdout"], result["stderr"]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result["stderr"]
    return lines[0]


def markers(store: Path) -> dict[str, tuple[int, bytes]]:
    """Every progress marker of a store: relative path -> (mtime_ns, content)."""
    folder = store / "_progress"
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in folder.rglob("*.json") if not p.name.startswith(".")}


def stage_reached(store: Path) -> str:
    """Where a killed build stood, read from what it left on disk."""
    if not (store / "zarr.json").is_file():
        return "no store yet" if not (store / "_progress").is_dir() else "creating the layout"
    attrs = json.loads((store / "zarr.json").read_text()).get("attributes", {})
    if "format_version" not in attrs:
        return "creating the layout"
    if attrs.get("complete"):
        return "complete"
    m = markers(store)
    n_img = sum(k.startswith("images/") for k in m)
    n_txt = sum(k.startswith("texts/") for k in m)
    n_nbr = sum(k.startswith("neighbors_") for k in m)
    if n_nbr:
        return f"neighbor tables ({n_nbr} of 2 done)"
    if n_txt:
        return f"captions ({n_txt} chunks done)"
    return f"images ({n_img} chunks done)"


def assert_same_store(store: Path, reference: Path) -> None:
    """Same embedding bytes, neighbor tables, checksums, data files and identity; verified clean; no lock left."""
    a, b = Store.open(store, require_complete=True), Store.open(reference, require_complete=True)
    for modality in MODALITIES:
        ea, eb = a.array(modality)[:], b.array(modality)[:]
        assert ea.dtype == eb.dtype == np.float16 and ea.shape == eb.shape
        assert ea.tobytes() == eb.tobytes(), f"{modality} embeddings differ"
        ia, sa = a.neighbors(modality)
        ib, sb = b.neighbors(modality)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(sa, sb)
    aa, ab = a.attrs, b.attrs
    for key in ("checksums", "files", "counts", "dims", "teachers", "fingerprint", "skipped_images", "caption_notes"):
        assert aa[key] == ab[key], key
    for modality in MODALITIES:
        keep = ("k", "k_requested", "factory", "rows", "checksums")
        assert {k: aa["neighbors"][modality][k] for k in keep} == {k: ab["neighbors"][modality][k] for k in keep}
    # no duplicated or missing rows: one marker per chunk, each row a unit vector, the right row counts
    progress = a.progress()
    for modality in MODALITIES:
        assert sorted(progress.done[modality]) == list(range(a.n_chunks(modality)))
        norms = np.linalg.norm(a.load(modality), axis=1)
        assert norms.shape == (a.counts[modality],) and np.abs(norms - 1).max() < 2e-3
    report = verify_store(a)
    assert report.ok, report.problems
    assert not (store / "_build.lock").exists()
