"""COCO-WholeBody v1.0 annotation and detection files: reading, validating, caching.

``load_wholebody_annotations`` parses the published v1.0 annotation file unchanged (``keypoints`` 17x3,
``foot_kpts`` 6x3, ``face_kpts`` 68x3, ``lefthand_kpts`` 21x3, ``righthand_kpts`` 21x3, ``*_valid``,
``*_box``, ``bbox``, ``area``, ``iscrowd``, ``num_keypoints``) into ``[133, 3]`` arrays in the order of
``trainer.datasets.keypoints``, converted once per cache directory into arrays every later process memory-maps
(``trainer.datasets.annotation_cache``); ``load_detections`` reads a person-detection results file (e.g. the
AP_H 56
boxes used by MMPose and the paper). Anything malformed raises ``DatasetError`` naming the file and the
annotation id / field / value, before anything is cached.

Ground-truth boxes as MMPose's ``BaseCocoStyleDataset.parse_data_info`` / ``_is_valid_instance`` treat them:
clipped to ``[0, W - 1] x [0, H - 1]`` of their image (``clipped_boxes``, x1 y1 x2 y2); an instance whose
clipped box is empty (a width or height <= 0, or a box wholly outside its image) is dropped by every data
set (``box_kept`` false), counted (``num_dropped_instances``) and named once per process in one line on
stderr. A box value that is not finite is an error, as a keypoint value is.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.datasets.annotation_cache import CachedArrays, cached_arrays
from trainer.datasets.keypoints import ANNOTATION_KEYPOINT_FIELDS, NUM_KEYPOINTS

logger = logging.getLogger(__name__)

_IMAGE_FIELDS = ("id", "file_name", "width", "height")
# Parts whose ``<part>_valid`` flag is kept (InstanceRecord.part_valid), in the cache's column order.
PART_VALID_NAMES: tuple[str, ...] = ("face", "lefthand", "righthand", "foot")
_ANNOTATION_FIELDS = ("id", "image_id", "bbox", "area", "iscrowd") + tuple(
    name for name, _ in ANNOTATION_KEYPOINT_FIELDS
)


class DatasetError(ValueError):
    """Malformed or missing data; the message names the file and the annotation id / field / value."""


@dataclass
class ImageRecord:
    """One entry of ``images``."""

    image_id: int
    file_name: str
    width: int
    height: int


@dataclass
class InstanceRecord:
    """One person annotation; ``keypoints``: ``[133, 3]`` float32 (x, y, v) in ``trainer.datasets.keypoints``
    order."""

    ann_id: int
    image_id: int
    bbox: tuple[float, float, float, float]
    area: float
    iscrowd: int
    num_keypoints: int
    keypoints: np.ndarray
    part_valid: dict[str, bool] = field(default_factory=dict)


class WholeBodyAnnotations:
    """Parsed annotation file as flat arrays (memory-mapped from the per-node cache when there is one).

    Arrays, images in file order: ``image_ids``, ``file_names``, ``image_widths``, ``image_heights``;
    annotations in file order: ``ann_ids``, ``ann_image_ids``, ``bboxes [N, 4]`` (float64), ``areas``,
    ``iscrowd``, ``num_keypoints``, ``keypoints [N, 133, 3]`` (float32), ``part_valid [N, 4]`` (int8 over
    ``PART_VALID_NAMES``: 1 true, 0 false, -1 absent), ``labelled_body`` and ``labelled_total`` (labelled
    keypoints among the 17 body ones and among all 133), ``clipped_boxes [N, 4]`` (float64 x1 y1 x2 y2,
    clipped to the image as MMPose does) and ``box_kept [N]`` (bool: the clipped box is not empty; the data
    sets drop the others). ``images`` and ``instances`` build the record views on first use (a full-size
    train file: ~250k objects, so the dataset does not use them).
    """

    _ARRAYS = (
        "image_ids",
        "file_names",
        "image_widths",
        "image_heights",
        "ann_ids",
        "ann_image_ids",
        "bboxes",
        "areas",
        "iscrowd",
        "num_keypoints",
        "keypoints",
        "part_valid",
        "labelled_body",
        "labelled_total",
        "clipped_boxes",
        "box_kept",
    )

    def __init__(self, ann_file: str, arrays: CachedArrays) -> None:
        self.ann_file = str(ann_file)
        self.arrays = arrays
        self._images: dict[int, ImageRecord] | None = None
        self._instances: list[InstanceRecord] | None = None

    def __getattr__(self, name: str) -> np.ndarray:
        if name in WholeBodyAnnotations._ARRAYS:
            return self.__dict__["arrays"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getstate__(self) -> dict:
        return {"ann_file": self.ann_file, "arrays": self.arrays, "_images": None, "_instances": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def images(self) -> dict[int, ImageRecord]:
        """Images by id."""
        if self._images is None:
            self._images = {
                int(i): ImageRecord(image_id=int(i), file_name=str(f), width=int(w), height=int(h))
                for i, f, w, h in zip(
                    self.image_ids, self.file_names, self.image_widths, self.image_heights, strict=True
                )
            }
        return self._images

    @property
    def instances(self) -> list[InstanceRecord]:
        """Every annotation (crowd and unlabelled ones included) in file order."""
        if self._instances is None:
            part_valid = np.asarray(self.part_valid)
            self._instances = [
                InstanceRecord(
                    ann_id=int(self.ann_ids[n]),
                    image_id=int(self.ann_image_ids[n]),
                    bbox=tuple(float(v) for v in self.bboxes[n]),
                    area=float(self.areas[n]),
                    iscrowd=int(self.iscrowd[n]),
                    num_keypoints=int(self.num_keypoints[n]),
                    keypoints=self.keypoints[n],
                    part_valid={
                        name: bool(part_valid[n, j])
                        for j, name in enumerate(PART_VALID_NAMES)
                        if part_valid[n, j] >= 0
                    },
                )
                for n in range(len(self.ann_ids))
            ]
        return self._instances

    @property
    def num_dropped_instances(self) -> int:
        """Annotations (crowd ones included) whose box is empty once clipped to its image: no data set uses
        them."""
        return int(np.count_nonzero(~np.asarray(self.box_kept)))

    def dropped_instances_line(self) -> str | None:
        """The one line that names the file, the count and the first dropped annotation ids; None if none."""
        count = self.num_dropped_instances
        if not count:
            return None
        ids = np.asarray(self.ann_ids)[~np.asarray(self.box_kept)][:5].tolist()
        return (
            f"{self.ann_file}: {count} instance(s) dropped: 'bbox' empty once clipped to its image "
            f"(ann ids {', '.join(map(str, ids))}{', ...' if count > len(ids) else ''})"
        )

    def instances_with_keypoints(self) -> list[InstanceRecord]:
        """Instances with at least one labelled keypoint (of 133)."""
        labelled = np.asarray(self.labelled_total) > 0
        return [inst for inst, keep in zip(self.instances, labelled, strict=True) if keep]


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
    finite = np.isfinite(array)
    if not finite.all():
        position = int(np.argmin(finite))
        raise DatasetError(f"{where} holds a non-finite value: {array[position]} at position {position}")
    return array


def clip_boxes_to_images(
    bboxes: np.ndarray, widths: np.ndarray, heights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """MMPose's GT-box sanitation (``BaseCocoStyleDataset.parse_data_info`` and ``_is_valid_instance``):
    COCO ``[x, y, w, h]`` boxes clipped to ``[0, W - 1] x [0, H - 1]`` of their image, as ``[x1, y1, x2,
    y2]`` float64, and whether each clipped box is non-empty (x2 > x1 and y2 > y1)."""
    x, y, w, h = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4).T
    right = np.asarray(widths, dtype=np.float64) - 1.0
    bottom = np.asarray(heights, dtype=np.float64) - 1.0
    x1, y1 = np.minimum(np.maximum(x, 0.0), right), np.minimum(np.maximum(y, 0.0), bottom)
    x2, y2 = np.minimum(np.maximum(x + w, 0.0), right), np.minimum(np.maximum(y + h, 0.0), bottom)
    return np.stack([x1, y1, x2, y2], axis=1).reshape(-1, 4), (x2 > x1) & (y2 > y1)


def _annotation_arrays(images: dict, ann_rows: dict) -> dict[str, np.ndarray]:
    """Both parsers' output in the cache's layout (``WholeBodyAnnotations`` names the arrays)."""
    keypoints = ann_rows["keypoints"]
    labelled = keypoints[:, :, 2] > 0
    image_ids = np.asarray(images["id"], dtype=np.int64)
    widths = np.asarray(images["width"], dtype=np.int64)
    heights = np.asarray(images["height"], dtype=np.int64)
    ann_image_ids = np.asarray(ann_rows["image_id"], dtype=np.int64)
    bboxes = np.asarray(ann_rows["bbox"], dtype=np.float64).reshape(-1, 4)
    by_id = np.argsort(image_ids, kind="stable")  # image ids are unique and every annotation's is known
    image_rows = by_id[np.searchsorted(image_ids, ann_image_ids, sorter=by_id)]
    clipped, kept = clip_boxes_to_images(bboxes, widths[image_rows], heights[image_rows])
    return {
        "image_ids": image_ids,
        "file_names": np.asarray(images["file_name"], dtype=np.str_).reshape(-1),
        "image_widths": widths,
        "image_heights": heights,
        "ann_ids": np.asarray(ann_rows["id"], dtype=np.int64),
        "ann_image_ids": ann_image_ids,
        "bboxes": bboxes,
        "areas": np.asarray(ann_rows["area"], dtype=np.float64),
        "iscrowd": np.asarray(ann_rows["iscrowd"], dtype=np.int64),
        "num_keypoints": np.asarray(ann_rows["num_keypoints"], dtype=np.int64),
        "keypoints": keypoints,
        "part_valid": np.asarray(ann_rows["part_valid"], dtype=np.int8).reshape(-1, len(PART_VALID_NAMES)),
        "labelled_body": labelled[:, :17].sum(axis=1).astype(np.int16),
        "labelled_total": labelled.sum(axis=1).astype(np.int16),
        "clipped_boxes": clipped,
        "box_kept": kept,
    }


def _parse_strict(path: Path) -> dict[str, np.ndarray]:
    """The reference parser (standard-library JSON, one annotation at a time): every check, in file order,
    raising ``DatasetError`` with the file, annotation id, field and value of the first problem."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if key not in data:
            raise DatasetError(f"{path}: missing top-level field {key!r}")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: field {key!r} must be a list")

    images: dict[str, list] = {"id": [], "file_name": [], "width": [], "height": []}
    seen_images: set[int] = set()
    for position, entry in enumerate(data["images"]):
        where = f"{path}: images[{position}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where} must be an object")
        for key in _IMAGE_FIELDS:
            if key not in entry:
                raise DatasetError(f"{where} (id={entry.get('id')!r}): missing field {key!r}")
        image_id = _as_int(entry["id"], f"{where}: field 'id'")
        where = f"{path}: image id={image_id}"
        if image_id in seen_images:
            raise DatasetError(f"{where}: duplicate image id")
        seen_images.add(image_id)
        if not isinstance(entry["file_name"], str) or not entry["file_name"]:
            raise DatasetError(
                f"{where}: field 'file_name' must be a non-empty string, got {entry['file_name']!r}"
            )
        images["id"].append(image_id)
        images["file_name"].append(entry["file_name"])
        images["width"].append(_as_int(entry["width"], f"{where}: field 'width'"))
        images["height"].append(_as_int(entry["height"], f"{where}: field 'height'"))

    rows: dict[str, list] = {
        "id": [], "image_id": [], "bbox": [], "area": [], "iscrowd": [], "num_keypoints": [], "part_valid": []
    }  # fmt: skip
    keypoint_rows: list[np.ndarray] = []
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
        if image_id not in seen_images:
            raise DatasetError(f"{where}: field 'image_id' = {image_id} is not in 'images'")
        bbox = _as_floats(entry["bbox"], 4, f"{where}: field 'bbox'")
        parts = []
        for name, count in ANNOTATION_KEYPOINT_FIELDS:
            values = _as_floats(entry[name], count * 3, f"{where}: field {name!r} ({count} keypoints x 3)")
            parts.append(values.reshape(count, 3))
        keypoints = np.concatenate(parts, axis=0).astype(np.float32)
        area = float(_as_floats([entry["area"]], 1, f"{where}: field 'area'")[0])
        num_keypoints = entry.get("num_keypoints", int((keypoints[:17, 2] > 0).sum()))
        rows["id"].append(ann_id)
        rows["image_id"].append(image_id)
        rows["bbox"].append(bbox)
        rows["area"].append(area)
        rows["iscrowd"].append(_as_int(entry["iscrowd"], f"{where}: field 'iscrowd'"))
        rows["num_keypoints"].append(_as_int(num_keypoints, f"{where}: field 'num_keypoints'"))
        rows["part_valid"].append(
            [
                int(bool(entry[f"{name}_valid"])) if f"{name}_valid" in entry else -1
                for name in PART_VALID_NAMES
            ]
        )
        keypoint_rows.append(keypoints)
    rows["keypoints"] = (
        np.stack(keypoint_rows) if keypoint_rows else np.zeros((0, NUM_KEYPOINTS, 3), dtype=np.float32)
    )
    return _annotation_arrays(images, rows)


