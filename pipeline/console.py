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
import re
from pathlib import Path

import click
import numpy as np

from pipeline.errors import CusaError
from teacher_cache.errors import StoreError
from teacher_cache.remote import redact_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# how torch's DataLoader re-raises an exception of a worker: "Caught ERROR in DataLoader worker process N.", then the
# worker's traceback, whose last line is "module.ERROR: message"
_WORKER_ERROR = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.")


def user_errors(fn):
    """Turn every error caused by user input into a one-line click error (exit 1, no traceback); secrets in URLs are
    redacted."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CusaError, StoreError, ValueError) as exc:
            raise click.ClickException(redact_text(error_line(exc))) from None
        except OSError as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise click.ClickException(redact_text(f"{where}{exc.strerror or exc}")) from None

    return wrapper


def error_line(exc: BaseException) -> str:
    """The one line an error is reported as: its first line; for an error a DataLoader worker raised (a transfer of
    a shard that failed there, say), the worker's own message rather than torch's "Caught ... in DataLoader worker"."""
    text = str(exc)
    if not text:
        return type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    match = _WORKER_ERROR.match(lines[0])
    if match:
        for line in reversed(lines):
            head, sep, message = line.partition(": ")
            if sep and head.rsplit(".", 1)[-1] == match.group(1):
                return message.strip()
    return lines[0]


def emit(payload: dict, as_json: bool, human: str) -> None:
    """Print a command's result: ``payload`` as JSON with ``--json``, else the human-readable text (secrets in URLs
    redacted either way)."""
    click.echo(redact_text(json.dumps(payload, indent=2, default=_json_default) if as_json else human))


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
