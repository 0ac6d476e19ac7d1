"""The optimizer's parameter groups: a pretrained backbone and newly initialised parameters each at their own lr.

A fine-tuned open_clip student has both: CLIP's towers (``lr``, 1e-5 in the paper) and CUSA's heads. A frozen-backbone
student has only new parameters (adapters and heads). Everything new (adapters, cross and uni heads, the loss's
learnable temperatures) is the ``heads`` group at ``head_lr`` (default: ``lr``, as the reference code trains the
heads with CLIP); the ``backbone`` group is whatever the student names ``pretrained_backbone``. Both decay by the same
cosine factor, from their lr down to lr × min_lr / lr. Weight decay applies to matrices only (not norms, biases or
temperatures).
"""

from __future__ import annotations

import math

import torch

BACKBONE = "backbone"
HEADS = "heads"


def head_lr(cfg) -> float:
    return cfg.head_lr if cfg.head_lr is not None else cfg.lr


def parameter_groups(student: torch.nn.Module, loss_fn: torch.nn.Module, cfg) -> list[dict]:
    """AdamW parameter groups (each with a ``name``): backbone matrices, backbone vectors, head matrices, head
    vectors and temperatures; empty groups are left out."""
    backbone = getattr(student, "pretrained_backbone", None)
    in_backbone = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    lr_of = {BACKBONE: cfg.lr, HEADS: head_lr(cfg)}
    parts: dict[tuple[str, bool], list[torch.nn.Parameter]] = {(part, decay): [] for part in (BACKBONE, HEADS)
                                                               for decay in (True, False)}
    for p in student.parameters():
        if p.requires_grad:
            parts[(BACKBONE if id(p) in in_backbone else HEADS, p.ndim >= 2)].append(p)
    parts[(HEADS, False)].extend(p for p in loss_fn.parameters() if p.requires_grad)
    return [{"name": part, "params": params, "lr": lr_of[part], "weight_decay": cfg.weight_decay if decay else 0.0}
            for (part, decay), params in parts.items() if params]


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, lr: float,
                    min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Every group's lr from its peak down the cosine to (its peak) × min_lr / lr over ``total_steps``, no warm-up."""
    def factor(step: int) -> float:
        t = min(step, total_steps) / max(total_steps, 1)
        return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))) / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current lr of each named group."""
    return {g.get("name", f"group{i}"): g["lr"] for i, g in enumerate(optimizer.param_groups)}


def lr_plan(optimizer: torch.optim.Optimizer, cfg) -> dict[str, dict]:
    """Per named group: its peak and final lr (cosine) and how many parameters it trains."""
    plan: dict[str, dict] = {}
    for i, g in enumerate(optimizer.param_groups):
        peak = g["initial_lr"] if "initial_lr" in g else g["lr"]
        entry = plan.setdefault(g.get("name", f"group{i}"),
                                {"lr": peak, "min_lr": peak * cfg.min_lr / cfg.lr, "parameters": 0})
        entry["parameters"] += sum(p.numel() for p in g["params"])
    return plan


def describe_lr_plan(plan: dict[str, dict]) -> str:
    return "; ".join(f"{name} {p['lr']:.0e} → {p['min_lr']:.0e} ({p['parameters']:,} parameters)"
                     for name, p in plan.items())
