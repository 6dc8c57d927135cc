"""Evaluating a trained model on a data set, for every family: ``fowkal eval``, ``fowkal show`` and the
inference-time sweeps run the family's inference through here and score it with the shared evaluator.

Devices: ``select_device(gpus)``: 0 = CPU, 1 = ``cuda:0`` (the default when CUDA is available), N > 1 splits
every batch over ``cuda:0..N-1`` with ``torch.nn.DataParallel`` (one process; simple, and the data loading,
not the model, is the usual bottleneck of top-down evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from trainer.checkpoint import EvalError, LoadedCheckpoint
from trainer.config import ConfigError, apply_overrides, config_from_dict, config_to_dict
from trainer.evaluation.wholebody import evaluate_wholebody
from trainer.families import family_of
from trainer.runtime import autocast_dtype


@dataclass
class EvalOutcome:
    """What ``evaluate_model`` returns."""

    metrics: dict[str, float]
    results: list[dict]
    num_boxes: int


def select_device(gpus: int | None) -> tuple[torch.device, list[int]]:
    """``(device, device_ids)`` for ``--gpus``: None = 1 GPU when CUDA is available else CPU, 0 = CPU."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus is None:
        gpus = 1 if available else 0
    if gpus < 0:
        raise EvalError(f"--gpus must be >= 0, got {gpus}")
    if gpus == 0:
        return torch.device("cpu"), []
    if gpus > available:
        raise EvalError(f"--gpus {gpus} asked for, but torch sees {available} CUDA device(s)")
    return torch.device("cuda:0"), list(range(gpus))


def with_progress(iterable, total: int, description: str, enabled: bool = True):
    """Iterate with a tqdm bar on stderr (a plain counter every ~10% when tqdm is missing)."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm import tqdm
    except ImportError:
        step = max(1, total // 10)
        for index, item in enumerate(iterable, 1):
            if index % step == 0 or index == total:
                print(f"{description}: {index}/{total}", flush=True)
            yield item
        return
    yield from tqdm(iterable, total=total, desc=description, unit="batch", dynamic_ncols=True)


def build_eval_dataset(config, ann_file, image_dir, det_file=None, det_score_thr: float | None = None):
    """The family's test-mode data set of ``ann_file`` / ``image_dir`` with the run's pipeline (and, for a
    family that evaluates person boxes, ``det_file``); errors name the missing path."""
    if not Path(ann_file).is_file():
        raise EvalError(f"annotation file {str(ann_file)!r} does not exist (--ann)")
    if not Path(image_dir).is_dir():
        raise EvalError(f"image directory {str(image_dir)!r} does not exist (--images)")
    if det_file is not None and not Path(det_file).is_file():
        raise EvalError(f"detection file {str(det_file)!r} does not exist (--det-file)")
    if det_score_thr is not None:
        config = apply_eval_settings(config, {"data.det_score_thr": det_score_thr})
    return family_of(config).eval_dataset(config, ann_file, image_dir, det_file)


def evaluate_model(
    loaded: LoadedCheckpoint,
    ann_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    det_file: str | os.PathLike | None = None,
    det_score_thr: float | None = None,
    flip_test: bool = True,
    batch_size: int | None = None,
    workers: int | None = None,
    gpus: int | None = None,
    progress: bool = True,
    flip_mode: str | None = None,
) -> EvalOutcome:
    """The family's inference on a data set (top-down: flip test + DARK, rescoring + OKS-NMS) -> the shared
    COCO-WholeBody evaluator's AP/AR.

    ``batch_size`` / ``workers`` / ``flip_mode`` / ``det_score_thr`` default to the run's
    ``data.val_batch_size`` / ``data.loader_workers`` / ``eval.flip_mode`` / ``data.det_score_thr``; the
    other inference settings are the run config's ``eval.*`` (``apply_eval_settings`` changes them).
    """
    config = dataclasses.replace(loaded.config, flip_test=flip_test)
    if flip_mode is not None:
        config = apply_eval_settings(config, {"eval.flip_mode": flip_mode})
    family = family_of(config)
    dataset = build_eval_dataset(config, ann_file, image_dir, det_file, det_score_thr)
    batch_size = config.data.val_batch_size if batch_size is None else int(batch_size)
    workers = config.data.loader_workers if workers is None else int(workers)
    if batch_size < 1:
        raise EvalError(f"--batch must be >= 1, got {batch_size}")
    if workers < 0:
        raise EvalError(f"--workers must be >= 0, got {workers}")
    device, device_ids = select_device(gpus)
    model = loaded.model.to(device).eval()
    if len(device_ids) > 1:
        model = torch.nn.DataParallel(model, device_ids=device_ids)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=family.collate_fn(config),
    )
    batches = with_progress(loader, len(loader), "eval", enabled=progress)
    predictions = family.predict(model, batches, config, device, autocast_dtype(device, config.amp), False)
    results = family.results(predictions, config)
    metrics = evaluate_wholebody(ann_file, results)
    return EvalOutcome(metrics=metrics, results=results, num_boxes=len(dataset))


def apply_eval_settings(config, overrides: Sequence[str] | Mapping[str, object]):
    """``config`` (a ``TrainConfig``) with evaluation settings changed: ``["eval.nms_thr=0.7", ...]`` (values
    parsed as YAML) or a mapping ``{"eval.nms_thr": 0.7}``. Only ``EVAL_SETTING_KEYS`` may be changed (the
    rest describes the model the checkpoint holds); ``EvalError`` names a bad key or value."""
    if isinstance(overrides, Mapping):
        values = dict(overrides)
    else:
        values = {}
        for item in overrides:
            key, sep, text = str(item).partition("=")
            if not sep or not key.strip():
                raise EvalError(f"--set {item!r}: expected KEY=VALUE, e.g. eval.nms_thr=0.7")
            try:
                values[key.strip()] = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise EvalError(f"--set {item!r}: the value is not valid YAML: {err}") from err
    allowed = family_of(config).eval_setting_keys
    for key in values:
        if key not in allowed:
            raise EvalError(f"--set {key}: not an evaluation setting (they are: {', '.join(allowed)})")
    try:
        return config_from_dict(apply_overrides(config_to_dict(config), values), source="--set")
    except ConfigError as err:
        raise EvalError(str(err)) from err


def score_results_file(results_file: str | os.PathLike, ann_file: str | os.PathLike) -> EvalOutcome:
    """Score an existing COCO-WholeBody results file; errors name the file (e.g. ids not in ``ann_file``)."""
    path = Path(results_file)
    if not path.is_file():
        raise EvalError(f"results file {str(path)!r} does not exist (--results)")
    if not Path(ann_file).is_file():
        raise EvalError(f"annotation file {str(ann_file)!r} does not exist (--ann)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvalError(f"results file {str(path)!r} is not valid JSON: {err}") from err
    try:
        metrics = evaluate_wholebody(ann_file, results)
    except ValueError as err:
        raise EvalError(f"results file {str(path)!r}: {err}") from err
    return EvalOutcome(metrics=metrics, results=results, num_boxes=len(results))


__all__ = [
    "EvalOutcome",
    "apply_eval_settings",
    "build_eval_dataset",
    "evaluate_model",
    "score_results_file",
    "select_device",
    "with_progress",
]
