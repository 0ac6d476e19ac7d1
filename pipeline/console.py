"""What every command shares (`cusa-cache`, `cusa-train`, `cusa-eval`, `cusa-ablate`, `cusa-search`): user errors as
one line, results as text or JSON, and the environment the models run in.

Importing this module sets the environment defaults, once, for every command: teachers and students resolve
their weights from local files unless a user opts in to the Hugging Face hub (``HF_HUB_OFFLINE=0``), and tokenizers
do not start threads of their own beside DataLoader workers. A value the user set is kept.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import click
import numpy as np

from pipeline.errors import CusaError
from teacher_cache.errors import StoreError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def user_errors(fn):
    """Turn every error caused by user input into a one-line click error (exit 1, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CusaError, StoreError, ValueError) as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        except OSError as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None

    return wrapper


def emit(payload: dict, as_json: bool, human: str) -> None:
    """Print a command's result: ``payload`` as JSON with ``--json``, else the human-readable text."""
    click.echo(json.dumps(payload, indent=2, default=_json_default) if as_json else human)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"
