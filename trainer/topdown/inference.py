"""Top-down inference of a trained model: flip test + DARK decoding, rescoring + OKS-NMS.

One path for the training loop's validation, ``fowkal eval`` and ``fowkal show``: ``predict_keypoints``
turns a loader of test crops into image-space keypoints, ``results_from_predictions`` into COCO-WholeBody
results (instance rescoring and per-image OKS-NMS, applied to GT boxes as well, as MMPose and the paper do).
Running it over a data set and scoring it (``evaluate_model``) is shared by the families:
``trainer.evaluation.model_eval``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer.datasets.keypoints import NUM_KEYPOINTS
from trainer.evaluation.wholebody import detections_to_results
from trainer.topdown.codec import decode_dark, flip_back_heatmaps, heatmap_to_image_coords
from trainer.topdown.config import EvalConfig
from trainer.topdown.model import PoseModel


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

    ``flip_mode`` is how the mirrored heatmaps are put back (``trainer.topdown.codec.flip_back_heatmaps``),
    for
    the model's own stride (input width / heatmap width); ``blur_kernel`` is DARK's (``decode_dark``).

    Returns NumPy arrays ``image_ids [N]``, ``keypoints [N,K,2]`` (image pixels), ``keypoint_scores [N,K]``,
    ``box_scores [N]`` and ``areas [N]`` (crop scale w x h, the OKS-NMS area as MMPose), ready for
    ``trainer.evaluation.wholebody.detections_to_results``.
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

    The one decoding path of ``predict_keypoints`` and of the cached heatmaps
    (``trainer.topdown.heatmap_cache``),
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


__all__ = ["decode_heatmaps", "predict_keypoints", "results_from_predictions"]
