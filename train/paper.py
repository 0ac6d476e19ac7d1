"""The paper's reference configuration — CLIP ViT-B/32 fine-tuned on COCO and Flickr30K (docs/method.md, "Defaults")
— written once. TrainConfig's defaults, the loss settings' defaults and the ``paper`` preset all read this table.

Temperatures are (initial raw value, clamp range, learnable); τ_s (``tau_soft``) is frozen. The rates were tuned with
the contrastive loss's "mean" reduction (docs/method.md, "Reductions").
"""

from __future__ import annotations

from typing import Any

PAPER: dict[str, Any] = {
    # AdamW with a cosine from lr to min_lr, no warm-up; 30 epochs on COCO (40 on Flickr30K), 128 pairs a GPU
    "lr": 1e-5, "min_lr": 1e-6, "weight_decay": 1e-4, "batch_size": 128, "epochs": 30,
    "contrastive": {"rate": 1.0, "reduction": "mean",
                    "tau": {"init": 0.05, "min": 0.01, "max": 0.10, "learnable": True}},
    # one student temperature shared by both directions
    "csa": {"rate": 0.1, "mode": "each", "form": "kl",
            "tau": {"init": 0.45, "min": 0.10, "max": 0.99, "learnable": True}},
    # a student temperature per modality
    "usa": {"rate": 0.5, "form": "kl",
            "tau_images": {"init": 0.45, "min": 0.10, "max": 1.00, "learnable": True},
            "tau_texts": {"init": 0.45, "min": 0.10, "max": 1.00, "learnable": True}},
    "tau_soft": 1.0,  # the teachers' soft-label temperature, the same for CSA and USA
}
