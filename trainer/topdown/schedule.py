"""The paper's optimiser and schedule (Implementation Details): Adam, lr 5e-4, linear warm-up over 500
iterations from ratio 0.001, lr x0.1 at epochs 170 and 200 of 210."""

from __future__ import annotations

import torch

from trainer.topdown.config import OptimConfig


def lr_decay_epochs(epochs: int, optim: OptimConfig) -> list[int]:
    """Epochs (0-based) from which each lr decay applies: the paper's 170 and 200 for 210 epochs."""
    return [int(round(fraction * epochs)) for fraction in optim.lr_decay_at]


def lr_factor(iteration: int, iters_per_epoch: int, epochs: int, optim: OptimConfig) -> float:
    """Multiplier of the base lr at 0-based global ``iteration``: linear warm-up x step decay.

    Warm-up as MMCV's ``linear`` policy: ``1 - (1 - i / warmup_iters) * (1 - warmup_ratio)`` for
    ``i < warmup_iters`` (``warmup_ratio`` at i = 0, 1 at the end), times ``lr_decay_factor`` per decay
    milestone reached by the iteration's epoch.
    """
    factor = 1.0
    if iteration < optim.warmup_iters:
        factor = 1.0 - (1.0 - iteration / optim.warmup_iters) * (1.0 - optim.warmup_ratio)
    epoch = iteration // iters_per_epoch
    decays = sum(epoch >= milestone for milestone in lr_decay_epochs(epochs, optim))
    return factor * optim.lr_decay_factor**decays


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, epochs: int, iters_per_epoch: int):
    """``(Adam, LambdaLR)``: the scheduler steps once per iteration."""
    optimizer = torch.optim.Adam(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda iteration: lr_factor(iteration, iters_per_epoch, epochs, optim)
    )
    return optimizer, scheduler


__all__ = ["build_optimizer", "lr_decay_epochs", "lr_factor"]
