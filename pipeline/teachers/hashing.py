"""Content hashes that name a teacher's weights in its identity, so a store built with other weights is refused
rather than silently mixed."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@functools.lru_cache(maxsize=256)
def _sha256_of_file(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key: a file rewritten in place is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes, cached per process by (path, size, mtime)."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return _sha256_of_file(str(resolved), st.st_size, st.st_mtime_ns)


def files_sha256(paths: list[Path]) -> str:
    """sha256 hex over the hashes of several files, in order (an array and its ids or keys file)."""
    return hashlib.sha256("".join(file_sha256(p) for p in paths).encode()).hexdigest()


def directory_sha256(path: str | os.PathLike) -> str:
    """sha256 hex over every file below a directory (relative path + content hash), in sorted order."""
    root = Path(path).resolve()
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if "__pycache__" in rel:
            continue
        digest.update(f"{rel}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def state_dict_sha256(module: "torch.nn.Module") -> str:
    """sha256 hex over a module's parameters and buffers (names, dtypes, shapes and bytes)."""
    import torch  # here: the file hashes above serve commands that never load a model

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def package_version(distribution: str) -> str:
    """The installed version of a distribution (its weights ship inside it), "unknown" when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
