"""The COCO-WholeBody top-down training / test pipeline (the files are read by
``trainer.datasets.annotations``).

Pipeline (paper, Implementation Details; MMPose defaults where the paper is silent): box -> centre/scale at
the input aspect ratio with padding 1.25 -> [train] half-body (p 0.3), random centre shift (0.16 of the
box, p 0.3), random scale [0.5, 1.5], random rotation [-40, 40] deg (p 0.6), random flip (p 0.5) -> one
``cv2.warpAffine`` to the input size -> ImageNet normalisation -> DARK unbiased Gaussian targets
(``trainer.topdown.codec.encode_unbiased``, sigma 2) on 48x64.

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
  ``trainer.datasets.keypoints.flip_index()``. The test-time crop is the plain, centred warp, so the
  evaluation
  loop's ``image.flip(-1)`` plus ``trainer.topdown.codec.flip_back_heatmaps`` is the matching flip test.
- Missing images: ``missing_images="error"`` (default) raises ``DatasetError`` at construction naming the
  first missing files, their annotation ids and the count; ``"skip"`` drops their samples and logs a warning
  with the count (also kept in ``num_skipped_missing_images``). An image that cannot be read when a sample
  is made (gone, undecodable or truncated): in evaluation a ``DatasetError`` naming it; in training the next
  sample takes its place and the file is recorded in the sample (``trainer.datasets.bad_images``).
- Training / GT-box evaluation samples: non-crowd instances with at least one labelled *body* keypoint
  (MMPose drops ``num_keypoints == 0`` even when face or hand points are labelled; ``gt_instances="any"``
  keeps every instance with any of the 133) and a non-empty box after clipping to the image (MMPose).
  Detection samples: ``category_id == 1`` (when present), ``score >= det_score_thr``, positive width and
  height.
- Annotations: ``load_wholebody_annotations`` converts a file once per cache directory into arrays that
  every later process memory-maps (``trainer.datasets.annotation_cache``); the dataset keeps sample indices
  into
  them, so the 133x3 keypoints of a full-size train file stay in the shared page cache. The image check
  lists each image directory once instead of one ``stat`` per image (cheap on NFS).
- DataLoader workers: the dataset holds only NumPy arrays, strings, the config and the cache's memory maps,
  which pickle as their path and reopen after unpickling (fork, spawn and Ray workers alike);
  augmentation randomness comes from a NumPy generator seeded from ``get_worker_info().seed`` (different
  per worker and per epoch) or, in the main process, from torch's global generator (reproducible with
  ``torch.manual_seed``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from trainer.datasets.annotations import (  # noqa: F401 - also the data set's public names, as before
    PART_VALID_NAMES,
    DatasetError,
    DetectionRecord,
    ImageRecord,
    InstanceRecord,
    WholeBodyAnnotations,
    load_detections,
    load_wholebody_annotations,
)
from trainer.datasets.bad_images import SAMPLE_KEY, encode_met, load_skipping_bad_images
from trainer.datasets.common import AugmentationGenerator, read_bgr_image, regular_files
from trainer.datasets.keypoints import NUM_KEYPOINTS, PART_RANGES, flip_index
from trainer.datasets.sources import DEFAULT_GT_INSTANCES, GT_INSTANCE_RULES
from trainer.topdown.geometry import apply_affine, get_warp_matrix

logger = logging.getLogger(__name__)


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

# Which GT instances become samples: "body" = at least one labelled body keypoint (num_keypoints > 0), as
# MMPose (0.x: max(keypoints) > 0; 1.x CocoWholeBodyDataset); "any" = at least one labelled keypoint of 133.


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
    # Random centre shift as a fraction of the box scale, with probability shift_prob (MMPose's DARK
    # whole-body recipe: 1.x RandomBBoxTransform defaults, 0.x configs from v0.26; 0 turns it off).
    shift_factor: float = 0.16
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
    from trainer.topdown.codec import encode_unbiased

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


class WholeBodyTopDownDataset(AugmentationGenerator, torch.utils.data.Dataset):
    """Top-down COCO-WholeBody samples: one person box -> one normalised crop and its 133 heatmaps.

    ``train=True``: samples from GT boxes of non-crowd instances with a labelled keypoint (``gt_instances``:
    ``"body"``, MMPose's rule, needs a labelled *body* keypoint, i.e. ``num_keypoints > 0``; ``"any"`` accepts
    any of the 133), with augmentation. ``train=False``: no augmentation; samples from GT boxes (same filter)
    or, with ``det_file``, from person detections with ``score >= det_score_thr`` (then ``ann_id`` is -1 and
    the targets are all zero). Annotations come through the per-node cache in ``cache_dir``
    (``load_wholebody_annotations``); keypoints stay in its memory map and are read per sample.
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
        cache_dir: str | os.PathLike | None = None,
        gt_instances: str = DEFAULT_GT_INSTANCES,
    ) -> None:
        if missing_images not in ("error", "skip"):
            raise ValueError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
        if gt_instances not in GT_INSTANCE_RULES:
            raise ValueError(f"gt_instances must be one of {GT_INSTANCE_RULES}, got {gt_instances!r}")
        if train and det_file is not None:
            raise ValueError("det_file is for evaluation: pass train=False with it")
        self.config = config if config is not None else PipelineConfig()
        self.train = bool(train)
        self.ann_file = str(ann_file)
        self.image_root = str(image_root)
        self.det_file = None if det_file is None else str(det_file)
        self.gt_instances = gt_instances
        annotations = load_wholebody_annotations(ann_file, cache_dir=cache_dir)
        self._annotations = annotations
        image_ids_all = np.asarray(annotations.image_ids)
        by_id = np.argsort(image_ids_all, kind="stable")

        def image_rows(ids: np.ndarray) -> np.ndarray:
            return by_id[np.searchsorted(image_ids_all, ids, sorter=by_id)]

        self.num_skipped_boxes = 0
        if det_file is None:
            labelled = annotations.labelled_body if gt_instances == "body" else annotations.labelled_total
            rows = np.nonzero((np.asarray(annotations.iscrowd) == 0) & (np.asarray(labelled) > 0))[0]
            image_ids = np.asarray(annotations.ann_image_ids)[rows]
            sample_images = image_rows(image_ids)
            # Boxes clipped to the image (MMPose's GT-box sanitation, trainer.datasets.annotations): empty
            # ones (already counted and named as the file's dropped instances) and non-positive areas go.
            x1, y1, x2, y2 = np.asarray(annotations.clipped_boxes)[rows].T
            box_kept = np.asarray(annotations.box_kept)[rows]
            keep = box_kept & (np.asarray(annotations.areas)[rows] > 0)
            self.num_skipped_boxes = int((~keep).sum())
            no_area = int((box_kept & ~keep).sum())
            if no_area:
                logger.warning("%s: skipped %d instance(s) with a non-positive 'area'", ann_file, no_area)
            self._rows = rows[keep]
            self._image_ids = image_ids[keep]
            self._image_rows = sample_images[keep]
            self._ann_ids = np.asarray(annotations.ann_ids)[self._rows]
            boxes = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)[keep]
            self._scores = np.ones(len(self._rows), dtype=np.float32)
        else:
            detections = load_detections(det_file, score_thr=det_score_thr)
            image_ids = np.asarray([det.image_id for det in detections], dtype=np.int64)
            boxes = np.asarray([det.bbox for det in detections], dtype=np.float64).reshape(-1, 4)
            known = np.isin(image_ids, image_ids_all)
            if not known.all():
                position = int(np.argmin(known))
                raise DatasetError(
                    f"{det_file}: detection [{position}]: image_id={image_ids[position]} is not in {ann_file}"
                )
            keep = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
            self.num_skipped_boxes = int((~keep).sum())
            if self.num_skipped_boxes:
                logger.warning("%s: skipped %d empty boxes", det_file, self.num_skipped_boxes)
            self._image_ids = image_ids[keep]
            self._image_rows = image_rows(self._image_ids)
            self._rows = np.full(len(self._image_ids), -1, dtype=np.int64)
            self._ann_ids = np.full(len(self._image_ids), -1, dtype=np.int64)
            boxes = boxes[keep]
            self._scores = np.asarray([det.score for det in detections], dtype=np.float32)[keep]

        # Flat NumPy arrays, not lists of objects: cheap to pickle to workers and copy-on-write friendly.
        self._boxes = boxes.astype(np.float32).reshape(-1, 4)
        self._has_keypoints = det_file is None
        self._check_images(missing_images)

        # box_to_center_scale (trainer.topdown.geometry), vectorised: same float64 arithmetic on the float32
        # boxes.
        aspect = self.config.input_size[0] / self.config.input_size[1]
        x, y, w, h = self._boxes.astype(np.float64).T
        self._centers = np.stack([x + w * 0.5, y + h * 0.5], axis=1).astype(np.float32).reshape(-1, 2)
        wider = w > aspect * h
        w, h = np.where(wider, w, h * aspect), np.where(wider, w / aspect, h)
        padding = self.config.padding
        self._scales = np.stack([w * padding, h * padding], axis=1).astype(np.float32).reshape(-1, 2)
        self._flip_index = np.asarray(flip_index(), dtype=np.int64)
        self._mean = np.asarray(self.config.mean, dtype=np.float32) * 255.0
        self._inv_std = 1.0 / (np.asarray(self.config.std, dtype=np.float32) * 255.0)
        self._rng: np.random.Generator | None = None
        self._rng_key: object = None
        self._bad_images: dict[str, str] = {}  # this process's unreadable files (training skips them)

    @property
    def images(self) -> dict[int, ImageRecord]:
        """Images of the annotation file by id (built on first use)."""
        return self._annotations.images

    def _image_path(self, index: int) -> str:
        """Path of the image of sample ``index``."""
        return os.path.join(self.image_root, str(self._annotations.file_names[self._image_rows[index]]))

    def _check_images(self, missing_images: str) -> None:
        # One directory listing per image directory (not one stat per image: cheap on NFS too).
        first_sample = {}
        for index, image_id in enumerate(self._image_ids.tolist()):
            first_sample.setdefault(image_id, index)
        listings: dict[str, set[str]] = {}
        missing = []
        for image_id, index in first_sample.items():
            path = self._image_path(index)
            directory, name = os.path.split(path)
            if directory not in listings:
                listings[directory] = regular_files(directory)
            if name not in listings[directory]:
                missing.append(image_id)
        missing.sort()
        self.num_skipped_missing_images = 0
        if not missing:
            return
        if missing_images == "error":

            def _ids_of(image_id: int) -> list[int]:
                return self._ann_ids[self._image_ids == image_id].tolist()

            first = ", ".join(
                f"{self._image_path(first_sample[i])} (image_id={i}, ann_ids={_ids_of(i)})"
                for i in missing[:5]
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
        self._image_rows, self._rows = self._image_rows[keep], self._rows[keep]
        self._boxes, self._scores = self._boxes[keep], self._scores[keep]

    def __len__(self) -> int:
        return len(self._image_ids)

    @property
    def sample_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """``(image_ids [N], ann_ids [N])`` of the samples in index order (ann_id -1 for detections), without
        reading any image."""
        return self._image_ids.copy(), self._ann_ids.copy()

    def read_image(self, index: int) -> np.ndarray:
        """BGR uint8 image of sample ``index``; ``DatasetError`` naming the file and ids if unreadable."""
        ids = f"image_id={int(self._image_ids[index])}, ann_id={int(self._ann_ids[index])}"
        return read_bgr_image(self._image_path(index), ids)

    def __getitem__(self, index: int) -> dict:
        if not self.train:
            return self._sample(index)
        met: dict[str, str] = {}
        sample, _ = load_skipping_bad_images(
            self._sample, index, len(self), self._image_path, self._bad_images, met, self.ann_file
        )
        sample[SAMPLE_KEY] = encode_met(met)
        return sample

    def _sample(self, index: int) -> dict:
        config = self.config
        image = self.read_image(index)
        center = self._centers[index].copy()
        scale = self._scales[index].copy()
        keypoints = (
            np.array(self._annotations.keypoints[self._rows[index]], dtype=np.float32)
            if self._has_keypoints
            else np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
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
