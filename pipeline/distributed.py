"""torch.distributed helpers shared by both stages: ranks from torchrun's environment, or a single process."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this context created the process group, so it also tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: str) -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1); otherwise a one-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, owns_group=owns)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and ctx.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_device(device: str, ctx: DistContext | None = None) -> str:
    """'auto' picks CUDA when present; under torchrun each rank takes its local GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
        if ctx is not None and ctx.enabled:
            return f"cuda:{ctx.local_rank}"
    return device


def autocast(device: str | torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device (throughput; callers cast results back to float32), nothing on a CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def split_evenly(items: list, rank: int, world_size: int) -> list:
    """A contiguous, disjoint share of ``items`` for ``rank`` (chunk-aligned when items are chunks)."""
    n = len(items)
    lo = n * rank // world_size
    hi = n * (rank + 1) // world_size
    return items[lo:hi]
