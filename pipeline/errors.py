"""User-facing errors of stage 1: each one's message is a single line naming the file/row and the problem."""

import re


class CusaError(Exception):
    """Base of every error caused by user input; the CLI prints it as one line, never a traceback."""


class ManifestError(CusaError):
    """An annotation file cannot be read into a manifest."""


class EncoderError(CusaError):
    """An encoder spec is unknown or its weights cannot be loaded."""


class ImageError(CusaError):
    """An image file is missing, truncated, undecodable or refused."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception, short enough for a one-line error message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > 240:
        text = text[:237] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def pickle_refusal(exc: BaseException) -> str:
    """What ``torch.load(..., weights_only=True)`` (or a restricted unpickler) refused, for a one-line message:
    "it needs the Python object NAME", read from the error's text."""
    text = str(exc)
    match = re.search(r"GLOBAL (\S+) was not an allowed global", text) or re.search(r"but got <class '([^']+)'>", text)
    what = f"it needs the Python object {match.group(1)}" if match else "it holds pickled Python objects"
    return f"{what}, and unpickling it could run code"
