"""The KAPAO data set: whole COCO-WholeBody images (no person crops) with pose and keypoint objects.

``KapaoDataset`` reads the same files as the top-down ``trainer.topdown.data.WholeBodyTopDownDataset``
through the
same machinery: ``load_wholebody_annotations`` (the per-node memory-mapped annotation cache), one directory
listing per image directory for the missing-image check, and the per-worker augmentation generator with its
checkpointable state (``trainer.datasets.common``). One sample is one image of the annotation file:

- ``train=True``: ``trainer.kapao.augment.augment_sample`` (mosaic, random affine, HSV, flip).
- ``train=False``: the letterbox only, every image of the file (also those without persons) in file order;
  the sample carries ``ratio`` and ``pad`` to map predictions back (``letterbox_to_original``).

Objects (``trainer.kapao.labels``): every non-crowd person whose box is not empty once clipped to its image
(``trainer.datasets.annotations``: MMPose's rule; the others are dropped instances) is a pose object; each of
its labelled keypoints a keypoint object. ``num_keypoints=17`` keeps only the first 17 (COCO body)
keypoints of each annotation.
Training uses every image of the file too (YOLOv5 keeps images without labels as background; the
authors' image list is the whole split). An image that cannot be read in training (gone, undecodable,
truncated) is replaced by the next one, also as a mosaic tile, and recorded in the sample
(``trainer.datasets.bad_images``); in evaluation it is a ``DatasetError`` naming it.

Batches (``collate_kapao``): ``images`` uint8 ``[B, 3, S, S]`` RGB, as YOLOv5 moves them (a quarter of the
float bytes to the accelerator); ``images_to_float`` divides by 255 on the tensor's device, with no
mean / std (YOLOv5's normalisation, which the COCO-detection YOLOv5 weights expect). ``targets`` is the
loss's ``[N, 6 + 3K]`` rows (``label_rows``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from trainer.datasets.annotations import DatasetError, load_wholebody_annotations
from trainer.datasets.bad_images import SAMPLE_KEY, encode_met, load_skipping_bad_images
from trainer.datasets.common import AugmentationGenerator, read_bgr_image, regular_files
from trainer.kapao.augment import KapaoAugmentConfig, augment_sample
from trainer.kapao.labels import (
    KP_BBOX_MODES,
    SUPPORTED_KEYPOINTS,
    ObjectLabels,
    empty_labels,
    label_rows,
    letterbox,
    pose_and_keypoint_objects,
    resize_long_side,
    scale_labels,
)

LABEL_KEYS: tuple[str, ...] = ("boxes", "keypoints", "ann_ids", "kp_classes", "kp_points", "kp_sides")


@dataclass
class KapaoPipelineConfig(KapaoAugmentConfig):
    """Input size, keypoint-object boxes and the P6 augmentation recipe (``KapaoAugmentConfig``'s fields).

    Flat on purpose: the KAPAO family's ``data:`` section can subclass or embed it, giving the issue's keys
    ``data.kp_bbox_mode`` / ``data.kp_bbox_sigma_scale`` and the hyp file's ``data.mosaic`` etc.
    """

    input_size: int = 1280  # square input, a multiple of the largest stride (64)
    kp_bbox: float = 0.05  # keypoint-object side / longest image side (paper's best of its sweep)
    kp_bbox_mode: str = "fixed"  # "fixed": kp_bbox for all; "sigma": c * sigma_k (beyond the paper)
    # c of the sigma mode; null = kp_bbox / mean(sigma_k), the fixed mode's mean size (1.722 for K = 133).
    kp_bbox_sigma_scale: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.input_size <= 0 or self.input_size % 64:
            raise ValueError(f"input_size must be a positive multiple of 64, got {self.input_size!r}")
        if not self.kp_bbox > 0:
            raise ValueError(f"kp_bbox must be > 0, got {self.kp_bbox!r}")
        if self.kp_bbox_mode not in KP_BBOX_MODES:
            raise ValueError(f"kp_bbox_mode must be one of {KP_BBOX_MODES}, got {self.kp_bbox_mode!r}")
        if self.kp_bbox_sigma_scale is not None and not self.kp_bbox_sigma_scale > 0:
            raise ValueError(f"kp_bbox_sigma_scale must be null or > 0, got {self.kp_bbox_sigma_scale!r}")


class KapaoDataset(AugmentationGenerator, torch.utils.data.Dataset):
    """COCO-WholeBody images as KAPAO samples (module docstring); arguments as the top-down data set's.

    ``sigmas``: the OKS sigmas of the sigma box mode (default: the first ``num_keypoints`` of
    ``trainer.datasets.keypoints.SIGMAS``). ``missing_images``: ``"error"`` raises ``DatasetError`` naming
    the first
    missing files, ``"skip"`` drops their images (count in ``num_skipped_missing_images``).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike,
        config: KapaoPipelineConfig | None = None,
        train: bool = True,
        num_keypoints: int = 133,
        sigmas=None,
        missing_images: str = "error",
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if num_keypoints not in SUPPORTED_KEYPOINTS:
            raise ValueError(f"num_keypoints must be one of {SUPPORTED_KEYPOINTS}, got {num_keypoints!r}")
        if missing_images not in ("error", "skip"):
            raise ValueError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
        self.config = config if config is not None else KapaoPipelineConfig()
        self.train = bool(train)
        self.ann_file = str(ann_file)
        self.image_root = str(image_root)
        self.num_keypoints = int(num_keypoints)
        self.sigmas = None if sigmas is None else np.asarray(sigmas, dtype=np.float64)
        annotations = load_wholebody_annotations(ann_file, cache_dir=cache_dir)
        self._annotations = annotations

        # Non-crowd annotations grouped by image (file order inside an image): rows[starts[i]:ends[i]].
        image_ids = np.asarray(annotations.image_ids)
        by_id = np.argsort(image_ids, kind="stable")
        persons = np.nonzero((np.asarray(annotations.iscrowd) == 0) & np.asarray(annotations.box_kept))[0]
        person_images = by_id[
            np.searchsorted(image_ids, np.asarray(annotations.ann_image_ids)[persons], sorter=by_id)
        ]
        order = np.argsort(person_images, kind="stable")
        self._person_rows = persons[order]
        sorted_images = person_images[order]
        all_images = np.arange(len(image_ids))
        self._starts = np.searchsorted(sorted_images, all_images, side="left")
        self._ends = np.searchsorted(sorted_images, all_images, side="right")
        self._images = all_images  # samples: image rows, file order
        self._check_images(missing_images)
        self._rng: np.random.Generator | None = None
        self._rng_key: object = None
        self._bad_images: dict[str, str] = {}  # this process's unreadable files (training skips them)

    # ------------------------------------------------------------------------------------------------------
    # Files

    def _image_path(self, image_row: int) -> str:
        return os.path.join(self.image_root, str(self._annotations.file_names[image_row]))

    def _sample_path(self, index: int) -> str:
        return self._image_path(int(self._images[index]))

    def _check_images(self, missing_images: str) -> None:
        listings: dict[str, set[str]] = {}
        missing = []
        for row in self._images.tolist():
            directory, name = os.path.split(self._image_path(row))
            if directory not in listings:
                listings[directory] = regular_files(directory)
            if name not in listings[directory]:
                missing.append(row)
        self.num_skipped_missing_images = 0
        if not missing:
            return
        if missing_images == "error":
            ids = self._annotations.image_ids
            first = ", ".join(f"{self._image_path(row)} (image_id={int(ids[row])})" for row in missing[:5])
            raise DatasetError(
                f"{self.ann_file}: {len(missing)} image file(s) missing under {self.image_root}: {first}"
                + (" ..." if len(missing) > 5 else "")
                + " (pass missing_images='skip' to drop them)"
            )
        self.num_skipped_missing_images = len(missing)
        self._images = self._images[~np.isin(self._images, np.asarray(missing))]

    def __len__(self) -> int:
        return len(self._images)

    @property
    def image_ids(self) -> np.ndarray:
        """Image ids of the samples in index order."""
        return np.asarray(self._annotations.image_ids)[self._images].copy()

    def read_image(self, index: int) -> np.ndarray:
        """BGR uint8 image of sample ``index``; ``DatasetError`` (file, image id) if unreadable."""
        row = int(self._images[index])
        return read_bgr_image(self._image_path(row), f"image_id={int(self._annotations.image_ids[row])}")

    # ------------------------------------------------------------------------------------------------------
    # Labels

    def labels(self, index: int, image_wh: tuple[int, int] | None = None) -> ObjectLabels:
        """Objects of sample ``index`` in its original image's pixels (``image_wh``: the decoded size; by
        default the annotation file's)."""
        row = int(self._images[index])
        rows = self._person_rows[self._starts[row] : self._ends[row]]
        if image_wh is None:
            image_wh = (int(self._annotations.image_widths[row]), int(self._annotations.image_heights[row]))
        if len(rows) == 0:
            return empty_labels(self.num_keypoints)
        config = self.config
        return pose_and_keypoint_objects(
            np.asarray(self._annotations.bboxes[rows]),
            np.asarray(self._annotations.keypoints[rows][:, : self.num_keypoints]),
            image_wh,
            kp_bbox=config.kp_bbox,
            kp_bbox_mode=config.kp_bbox_mode,
            sigmas=self.sigmas,
            sigma_scale=config.kp_bbox_sigma_scale,
            ann_ids=np.asarray(self._annotations.ann_ids[rows]),
        )

    def _load_resized(self, index: int) -> tuple[np.ndarray, ObjectLabels]:
        """Image ``index`` resized to the input size on its longest side (bilinear, as YOLOv5 trains) and its
        labels in those pixels."""
        image = self.read_image(index)
        height, width = image.shape[:2]
        labels = self.labels(index, (width, height))
        resized, ratio = resize_long_side(image, self.config.input_size, cv2.INTER_LINEAR)
        return resized, scale_labels(labels, ratio, (0.0, 0.0))

    # ------------------------------------------------------------------------------------------------------
    # Samples

    def __getitem__(self, index: int) -> dict:
        size = self.config.input_size
        extra: dict = {}
        if self.train:
            met: dict[str, str] = {}
            used: list[int] = []  # the sample's own image (the first tile loaded) or its replacement

            def load(i: int) -> tuple[np.ndarray, ObjectLabels]:
                tile, loaded = load_skipping_bad_images(
                    self._load_resized, i, len(self), self._sample_path, self._bad_images, met, self.ann_file
                )
                used.append(loaded)
                return tile

            image, labels, flipped = augment_sample(
                load, index, len(self), size, self.config, self._generator()
            )
            index = used[0]
            extra.update(flipped=flipped, **{SAMPLE_KEY: encode_met(met)})
        else:
            original = self.read_image(index)
            height, width = original.shape[:2]
            image, ratio, pad = letterbox(original, size)
            labels = scale_labels(self.labels(index, (width, height)), ratio, pad)
            extra.update(ratio=float(ratio), pad=(int(pad[0]), int(pad[1])), orig_size=(width, height))
        rgb = np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))
        sample = {"image": torch.from_numpy(rgb)}
        sample.update(
            {key: torch.from_numpy(np.ascontiguousarray(getattr(labels, key))) for key in LABEL_KEYS}
        )
        sample["image_id"] = int(self._annotations.image_ids[self._images[index]])
        sample.update(extra)
        return sample