class _FastPathRejected(Exception):
    """The fast parser met something it does not handle; the strict parser decides (and names it)."""


def _fast_schema():
    """msgspec types of the fields the pipeline reads (others are skipped); built on first use."""
    import msgspec

    unset_or_int = int | msgspec.UnsetType
    any_or_unset = typing.Any

    class Image(msgspec.Struct):
        id: int
        file_name: str
        width: int
        height: int

    annotation_fields = [
        ("id", int),
        ("image_id", int),
        ("bbox", list[float]),
        ("area", float),
        ("iscrowd", int),
        *[(name, list[float]) for name, _ in ANNOTATION_KEYPOINT_FIELDS],
        ("num_keypoints", unset_or_int, msgspec.UNSET),
        *[(f"{name}_valid", any_or_unset, msgspec.UNSET) for name in PART_VALID_NAMES],
    ]
    Annotation = msgspec.defstruct("Annotation", annotation_fields)
    File = msgspec.defstruct("File", [("images", list[Image]), ("annotations", list[msgspec.Raw])])
    return File, Annotation


def _parse_fast(path: Path) -> dict[str, np.ndarray]:
    """``msgspec`` parser: typed decoding straight into preallocated arrays, one annotation at a time.

    At least as strict as ``_parse_strict`` (integers must be JSON integers, numbers JSON numbers, every
    field present, ids unique and known): whatever it rejects goes to ``_parse_strict``, which names the
    problem or, for what only the fast parser refuses (e.g. ``"id": 5.0``), returns the arrays. It keeps each
    annotation as a slice of the file's bytes until it is decoded, so its peak memory is about the file
    plus the arrays (the standard library's objects for a full-size train file take several times that).
    """
    import msgspec

    file_type, annotation_type = _fast_schema()
    unset = msgspec.UNSET
    try:
        top = msgspec.json.decode(path.read_bytes(), type=file_type)
        num = len(top.annotations)
        keypoints = np.empty((num, NUM_KEYPOINTS * 3), dtype=np.float32)
        ints = np.empty((num, 4), dtype=np.int64)  # id, image_id, iscrowd, num_keypoints
        has_num_keypoints = np.ones(num, dtype=bool)
        floats = np.empty((num, 5), dtype=np.float64)  # bbox, area
        part_valid = np.empty((num, len(PART_VALID_NAMES)), dtype=np.int8)
        slices, start = [], 0
        for _, count in ANNOTATION_KEYPOINT_FIELDS:
            slices.append(slice(start, start + 3 * count))
            start += 3 * count
        fields = [name for name, _ in ANNOTATION_KEYPOINT_FIELDS]
        valid_fields = [f"{name}_valid" for name in PART_VALID_NAMES]
        decoder = msgspec.json.Decoder(annotation_type)
        for n, raw in enumerate(top.annotations):
            entry = decoder.decode(raw)
            count = entry.num_keypoints
            if count is unset:
                has_num_keypoints[n] = False
                count = 0
            ints[n] = (entry.id, entry.image_id, entry.iscrowd, count)
            floats[n, :4] = entry.bbox
            floats[n, 4] = entry.area
            row = keypoints[n]
            for name, part in zip(fields, slices, strict=True):
                row[part] = getattr(entry, name)
            part_valid[n] = [
                -1 if value is unset else int(bool(value))
                for value in (getattr(entry, name) for name in valid_fields)
            ]
        images = top.images
        del top
    except (msgspec.DecodeError, ValueError, TypeError, OverflowError) as error:
        raise _FastPathRejected(str(error)) from None
    image_ids = np.asarray([image.id for image in images], dtype=np.int64)
    file_names = [image.file_name for image in images]
    if (
        len(np.unique(image_ids)) != len(image_ids)
        or not all(file_names)
        or len(np.unique(ints[:, 0])) != num
        or not np.isin(ints[:, 1], image_ids).all()
        or not (np.isfinite(floats).all() and np.isfinite(keypoints).all())
    ):
        raise _FastPathRejected("duplicate or unknown id, empty file name or non-finite value")
    keypoints = keypoints.reshape(num, NUM_KEYPOINTS, 3)
    ints[~has_num_keypoints, 3] = (keypoints[~has_num_keypoints, :17, 2] > 0).sum(axis=1)
    image_columns = {
        "id": image_ids,
        "file_name": file_names,
        "width": [image.width for image in images],
        "height": [image.height for image in images],
    }
    rows = {
        "id": ints[:, 0],
        "image_id": ints[:, 1],
        "bbox": floats[:, :4],
        "area": floats[:, 4],
        "iscrowd": ints[:, 2],
        "num_keypoints": ints[:, 3],
        "part_valid": part_valid,
        "keypoints": keypoints,
    }
    return _annotation_arrays(image_columns, rows)


