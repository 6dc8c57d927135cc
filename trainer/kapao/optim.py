"""KAPAO's optimiser, learning-rate schedule and weight EMA: the authors' ``train.py`` recipe (YOLOv5).

``kapao_facts.md`` ("Optimiser"): SGD with Nesterov momentum, lr0 0.01 with a cosine decay to ``lrf * lr0``
over the epochs, momentum 0.937, weight decay 5e-4 scaled by ``batch * accumulate / 64`` (nominal batch 64,
gradients accumulated below it), no decay on biases and norm weights, a warm-up of
``max(3 epochs, 1000 iterations)`` (lr from 0, bias lr from 0.1, momentum from 0.8), and an EMA of the
weights with decay ``0.9999 * (1 - exp(-updates / 2000))``.

Differences from the authors' loop: the schedule steps once per optimiser step (the shared loop's contract)
and maps that step back to the loader iteration the authors interpolate on; the authors' warm-up also ramps
the accumulation from 1 to ``64 / batch``, which the shared loop (a fixed ``accumulate``) does not do.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

NOMINAL_BATCH = 64  # the authors' ``nbs`` (the default of KapaoOptimConfig.nominal_batch)


@dataclass
class KapaoOptimConfig:
    """The ``optim:`` section of a KAPAO config (defaults: the authors' ``train.py``, ``hyp.kp-p6.yaml``)."""

    lr0: float = 0.01
    lrf: float = 0.2  # final lr = lrf * lr0 (cosine, per epoch)
    momentum: float = 0.937
    weight_decay: float = 5e-4  # before the batch scaling (build_optimizer)
    warmup_epochs: float = 3.0
    warmup_min_iters: int = 1000  # warm-up iterations = max(warmup_epochs * iterations per epoch, this)
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    ema: bool = True
    ema_decay: float = 0.9999
    ema_ramp: float = 2000.0  # updates; decay = ema_decay * (1 - exp(-updates / ema_ramp))
    grad_clip: float | None = None  # the authors' train.py does not clip
    # Gradients are summed over max(round(nominal_batch / total batch), 1) iterations per optimiser step, and
    # weight decay is per nominal batch (the authors' nbs = 64); a CPU smoke run sets it to its batch.
    nominal_batch: int = NOMINAL_BATCH

    def validate(self) -> None:
        """Raise ``ValueError`` whose message starts with the field name of the first setting out of range."""
        for name in ("lr0", "momentum", "warmup_momentum"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.lrf <= 1:
            raise ValueError(f"lrf must be in (0, 1], got {self.lrf!r}")
        for name in ("weight_decay", "warmup_epochs", "warmup_bias_lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.nominal_batch < 1:
            raise ValueError(f"nominal_batch must be >= 1, got {self.nominal_batch!r}")
        if self.warmup_min_iters < 0:
            raise ValueError(f"warmup_min_iters must be >= 0, got {self.warmup_min_iters!r}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if not self.ema_ramp > 0:
            raise ValueError(f"ema_ramp must be > 0, got {self.ema_ramp!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be null or > 0, got {self.grad_clip!r}")


def accumulation_steps(total_batch: int, nominal_batch: int = NOMINAL_BATCH) -> int:
    """The authors' ``accumulate = max(round(64 / batch), 1)`` (batch: over all workers)."""
    return max(round(nominal_batch / total_batch), 1)


def scaled_weight_decay(config: KapaoOptimConfig, total_batch: int) -> float:
    """``weight_decay * batch * accumulate / 64``: the decay per nominal batch of 64 images."""
    accumulate = accumulation_steps(total_batch, config.nominal_batch)
    return config.weight_decay * total_batch * accumulate / config.nominal_batch


def parameter_groups(model: nn.Module) -> tuple[list, list, list]:
    """``(norm_weights, weights, biases)`` as the authors split them: decay on the weights only."""
    norm_weights, weights, biases = [], [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias":
                biases.append(param)
            elif isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm):
                norm_weights.append(param)
            else:
                weights.append(param)
    return norm_weights, weights, biases


def cosine_factor(epoch: int, epochs: int, lrf: float) -> float:
    """The authors' ``one_cycle(1, lrf, epochs)``: 1 at epoch 0, falling along a half cosine to lrf."""
    return ((1 - math.cos(epoch * math.pi / epochs)) / 2) * (lrf - 1) + 1


class KapaoSchedule:
    """lr and momentum of every group, set once per optimiser step (``step()``) for the next one.

    Per epoch ``lr = lr0 * cosine_factor(epoch)``; during the first ``warmup_iters`` loader iterations
    the lr rises linearly from 0 (biases: falls from ``warmup_bias_lr``) to that value and the momentum from
    ``warmup_momentum`` to ``momentum`` (the authors' ``np.interp`` on the iteration).
    """

    BIAS_GROUP = 2

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        config: KapaoOptimConfig,
        epochs: int,
        iters_per_epoch: int,
        accumulate: int,
    ):
        self.optimizer = optimizer
        self.config = config
        self.epochs = epochs
        self.iters_per_epoch = max(int(iters_per_epoch), 1)
        self.accumulate = max(int(accumulate), 1)
        # The loop steps every ``accumulate`` iterations and at the end of each epoch.
        self.steps_per_epoch = math.ceil(self.iters_per_epoch / self.accumulate)
        self.warmup_iters = max(round(config.warmup_epochs * self.iters_per_epoch), config.warmup_min_iters)
        self.steps_done = 0
        self._apply()

    def iteration(self) -> tuple[int, int]:
        """``(epoch, loader iteration since the start)`` of the next optimiser step."""
        epoch, within = divmod(self.steps_done, self.steps_per_epoch)
        return epoch, epoch * self.iters_per_epoch + min(within * self.accumulate, self.iters_per_epoch)

    def _apply(self) -> None:
        config = self.config
        epoch, ni = self.iteration()
        target = config.lr0 * cosine_factor(min(epoch, self.epochs), self.epochs, config.lrf)
        warm = ni <= self.warmup_iters and self.warmup_iters > 0
        for index, group in enumerate(self.optimizer.param_groups):
            if warm:
                start = config.warmup_bias_lr if index == self.BIAS_GROUP else 0.0
                group["lr"] = float(np.interp(ni, [0, self.warmup_iters], [start, target]))
                group["momentum"] = float(
                    np.interp(ni, [0, self.warmup_iters], [config.warmup_momentum, config.momentum])
                )
            else:
                group["lr"] = target
                group["momentum"] = config.momentum

    def step(self) -> None:
        self.steps_done += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])
        self._apply()


def build_optimizer(
    model: nn.Module, config: KapaoOptimConfig, epochs: int, iters_per_epoch: int, total_batch: int
) -> tuple[torch.optim.SGD, KapaoSchedule, int]:
    """``(SGD, schedule, accumulate)``: three groups (norm weights, decayed weights, biases), Nesterov."""
    accumulate = accumulation_steps(total_batch, config.nominal_batch)
    norm_weights, weights, biases = parameter_groups(model)
    optimizer = torch.optim.SGD(
        [
            {"params": norm_weights, "weight_decay": 0.0, "name": "norm_weights"},
            {"params": weights, "weight_decay": scaled_weight_decay(config, total_batch), "name": "weights"},
            {"params": biases, "weight_decay": 0.0, "name": "biases"},
        ],
        lr=config.lr0,
        momentum=config.momentum,
        nesterov=True,
    )
    return optimizer, KapaoSchedule(optimizer, config, epochs, iters_per_epoch, accumulate), accumulate


class ModelEMA:
    """An exponential moving average of a model's state dict (parameters and float buffers), the authors'
    ``ModelEMA``: ``ema = d * ema + (1 - d) * model`` with ``d = decay * (1 - exp(-updates / ramp))``."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, ramp: float = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.ramp = ramp
        self.updates = updates

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.ramp))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        source = model.state_dict()
        for key, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[key].detach().to(value.dtype), alpha=1 - d)
            else:  # e.g. BatchNorm's num_batches_tracked
                value.copy_(source[key])


__all__ = [
    "KapaoOptimConfig",
    "KapaoSchedule",
    "ModelEMA",
    "NOMINAL_BATCH",
    "accumulation_steps",
    "build_optimizer",
    "cosine_factor",
    "parameter_groups",
    "scaled_weight_decay",
]
