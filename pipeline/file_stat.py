"""What identifies one version of a data file (an annotation file, a shard): the record the manifest index keys its
entries by, and the shard cache its local copies.

A local file is known by its name, size and modification time (ns). A file at a URL also by the version its listing
gives (object version or generation, ETag, content digest, else its modification time: ``teacher_cache.remote.
info_version``), so that an unchanged remote shard is recognised from one listing, without fetching it. A ``pipe:``
shard cannot be listed: it is known by its command text alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class FileStat:
    """A file's path (or URL, or ``pipe:`` command), its name (``shard_file_name``), size in bytes (-1: unknown until
    read), modification time (ns, 0: unknown) and ``version`` ("" for local files: their mtime decides)."""

    path: str
    name: str
    size: int
    mtime_ns: int
    version: str = ""

    @classmethod
    def of(cls, path: str) -> "FileStat":
        st = os.stat(path)
        return cls(path, os.path.basename(path), st.st_size, st.st_mtime_ns)
