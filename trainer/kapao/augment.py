"""KAPAO training augmentation: the YOLOv5-P6 recipe of the authors' ``hyp.kp-p6.yaml``.

Per sample (facts file, "Labels and augmentation"): with probability ``mosaic`` four images (the sample's
and three drawn at random), each resized so its longest side is S, are tiled around a random centre in a
2S x 2S grey canvas; otherwise the one image is letterboxed to S. A random affine (scale gain in
``[1 - scale, 1 + scale]`` = 0.1-1.9, translation of the centre by up to ``translate`` of S, no rotation,
shear or perspective) maps it to S x S, then HSV gains (hue, saturation, value) and a left-right flip
(p ``fliplr``). All randomness comes from the NumPy ``Generator`` passed in: the same seed, the same sample.

What happens to the objects (our rules, where YOLOv5's ``box_candidates`` would drop whole-body objects):
- Keypoints pushed out of the image get v = 0 (and x = y = 0); so do keypoints of a mosaic tile's image
  that fall outside the part of it placed on the canvas.
- A keypoint object lives while its centre is in the image. Its side stays ``bs_k * S`` (the authors reset
  keypoint boxes to their nominal size after the affine); it is not dropped below 2 px as YOLOv5's rule
  would, which at a 0.1 scale gain removes every whole-body face box. Its box is not clipped either (a
  clipped box would move its centre off the keypoint).
- A person box is clipped to the image and kept when it stays at least ``MIN_BOX_SIDE`` px wide and high
  with an aspect ratio below ``MAX_ASPECT`` (YOLOv5's rule) and either keeps more than ``MIN_AREA_RATIO`` of
  its scaled area (YOLOv5's rule) or still holds a labelled keypoint in the image: COCO boxes a truncated
  person by its visible part, so a person cut by the mosaic or the border with visible labelled keypoints
  stays a pose object (YOLOv5 would drop it below 10% of its area, teaching "no person" there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import cv2
import numpy as np

from trainer.kapao.labels import (
    GREY,
    ObjectLabels,
    concat_labels,
    flip_labels,
    letterbox,
    points_inside,
    scale_labels,
)

# Person-box survival after the affine (YOLOv5's box_candidates: wh_thr, area_thr, ar_thr).
MIN_BOX_SIDE = 2.0
MIN_AREA_RATIO = 0.1
MAX_ASPECT = 20.0


@dataclass
class KapaoAugmentConfig:
    """The P6 recipe (``hyp.kp-p6.yaml``); part of the KAPAO ``data:`` section via ``KapaoPipelineConfig``."""

    hsv_h: float = 0.015  # hue gain range (fraction)
    hsv_s: float = 0.7  # saturation gain range
    hsv_v: float = 0.4  # value gain range
    translate: float = 0.1  # centre shift, fraction of the input size
    scale: float = 0.9  # scale gain in [1 - scale, 1 + scale]
    fliplr: float = 0.5  # left-right flip probability
    mosaic: float = 1.0  # 4-image mosaic probability

    def __post_init__(self) -> None:
        for name in ("hsv_h", "hsv_s", "hsv_v", "translate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not 0.0 <= self.scale < 1.0:
            raise ValueError(f"scale must be in [0, 1) (gain 1 +- scale stays positive), got {self.scale!r}")
        for name in ("fliplr", "mosaic"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def augment_hsv(image: np.ndarray, config: KapaoAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Random hue / saturation / value gains ``1 + U(-1, 1) * (hsv_h, hsv_s, hsv_v)`` on a BGR uint8 image,
    through lookup tables (OpenCV's hue runs 0-179 and wraps)."""
    gains = rng.uniform(-1.0, 1.0, 3) * (config.hsv_h, config.hsv_s, config.hsv_v) + 1.0
    if np.all(gains == 1.0):
        return image
    hue, saturation, value = cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    levels = np.arange(256, dtype=np.float64)
    lut_hue = ((levels * gains[0]) % 180).astype(np.uint8)
    lut_saturation = np.clip(levels * gains[1], 0, 255).astype(np.uint8)
    lut_value = np.clip(levels * gains[2], 0, 255).astype(np.uint8)
    merged = cv2.merge(
        (cv2.LUT(hue, lut_hue), cv2.LUT(saturation, lut_saturation), cv2.LUT(value, lut_value))
    )
    return cv2.cvtColor(merged, cv2.COLOR_HSV2BGR)


