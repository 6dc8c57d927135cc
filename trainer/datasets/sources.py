"""Where a run's images and annotations come from: the ``data:`` fields every family shares, and the paths
they resolve to (synthetic data sets are generated here on first use).

A family's ``data:`` section subclasses :class:`DataSourceConfig` and adds its pipeline's parameters.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DATA_KINDS: tuple[str, ...] = ("synthetic", "coco_wholebody")
# GT instances used: "body" = num_keypoints > 0 (MMPose), "any" = any of the 133 keypoints labelled.
GT_INSTANCE_RULES: tuple[str, ...] = ("body", "any")
DEFAULT_GT_INSTANCES = "body"


@dataclass
class DataSourceConfig:
    """The data set files, the synthetic generator's sizes and seeds, and the loaders' sizes.

    ``kind: synthetic`` generates ``trainer.datasets.synth`` data sets under ``synthetic_dir`` on first use
    (one for
    training with ``synthetic_train_seed``, one for validation with a different seed), reused afterwards.
    ``kind: coco_wholebody`` reads the real data set.
    """

    kind: str = "coco_wholebody"
    synthetic_dir: str = "data/synthetic"
    synthetic_train_images: int = 256
    synthetic_val_images: int = 32
    synthetic_train_seed: int = 0
    synthetic_val_seed: int = 1
    train_ann_file: str = "data/coco/annotations/coco_wholebody_train_v1.0.json"
    train_image_root: str = "data/coco/train2017"
    val_ann_file: str = "data/coco/annotations/coco_wholebody_val_v1.0.json"
    val_image_root: str = "data/coco/val2017"
    # DataLoader worker processes per training worker (0 = load in the training process).
    loader_workers: int = 2
    val_batch_size: int = 64
    # Per-node annotation cache (trainer.datasets.annotation_cache); null = $XDG_CACHE_HOME/fowkal or
    # ~/.cache/fowkal.
    cache_dir: str | None = None
    gt_instances: str = DEFAULT_GT_INSTANCES  # GT_INSTANCE_RULES
    # Distinct unreadable image files (missing, undecodable, truncated) a training run skips before it fails
    # (trainer.datasets.bad_images); 0 = fail at the first. Evaluation never skips one.
    max_bad_images: int = 100


def validate_data_source(data: DataSourceConfig, check) -> None:
    """Range checks of the shared ``data:`` fields: ``check(ok, dotted_key, value, expected)``."""
    check(data.kind in DATA_KINDS, "data.kind", data.kind, f"one of {DATA_KINDS}")
    for key in ("synthetic_train_images", "synthetic_val_images", "val_batch_size"):
        value = getattr(data, key)
        check(value >= 1, f"data.{key}", value, "an integer >= 1")
    check(data.loader_workers >= 0, "data.loader_workers", data.loader_workers, "an integer >= 0")
    check(
        isinstance(data.max_bad_images, int)
        and not isinstance(data.max_bad_images, bool)
        and data.max_bad_images >= 0,
        "data.max_bad_images",
        data.max_bad_images,
        "an integer >= 0 (0 = fail at the first unreadable training image)",
    )
    check(
        data.gt_instances in GT_INSTANCE_RULES,
        "data.gt_instances",
        data.gt_instances,
        f"one of {GT_INSTANCE_RULES}",
    )
    if data.kind == "synthetic":
        check(
            data.synthetic_train_seed != data.synthetic_val_seed,
            "data.synthetic_val_seed",
            data.synthetic_val_seed,
            "a seed different from data.synthetic_train_seed (validation must not be the training set)",
        )


def dataset_paths(data: DataSourceConfig) -> dict[str, str | None]:
    """``{"train_ann", "train_images", "val_ann", "val_images", "val_det"}`` of the run, without generating
    anything (synthetic sets: where :func:`resolve_datasets` puts them). ``val_det`` is the family's
    person-detection file for validation, where it has one."""
    val_det = getattr(data, "val_det_file", None)
    if data.kind == "coco_wholebody":
        return {
            "train_ann": data.train_ann_file,
            "train_images": data.train_image_root,
            "val_ann": data.val_ann_file,
            "val_images": data.val_image_root,
            "val_det": val_det,
        }
    paths: dict[str, str | None] = {"val_det": None}
    for split in ("train", "val"):
        directory = _synthetic_dir(data, split)
        paths[f"{split}_ann"] = str(directory / _SYNTH_ANN_FILE)
        paths[f"{split}_images"] = str(directory / _SYNTH_IMAGE_DIR)
    return paths


def _synthetic_dir(data: DataSourceConfig, split: str) -> Path:
    images = data.synthetic_train_images if split == "train" else data.synthetic_val_images
    seed = data.synthetic_train_seed if split == "train" else data.synthetic_val_seed
    return Path(data.synthetic_dir) / f"{split}_n{images}_s{seed}"


def resolve_datasets(data: DataSourceConfig) -> dict[str, str | None]:
    """Annotation files and image roots of the run; synthetic data sets are generated here on first use.

    Returns :func:`dataset_paths`. Generation is safe when several workers (or nodes) start at once: each
    writes into a private temporary directory that is renamed into place; a worker that loses the race
    discards its copy (same seed, same data).
    """
    if data.kind == "synthetic":
        for split, images, seed in (
            ("train", data.synthetic_train_images, data.synthetic_train_seed),
            ("val", data.synthetic_val_images, data.synthetic_val_seed),
        ):
            _synthetic_dataset(_synthetic_dir(data, split), images, seed)
    return dataset_paths(data)


_SYNTH_ANN_FILE = "annotations.json"
_SYNTH_IMAGE_DIR = "images"


def _synthetic_dataset(directory: Path, num_images: int, seed: int) -> tuple[str, str]:
    from trainer.datasets.synth import write_synthetic_dataset

    ann_file = directory / _SYNTH_ANN_FILE
    if not ann_file.is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        written = Path(write_synthetic_dataset(scratch, num_images=num_images, seed=seed))
        if written != scratch / _SYNTH_ANN_FILE:
            raise RuntimeError(
                f"trainer.datasets.synth wrote {written}, expected {scratch / _SYNTH_ANN_FILE}"
            )
        try:
            os.rename(scratch, directory)
        except OSError:  # another worker renamed its copy first
            shutil.rmtree(scratch, ignore_errors=True)
            if not ann_file.is_file():
                raise
    return str(ann_file), str(directory / _SYNTH_IMAGE_DIR)


__all__ = [
    "DATA_KINDS",
    "DEFAULT_GT_INSTANCES",
    "GT_INSTANCE_RULES",
    "DataSourceConfig",
    "dataset_paths",
    "resolve_datasets",
    "validate_data_source",
]
