"""Reading a folder that ``cusa-export`` wrote: the open_clip towers plus CUSA's heads, as the student it came from.

The folder is what open_clip's ``save_for_hf`` writes (``open_clip_config.json``, ``open_clip_model.safetensors``,
tokenizer files), so ``open_clip.create_model_and_transforms("local-dir:OUT")`` builds the towers; beside them
``cusa_heads.safetensors`` holds the heads open_clip has no place for (the cross heads of a run with the reference
heads, the uni heads of every run) and, in its metadata, the run's configuration. ``load_model(OUT)`` reads both.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.config import TrainConfig
from train.students import OpenClipStudent

OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's HF_CONFIG_NAME
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # open_clip's HF_SAFE_WEIGHTS_NAME
OPEN_CLIP_WEIGHTS_BIN = "open_clip_pytorch_model.bin"  # open_clip's HF_WEIGHTS_NAME
HEADS_FILE = "cusa_heads.safetensors"
HEADS_FORMAT = "cusa-heads-1"
HEAD_PREFIXES = ("cross_head_", "uni_head_")


def is_exported_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder that ``cusa-export`` wrote (open_clip's config beside cusa's heads)."""
    p = Path(path)
    return p.is_dir() and (p / OPEN_CLIP_CONFIG).is_file() and (p / HEADS_FILE).is_file()


def open_clip_folder_without_heads(path: str | Path) -> bool:
    """Whether ``path`` is an open_clip folder (``local-dir:``) that ``cusa-export`` did not write."""
    p = Path(path)
    return p.is_dir() and (p / OPEN_CLIP_CONFIG).is_file() and not (p / HEADS_FILE).is_file()


def read_heads(folder: str | Path) -> tuple[dict, dict[str, str]]:
    """(head tensors by state-dict name, metadata) of an exported folder's heads file; ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / HEADS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{path}: cannot read the heads file ({str(exc).splitlines()[0]})") from None
    if meta.get("format") != HEADS_FORMAT:
        raise ValueError(f"{path}: not a cusa heads file (format {meta.get('format')!r}, expected {HEADS_FORMAT!r})")
    return tensors, meta


def load_exported(folder: str | Path, device: str = "cpu") -> tuple[OpenClipStudent, TrainConfig, int]:
    """(student in eval mode on ``device``, its run's configuration, the epoch it was exported after) of a folder
    that ``cusa-export`` wrote; the towers come from open_clip's own loading of the folder."""
    folder = Path(folder).resolve()
    if not any((folder / name).is_file() for name in (OPEN_CLIP_WEIGHTS, OPEN_CLIP_WEIGHTS_BIN)):
        # open_clip would build the towers randomly initialised, with a warning only
        raise ValueError(f"{folder}: no {OPEN_CLIP_WEIGHTS} (or {OPEN_CLIP_WEIGHTS_BIN}) beside {OPEN_CLIP_CONFIG}")
    heads, meta = read_heads(folder)
    try:
        run_config = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{folder / HEADS_FILE}: its metadata holds no run configuration") from None
    # the student is now the folder itself: open_clip builds its towers from the folder's config and weights
    cfg = TrainConfig.from_dict({**run_config, "student": f"open_clip:local-dir:{folder}"})
    student = OpenClipStudent(f"local-dir:{folder}", cross_head=cfg.cross_head)
    missing, unexpected = student.load_state_dict(heads, strict=False)
    missing_heads = [k for k in missing if k.startswith(HEAD_PREFIXES)]
    if missing_heads or unexpected:
        what = (f"lacks {', '.join(missing_heads[:3])}" if missing_heads
                else f"holds unknown tensors {', '.join(unexpected[:3])}")
        raise ValueError(f"{folder / HEADS_FILE}: {what} (cross_head={cfg.cross_head})")
    return student.to(device).eval(), cfg, int(meta.get("epoch", 0))
