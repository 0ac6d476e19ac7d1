"""Checkpoint files of `cusa-train`: written atomically, read without running code from them.

A checkpoint holds only what ``torch.load(..., weights_only=True)`` accepts: tensors, numbers, strings, None, lists,
tuples and dicts. Run folders travel between people (a collaborator's ``best.pt``), and unpickling an arbitrary file
can execute whatever it names, so every reader of a checkpoint goes through :func:`load_checkpoint`, which refuses
a file that needs any other Python object, in one line naming the file and the object.

Checkpoints of the previous release stored numpy's random state as numpy objects (``np.random.get_state()``).
They are still read: the handful of numpy globals that rebuild a uint32 array are allowed for exactly that
reading, nothing broader, and the state is converted to the plain form on the way in.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import one_line, pickle_refusal

# Every checkpoint cusa-train has written holds these keys; "dims" and "student_spec" are read with defaults.
CHECKPOINT_KEYS = ("student", "loss", "optimizer", "scheduler", "epoch", "best", "rng", "config")
# "format" 2: "epoch" (and best["epoch"]) count epochs from 1, as everywhere else; checkpoints without the key
# counted from 0 and are converted on reading
CHECKPOINT_FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint file is refused or cannot be read; the message is one line naming the file."""


def _numpy_array_globals() -> list:
    """What a pickled uint32 numpy array (the legacy numpy RNG key) needs, under both numpy 1 and numpy 2 names."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [(_reconstruct, "numpy._core.multiarray._reconstruct"),
            (_reconstruct, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


# ---------------------------------------------------------------------------------------------- random state
def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states as tensors, numbers and strings only."""
    version, internal, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (or the previous release's tuples, converted first)."""
    state = plain_rng_state(state)
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state({"bit_generator": nps["bit_generator"],
                         "state": {"key": nps["key"].numpy().astype(np.uint32), "pos": nps["pos"]},
                         "has_gauss": nps["has_gauss"], "gauss": nps["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain_rng_state(state: dict) -> dict:
    """The plain form of one rank's RNG state; the previous release's tuples (``random.getstate()``,
    ``np.random.get_state()``) are converted, anything else is returned as it is."""
    state = dict(state)
    py = state.get("python")
    if isinstance(py, tuple) and len(py) == 3:
        state["python"] = {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64), "gauss_next": py[2]}
    nps = state.get("numpy")
    if isinstance(nps, tuple) and len(nps) == 5:
        name, key, pos, has_gauss, gauss = nps
        state["numpy"] = {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key).astype(np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return state


# ---------------------------------------------------------------------------------------------- files
def save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a cusa-train checkpoint on the CPU without running code from it.

    Raises :class:`CheckpointError` (one line naming the file) for a file that needs arbitrary unpickling, that is
    not a checkpoint, or that is damaged. RNG states of the previous release's format come back converted.
    """
    path = Path(path)
    try:
        payload = _torch_load_plain(path)
    except pickle.UnpicklingError as exc:
        if "GLOBAL numpy" not in str(exc):
            raise CheckpointError(_refusal(path, exc)) from None
        try:  # the previous release's format: numpy's RNG key pickled as a numpy array
            with torch.serialization.safe_globals(_numpy_array_globals()):
                payload = _torch_load_plain(path)
        except pickle.UnpicklingError as again:
            raise CheckpointError(_refusal(path, again)) from None
    if not isinstance(payload, dict) or any(k not in payload for k in CHECKPOINT_KEYS):
        missing = [k for k in CHECKPOINT_KEYS if k not in payload] if isinstance(payload, dict) else []
        what = f"no {', '.join(missing)}" if missing else f"a {type(payload).__name__}, not a dict"
        raise CheckpointError(f"{path}: not a cusa-train checkpoint ({what})")
    rng = payload["rng"]
    payload["rng"] = [plain_rng_state(r) for r in rng] if isinstance(rng, list) else plain_rng_state(rng)
    if payload.get("format", 1) < 2:  # epochs numbered from 0
        payload["epoch"] = int(payload["epoch"]) + 1
        if isinstance(payload["best"], dict) and payload["best"].get("epoch") is not None:
            payload["best"] = {**payload["best"], "epoch": int(payload["best"]["epoch"]) + 1}
    return payload


def _torch_load_plain(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise
    except OSError:
        raise  # missing or unreadable file: the CLI names it
    except Exception as exc:  # truncated or not a torch file at all
        raise CheckpointError(f"{path}: cannot read the checkpoint ({one_line(exc)}); "
                              "it is damaged or not a torch.save file") from None


def _refusal(path: Path, exc: BaseException) -> str:
    return (f"{path}: refused: {pickle_refusal(exc)}; cusa reads checkpoints holding only tensors, numbers, "
            "strings, lists and dicts (what cusa-train writes)")

