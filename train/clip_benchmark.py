"""cusa students inside CLIP_benchmark: a loader of the kind its ``TYPE2FUNC`` table holds, for students that
``--model_type open_clip`` cannot load (runs with CUSA's reference heads, frozen-backbone students).

CLIP_benchmark asks a loader ``(model_name, pretrained, cache_dir, device)`` for ``(model, transform, tokenizer)``:
the model's ``encode_image`` takes a batch the transform made, its ``encode_text`` what the tokenizer returned
(after ``.to(device)``). Here ``pretrained`` (else ``model_name``) names a run folder, a checkpoint file or a folder
``cusa-export`` wrote, read by ``load_model``; the embeddings are the student's retrieval (cross-modal) ones.

Run it as CLIP_benchmark's own command, with this loader registered::

    python -m train.clip_benchmark eval --model_type cusa --model cusa --pretrained RUN \\
        --dataset wds/demo --dataset_root demo/clip_benchmark --task zeroshot_retrieval --output result.json
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch

MODEL_TYPE = "cusa"


class Sentences(list):
    """A batch of captions as CLIP_benchmark's tokenizer output: it moves it with ``.to(device)`` before encoding;
    the student tokenizes (or runs its frozen text backbone) itself."""

    def to(self, device) -> "Sentences":
        return self


class StudentForClipBenchmark(torch.nn.Module):
    """``encode_image`` / ``encode_text`` of a trained student, as CLIP_benchmark calls them."""

    def __init__(self, trained) -> None:
        super().__init__()
        self.trained = trained
        self.embedder = trained.embedder
        if self.embedder.region:
            raise ValueError(f"{trained.checkpoint}: a region student ({trained.spec}) scores image-caption pairs and "
                             "has no image or text embedding for CLIP_benchmark to compare")

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder.image_batch(images, "cross")

    def encode_text(self, sentences: Sequence[str]) -> torch.Tensor:
        return self.embedder.text_batch(list(sentences), "cross")


def load_for_clip_benchmark(model_name: str = "", pretrained: str = "", cache_dir: str | None = None,
                            device: str | torch.device = "cpu"):
    """(model, transform, tokenizer) of the student ``pretrained`` (or ``model_name``) names, for CLIP_benchmark."""
    from train.model import load_model

    source = pretrained or model_name
    device = str(device)
    trained = load_model(source, device="cuda" if device.startswith("cuda") else device)
    return StudentForClipBenchmark(trained), trained.embedder.image_preprocess, Sentences


def register() -> None:
    """Add this loader to CLIP_benchmark's table as ``--model_type cusa`` (its command line reads the same list)."""
    from clip_benchmark import models

    models.TYPE2FUNC[MODEL_TYPE] = load_for_clip_benchmark
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)


def main() -> int:
    """CLIP_benchmark's own command line, with ``--model_type cusa`` available."""
    import pipeline.console  # noqa: F401 (the environment defaults every cusa command runs with)

    register()
    from clip_benchmark.cli import main as clip_benchmark_main

    return clip_benchmark_main() or 0


if __name__ == "__main__":
    sys.exit(main())
