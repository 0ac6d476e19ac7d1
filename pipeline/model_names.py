"""Model names with their weights, as open_clip and timm write them; the one parser of the open_clip and timm
teachers (pipeline/teachers/) and the open_clip student (train/students.py):

    ARCH                     a library architecture (open_clip: random init; timm: its default weights)
    ARCH:WEIGHTS             the weights by pretrained tag or local checkpoint file
    hf-hub:ORG/REPO[:TAG]    config and weights from a Hugging Face Hub repository
    local-dir:PATH           config and weights from a local folder; PATH is kept whole, colons and all

A Hub repository id never holds a colon, so an ``hf-hub:`` name ends at its first one and a TAG after it is the
weights part, as after ARCH: handing "ORG/REPO:TAG" to a library whole would ask the Hub for a repository that
cannot exist. A ``local-dir:`` folder names its own weights, so nothing is split off a path that may hold colons.

Importing this module imports no model library: stage 2 reads student specs without any teacher installed.
"""

from __future__ import annotations

from dataclasses import dataclass

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"
SCHEMAS: tuple[str, ...] = (HF_HUB, LOCAL_DIR)


@dataclass(frozen=True)
class ModelName:
    """A parsed model name: ``model`` is what the library's factory takes as its model name (schema included),
    ``weights`` the pretrained tag or checkpoint file after it (None: none named)."""

    model: str
    weights: str | None = None

    @property
    def schema(self) -> str | None:
        """``"hf-hub:"`` or ``"local-dir:"`` when the model comes from a repository or folder, else None."""
        return next((s for s in SCHEMAS if self.model.startswith(s)), None)

    @property
    def names_a_model(self) -> bool:
        """False for an empty name or a schema with nothing after it ("", "hf-hub:", "local-dir:")."""
        return bool(self.model) and self.model not in SCHEMAS

    def __str__(self) -> str:
        return self.model + (f":{self.weights}" if self.weights else "")


def parse_model_name(text: str) -> ModelName:
    """"ARCH[:WEIGHTS]", "hf-hub:ORG/REPO[:TAG]" or "local-dir:PATH" -> ModelName (see the module docstring); parts
    are trimmed of spaces, an empty weights part is None."""
    text = text.strip()
    if text.startswith(LOCAL_DIR):
        return ModelName(text)
    schema = HF_HUB if text.startswith(HF_HUB) else ""
    name, _, weights = text[len(schema):].partition(":")
    return ModelName(schema + name.strip(), weights.strip() or None)