def clip_to_region(labels: ObjectLabels, x1: float, y1: float, x2: float, y2: float) -> ObjectLabels:
    """Objects restricted to the rectangle: boxes clipped (empty ones dropped), keypoints outside -> v = 0,
    keypoint objects with their centre outside dropped (a mosaic tile's placed part)."""
    clipped, non_empty = _clip(labels, x1, y1, x2, y2)
    return clipped.select(poses=non_empty)


def _clip(
    labels: ObjectLabels, x1: float, y1: float, x2: float, y2: float
) -> tuple[ObjectLabels, np.ndarray]:
    """``clip_to_region`` without dropping persons: the clipped labels and which boxes are non-empty."""
    boxes = labels.boxes.copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(x1, x2)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(y1, y2)
    offset = np.array([x1, y1], np.float32)
    keypoints = _invalidate_outside(labels.keypoints, offset, x2 - x1, y2 - y1)
    non_empty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    centres_in = points_inside(labels.kp_points - offset, x2 - x1, y2 - y1)
    return replace(labels, boxes=boxes, keypoints=keypoints).select(kp_objects=centres_in), non_empty


def _invalidate_outside(keypoints: np.ndarray, offset: np.ndarray, width: float, height: float) -> np.ndarray:
    """Keypoints outside ``[offset, offset + (width, height)]`` become (0, 0, 0)."""
    out = keypoints.copy()
    gone = (out[..., 2] > 0) & ~points_inside(out[..., :2] - offset, width, height)
    out[gone] = 0.0
    return out


def mosaic4(
    tiles: list[tuple[np.ndarray, ObjectLabels]], input_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, ObjectLabels]:
    """YOLOv5's 4-mosaic: ``tiles`` (images already resized to longest side S, labels in their pixels) are
    placed top-left, top-right, bottom-left, bottom-right of a centre drawn in [S/2, 3S/2]^2 on a 2S x 2S
    grey canvas; the parts beyond the canvas are cut (with their objects, ``clip_to_region``)."""
    if len(tiles) != 4:
        raise ValueError(f"mosaic4 needs 4 tiles, got {len(tiles)}")
    size = input_size
    canvas = np.full((2 * size, 2 * size, tiles[0][0].shape[2]), GREY, dtype=np.uint8)
    xc, yc = (int(rng.uniform(size * 0.5, size * 1.5)) for _ in range(2))
    placed = []
    for position, (image, labels) in enumerate(tiles):
        h, w = image.shape[:2]
        if position == 0:  # top left: its bottom-right corner at the centre
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b = w - (x2a - x1a), h - (y2a - y1a)
        elif position == 1:  # top right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * size), yc
            x1b, y1b = 0, h - (y2a - y1a)
        elif position == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * size, yc + h)
            x1b, y1b = w - (x2a - x1a), 0
        else:  # bottom right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * size), min(2 * size, yc + h)
            x1b, y1b = 0, 0
        canvas[y1a:y2a, x1a:x2a] = image[y1b : y1b + (y2a - y1a), x1b : x1b + (x2a - x1a)]
        shifted = scale_labels(labels, 1.0, (x1a - x1b, y1a - y1b))
        placed.append(clip_to_region(shifted, x1a, y1a, x2a, y2a))
    return canvas, concat_labels(placed, tiles[0][1].num_keypoints)


