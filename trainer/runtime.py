"""Where a training process runs: the one place that answers "am I under Ray Train, which rank am I, is
this run distributed, which device do I use".

A Ray Train worker has imported ``ray.train`` before it calls the loop; a plain run (``python -m trainer``,
tests) never imports it, so the same loop runs alone and as a Ray Train worker.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class WorkerContext:
    """This process's place in the run."""

    ray_context: Any | None  # ray.train's context in a Ray Train worker, else None
    rank: int
    world_size: int
    device: torch.device

    @property
    def under_ray(self) -> bool:
        return self.ray_context is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: it writes the run's files, logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Several processes with an initialised process group (DDP, all-reduce, gathers)."""
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the workers in place (nothing to do in a single process)."""
        if self.distributed:
            torch.distributed.all_reduce(tensor)


def ray_train_context() -> Any | None:
    """The Ray Train context inside a Ray Train worker, else None (plain run)."""
    train = sys.modules.get("ray.train")
    if train is None:
        return None
    try:
        return train.get_context()
    except Exception:  # not in a Ray Train worker, or in a bare Tune session
        return None


def worker_context() -> WorkerContext:
    """This process's :class:`WorkerContext`: Ray Train's rank, world size and device, or a single process
    on CUDA when available, else the CPU."""
    context = ray_train_context()
    if context is not None:
        import ray.train.torch

        return WorkerContext(
            context, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return WorkerContext(None, 0, 1, device)


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """Mixed-precision dtype for ``amp`` ("auto", "bf16", "fp16", "none") on ``device``: CUDA only, else None.

    "auto" takes bf16 where the GPU supports it (no loss scaling needed), else fp16.
    """
    if device.type != "cuda" or amp == "none":
        return None
    use_bf16 = amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported())
    return torch.bfloat16 if use_bf16 else torch.float16


__all__ = ["WorkerContext", "autocast_dtype", "ray_train_context", "worker_context"]
