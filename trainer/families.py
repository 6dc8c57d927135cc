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
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from trainer.kapao.family import KAPAO
from trainer.latency import PROBE_IMAGES
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


@dataclass
class SweepCacheInfo:
    """What ``EvalSweep.build_cache`` leaves: where the cache is, how much it holds, and the plain, picklable
    options every trial's ``EvalSweep.score`` receives."""

    path: str
    units: int  # what the cache holds per entry: boxes (top-down) or images (whole-image families)
    unit_name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepScore:
    """One trial's scoring: the shared evaluator's metrics (``evaluate_wholebody``'s keys, fractions), the
    units scored and, for a cache of limited depth, the images whose cache ran out (None: it cannot)."""

    metrics: dict[str, float]
    units: int
    short_images: int | None = None


class EvalSweep(Protocol):
    """What ``fowkal tune-eval`` asks a family: the network runs once over the evaluation set into a cache,
    then each trial turns the cache into results with its inference-time settings and scores them, with the
    numbers ``fowkal eval`` gives at the same settings (``trainer.topdown.family.HeatmapEvalSweep``,
    ``trainer.kapao.family.KapaoEvalSweep``)."""

    # The dotted keys a tune-eval space may sweep (the family's ``eval_setting_keys``).
    setting_keys: tuple[str, ...]

    def base_settings(self, cfg) -> dict[str, Any]:
        """The checkpoint config's values of ``setting_keys``: the sweep's base and its first trial."""

    def build_cache(
        self, loaded, ann_file, image_dir, cache_root, *, det_file, reach: Mapping[str, tuple], progress: bool
    ) -> SweepCacheInfo:
        """Run the network once (or reuse a cache of the same inputs under ``cache_root``); ``reach`` maps
        every setting key to the values the space can ask for (a continuous range as its two ends), so that
        the cache holds what the most permissive trial needs (e.g. the lowest thresholds)."""

    def open_cache(self, path):
        """The cache at ``path`` (``SweepCacheInfo.path``), opened in a trial process."""

    def score(
        self, cache, settings: Mapping[str, Any], evaluator, options: Mapping[str, Any], *, image_ids=None,
        memo_dir=None,
    ) -> SweepScore:  # fmt: skip
        """One trial: ``settings`` (every key of ``setting_keys``) applied to the cache, scored by
        ``evaluator`` (a ``WholeBodyEvaluator``) on the images of ``image_ids`` (None: all); ``memo_dir``: a
        directory the sweep's trials share for what they can reuse."""


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
    # Whether an evaluation scoring as high as the best so far replaces it (the later checkpoint wins a tie)
    # or not (the first one keeps it). Under Ray, Ray Train's ranking of the reported checkpoints (the
    # run's best_checkpoint) gives ties to the later one whatever this says.
    best_on_ties: bool
    # Whether the prediction rows are the eval data set's samples, one per person box (a top-down family);
    # False: the family finds the people in whole images itself (``fowkal show`` matches them to the GT).
    predicts_per_box: bool
    # Whether the network outputs crop heatmaps that ``fowkal tune-eval`` caches and ``fowkal show`` draws.
    heatmap_eval_sweep: bool
    # The family's own exception types whose messages name a user's setting (a loss or inference value):
    # ``fowkal`` prints them as one line, as it does ConfigError (orchestrator/user_errors.py).
    setting_errors: tuple[type[Exception], ...]
    # How ``fowkal tune-eval`` sweeps the family's inference-time settings without training (None: it cannot).
    eval_sweep: EvalSweep | None
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

    def selection_score(self, metrics: Mapping[str, float], cfg=None) -> float | None:
        """The number the best checkpoint maximises for a run of ``cfg`` (None on epochs without
        validation)."""

    def run_artifacts(self, cfg, checkpoint_dir, out_dir) -> tuple[list, list[str]]:
        """Files a finished run logs beside its checkpoints (written into ``out_dir`` from the last
        checkpoint's directory), and notes to print: ``(files, notes)``."""

    def describe_protocol(self, cfg, flip_test: bool, det_file=None, det_score_thr=None) -> tuple[str, str]:
        """What ``fowkal eval`` ran on and how: ``("ground-truth boxes", "flip test, DARK")``."""

    def describe_inference(self, cfg) -> str:
        """The model and its input, for ``fowkal eval``'s first line."""

    def describe_model(self, cfg) -> str:
        """What the model of ``cfg`` is, for messages (``backbone 'hrnet_w32' with a KAF head``)."""

    def describe_recipe(self, cfg) -> tuple[str, str]:
        """The model at its input size and the optimiser's learning rate, for a sweep's description:
        (``hrnet_w32 at 256x192 (h x w)``, ``lr 0.0005``)."""

    def latency_probe(self, cfg, dataset, images: int = PROBE_IMAGES, image_ids=None):
        """A ``trainer.latency.LatencyProbe`` of ``images`` images of the test-mode ``dataset`` (the smallest
        image ids, or ``image_ids``): each image's network input at the family's input size, the forward
        pass, and the family's post-processing into poses (what ``trainer.latency.inference_cost`` times)."""


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
    "EvalSweep",
    "ExperimentFamily",
    "FAMILIES",
    "FamilyTraining",
    "SweepCacheInfo",
    "SweepScore",
    "UnknownFamilyError",
    "family_of",
    "get_family",
]
