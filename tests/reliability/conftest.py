"""Fixtures of the reliability suite: one tiny dataset, one build server, one uninterrupted reference store."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from reliability_support import BuildServer, TinyData, make_tiny_data


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyData:
    return make_tiny_data(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def server(tiny, tmp_path_factory) -> BuildServer:
    """The build server, its teachers loaded: the packaged MiniLM, a one-layer text teacher with MiniLM's tokenizer
    (the many kill trials use it: it encodes in a millisecond), and the tiny timm image teacher."""
    srv = BuildServer(tmp_path_factory.mktemp("server") / "server.log")
    tiny.text_teacher = srv.make_tiny_text_teacher(tiny.root / "tiny_text_teacher")
    srv.warm([("minilm-l6", "text"), (tiny.text_teacher, "text"), (tiny.pixel_teacher, "image")])
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def reference(server, tiny, tmp_path_factory) -> tuple[Path, float]:
    """The uninterrupted build every killed-and-resumed one must equal, and how long it took."""
    root = tmp_path_factory.mktemp("reference")
    warm = server.run(tiny.build_args(root / "first"))  # the first build in a process pays for lazy imports
    assert warm["rc"] == 0, warm["stderr"]
    result = server.run(tiny.build_args(root / "store"))
    assert result["rc"] == 0, result["stderr"]
    return root / "store", result["seconds"]


@pytest.fixture(scope="session")
def reliability_seed() -> int:
    """Seed of the random kill times: CUSA_RELIABILITY_SEED replays a failed run."""
    seed = int(os.environ.get("CUSA_RELIABILITY_SEED", random.SystemRandom().randrange(2**31)))
    print(f"\nreliability seed: CUSA_RELIABILITY_SEED={seed}")
    return seed
