"""KAPAO labels: letterbox, pose objects and keypoint objects, flip, and the loss's ``[N, 6 + 3K]`` rows.

One image's labels travel through the pipeline as ``ObjectLabels`` (compact arrays in pixels of the current
image); only ``label_rows`` (called at collate time) builds the authors' row format that the loss reads.

Conventions (facts file, "Labels and augmentation"):
- Coordinates are continuous pixels with the image's top-left corner at (0, 0): a pixel column i spans
  [i, i + 1). A left-right flip maps x -> W - x (``np.fliplr`` moves column i to W - 1 - i, the same thing),
  the letterbox maps p -> p * ratio + pad, as YOLOv5.
- Pose object: every non-crowd person, box + K (x, y, v), also without labelled keypoints. Unlabelled
  keypoints (v = 0) carry x = y = 0.
- Keypoint object of class k + 1: every labelled keypoint (v > 0), a square centred on it. Its side is a
  fraction of the longest image side, ``bs_k * max(W, H)``: ``kp_bbox_mode = "fixed"``: ``bs_k = kp_bbox``
  (0.05, the paper); ``"sigma"`` (beyond the paper): ``bs_k = c * sigma_k`` with the OKS sigmas, the authors'
  commented-out per-keypoint list in ``hyp.kp.yaml`` (equal to the COCO sigmas, i.e. c = 1 for K = 17). The
  default c (``sigma_scale=None``) is ``kp_bbox / mean_k(sigma_k)`` over the K keypoints trained, so both
  modes have the same mean box size (the paper's tuned 0.05): c = 1.722 for K = 133, 0.747 for K = 17.
  After the letterbox (or a mosaic tile's resize to S) the side is ``bs_k * S`` input pixels; the random
  affine moves the centre but keeps that side, as the authors reset keypoint boxes after their affine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch

from trainer.datasets.keypoints import NUM_KEYPOINTS, SIGMAS, flip_index

GREY = 114  # YOLOv5's padding / border value
KP_BBOX_MODES: tuple[str, ...] = ("fixed", "sigma")
SUPPORTED_KEYPOINTS: tuple[int, ...] = (NUM_KEYPOINTS, 17)  # whole-body, or its first 17 (COCO body)


@dataclass
class ObjectLabels:
    """One image's objects in pixels of the current image.

    ``boxes [P, 4]`` float32 xyxy and ``keypoints [P, K, 3]`` float32 (x, y, v) of the pose objects,
    ``ann_ids [P]`` int64 (the annotation each pose came from, for tracing); keypoint objects:
    ``kp_classes [M]`` int64 (k + 1), ``kp_points [M, 2]`` float32 centres, ``kp_sides [M]`` float32 sides.
    """

    boxes: np.ndarray
    keypoints: np.ndarray
    ann_ids: np.ndarray
    kp_classes: np.ndarray
    kp_points: np.ndarray
    kp_sides: np.ndarray

    @property
    def num_keypoints(self) -> int:
        return int(self.keypoints.shape[1])

    def select(self, poses: np.ndarray | None = None, kp_objects: np.ndarray | None = None) -> ObjectLabels:
        """The poses and keypoint objects chosen by boolean masks (None keeps all)."""
        out = self
        if poses is not None:
            out = replace(
                out, boxes=out.boxes[poses], keypoints=out.keypoints[poses], ann_ids=out.ann_ids[poses]
            )
        if kp_objects is not None:
            out = replace(
                out,
                kp_classes=out.kp_classes[kp_objects],
                kp_points=out.kp_points[kp_objects],
                kp_sides=out.kp_sides[kp_objects],
            )
        return out


def empty_labels(num_keypoints: int) -> ObjectLabels:
    """No objects (an image without persons)."""
    return ObjectLabels(
        boxes=np.zeros((0, 4), np.float32),
        keypoints=np.zeros((0, num_keypoints, 3), np.float32),
        ann_ids=np.zeros(0, np.int64),
        kp_classes=np.zeros(0, np.int64),
        kp_points=np.zeros((0, 2), np.float32),
        kp_sides=np.zeros(0, np.float32),
    )


def concat_labels(parts: list[ObjectLabels], num_keypoints: int) -> ObjectLabels:
    """All objects of ``parts`` (the four tiles of a mosaic)."""
    if not parts:
        return empty_labels(num_keypoints)
    return ObjectLabels(
        **{
            name: np.concatenate([getattr(p, name) for p in parts])
            for name in ObjectLabels.__dataclass_fields__
        }
    )


def scale_labels(labels: ObjectLabels, ratio: float, pad: tuple[float, float]) -> ObjectLabels:
    """Labels under p -> p * ratio + pad (letterbox, mosaic placement); keypoint boxes scale with the image.

    Unlabelled keypoints stay at (0, 0)."""
    offset = np.asarray(pad, np.float32)
    keypoints = labels.keypoints.copy()
    labelled = keypoints[..., 2] > 0
    keypoints[..., :2] = np.where(labelled[..., None], keypoints[..., :2] * ratio + offset, 0.0)
    return replace(
        labels,
        boxes=(labels.boxes * ratio + np.tile(offset, 2)).astype(np.float32),
        keypoints=keypoints.astype(np.float32),
        kp_points=(labels.kp_points * ratio + offset).astype(np.float32),
        kp_sides=(labels.kp_sides * ratio).astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------------------
# Letterbox


def resize_long_side(
    image: np.ndarray, size: int, interpolation: int | None = None
) -> tuple[np.ndarray, float]:
    """Resize ``image`` so its longest side is ``size`` (aspect kept); returns ``(image, ratio)``.

    ``interpolation`` None: area averaging when shrinking, bilinear when enlarging (YOLOv5 validation;
    its training tiles use bilinear both ways, pass ``cv2.INTER_LINEAR``). The short side is rounded to
    whole pixels, so it is scaled by ``ratio`` to within half a pixel.
    """
    height, width = image.shape[:2]
    ratio = size / max(height, width)
    new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
    if (new_w, new_h) != (width, height):
        if interpolation is None:
            interpolation = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    return image, ratio


def letterbox(
    image: np.ndarray, input_size: int, interpolation: int | None = None
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Fit ``image`` into a grey (114) ``input_size`` square, aspect kept: ``(image, ratio, (pad_x, pad_y))``.

    A point p of the original image lands at ``p * ratio + pad`` (``letterbox_to_original`` inverts it).
    The pads are the whole pixels really added on the left / top (YOLOv5 reports half of the total, a
    float, half a pixel off the image when the total is odd).
    """
    if input_size <= 0 or input_size % 64:
        raise ValueError(f"input_size must be a positive multiple of 64 (stride 64), got {input_size!r}")
    resized, ratio = resize_long_side(image, input_size, interpolation)
    height, width = resized.shape[:2]
    pad_x, pad_y = (input_size - width) // 2, (input_size - height) // 2
    boxed = cv2.copyMakeBorder(
        resized,
        pad_y,
        input_size - height - pad_y,
        pad_x,
        input_size - width - pad_x,
        cv2.BORDER_CONSTANT,
        value=(GREY, GREY, GREY),
    )
    return boxed, ratio, (pad_x, pad_y)


