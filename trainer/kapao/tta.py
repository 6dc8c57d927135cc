"""KAPAO's test-time augmentation, as the authors run it (their ``models/yolo.py``: ``forward_augment``,
``_descale_pred``; ``utils/torch_utils.py``: ``scale_img``).

Each pass of a mode (``trainer.kapao.postprocess.TTA_MODES``: scale, left-right flip) runs the network on the
batch resized by the scale (bilinear, padded at the right and bottom to a multiple of the coarsest stride with
the authors' 0.447) and, when flipped, mirrored. Its candidates are put back into the un-augmented input:
coordinates divided by the scale; mirrored ones at ``x -> W - x`` with the keypoints permuted by their
left-right pairs and a keypoint object's class replaced by its mirror's (the authors permute the class scores
before the arg-max: the same class). The passes' candidates are concatenated before NMS, as the authors
concatenate the passes' predictions.

Used by ``fowkal eval`` (``trainer.kapao.family.predict_poses``) and by the candidate cache of ``fowkal
tune-eval`` (``trainer.kapao.candidate_cache``): one function, so both see the same candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from trainer.datasets.keypoints import flip_index
from trainer.kapao.anchors import STRIDES
from trainer.kapao.postprocess import TTA_MODES, Candidates, candidates

PAD_VALUE = 0.447  # the authors' scale_img padding (the ImageNet mean)


def scale_images(images: torch.Tensor, ratio: float, multiple: int = int(max(STRIDES))) -> torch.Tensor:
    """``[B, 3, H, W]`` resized by ``ratio`` and padded to a multiple of ``multiple`` (the authors' rule)."""
    if ratio == 1.0:
        return images
    height, width = images.shape[2:]
    size = (int(height * ratio), int(width * ratio))
    scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    padded_h, padded_w = (math.ceil(x * ratio / multiple) * multiple for x in (height, width))
    return F.pad(scaled, [0, padded_w - size[1], 0, padded_h - size[0]], value=PAD_VALUE)


def undo_augmentation(cands: Candidates, scale: float, flipped: bool, width: float) -> Candidates:
    """One pass's candidates in the un-augmented input's pixels (``width``: its width)."""
    pose_boxes, kp_boxes = cands.pose_boxes / scale, cands.kp_boxes / scale
    pose_keypoints, kp_classes = cands.pose_keypoints / scale, cands.kp_classes
    if flipped:
        mirror = torch.as_tensor(flip_index()[: cands.num_keypoints], device=kp_classes.device)
        pose_boxes, kp_boxes = _mirror_boxes(pose_boxes, width), _mirror_boxes(kp_boxes, width)
        pose_keypoints = torch.stack([width - pose_keypoints[..., 0], pose_keypoints[..., 1]], dim=-1)
        pose_keypoints = pose_keypoints[:, mirror]
        kp_classes = mirror[kp_classes]
    return Candidates(pose_boxes, cands.pose_scores, pose_keypoints, kp_boxes, cands.kp_scores, kp_classes)


def _mirror_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Boxes x1, y1, x2, y2 of a mirrored image, in the image's own pixels: ``x -> W - x``."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def merge(passes: list[Candidates]) -> Candidates:
    """One image's candidates of every pass, concatenated in pass order."""
    if len(passes) == 1:
        return passes[0]
    names = list(Candidates.__dataclass_fields__)
    return Candidates(*(torch.cat([getattr(c, name) for c in passes]) for name in names))


def augmented_candidates(
    forward: Callable[[torch.Tensor], list[torch.Tensor]],
    images: torch.Tensor,
    tta: str,
    pose_floor: float,
    keypoint_floor: float,
) -> list[Candidates]:
    """Per image of ``images`` (float ``[B, 3, H, W]``), the candidates of every pass of ``tta`` above the
    floors, merged (module docstring). ``forward(x)``: the network's raw per-stride outputs, float32."""
    passes = []
    for scale, flipped in TTA_MODES[tta]:
        x = scale_images(images.flip(-1) if flipped else images, scale)
        found = candidates(forward(x), pose_floor, keypoint_floor)
        if scale != 1.0 or flipped:
            found = [undo_augmentation(c, scale, flipped, float(images.shape[-1])) for c in found]
        passes.append(found)
    return [merge(list(per_image)) for per_image in zip(*passes, strict=True)]


__all__ = ["PAD_VALUE", "augmented_candidates", "merge", "scale_images", "undo_augmentation"]