def _convert_annotation_file(path: Path) -> dict[str, np.ndarray]:
    """The cache's conversion: the fast parser where it accepts the file, else the strict one."""
    try:
        return _parse_fast(path)
    except _FastPathRejected:
        return _parse_strict(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None


def load_wholebody_annotations(
    ann_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> WholeBodyAnnotations:
    """Parse and validate a COCO-WholeBody v1.0 annotation file, through the per-node annotation cache.

    Returns every image and every annotation (crowd and unlabelled ones included; the dataset filters) with
    its keypoints concatenated to ``[133, 3]``. The first call for a version of a file converts it into
    ``cache_dir`` (None: ``trainer.datasets.annotation_cache.default_cache_dir()``); later calls, in any
    process,
    memory-map that copy (``trainer.datasets.annotation_cache``). Raises ``DatasetError`` on malformed JSON, a
    missing field, a keypoint array of the wrong length, a non-numeric or non-finite value (a box's too), a
    duplicate id or an unknown ``image_id``, naming the file, the annotation id, the field and the value,
    before anything is cached. Instances whose box is empty once clipped to its image are kept in the arrays
    (``box_kept`` false) and named in one line on stderr, once per process and file.
    """
    path = Path(ann_file)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    arrays = cached_arrays(path, "wholebody", _convert_annotation_file, cache_dir=cache_dir)
    annotations = WholeBodyAnnotations(ann_file=str(path), arrays=arrays)
    _report_dropped_instances(annotations, path)
    return annotations


# The file versions whose dropped instances this process has named (one line per file, not per data set).
_REPORTED_FILES: set[tuple[str, int, int]] = set()


def _report_dropped_instances(annotations: WholeBodyAnnotations, path: Path) -> None:
    """Name the dropped instances of ``path`` once per process on stderr. Not in a Ray Train worker: the
    command that started it read the files before Ray (``trainer.preflight``) and named them there, once
    (each worker's stderr would reach the same console again)."""
    line = annotations.dropped_instances_line()
    if line is None:
        return
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _REPORTED_FILES:
        return
    _REPORTED_FILES.add(key)
    if "ray.train" in sys.modules:  # no Ray Train imported: not a Ray Train worker
        from trainer.runtime import ray_train_context

        if ray_train_context() is not None:
            return
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def count_dropped_instances(
    ann_files: typing.Iterable[str | os.PathLike | None], cache_dir: str | os.PathLike | None = None
) -> int:
    """Dropped instances (``WholeBodyAnnotations.num_dropped_instances``) of the distinct files named (a run's
    train and val files; None entries are skipped); the files come through the cache, as the data sets'."""
    files = {str(Path(f).resolve()) for f in ann_files if f is not None}
    return sum(
        load_wholebody_annotations(f, cache_dir=cache_dir).num_dropped_instances for f in sorted(files)
    )


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