def collate_kapao(batch: list[dict]) -> dict:
    """A batch for the model and the loss.

    ``images`` uint8 ``[B, 3, S, S]``; ``targets`` float32 ``[N, 6 + 3K]`` (``label_rows``, the image index
    is the position in the batch); ``image_ids`` int64 ``[B]``; validation batches also ``ratios`` float64
    ``[B]``, ``pads`` float64 ``[B, 2]`` and ``orig_sizes`` int64 ``[B, 2]`` (W, H); training batches
    ``flipped`` bool ``[B]``.
    """
    if not batch:
        raise ValueError("collate_kapao needs at least one sample")
    images = torch.stack([sample["image"] for sample in batch])
    size = int(images.shape[-1])
    targets = torch.cat(
        [
            label_rows(
                s["boxes"], s["keypoints"], s["kp_classes"], s["kp_points"], s["kp_sides"], index, size
            )
            for index, s in enumerate(batch)
        ]
    )
    out = {
        "images": images,
        "targets": targets,
        "image_ids": torch.tensor([s["image_id"] for s in batch], dtype=torch.int64),
    }
    if "ratio" in batch[0]:
        out["ratios"] = torch.tensor([s["ratio"] for s in batch], dtype=torch.float64)
        out["pads"] = torch.tensor([s["pad"] for s in batch], dtype=torch.float64)
        out["orig_sizes"] = torch.tensor([s["orig_size"] for s in batch], dtype=torch.int64)
    if "flipped" in batch[0]:
        out["flipped"] = torch.tensor([s["flipped"] for s in batch], dtype=torch.bool)
    return out


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 batch -> float32 in [0, 1] on its own device (YOLOv5: / 255, no mean / std)."""
    return images.to(torch.float32).div_(255.0)


__all__ = [
    "KapaoDataset",
    "KapaoPipelineConfig",
    "LABEL_KEYS",
    "collate_kapao",
    "images_to_float",
]