def random_affine(
    image: np.ndarray,
    labels: ObjectLabels,
    output_size: int,
    config: KapaoAugmentConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, ObjectLabels]:
    """Scale by a gain in ``[1 - scale, 1 + scale]`` about the image centre and put that centre at
    ``U(0.5 - translate, 0.5 + translate) * output_size`` (each axis): YOLOv5's ``random_perspective`` with
    the P6 recipe's zero rotation, shear and perspective. Objects follow the module docstring's rules."""
    height, width = image.shape[:2]
    gain = rng.uniform(1.0 - config.scale, 1.0 + config.scale)
    target = rng.uniform(0.5 - config.translate, 0.5 + config.translate, 2) * output_size
    offset = target - gain * np.array([width * 0.5, height * 0.5])
    # The labels map p -> gain * p + offset in continuous pixels (corner at 0); cv2 samples pixel centres
    # (p - 0.5), hence the half-pixel terms, so the image moves exactly with its labels.
    matrix = np.array(
        [[gain, 0.0, offset[0] + 0.5 * gain - 0.5], [0.0, gain, offset[1] + 0.5 * gain - 0.5]], np.float64
    )
    warped = cv2.warpAffine(
        image,
        matrix,
        (output_size, output_size),
        flags=cv2.INTER_LINEAR,
        borderValue=(GREY, GREY, GREY),
    )

    moved = scale_labels(labels, gain, (float(offset[0]), float(offset[1])))
    moved = replace(moved, kp_sides=labels.kp_sides)  # keypoint boxes keep their nominal side (bs_k * S)
    scaled_area = (moved.boxes[:, 2] - moved.boxes[:, 0]) * (moved.boxes[:, 3] - moved.boxes[:, 1])
    clipped, _ = _clip(moved, 0.0, 0.0, float(output_size), float(output_size))
    # YOLOv5's candidate rule, relaxed for persons that keep a labelled keypoint (module docstring).
    box_w = clipped.boxes[:, 2] - clipped.boxes[:, 0]
    box_h = clipped.boxes[:, 3] - clipped.boxes[:, 1]
    aspect = np.maximum(box_w / (box_h + 1e-16), box_h / (box_w + 1e-16))
    area_ratio = box_w * box_h / (scaled_area + 1e-16)
    has_keypoint = (clipped.keypoints[..., 2] > 0).any(axis=1)
    keep = (
        (box_w > MIN_BOX_SIDE)
        & (box_h > MIN_BOX_SIDE)
        & (aspect < MAX_ASPECT)
        & ((area_ratio > MIN_AREA_RATIO) | has_keypoint)
    )
    return warped, clipped.select(poses=keep)


def augment_sample(
    load: Callable[[int], tuple[np.ndarray, ObjectLabels]],
    index: int,
    num_images: int,
    input_size: int,
    config: KapaoAugmentConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, ObjectLabels, bool]:
    """One training sample: ``(BGR uint8 image [S, S, 3], labels in its pixels, flipped)``.

    ``load(i)`` returns image i resized so its longest side is ``input_size`` (bilinear, as YOLOv5's
    training) and its labels in those pixels; the mosaic's three other images are drawn uniformly from
    ``range(num_images)`` (YOLOv5: ``random.choices``).
    """
    if rng.random() < config.mosaic:
        others = rng.integers(0, num_images, 3)
        tiles = [load(index)] + [load(int(i)) for i in others]
        image, labels = mosaic4(tiles, input_size, rng)
    else:
        tile, labels = load(index)
        image, ratio, pad = letterbox(tile, input_size)  # ratio 1: the tile is already S on its long side
        labels = scale_labels(labels, ratio, pad)
    image, labels = random_affine(image, labels, input_size, config, rng)
    image = augment_hsv(image, config, rng)
    flipped = bool(rng.random() < config.fliplr)
    if flipped:
        image = cv2.flip(image, 1)  # column i -> W - 1 - i (30x faster than a NumPy copy of image[:, ::-1])
        labels = flip_labels(labels, float(input_size))
    return image, labels, flipped


__all__ = [
    "KapaoAugmentConfig",
    "MAX_ASPECT",
    "MIN_AREA_RATIO",
    "MIN_BOX_SIDE",
    "augment_hsv",
    "augment_sample",
    "clip_to_region",
    "mosaic4",
    "random_affine",
]
