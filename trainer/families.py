"""Experiment families: the registry, and what the shared code asks a family.

A family is one way of turning images into keypoints, with its model, loss, data pipeline and decoding:
``topdown_heatmap`` (HRNet + DARK heatmaps on person crops, the FoWKAL loss family; ``trainer/topdown/``)
and ``kapao`` (keypoints and poses as objects; ``trainer/kapao/``). A config picks one with its top-level
``family`` key (default ``topdown_heatmap``, so configs written before families existed mean what they
meant). The shared code (``trainer.config``, ``trainer.loop``, ``trainer.checkpoint``, ``orchestrator/``)
asks the family object for everything family-specific and names none of its pieces.

Adding a family: a package ``trainer/<name>/`` whose ``family.py`` defines an object with the attributes and
methods of :class:`ExperimentFamily`, and one line in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from trainer.kapao.family import KAPAO
from trainer.topdown.family import TOPDOWN_HEATMAP

DEFAULT_FAMILY = "topdown_heatmap"


class FamilyTraining(Protocol):
    """One run's training objective on one worker: the loss and what it tracks across epochs."""

    # The loss parts reported each epoch as ``train/loss_<part>`` (their sum is not required to be the total).
    loss_parts: tuple[str, ...]

    def step(self, model: torch.nn.Module, batch: dict, device: torch.device, amp_dtype, channels_last: bool):
        """Forward + loss of one batch: ``(total, {part: value})``; records what ``epoch_metrics`` reports."""

    def epoch_metrics(self, all_reduce: Callable[[torch.Tensor], None] | None) -> dict[str, float]:
        """The family's extra metrics of the epoch (e.g. the KAF statistics); resets its accumulators."""

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint holds beyond the shared keys (weights, optimiser, schedule, RNG, config)."""

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Restore from a checkpoint written by :meth:`checkpoint_state` (resume)."""

    def write_outputs(self, directory) -> list[str]:
        """Write the per-epoch files (e.g. ``kaf_history.npy``) into ``directory``; returns their names."""

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        """Called after every optimiser step (e.g. to update an EMA of the weights)."""

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to evaluate and checkpoint as ``model`` (the EMA where the family keeps one)."""


class ExperimentFamily(Protocol):
    """What the shared code asks a family (``trainer.topdown.family.TopDownHeatmapFamily`` is one)."""

    name: str
    summary: str
    # Config sections by top-level key (``data``, ``model``, ``loss``, ``optim``, ``eval``): dataclasses.
    sections: Mapping[str, type]
    # The dotted keys that act after the network: ``fowkal eval --set`` and ``fowkal tune-eval`` may change
    # only these.
    eval_setting_keys: tuple[str, ...]
    # Keys whose values have properties that a search space's ``when:`` may name:
    # ``{"loss.variant": (table value -> object with the properties, ("needs_kaf", "weighting", ...))}``.
    sweep_conditions: Mapping[str, tuple[Mapping[str, Any], tuple[str, ...]]]
    # A key an ablation arm must set (the arm's point), or None.
    arm_key: str | None
    # The metric the best checkpoint maximises (the loop reports it on evaluation epochs).
    selection_metric: str
    # Whether the prediction rows are the eval data set's samples, one per person box (a top-down family);
    # False: the family finds the people in whole images itself (``fowkal show`` matches them to the GT).
    predicts_per_box: bool
    # Whether the network outputs crop heatmaps that ``fowkal tune-eval`` caches and ``fowkal show`` draws.
    heatmap_eval_sweep: bool
    # The shared evaluator's numbers the loop reports: evaluate_wholebody key -> metric name
    # (trainer.evaluation.wholebody.VAL_METRICS, or more).
    val_metrics: Mapping[str, str]

    def validate(self, cfg, check: Callable[[bool, str, Any, str], None]) -> None:
        """Range checks of the family's sections: ``check(ok, dotted_key, value, expected)``."""

    def run_label(self, cfg) -> str:
        """A short label of what this run trains, used in run names (``smoke-fowkal-1a2b3c4d``)."""

    def run_tags(self, cfg) -> dict[str, str]:
        """MLflow tags that describe the run (e.g. ``loss_variant``)."""

    def build_datasets(self, cfg, paths: Mapping[str, str | None]):
        """``(train_set, val_set)`` for :func:`trainer.datasets.sources.resolve_datasets`' paths."""

    def eval_dataset(self, cfg, ann_file, image_dir, det_file=None):
        """The test-mode data set ``fowkal eval`` runs on (``det_file``: person detections, for a family
        that evaluates person boxes; a family without them says so)."""

    def collate_fn(self, cfg) -> Callable | None:
        """The DataLoader's ``collate_fn`` (None: PyTorch's default)."""

    def build_model(self, cfg, pretrained: bool = True) -> torch.nn.Module:
        """The network of ``cfg`` (backbone weights from ``model.pretrained_path`` when ``pretrained``)."""

    def build_optimizer(self, cfg, model: torch.nn.Module, iters_per_epoch: int):
        """``(optimizer, scheduler, accumulate)``: ``scheduler.step()`` once per optimiser step, which
        happens every ``accumulate`` iterations."""

    def grad_clip(self, cfg) -> float | None:
        """Max global L2 norm of the gradients (None: no clipping)."""

    def training(self, cfg, model: torch.nn.Module, device: torch.device) -> FamilyTraining:
        """The training objective of one run on one worker."""

    def predict(self, model, loader, cfg, device, amp_dtype, channels_last: bool) -> dict:
        """Predictions of the val ``loader``: a dict of arrays that concatenate on axis 0 across workers."""

    def results(self, predictions: Mapping, cfg) -> list[dict]:
        """COCO-WholeBody result dicts (image-level keypoints) for the shared evaluator."""

    def selection_score(self, metrics: Mapping[str, float]) -> float | None:
        """The number the best checkpoint maximises (None on epochs without validation)."""

    def run_artifacts(self, cfg, checkpoint_dir, out_dir) -> tuple[list, list[str]]:
        """Files a finished run logs beside its checkpoints (written into ``out_dir`` from the last
        checkpoint's directory), and notes to print: ``(files, notes)``."""

    def describe_protocol(self, cfg, flip_test: bool, det_file=None, det_score_thr=None) -> tuple[str, str]:
        """What ``fowkal eval`` ran on and how: ``("ground-truth boxes", "flip test, DARK")``."""

    def describe_inference(self, cfg) -> str:
        """The model and its input, for ``fowkal eval``'s first line."""

    def describe_model(self, cfg) -> str:
        """What the model of ``cfg`` is, for messages (``backbone 'hrnet_w32' with a KAF head``)."""


# The family table: name -> family. Adding a family is one line here.
FAMILIES: dict[str, ExperimentFamily] = {
    TOPDOWN_HEATMAP.name: TOPDOWN_HEATMAP,
    KAPAO.name: KAPAO,
}


class UnknownFamilyError(ValueError):
    """A family name that is not in :data:`FAMILIES` (the message lists the known ones)."""


def get_family(name: str) -> ExperimentFamily:
    """The family registered as ``name``; :class:`UnknownFamilyError` lists the known ones."""
    family = FAMILIES.get(name) if isinstance(name, str) else None
    if family is None:
        raise UnknownFamilyError(f"unknown family {name!r} (known: {', '.join(sorted(FAMILIES))})")
    return family


def family_of(cfg) -> ExperimentFamily:
    """The family of a ``TrainConfig`` (or of its dict form)."""
    name = cfg.get("family", DEFAULT_FAMILY) if isinstance(cfg, Mapping) else cfg.family
    return get_family(name)


__all__ = [
    "DEFAULT_FAMILY",
    "ExperimentFamily",
    "FAMILIES",
    "FamilyTraining",
    "UnknownFamilyError",
    "family_of",
    "get_family",
]
