"""Top-down inference of a trained model: flip test + DARK decoding, rescoring + OKS-NMS, and scoring.

One path for the training loop's validation, ``fowkal eval`` and ``fowkal show``: ``predict_keypoints``
turns a loader of test crops into image-space keypoints, ``results_from_predictions`` into COCO-WholeBody
results (instance rescoring and per-image OKS-NMS, applied to GT boxes as well, as MMPose and the paper do),
and ``evaluate_model`` runs both on a data set and scores them with xtcocotools.

Devices: ``select_device(gpus)``: 0 = CPU, 1 = ``cuda:0`` (the default when CUDA is available), N > 1 splits
every batch over ``cuda:0..N-1`` with ``torch.nn.DataParallel`` (one process; simple, and the data loading,
not the model, is the usual bottleneck of top-down evaluation).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from trainer.checkpoint import EvalError, LoadedCheckpoint
from trainer.codec import decode_dark, flip_back_heatmaps, heatmap_to_image_coords
from trainer.config import (
    EVAL_SETTING_KEYS,
    ConfigError,
    EvalConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)
from trainer.data import WholeBodyTopDownDataset
from trainer.evaluate import detections_to_results, evaluate_wholebody
from trainer.keypoints import NUM_KEYPOINTS
from trainer.model import PoseModel


@torch.no_grad()
def predict_keypoints(
    model: PoseModel,
    loader: DataLoader,
    device: torch.device,
    flip_test: bool = True,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    flip_mode: str = EvalConfig.flip_mode,
    blur_kernel: int = EvalConfig.blur_kernel,
) -> dict[str, np.ndarray]:
    """Top-down inference over ``loader``: (flip-test averaged) heatmaps -> DARK -> image coordinates.

    ``flip_mode`` is how the mirrored heatmaps are put back (``trainer.codec.flip_back_heatmaps``), for
    the model's own stride (input width / heatmap width); ``blur_kernel`` is DARK's (``decode_dark``).

    Returns NumPy arrays ``image_ids [N]``, ``keypoints [N,K,2]`` (image pixels), ``keypoint_scores [N,K]``,
    ``box_scores [N]`` and ``areas [N]`` (crop scale w x h, the OKS-NMS area as MMPose), ready for
    ``trainer.evaluate.detections_to_results``.
    """
    model.eval()
    out: dict[str, list] = {
        "image_ids": [],
        "keypoints": [],
        "keypoint_scores": [],
        "box_scores": [],
        "areas": [],
    }
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            heatmaps = model(images)[0].float()
            flipped = model(images.flip(-1))[0].float() if flip_test else None
        stride = images.shape[-1] / heatmaps.shape[-1]
        scale = batch["scale"].cpu().numpy()
        keypoints, scores = decode_heatmaps(
            heatmaps, flipped, batch["center"].cpu().numpy(), scale, flip_mode, stride, blur_kernel
        )
        out["keypoints"].append(keypoints)
        out["keypoint_scores"].append(scores)
        out["image_ids"].append(np.asarray(batch["image_id"]).reshape(-1))
        out["box_scores"].append(np.asarray(batch["bbox_score"], dtype=np.float64).reshape(-1))
        out["areas"].append(scale[:, 0].astype(np.float64) * scale[:, 1])
    if not out["image_ids"]:
        return {
            "image_ids": np.zeros(0, np.int64),
            "keypoints": np.zeros((0, NUM_KEYPOINTS, 2), np.float32),
            "keypoint_scores": np.zeros((0, NUM_KEYPOINTS), np.float32),
            "box_scores": np.zeros(0),
            "areas": np.zeros(0),
        }
    return {key: np.concatenate(value) for key, value in out.items()}


def decode_heatmaps(
    heatmaps: torch.Tensor,
    flipped: torch.Tensor | None,
    center: np.ndarray,
    scale: np.ndarray,
    flip_mode: str = EvalConfig.flip_mode,
    stride: float = 4,
    blur_kernel: int = EvalConfig.blur_kernel,
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps of a batch of crops (and of their mirrors, or None) -> image keypoints ``[N, K, 2]`` and
    keypoint scores ``[N, K]``: the flip-test average, DARK, the inverse crop affine.

    The one decoding path of ``predict_keypoints`` and of the cached heatmaps (``trainer.heatmap_cache``),
    so a cached trial gives the numbers ``fowkal eval`` gives.
    """
    if flipped is not None:  # paper: average of the heatmaps of the image and of its mirror
        heatmaps = 0.5 * (heatmaps + flip_back_heatmaps(flipped, mode=flip_mode, stride=stride))
    coords, scores = decode_dark(heatmaps, blur_kernel=blur_kernel)
    heatmap_size = (heatmaps.shape[-1], heatmaps.shape[-2])
    keypoints = heatmap_to_image_coords(coords, center, scale, heatmap_size)
    return keypoints, scores.cpu().numpy()