def letterbox_to_original(points, ratio: float, pad) -> np.ndarray | torch.Tensor:
    """Input-image points ``[..., 2]`` (or xyxy boxes ``[..., 4]``) back to the original image:
    ``(p - pad) / ratio``.

    Works on NumPy arrays and on tensors (on their device)."""
    size = points.shape[-1]
    if isinstance(points, torch.Tensor):
        offset = torch.as_tensor(pad, dtype=points.dtype, device=points.device).repeat(size // 2)
    else:
        offset = np.tile(np.asarray(pad, dtype=np.float64), size // 2)
    return (points - offset) / ratio


# ----------------------------------------------------------------------------------------------------------
# Objects


def points_inside(points: np.ndarray, width: float, height: float) -> np.ndarray:
    """``[..., 2]`` points -> bool ``[...]``: inside the image, borders included (the authors' rule)."""
    x, y = points[..., 0], points[..., 1]
    return (x >= 0) & (y >= 0) & (x <= width) & (y <= height)


def keypoint_box_fractions(
    num_keypoints: int,
    kp_bbox: float = 0.05,
    kp_bbox_mode: str = "fixed",
    sigmas=None,
    sigma_scale: float | None = None,
) -> np.ndarray:
    """Keypoint-object box side per keypoint as a fraction of the longest image side, ``[K]`` float64.

    ``fixed``: ``kp_bbox`` for every keypoint (the paper). ``sigma``: ``c * sigma_k`` with ``sigmas``
    (default: the first K of ``trainer.datasets.keypoints.SIGMAS``) and ``c = sigma_scale``, by default
    ``kp_bbox / mean(sigma)`` (module docstring).
    """
    if kp_bbox_mode not in KP_BBOX_MODES:
        raise ValueError(f"kp_bbox_mode must be one of {KP_BBOX_MODES}, got {kp_bbox_mode!r}")
    if not kp_bbox > 0:
        raise ValueError(f"kp_bbox must be > 0, got {kp_bbox!r}")
    if kp_bbox_mode == "fixed":
        return np.full(num_keypoints, float(kp_bbox))
    sigma = np.asarray(SIGMAS[:num_keypoints] if sigmas is None else sigmas, dtype=np.float64)
    if sigma.shape != (num_keypoints,) or not (sigma > 0).all():
        raise ValueError(f"sigmas must be {num_keypoints} positive values, got shape {sigma.shape}")
    scale = kp_bbox / sigma.mean() if sigma_scale is None else float(sigma_scale)
    if not scale > 0:
        raise ValueError(f"kp_bbox_sigma_scale must be > 0, got {sigma_scale!r}")
    return scale * sigma


def pose_and_keypoint_objects(
    boxes,
    keypoints,
    image_wh: tuple[int, int],
    kp_bbox: float = 0.05,
    kp_bbox_mode: str = "fixed",
    sigmas=None,
    sigma_scale: float | None = None,
    iscrowd=None,
    ann_ids=None,
) -> ObjectLabels:
    """Objects of one image in its own pixels from COCO person annotations.

    ``boxes [P, 4]`` COCO xywh, ``keypoints [P, K, 3]``, ``image_wh`` the image's (W, H). Crowd persons
    (``iscrowd`` > 0) are neither pose nor keypoint objects. A pose object per remaining person whose box,
    clipped to the image, is not empty; a keypoint object of class k + 1 per labelled keypoint (v > 0) inside
    the image, of every remaining person, side ``bs_k * max(W, H)`` (``keypoint_box_fractions``).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    keypoints = np.asarray(keypoints, dtype=np.float32)
    num_people = len(boxes)
    num_keypoints = keypoints.shape[1] if keypoints.ndim == 3 else 0
    if keypoints.shape != (num_people, num_keypoints, 3) or num_keypoints not in SUPPORTED_KEYPOINTS:
        raise ValueError(
            f"keypoints must be [P, K, 3] with K in {SUPPORTED_KEYPOINTS}, got {keypoints.shape}"
        )
    keep = np.ones(num_people, bool) if iscrowd is None else np.asarray(iscrowd).reshape(-1) == 0
    ids = np.arange(num_people, dtype=np.int64) if ann_ids is None else np.asarray(ann_ids, np.int64)
    boxes, keypoints, ids = boxes[keep], keypoints[keep].copy(), ids[keep]
    width, height = image_wh

    x1 = np.clip(boxes[:, 0], 0, width)
    y1 = np.clip(boxes[:, 1], 0, height)
    x2 = np.clip(boxes[:, 0] + boxes[:, 2], 0, width)
    y2 = np.clip(boxes[:, 1] + boxes[:, 3], 0, height)
    xyxy = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    non_empty = (x2 > x1) & (y2 > y1)

    labelled = keypoints[..., 2] > 0
    keypoints[~labelled] = 0.0  # unlabelled: (0, 0, 0)
    # A keypoint object lives while its centre is in the image (also after augmentation).
    inside = labelled & points_inside(keypoints[..., :2], width, height)
    person, kind = np.nonzero(inside)  # row-major: person by person, keypoints in order
    fractions = keypoint_box_fractions(num_keypoints, kp_bbox, kp_bbox_mode, sigmas, sigma_scale)
    return ObjectLabels(
        boxes=xyxy[non_empty],
        keypoints=keypoints[non_empty],
        ann_ids=ids[non_empty],
        kp_classes=(kind + 1).astype(np.int64),
        kp_points=keypoints[person, kind, :2].astype(np.float32).reshape(-1, 2),
        kp_sides=(fractions[kind] * max(width, height)).astype(np.float32),
    )


def flip_permutation(num_keypoints: int) -> np.ndarray:
    """Left-right keypoint permutation: ``trainer.datasets.keypoints.flip_index()`` (its first 17 for K = 17,
    which
    the body's pairs keep closed)."""
    index = np.asarray(flip_index(), dtype=np.int64)[:num_keypoints]
    if num_keypoints not in SUPPORTED_KEYPOINTS or index.max() >= num_keypoints:
        raise ValueError(f"no flip permutation for {num_keypoints} keypoints")
    return index


def flip_labels(labels: ObjectLabels, width: float, flip_index_: np.ndarray | None = None) -> ObjectLabels:
    """Labels of the left-right mirrored image (x -> W - x).

    Pose keypoints are permuted by the flip pairs (the new "left wrist" is the mirrored right wrist) and a
    keypoint object's class c becomes ``flip[c - 1] + 1`` (facts file). Unlabelled keypoints stay (0, 0, 0).
    """
    index = flip_permutation(labels.num_keypoints) if flip_index_ is None else np.asarray(flip_index_)
    boxes = labels.boxes.copy()
    boxes[:, [0, 2]] = width - labels.boxes[:, [2, 0]]
    keypoints = labels.keypoints[:, index].copy()
    labelled = keypoints[..., 2] > 0
    keypoints[..., 0] = np.where(labelled, width - keypoints[..., 0], 0.0)
    points = labels.kp_points.copy()
    points[:, 0] = width - points[:, 0]
    return replace(
        labels,
        boxes=boxes,
        keypoints=keypoints,
        kp_classes=index[labels.kp_classes - 1] + 1,
        kp_points=points,
    )


def label_rows(
    boxes, keypoints, kp_classes, kp_points, kp_sides, image_index: int, input_size: int
) -> torch.Tensor:
    """The authors' target rows of one image, ``[P + M, 6 + 3K]`` float32 (the loss's contract).

    Row: image index in the batch, class (0 = pose object, k + 1 = keypoint object), box centre x, y and
    width, height, then K x (x, y, v); positions and sizes divided by ``input_size`` (the square input).
    Pose rows first, then keypoint-object rows, whose K keypoints are all zero (so they add nothing to the
    keypoint loss). Accepts NumPy arrays or CPU tensors (``ObjectLabels`` fields or a sample's tensors).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    keypoints = torch.as_tensor(keypoints, dtype=torch.float32)
    num_poses, num_keypoints = keypoints.shape[0], keypoints.shape[1]
    kp_classes = torch.as_tensor(kp_classes).reshape(-1)
    kp_points = torch.as_tensor(kp_points, dtype=torch.float32).reshape(-1, 2)
    kp_sides = torch.as_tensor(kp_sides, dtype=torch.float32).reshape(-1)
    num_kp_objects = len(kp_classes)
    rows = torch.zeros((num_poses + num_kp_objects, 6 + 3 * num_keypoints), dtype=torch.float32)
    rows[:, 0] = float(image_index)
    scale = 1.0 / float(input_size)

    poses = rows[:num_poses]
    poses[:, 2:4] = (boxes[:, :2] + boxes[:, 2:]) * (0.5 * scale)
    poses[:, 4:6] = (boxes[:, 2:] - boxes[:, :2]) * scale
    pose_keypoints = keypoints.clone()
    pose_keypoints[..., :2] *= scale
    poses[:, 6:] = pose_keypoints.reshape(num_poses, 3 * num_keypoints)

    objects = rows[num_poses:]
    objects[:, 1] = kp_classes.to(torch.float32)
    objects[:, 2:4] = kp_points * scale
    objects[:, 4] = kp_sides * scale
    objects[:, 5] = kp_sides * scale
    return rows


__all__ = [
    "GREY",
    "KP_BBOX_MODES",
    "ObjectLabels",
    "concat_labels",
    "empty_labels",
    "flip_labels",
    "flip_permutation",
    "keypoint_box_fractions",
    "label_rows",
    "letterbox",
    "letterbox_to_original",
    "points_inside",
    "pose_and_keypoint_objects",
    "resize_long_side",
    "scale_labels",
]
