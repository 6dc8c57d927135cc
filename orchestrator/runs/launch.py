"""The one place that builds a Ray Train run: a ``TorchTrainer`` of ``trainer.loop.train_loop_per_worker``
with its ``RunConfig``, for ``fowkal train`` and for every sweep trial alike.

``name`` + ``storage_path`` identify the run: building it again with the same pair finds the run's
checkpoint-manager snapshot in storage, and ``ray.train.get_checkpoint()`` hands the workers the latest
checkpoint, so the run resumes at the next epoch.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.train import UserCallback

from orchestrator.runs.resources import scaling_config
from trainer.config import TrainConfig, config_to_dict

# Checkpoints Ray Train keeps besides the latest (which it always keeps, for resuming).
NUM_CHECKPOINTS_TO_KEEP = 1
# The logger of Ray Train's checkpoint ranking (it names a checkpoint's missing score metric).
RAY_CHECKPOINT_LOGGER = "ray.train._internal.checkpoint_manager"


class _DropMissingScore(logging.Filter):
    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric
        self.prefix = f"Result dict has no key: {metric}."

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class QuietUnscoredCheckpoints(UserCallback):
    """Keeps Ray Train from logging an ERROR for every epoch that was not evaluated.

    Every epoch is checkpointed (resume), the score metric exists only where the loop evaluated
    (``eval_interval``): Ray ranks such a checkpoint -inf, which is what we want, but says so as an error
    naming the missing key, once an epoch on the console of ``fowkal train`` and in every trial's log. The
    filter goes on the controller's logger when this callback is unpickled there, before the first report;
    only that message for ``metric`` is dropped.
    """

    def __init__(self, metric: str):
        self.metric = metric

    def __setstate__(self, state):
        self.__dict__.update(state)
        install_missing_score_filter(self.metric)


def install_missing_score_filter(metric: str) -> None:
    """Drop Ray's "Result dict has no key: <metric>" records in this process (once per metric)."""
    logger = logging.getLogger(RAY_CHECKPOINT_LOGGER)
    if not any(isinstance(f, _DropMissingScore) and f.metric == metric for f in logger.filters):
        logger.addFilter(_DropMissingScore(metric))


def build_torch_trainer(
    cfg: TrainConfig,
    *,
    name: str,
    storage_path: str,
    callbacks: list,
    score_metric: str | None = None,
    gpus_per_trial: float | None = None,
    trainer_cls: Any = None,
):
    """A ``TorchTrainer`` (or ``trainer_cls``, a subclass) running ``cfg``.

    Args:
        cfg: the validated training config (its ``num_workers``, ``use_gpu``, ``max_failures``).
        name, storage_path: the Ray Train run's identity (see the module docstring).
        callbacks: ``ray.train.UserCallback`` objects for the controller (MLflow, Tune reporting, ...).
        score_metric: keep the checkpoints scoring highest on this metric (besides the latest); None keeps
            the most recent ones.
        gpus_per_trial: a sweep trial's GPUs (``orchestrator.runs.resources.scaling_config``); None for
            ``fowkal train``.
        trainer_cls: the trainer class (default ``ray.train.torch.TorchTrainer``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from trainer.loop import train_loop_per_worker

    checkpoint_config = CheckpointConfig(num_to_keep=NUM_CHECKPOINTS_TO_KEEP)
    if score_metric is not None:
        checkpoint_config = CheckpointConfig(
            num_to_keep=NUM_CHECKPOINTS_TO_KEEP,
            checkpoint_score_attribute=score_metric,
            checkpoint_score_order="max",
        )
        callbacks = [QuietUnscoredCheckpoints(score_metric), *callbacks]
    run_config = RunConfig(
        name=name,
        storage_path=storage_path,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=checkpoint_config,
        callbacks=callbacks,
    )
    return (trainer_cls or TorchTrainer)(
        train_loop_per_worker,
        train_loop_config=config_to_dict(cfg),
        scaling_config=scaling_config(cfg, gpus_per_trial),
        run_config=run_config,
    )


__all__ = [
    "NUM_CHECKPOINTS_TO_KEEP",
    "QuietUnscoredCheckpoints",
    "build_torch_trainer",
    "install_missing_score_filter",
]