def results_from_predictions(
    predictions: dict[str, np.ndarray], settings: EvalConfig | None = None
) -> list[dict]:
    """``predict_keypoints`` output -> COCO-WholeBody result dicts (rescoring + OKS-NMS, as MMPose), with
    the rescoring threshold and OKS-NMS threshold of ``settings`` (default: ``EvalConfig()``'s)."""
    settings = EvalConfig() if settings is None else settings
    return detections_to_results(
        predictions["image_ids"],
        predictions["keypoints"],
        predictions["keypoint_scores"],
        predictions["box_scores"],
        predictions["areas"],
        keypoint_score_thr=settings.rescore_keypoint_thr,
        nms_thr=settings.nms_thr,
    )


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """Mixed-precision dtype for ``amp`` ("auto", "bf16", "fp16", "none") on ``device``: CUDA only, else None.

    "auto" takes bf16 where the GPU supports it (no loss scaling needed), else fp16.
    """
    if device.type != "cuda" or amp == "none":
        return None
    use_bf16 = amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported())
    return torch.bfloat16 if use_bf16 else torch.float16


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


def build_eval_dataset(config, ann_file, image_dir, det_file=None, det_score_thr: float = 0.0):
    """The test-mode ``WholeBodyTopDownDataset`` with the run's pipeline; errors name the missing path."""
    if not Path(ann_file).is_file():
        raise EvalError(f"annotation file {str(ann_file)!r} does not exist (--ann)")
    if not Path(image_dir).is_dir():
        raise EvalError(f"image directory {str(image_dir)!r} does not exist (--images)")
    if det_file is not None and not Path(det_file).is_file():
        raise EvalError(f"detection file {str(det_file)!r} does not exist (--det-file)")
    return WholeBodyTopDownDataset(
        ann_file,
        image_dir,
        config=config.data.pipeline,
        train=False,
        det_file=det_file,
        det_score_thr=det_score_thr,
        cache_dir=config.data.cache_dir,
        gt_instances=config.data.gt_instances,
    )


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
    """Top-down inference (flip test + DARK) -> rescoring + OKS-NMS -> COCO-WholeBody AP/AR.

    ``batch_size`` / ``workers`` / ``flip_mode`` / ``det_score_thr`` default to the run's
    ``data.val_batch_size`` / ``data.loader_workers`` / ``eval.flip_mode`` / ``data.det_score_thr``; DARK's
    kernel, the rescoring and OKS-NMS thresholds are the run config's ``eval.*``
    (``apply_eval_settings`` changes them).
    """
    config = loaded.config
    flip_mode = config.eval.flip_mode if flip_mode is None else flip_mode
    det_score_thr = config.data.det_score_thr if det_score_thr is None else det_score_thr
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
    )
    batches = with_progress(loader, len(loader), "eval", enabled=progress)
    predictions = predict_keypoints(
        model,
        batches,
        device,
        flip_test,
        autocast_dtype(device, config.amp),
        False,
        flip_mode,
        config.eval.blur_kernel,
    )
    results = results_from_predictions(predictions, config.eval)
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
    for key in values:
        if key not in EVAL_SETTING_KEYS:
            raise EvalError(
                f"--set {key}: not an evaluation setting (they are: {', '.join(EVAL_SETTING_KEYS)})"
            )
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
    "autocast_dtype",
    "decode_heatmaps",
    "build_eval_dataset",
    "evaluate_model",
    "predict_keypoints",
    "results_from_predictions",
    "score_results_file",
    "select_device",
    "with_progress",
]
