"""Running `cusa-train` / `cusa-eval` from stage-2 tests: in-process through click, or as a real console script.

Training runs use the demo set and its session cache (tests/conftest.py) with small settings, so one run takes a few
seconds on CPU. Frozen students reuse the cache's teachers as backbones for the training split; validation and test
features are computed once into the cache's sibling feature folder and shared by every later run of the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner, Result

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
TEMPERATURE_RANGES = {"tau": (0.01, 0.10), "tau_csa": (0.10, 0.99), "tau_usa_images": (0.10, 1.00),
                      "tau_usa_texts": (0.10, 1.00)}
TIMING_KEYS = ("step_time", "epoch_time")
# A CLIP small enough to train an epoch on CPU in seconds (randomly initialised: the folder holds only a config).
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


# `python -c KILLED_IN_THIRD_EPOCH THREADS ARGS...` runs train_main with ARGS on THREADS torch threads and SIGKILLs it
# right after the first optimizer step of the third epoch has been logged: last.pt then holds epoch 2 and
# metrics.jsonl already has a record of the lost epoch.
KILLED_IN_THIRD_EPOCH = """
import os, signal, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
from train.metrics_log import MetricsLogger
from train.cli import train_main

log = MetricsLogger.log

def log_then_die(self, record):
    log(self, record)
    if record["kind"] == "step" and record["epoch"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)

MetricsLogger.log = log_then_die
train_main.main(sys.argv[2:], prog_name="cusa-train")
"""



def train_args(demo_dir: Path, cache: Path, out: Path, *extra: str, epochs: int = 2, batch_size: int = 32,
               val: bool = False) -> list[str]:
    """Small, fast `cusa-train` arguments on the demo train split (lr 1e-3: visible progress in a few steps)."""
    args = ["--data", str(demo_dir / "train.json"), "--cache", str(cache), "--out", str(out),
            "--epochs", str(epochs), "--batch-size", str(batch_size), "--lr", "1e-3", "--seed", "0",
            "--workers", "0", "--device", "cpu", "--json",
            # a narrow trainable part: the loop, not the matmuls, is what these runs exercise
            "--set", "frozen.hidden=64", "--set", "frozen.embed_dim=64"]
    if val:
        args += ["--val-data", str(demo_dir / "val.json")]
    return args + list(extra)


def invoke(command, args: list[str]) -> Result:
    """Run a click command in-process; an exception that escaped its error handling fails the test."""
    result = CliRunner().invoke(command, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def invoke_json(command, args: list[str]) -> dict:
    result = invoke(command, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def subprocess_env(**extra: str) -> dict[str, str]:
    # one torch thread per process: on a busy 2-core machine, threads waiting on each other make a tiny run 30× slower
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", **extra}


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread inside the block (as the subprocesses above do)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_script(name: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed console script ``name`` (cusa-train, cusa-eval) as a user would."""
    return subprocess.run([str(BIN / name), *[str(a) for a in args]], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=REPO)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def cusa_and_contrastive_runs(demo_dir: Path, demo_cache: Path, root: Path, contrastive_epochs: int = 2
                              ) -> tuple[Path, Path]:
    """A validated CUSA run (2 epochs) and contrastive run of the frozen student in ``root`` (seconds each)."""
    from train.cli import train_main

    with one_torch_thread():
        for loss, epochs in (("cusa", 2), ("contrastive", contrastive_epochs)):
            invoke_json(train_main, train_args(demo_dir, demo_cache, root / loss, "--loss", loss, epochs=epochs,
                                               val=True))
    return root / "cusa", root / "contrastive"


def assert_identical(a, b, where: str = "") -> None:
    """Tensors equal bit for bit, everything else equal, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_training(a: Path, b: Path) -> None:
    """Two runs ended with the same student and loss weights, bit for bit, and logged the same values."""
    ca, cb = (torch.load(run / "last.pt", map_location="cpu", weights_only=False) for run in (a, b))
    for key in ("student", "loss"):
        assert set(ca[key]) == set(cb[key])
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key]), key
    assert without_timings(read_jsonl(a / "metrics.jsonl")) == without_timings(read_jsonl(b / "metrics.jsonl"))


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``Error:`` line of a command that stopped as it should: exit status 1, no traceback."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]
