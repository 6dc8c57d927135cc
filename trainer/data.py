"""COCO-WholeBody v1.0 reading and the top-down training / test pipeline.

Reading: ``load_wholebody_annotations`` parses the published v1.0 annotation file unchanged
(``keypoints`` 17x3, ``foot_kpts`` 6x3, ``face_kpts`` 68x3, ``lefthand_kpts`` 21x3, ``righthand_kpts`` 21x3,
``*_valid``, ``*_box``, ``bbox``, ``area``, ``iscrowd``, ``num_keypoints``) into ``[133, 3]`` arrays in
``trainer.keypoints`` order; ``load_detections`` reads a person-detection results file (e.g. the AP_H 56
boxes used by MMPose and the paper). Anything malformed raises ``DatasetError`` naming the file and the
annotation id / field / value.

Pipeline (paper, Implementation Details; MMPose defaults where the paper is silent): box -> centre/scale at
the input aspect ratio with padding 1.25 -> [train] half-body (p 0.3), random scale [0.5, 1.5], random
rotation [-40, 40] deg (p 0.6), random flip (p 0.5) -> one ``cv2.warpAffine`` to the input size -> ImageNet
normalisation -> DARK unbiased Gaussian targets (``trainer.codec.encode_unbiased``, sigma 2) on 48x64.

Sampling facts and choices (documented because MMPose versions differ):
- Scale and rotation are drawn from a normal truncated to +-1 standard deviation and stretched to the
  ranges, as MMPose 1.x ``RandomBBoxTransform`` does, so they stay inside the paper's ranges [0.5, 1.5] and
  [-40, 40] deg. MMPose 0.x (``TopDownGetRandomScaleRotation(rot_factor=40, scale_factor=0.5,
  rot_prob=0.6)``) instead clips N(0, 40) at +-80 deg and N(1, 0.5) at [0.5, 1.5]. Rotation is applied with
  probability 0.6 in both MMPose versions (``rot_prob``); scale always.
- Visibility: a keypoint is labelled when its third value is > 0 (the real file has fractional hand scores
  and 1.0 for faces; MMPose 1.x also uses ``v > 0``). Unlabelled keypoints get target weight 0.
- Half-body (MMPose: ``num_joints_half_body=8``, ``prob_half_body=0.3``, box padding 1.5, upper half
  preferred ~70% of the time). For whole-body we decide: the upper half carries body keypoints 0-10 (head,
  shoulders, elbows, wrists) plus the face and both hands; the lower half carries body keypoints 11-16
  (hips, knees, ankles) plus the feet. Eligibility and the "enough keypoints in this half" checks count
  *body* keypoints only (>= 9 labelled of 17, >= 3 in the chosen half), otherwise 68 face points would
  always qualify. The half-body box bounds all labelled keypoints of the chosen half; its centre is the box
  centre, not the keypoint mean (MMPose), because the mean would be dragged onto the 68 face / 42 hand
  points.
- Flip is composed into the affine matrix: the warped crop is mirrored about its own centre, which is
  exactly ``crop.flip(-1)`` (pixel x -> W - 1 - x), and keypoints are permuted with
  ``trainer.keypoints.flip_index()``. The test-time crop is the plain, centred warp, so the evaluation
  loop's ``image.flip(-1)`` plus ``trainer.codec.flip_back_heatmaps`` is the matching flip test.
- Missing images: ``missing_images="error"`` (default) raises ``DatasetError`` at construction naming the
  first missing files, their annotation ids and the count; ``"skip"`` drops their samples and logs a warning
  with the count (also kept in ``num_skipped_missing_images``). An image that exists but cannot be decoded
  raises ``DatasetError`` when read.
- Training / GT-box evaluation samples: non-crowd instances with at least one labelled keypoint (any of
  133) and a non-empty box after clipping to the image (MMPose). Detection samples: ``category_id == 1``
  (when present), ``score >= det_score_thr``, positive width and height.
- DataLoader workers: the dataset holds only NumPy arrays, strings and the config (no open files);
  augmentation randomness comes from a NumPy generator seeded from ``get_worker_info().seed`` (different
  per worker and per epoch) or, in the main process, from torch's global generator (reproducible with
  ``torch.manual_seed``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from trainer.geometry import apply_affine, box_to_center_scale, get_warp_matrix
from trainer.keypoints import ANNOTATION_KEYPOINT_FIELDS, NUM_KEYPOINTS, PART_RANGES, flip_index

logger = logging.getLogger(__name__)

# OpenCV's own thread pool does not survive fork(): a DataLoader worker forked while the parent's pool
# exists deadlocks on its first cv2 call (seen here with cv2.setNumThreads in a worker). Parallelism comes
# from DataLoader workers, so OpenCV runs single-threaded in every process, as MMEngine also sets it.
cv2.setNumThreads(0)

# Half-body groups (see module docstring). Body indices: 0-10 head/arms, 11-16 hips/legs.
UPPER_BODY_IDS: tuple[int, ...] = (
    tuple(range(0, 11))
    + tuple(range(*PART_RANGES["face"]))
    + tuple(range(*PART_RANGES["lefthand"]))
    + tuple(range(*PART_RANGES["righthand"]))
)
LOWER_BODY_IDS: tuple[int, ...] = tuple(range(11, 17)) + tuple(range(*PART_RANGES["foot"]))
_UPPER_BODY_BODY_IDS = np.arange(0, 11)
_LOWER_BODY_BODY_IDS = np.arange(11, 17)

_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_ANNOTATION_FIELDS = ("id", "image_id", "bbox", "area", "iscrowd") + tuple(
    name for name, _ in ANNOTATION_KEYPOINT_FIELDS
)


class DatasetError(ValueError):
    """Malformed or missing data; the message names the file and the annotation id / field / value."""


@dataclass
class PipelineConfig:
    """All parameters of the top-down pipeline. Sizes are (w, h), as OpenCV expects."""

    input_size: tuple[int, int] = (192, 256)
    heatmap_size: tuple[int, int] = (48, 64)
    sigma: float = 2.0
    padding: float = 1.25
    flip_prob: float = 0.5
    half_body_prob: float = 0.3
    # At least this many labelled *body* keypoints (of 17) to try half-body (MMPose 0.x: > 8; 1.x: >= 9).
    min_keypoints_half_body: int = 9
    # At least this many labelled body keypoints inside the chosen half (MMPose 0.x: > 2).
    min_keypoints_per_half: int = 3
    half_body_upper_prob: float = 0.7
    half_body_padding: float = 1.5
    # Scale factor in [lo, hi] (truncated normal centred on the middle), always applied.
    scale_range: tuple[float, float] = (0.5, 1.5)
    # Rotation in [-rot_range, rot_range] deg (truncated normal, std = rot_range), with probability rot_prob.
    rot_range: float = 40.0
    rot_prob: float = 0.6
    # Random centre shift as a fraction of the box scale (MMPose 1.x: 0.16 with p 0.3; the paper's MMPose 0.x
    # recipe has none, so it is off by default).
    shift_factor: float = 0.0
    shift_prob: float = 0.3
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        for name in ("input_size", "heatmap_size"):
            value = tuple(getattr(self, name))
            if len(value) != 2 or any(int(v) <= 0 for v in value):
                raise ValueError(f"PipelineConfig.{name} must be two positive ints (w, h), got {value!r}")
            setattr(self, name, (int(value[0]), int(value[1])))
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(
                f"PipelineConfig.scale_range must satisfy 0 < lo <= hi, got {self.scale_range!r}"
            )
        for name in ("flip_prob", "half_body_prob", "half_body_upper_prob", "rot_prob", "shift_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"PipelineConfig.{name} must be a probability in [0, 1], got {value!r}")
        if self.sigma <= 0 or self.padding <= 0 or self.half_body_padding <= 0:
            raise ValueError(
                "PipelineConfig.sigma, padding and half_body_padding must be positive, got "
                f"{self.sigma!r}, {self.padding!r}, {self.half_body_padding!r}"
            )


@dataclass
class ImageRecord:
    """One entry of ``images``."""

    image_id: int
    file_name: str
    width: int
    height: int


@dataclass
class InstanceRecord:
    """One person annotation; ``keypoints``: ``[133, 3]`` float32 (x, y, v) in ``trainer.keypoints`` order."""

    ann_id: int
    image_id: int
    bbox: tuple[float, float, float, float]
    area: float
    iscrowd: int
    num_keypoints: int
    keypoints: np.ndarray
    part_valid: dict[str, bool] = field(default_factory=dict)


@dataclass
class WholeBodyAnnotations:
    """Parsed annotation file: images by id and person instances in file order."""

    ann_file: str
    images: dict[int, ImageRecord]
    instances: list[InstanceRecord]

    def instances_with_keypoints(self) -> list[InstanceRecord]:
        """Instances with at least one labelled keypoint (of 133)."""
        return [inst for inst in self.instances if bool((inst.keypoints[:, 2] > 0).any())]


@dataclass
class DetectionRecord:
    """One person detection: box (x, y, w, h) in image pixels and its score."""

    image_id: int
    bbox: tuple[float, float, float, float]
    score: float


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: malformed JSON: {error}") from None


def _as_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise DatasetError(f"{where} must be an integer, got {value!r}")
    return int(value)


def _as_floats(value, length: int, where: str) -> np.ndarray:
    if not isinstance(value, (list, tuple)):
        raise DatasetError(f"{where} must be a list of {length} numbers, got {type(value).__name__}")
    if len(value) != length:
        raise DatasetError(f"{where} has {len(value)} values, expected {length}")
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(f"{where} must hold numbers, got {value!r}") from None
    if not np.isfinite(array).all():
        raise DatasetError(f"{where} holds non-finite values")
    return array


def load_wholebody_annotations(ann_file: str | os.PathLike) -> WholeBodyAnnotations:
    """Parse and validate a COCO-WholeBody v1.0 annotation file.

    Returns images by id and every annotation (crowd and unlabelled ones included; the dataset filters) with
    its keypoints concatenated to ``[133, 3]``. Raises ``DatasetError`` on malformed JSON, a missing field, a
    keypoint array of the wrong length, a non-numeric value, a duplicate id or an unknown ``image_id``.
    """
    path = Path(ann_file)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if key not in data:
            raise DatasetError(f"{path}: missing top-level field {key!r}")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: field {key!r} must be a list")

    images: dict[int, ImageRecord] = {}
    for position, entry in enumerate(data["images"]):
        where = f"{path}: images[{position}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where} must be an object")
        for key in _IMAGE_FIELDS:
            if key not in entry:
                raise DatasetError(f"{where} (id={entry.get('id')!r}): missing field {key!r}")
        image_id = _as_int(entry["id"], f"{where}: field 'id'")
        where = f"{path}: image id={image_id}"
        if image_id in images:
            raise DatasetError(f"{where}: duplicate image id")
        if not isinstance(entry["file_name"], str) or not entry["file_name"]:
            raise DatasetError(
                f"{where}: field 'file_name' must be a non-empty string, got {entry['file_name']!r}"
            )
        images[image_id] = ImageRecord(
            image_id=image_id,
            file_name=entry["file_name"],
            width=_as_int(entry["width"], f"{where}: field 'width'"),
            height=_as_int(entry["height"], f"{where}: field 'height'"),
        )

    instances: list[InstanceRecord] = []
    seen_ids: set[int] = set()
    for position, entry in enumerate(data["annotations"]):
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: annotations[{position}] must be an object")
        if "id" not in entry:
            raise DatasetError(f"{path}: annotations[{position}]: missing field 'id'")
        ann_id = _as_int(entry["id"], f"{path}: annotations[{position}]: field 'id'")
        where = f"{path}: annotation id={ann_id}"
        if ann_id in seen_ids:
            raise DatasetError(f"{where}: duplicate annotation id")
        seen_ids.add(ann_id)
        for key in _ANNOTATION_FIELDS:
            if key not in entry:
                raise DatasetError(f"{where}: missing field {key!r}")
        image_id = _as_int(entry["image_id"], f"{where}: field 'image_id'")
        if image_id not in images:
            raise DatasetError(f"{where}: field 'image_id' = {image_id} is not in 'images'")
        bbox = _as_floats(entry["bbox"], 4, f"{where}: field 'bbox'")
        parts = []
        for name, count in ANNOTATION_KEYPOINT_FIELDS:
            values = _as_floats(entry[name], count * 3, f"{where}: field {name!r} ({count} keypoints x 3)")
            parts.append(values.reshape(count, 3))
        keypoints = np.concatenate(parts, axis=0).astype(np.float32)
        area = float(_as_floats([entry["area"]], 1, f"{where}: field 'area'")[0])
        num_keypoints = entry.get("num_keypoints", int((keypoints[:17, 2] > 0).sum()))
        instances.append(
            InstanceRecord(
                ann_id=ann_id,
                image_id=image_id,
                bbox=tuple(float(v) for v in bbox),
                area=area,
                iscrowd=_as_int(entry["iscrowd"], f"{where}: field 'iscrowd'"),
                num_keypoints=_as_int(num_keypoints, f"{where}: field 'num_keypoints'"),
                keypoints=keypoints,
                part_valid={
                    key[: -len("_valid")]: bool(entry[key]) for key in entry if key.endswith("_valid")
                },
            )
        )
    return WholeBodyAnnotations(ann_file=str(path), images=images, instances=instances)


def load_detections(det_file: str | os.PathLike, score_thr: float = 0.0) -> list[DetectionRecord]:
    """Read a COCO detection results file (list of ``image_id``, ``bbox``, ``score``[, ``category_id``]).

    Keeps person boxes (``category_id == 1`` when the field is present) with ``score >= score_thr``, in file
    order. Raises ``DatasetError`` naming the file, the entry index and the field for malformed entries.
    """
    path = Path(det_file)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of detections, got {type(data).__name__}")
    detections = []
    for position, entry in enumerate(data):
        where = f"{path}: detection [{position}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where} must be an object")
        for key in ("image_id", "bbox", "score"):
            if key not in entry:
                raise DatasetError(f"{where}: missing field {key!r}")
        image_id = _as_int(entry["image_id"], f"{where}: field 'image_id'")
        bbox = _as_floats(entry["bbox"], 4, f"{where} (image_id={image_id}): field 'bbox'")
        score = float(_as_floats([entry["score"]], 1, f"{where} (image_id={image_id}): field 'score'")[0])
        if "category_id" in entry and entry["category_id"] != 1:
            continue
        if score < score_thr:
            continue
        detections.append(DetectionRecord(image_id=image_id, bbox=tuple(float(v) for v in bbox), score=score))
    return detections


def _clip_box_to_image(bbox, width: int, height: int) -> tuple[float, float, float, float] | None:
    """Clip an (x, y, w, h) box to the image (MMPose's GT-box sanitation); None when it becomes empty."""
    x, y, w, h = bbox
    x1 = min(max(x, 0.0), width - 1.0)
    y1 = min(max(y, 0.0), height - 1.0)
    x2 = min(max(x + w, 0.0), width - 1.0)
    y2 = min(max(y + h, 0.0), height - 1.0)
    if x2 <= x1 or y2 <= y1:
        return None
    return (x1, y1, x2 - x1, y2 - y1)


def _truncated_normal(rng: np.random.Generator) -> float:
    """Standard normal truncated to [-1, 1] (rejection sampling; acceptance ~68%)."""
    while True:
        value = rng.standard_normal()
        if -1.0 <= value <= 1.0:
            return float(value)


def half_body_center_scale(
    keypoints: np.ndarray, config: PipelineConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray] | None:
    """Centre and scale of a random upper- or lower-half box, or None when the instance does not qualify.

    ``keypoints`` is ``[133, 3]`` in image pixels. Groups and counting rules: module docstring.
    """
    labelled = keypoints[:, 2] > 0
    if int(labelled[:17].sum()) < config.min_keypoints_half_body:
        return None
    upper_count = int(labelled[_UPPER_BODY_BODY_IDS].sum())
    lower_count = int(labelled[_LOWER_BODY_BODY_IDS].sum())
    prefer_upper = rng.random() < config.half_body_upper_prob
    need = config.min_keypoints_per_half
    if prefer_upper and upper_count >= need:
        group = UPPER_BODY_IDS
    elif lower_count >= need:
        group = LOWER_BODY_IDS
    elif upper_count >= need:
        group = UPPER_BODY_IDS
    else:
        return None
    group_index = np.asarray(group)
    points = keypoints[group_index[labelled[group_index]], :2]
    if len(points) < 2:
        return None
    low, high = points.min(axis=0), points.max(axis=0)
    center = ((low + high) * 0.5).astype(np.float32)
    w, h = float(high[0] - low[0]), float(high[1] - low[1])
    aspect = config.input_size[0] / config.input_size[1]
    if w > aspect * h:
        h = w / aspect
    else:
        w = h * aspect
    if w <= 0 or h <= 0:
        return None
    scale = np.array([w, h], dtype=np.float32) * config.half_body_padding
    return center, scale


def sample_augmentation(
    keypoints: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray,
    config: PipelineConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """Random training view of one box: ``(center, scale, rotation_deg, flipped)``.

    Half-body (p ``half_body_prob``) replaces the box, then optional centre shift, scale x factor in
    ``scale_range`` (always), rotation in ``[-rot_range, rot_range]`` (p ``rot_prob``), flip
    (p ``flip_prob``).
    """
    center = np.asarray(center, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    if rng.random() < config.half_body_prob:
        half = half_body_center_scale(keypoints, config, rng)
        if half is not None:
            center, scale = half
    if config.shift_factor > 0 and rng.random() < config.shift_prob:
        offset = np.array([_truncated_normal(rng), _truncated_normal(rng)], dtype=np.float32)
        center = center + offset * np.float32(config.shift_factor) * scale
    lo, hi = config.scale_range
    scale = scale * np.float32((lo + hi) * 0.5 + (hi - lo) * 0.5 * _truncated_normal(rng))
    rotation = 0.0
    if rng.random() < config.rot_prob:
        rotation = config.rot_range * _truncated_normal(rng)
    flipped = bool(rng.random() < config.flip_prob)
    return center, scale, float(rotation), flipped


def _flip_output_matrix(matrix: np.ndarray, output_width: int) -> np.ndarray:
    """Compose ``matrix`` with the mirror x -> W - 1 - x of the output, i.e. ``warp(...).flip(-1)``."""
    flipped = matrix.astype(np.float64).copy()
    flipped[0, :] *= -1.0
    flipped[0, 2] += output_width - 1.0
    return flipped.astype(np.float32)


def _encode_targets(keypoints_input: np.ndarray, visible: np.ndarray, config: PipelineConfig):
    """DARK targets for one instance; keypoints in input pixels -> heatmap pixels (MMPose's plain ratio)."""
    from trainer.codec import encode_unbiased

    ratio = np.array(
        [config.heatmap_size[0] / config.input_size[0], config.heatmap_size[1] / config.input_size[1]],
        dtype=np.float32,
    )
    heatmaps, weights = encode_unbiased(
        (keypoints_input * ratio)[None],
        visible[None],
        heatmap_size=config.heatmap_size,
        sigma=config.sigma,
    )
    return torch.as_tensor(heatmaps[0], dtype=torch.float32), torch.as_tensor(weights[0], dtype=torch.float32)


class WholeBodyTopDownDataset(torch.utils.data.Dataset):
    """Top-down COCO-WholeBody samples: one person box -> one normalised crop and its 133 heatmaps.

    ``train=True``: samples from GT boxes of labelled, non-crowd instances, with augmentation.
    ``train=False``: no augmentation; samples from GT boxes (same filter) or, with ``det_file``, from person
    detections with ``score >= det_score_thr`` (then ``ann_id`` is -1 and the targets are all zero).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike,
        config: PipelineConfig | None = None,
        train: bool = True,
        det_file: str | os.PathLike | None = None,
        det_score_thr: float = 0.0,
        missing_images: str = "error",
    ) -> None:
        if missing_images not in ("error", "skip"):
            raise ValueError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
        if train and det_file is not None:
            raise ValueError("det_file is for evaluation: pass train=False with it")
        self.config = config if config is not None else PipelineConfig()
        self.train = bool(train)
        self.ann_file = str(ann_file)
        self.image_root = str(image_root)
        self.det_file = None if det_file is None else str(det_file)
        annotations = load_wholebody_annotations(ann_file)
        self.images = annotations.images

        image_ids, ann_ids, boxes, scores, keypoints = [], [], [], [], []
        self.num_skipped_boxes = 0
        if det_file is None:
            for inst in annotations.instances:
                if inst.iscrowd or not bool((inst.keypoints[:, 2] > 0).any()):
                    continue
                image = annotations.images[inst.image_id]
                box = _clip_box_to_image(inst.bbox, image.width, image.height)
                if box is None or inst.area <= 0:
                    self.num_skipped_boxes += 1
                    continue
                image_ids.append(inst.image_id)
                ann_ids.append(inst.ann_id)
                boxes.append(box)
                scores.append(1.0)
                keypoints.append(inst.keypoints)
        else:
            for position, det in enumerate(load_detections(det_file, score_thr=det_score_thr)):
                if det.image_id not in annotations.images:
                    raise DatasetError(
                        f"{det_file}: detection [{position}]: image_id={det.image_id} is not in {ann_file}"
                    )
                if det.bbox[2] <= 0 or det.bbox[3] <= 0:
                    self.num_skipped_boxes += 1
                    continue
                image_ids.append(det.image_id)
                ann_ids.append(-1)
                boxes.append(det.bbox)
                scores.append(det.score)
        if self.num_skipped_boxes:
            logger.warning("%s: skipped %d empty boxes", det_file or ann_file, self.num_skipped_boxes)

        # Flat NumPy arrays, not lists of objects: cheap to pickle to workers and copy-on-write friendly.
        self._image_ids = np.asarray(image_ids, dtype=np.int64)
        self._ann_ids = np.asarray(ann_ids, dtype=np.int64)
        self._boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        self._scores = np.asarray(scores, dtype=np.float32)
        self._keypoints = (
            np.stack(keypoints).astype(np.float32)
            if keypoints
            else np.zeros((0, NUM_KEYPOINTS, 3), dtype=np.float32)
        )
        self._has_keypoints = det_file is None
        self._check_images(missing_images)

        aspect = self.config.input_size[0] / self.config.input_size[1]
        centers, scales = [], []
        for box in self._boxes:
            center, scale = box_to_center_scale(box, aspect, padding=self.config.padding)
            centers.append(center)
            scales.append(scale)
        self._centers = np.asarray(centers, dtype=np.float32).reshape(-1, 2)
        self._scales = np.asarray(scales, dtype=np.float32).reshape(-1, 2)
        self._flip_index = np.asarray(flip_index(), dtype=np.int64)
        self._mean = np.asarray(self.config.mean, dtype=np.float32) * 255.0
        self._inv_std = 1.0 / (np.asarray(self.config.std, dtype=np.float32) * 255.0)
        self._rng: np.random.Generator | None = None
        self._rng_key: object = None

    def _image_path(self, image_id: int) -> str:
        return os.path.join(self.image_root, self.images[int(image_id)].file_name)

    def _check_images(self, missing_images: str) -> None:
        missing = sorted(
            {int(i) for i in np.unique(self._image_ids) if not os.path.isfile(self._image_path(int(i)))}
        )
        self.num_skipped_missing_images = 0
        if not missing:
            return
        if missing_images == "error":

            def _ids_of(image_id: int) -> list[int]:
                return self._ann_ids[self._image_ids == image_id].tolist()

            first = ", ".join(
                f"{self._image_path(i)} (image_id={i}, ann_ids={_ids_of(i)})" for i in missing[:5]
            )
            raise DatasetError(
                f"{self.ann_file}: {len(missing)} image file(s) missing under {self.image_root}: {first}"
                + (" ..." if len(missing) > 5 else "")
                + " (pass missing_images='skip' to drop them)"
            )
        keep = ~np.isin(self._image_ids, np.asarray(missing, dtype=np.int64))
        self.num_skipped_missing_images = len(missing)
        logger.warning(
            "%s: skipping %d missing image(s) under %s (%d samples dropped)",
            self.ann_file,
            len(missing),
            self.image_root,
            int((~keep).sum()),
        )
        self._image_ids, self._ann_ids = self._image_ids[keep], self._ann_ids[keep]
        self._boxes, self._scores = self._boxes[keep], self._scores[keep]
        if self._has_keypoints:
            self._keypoints = self._keypoints[keep]

    def __len__(self) -> int:
        return len(self._image_ids)

    @property
    def sample_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """``(image_ids [N], ann_ids [N])`` of the samples in index order (ann_id -1 for detections), without
        reading any image."""
        return self._image_ids.copy(), self._ann_ids.copy()

    def _generator(self) -> np.random.Generator:
        """Per-process augmentation generator, reseeded when the worker (or epoch's worker seed) changes."""
        info = torch.utils.data.get_worker_info()
        key = ("worker", info.seed) if info is not None else ("main", os.getpid())
        if self._rng is None or self._rng_key != key:
            if info is not None:
                seed = info.seed
            else:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            self._rng = np.random.default_rng(seed)
            self._rng_key = key
        return self._rng

    def read_image(self, index: int) -> np.ndarray:
        """BGR uint8 image of sample ``index``; ``DatasetError`` naming the file and ids if unreadable."""
        image_id = int(self._image_ids[index])
        path = self._image_path(image_id)
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            reason = "missing" if not os.path.isfile(path) else "unreadable (not a decodable image)"
            raise DatasetError(
                f"{path}: image file {reason} (image_id={image_id}, ann_id={int(self._ann_ids[index])})"
            )
        return image

    def __getitem__(self, index: int) -> dict:
        config = self.config
        image = self.read_image(index)
        center = self._centers[index].copy()
        scale = self._scales[index].copy()
        keypoints = (
            self._keypoints[index] if self._has_keypoints else np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
        )
        rotation, flipped = 0.0, False
        if self.train:
            center, scale, rotation, flipped = sample_augmentation(
                keypoints, center, scale, config, self._generator()
            )

        input_w, input_h = config.input_size
        matrix = get_warp_matrix(center, scale, rotation, (input_w, input_h))
        if flipped:
            matrix = _flip_output_matrix(matrix, input_w)
        crop = cv2.warpAffine(image, matrix, (input_w, input_h), flags=cv2.INTER_LINEAR)
        # BGR -> RGB and ImageNet normalisation on the small crop.
        normalised = (crop[:, :, ::-1].astype(np.float32) - self._mean) * self._inv_std
        image_tensor = torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))

        points = apply_affine(keypoints[:, :2], matrix).astype(np.float32)
        visible = (keypoints[:, 2] > 0).astype(np.float32)
        if flipped:
            points = points[self._flip_index]
            visible = visible[self._flip_index]
        if self._has_keypoints:
            heatmaps, target_weight = _encode_targets(points, visible, config)
        else:
            heatmap_w, heatmap_h = config.heatmap_size
            heatmaps = torch.zeros((NUM_KEYPOINTS, heatmap_h, heatmap_w), dtype=torch.float32)
            target_weight = torch.zeros(NUM_KEYPOINTS, dtype=torch.float32)

        return {
            "image": image_tensor,
            "heatmaps": heatmaps,
            "target_weight": target_weight,
            "keypoints": torch.from_numpy(points),
            "keypoints_visible": torch.from_numpy(visible),
            "center": torch.from_numpy(np.asarray(center, dtype=np.float32)),
            "scale": torch.from_numpy(np.asarray(scale, dtype=np.float32)),
            "rotation": float(rotation),
            "flipped": flipped,
            "image_id": int(self._image_ids[index]),
            "ann_id": int(self._ann_ids[index]),
            "bbox_score": float(self._scores[index]),
        }


__all__ = [
    "DatasetError",
    "DetectionRecord",
    "ImageRecord",
    "InstanceRecord",
    "LOWER_BODY_IDS",
    "PipelineConfig",
    "UPPER_BODY_IDS",
    "WholeBodyAnnotations",
    "WholeBodyTopDownDataset",
    "half_body_center_scale",
    "load_detections",
    "load_wholebody_annotations",
    "sample_augmentation",
]
