"""The public names of the teacher registry, re-exported for scripts written against ``pipeline.encoders``.

Nothing is defined here: each name lives in the ``pipeline.teachers`` package (the registry and `build_encoder` in
pipeline/teachers/registry.py, the spec list in docs/teachers.md), and the project imports it from there.
"""

from pipeline.teachers.base import MODALITIES, Encoder, ImagePreprocess, TorchImageEncoder
from pipeline.teachers.efficientnet_lite import build_lite_model, map_lite_state_dict
from pipeline.teachers.hashing import directory_sha256, file_sha256, state_dict_sha256
from pipeline.teachers.open_clip_models import OpenClipTextEncoder
from pipeline.teachers.precomputed import PRECOMPUTED_OPTIONS, PrecomputedEncoder, precomputed_paths
from pipeline.teachers.registry import ACCEPTED_SPECS, DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER, build_encoder
from pipeline.teachers.sentence_models import SentenceTransformerEncoder

__all__ = [
    "ACCEPTED_SPECS", "DEFAULT_IMAGE_TEACHER", "DEFAULT_TEXT_TEACHER", "MODALITIES", "PRECOMPUTED_OPTIONS", "Encoder",
    "ImagePreprocess", "OpenClipTextEncoder", "PrecomputedEncoder", "SentenceTransformerEncoder", "TorchImageEncoder",
    "build_encoder", "build_lite_model", "directory_sha256", "file_sha256", "map_lite_state_dict",
    "precomputed_paths", "state_dict_sha256",
]
