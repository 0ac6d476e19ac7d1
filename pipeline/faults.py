"""A testing hook: ``CUSA_FAULT_AT="STAGE:N[:ACTION]"`` makes the N-th arrival (1-based) at STAGE end the process with
SIGKILL (ACTION ``kill``, the default), raise ``OSError(ENOSPC)`` (``enospc``) or hang until killed (``stall``), so
tests can stop a build (pipeline/build.py) or a push at a chosen point. Stages, in build order: ``store_ready``,
``image_batch``, ``image_chunk_data`` (rows written, marker not yet), ``image_chunk_written``, ``images_done``,
``text_batch``, ``text_chunk_data``, ``text_chunk_written``, ``texts_done``, ``neighbors_images`` and
``neighbors_texts`` (table and index written, marker not yet), ``before_finalize``, ``after_finalize``; and
``push_file`` (after each file `cusa-cache push` uploads). Unset, it costs nothing.
"""

from __future__ import annotations

import errno
import os
import signal
import time

from pipeline.errors import CusaError

FAULT_ENV = "CUSA_FAULT_AT"
FAULT_STAGES = ("store_ready", "image_batch", "image_chunk_data", "image_chunk_written", "images_done", "text_batch",
                "text_chunk_data", "text_chunk_written", "texts_done", "neighbors_images", "neighbors_texts",
                "before_finalize", "after_finalize", "push_file")
FAULT_ACTIONS = ("kill", "enospc", "stall")


class FaultInjector:
    """The testing hook described in the module docstring; built from ``CUSA_FAULT_AT`` by :meth:`from_env`."""

    def __init__(self, stage: str | None = None, count: int = 1, action: str = "kill"):
        self.stage, self.count, self.action = stage, count, action
        self.seen = 0

    @classmethod
    def from_env(cls) -> "FaultInjector":
        spec = os.environ.get(FAULT_ENV, "").strip()
        if not spec:
            return cls()
        parts = spec.split(":")
        stage, count, action = parts[0], parts[1] if len(parts) > 1 else "1", parts[2] if len(parts) > 2 else "kill"
        if stage not in FAULT_STAGES or not count.isdigit() or int(count) < 1 or action not in FAULT_ACTIONS \
                or len(parts) > 3:
            raise CusaError(f"{FAULT_ENV}={spec!r}: expected STAGE:N[:ACTION] with STAGE one of "
                            f"{', '.join(FAULT_STAGES)}, N ≥ 1 and ACTION one of {', '.join(FAULT_ACTIONS)}")
        return cls(stage, int(count), action)

    def at(self, stage: str, path: str = "") -> None:
        if stage != self.stage:
            return
        self.seen += 1
        if self.seen != self.count:
            return
        if self.action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path or None)
        if self.action == "stall":
            while True:
                time.sleep(60)
        os.kill(os.getpid(), signal.SIGKILL)
