"""Synthetic COCO-WholeBody v1.0 data set: procedurally drawn people, deterministic for a seed.

``write_synthetic_dataset(out_dir, num_images, seed)`` writes ``out_dir/images/*.jpg`` and
``out_dir/annotations.json`` with the same structure as the real file (``images``; ``annotations`` with
``keypoints``/``foot_kpts``/``face_kpts``/``lefthand_kpts``/``righthand_kpts``, the ``*_valid`` flags,
``face_box``/``lefthand_box``/``righthand_box``, ``bbox``, ``area``, ``segmentation``, ``iscrowd``,
``num_keypoints``; ``categories`` with the 17 body keypoint names and the COCO skeleton, exactly as in the
published v1.0 file, whose category lists only the body keypoints).

What is drawn, so that a small network can learn it on a CPU and the data keeps the real set's structure:
- A body skeleton in COCO order (torso polygon, arms and legs as thick lines, left limbs lighter and right
  limbs darker than the clothing colour), feet with big toe / small toe / heel, a head with the 68 face
  landmarks in the usual iBUG layout (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67) drawn as
  features (jaw line, brows, eyes, nose, lips), and two 21-point hands at the wrists (palm plus five
  fingers, each finger its own tint). People face the camera or turn away (then the face is not annotated,
  as in COCO-WholeBody) and turn sideways (yaw).
- Dense parts are small relative to the body, as in the real data: face width ~7.5% and hand length ~10%
  of the person's height (real COCO-WholeBody: face and hand boxes ~7-8% of the person box height).
- Varied pose (arm/leg angles, bends, body lean and tilt), scale (person height 40-95% of the image),
  1-3 people per image ordered by depth, textured backgrounds (gradients, low-frequency colour noise,
  stripes, clutter shapes) and occluders.
- Visibility follows COCO: 0 = not labelled (outside the image, face turned away, part too occluded;
  coordinates 0), 1 = labelled but occluded (covered by an occluder or a person drawn in front, or
  self-occluded far-side eye/ear/heel), 2 = visible. Face points use 1.0 when labelled, as the real file.
  A face or hand with more than half of its points occluded or outside the image is not annotated
  (``*_valid`` false, box zeros).
- ``bbox``, ``area`` and ``segmentation`` come from the person's visible pixels, as COCO's do.

Determinism: image i is drawn from ``numpy.random.default_rng([seed, i])`` only, so the same seed gives
byte-identical annotations and images, and the first N images do not depend on ``num_images``.

Splits: generate one directory per split with different seeds (e.g. ``--seed 0`` for training and
``--seed 1`` for validation). File names carry the seed (``synth_s{seed}_{i:06d}.jpg``), so two splits may
also share one directory when given different ``ann_name`` values.

This module composes each image (background, people, occluders) and writes the files and annotations; the
people are posed and drawn by ``trainer.datasets.synth_people``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from trainer.datasets.keypoints import KEYPOINT_NAMES

# The people: posing and drawing (trainer.datasets.synth_people); all its names stay importable from here.
from trainer.datasets.synth_people import (  # noqa: F401
    _BODY,
    _FACE0,
    _FACE_DEPTH,
    _FACE_INNER_LOWER_LIP,
    _FINGER_TINTS,
    _HAIR_COLOURS,
    _HAND_FINGER_ANGLES,
    _HAND_FINGER_BASES,
    _HAND_SEGMENTS,
    _LEFT_HAND0,
    _ONE,
    _RIGHT_HAND0,
    _SHIFT,
    _SKIN_TONES,
    FACE_TEMPLATE,
    _background,
    _Canvas,
    _draw_person,
    _fixed,
    _hand_points,
    _rot,
    _sample_person,
    _shade,
    _unit,
)

# COCO body skeleton, 1-based, as in the real annotation file's category.
_COCO_SKELETON_1BASED = (
    (16, 14),
    (14, 12),
    (17, 15),
    (15, 13),
    (12, 13),
    (6, 12),
    (7, 13),
    (6, 7),
    (6, 8),
    (7, 9),
    (8, 10),
    (9, 11),
    (2, 3),
    (1, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
    (5, 7),
)

_OCCLUDER_LABEL = 255


def _occlusion(kp_xy: np.ndarray, labels: np.ndarray, own_label: int, later_labels: set[int]) -> np.ndarray:
    """True where a keypoint is inside the image and covered by an occluder or a person drawn later."""
    height, width = labels.shape
    x = np.round(kp_xy[:, 0]).astype(int)
    y = np.round(kp_xy[:, 1]).astype(int)
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    found = np.zeros(len(kp_xy), dtype=np.int64)
    found[inside] = labels[y[inside], x[inside]]
    covered = np.isin(found, list(later_labels | {_OCCLUDER_LABEL}))
    return inside & covered & (found != own_label)


def _box(points: np.ndarray) -> list[float]:
    low, high = points.min(axis=0), points.max(axis=0)
    return [
        round(float(low[0]), 2),
        round(float(low[1]), 2),
        round(float(high[0] - low[0]), 2),
        round(float(high[1] - low[1]), 2),
    ]


def _flat(keypoints: np.ndarray, visibility: np.ndarray, as_float: bool) -> list:
    values = []
    for (x, y), v in zip(keypoints, visibility, strict=True):
        if v > 0:
            values += [round(float(x), 2), round(float(y), 2), float(v) if as_float else int(v)]
        else:
            values += [0.0, 0.0, 0.0] if as_float else [0, 0, 0]
    return values


def _annotate(person: dict, labels: np.ndarray, label: int, later: set[int], image_id: int, ann_id: int):
    """COCO-WholeBody annotation dict for a drawn person, or None when none of it is visible."""
    height, width = labels.shape
    kp = person["keypoints"]
    inside = (kp[:, 0] >= 0) & (kp[:, 0] <= width - 1) & (kp[:, 1] >= 0) & (kp[:, 1] <= height - 1)
    occluded = _occlusion(kp, labels, label, later)
    vis = np.where(inside, np.where(occluded, 1, 2), 0).astype(np.float64)
    b = _BODY
    facing, turn = person["facing"], person["turn"]
    if facing <= 0.34:  # turned away: no nose/eyes (as COCO), face not annotated
        vis[[b["nose"], b["left_eye"], b["right_eye"]]] = 0
        vis[_FACE0 : _FACE0 + 68] = 0
    elif abs(turn) > 0.6:  # sideways: the far eye and ear are self-occluded
        far = ("left", "right")[0 if turn * np.sign(facing) < 0 else 1]
        for part in (f"{far}_eye", f"{far}_ear"):
            vis[b[part]] = np.minimum(vis[b[part]], 1)
    if abs(turn) < 0.3 and facing > 0:  # heels hidden behind the feet when facing the camera
        for heel in ("left_heel", "right_heel"):
            vis[b[heel]] = np.minimum(vis[b[heel]], 1)

    annotation_parts = {}
    for part, start, count in (
        ("face", _FACE0, 68),
        ("lefthand", _LEFT_HAND0, 21),
        ("righthand", _RIGHT_HAND0, 21),
    ):
        part_vis = vis[start : start + count]
        if (part_vis == 2).sum() < count * 0.5:
            vis[start : start + count] = 0
            annotation_parts[part] = False
        else:
            if part == "face":  # the real file labels every point of an annotated face with 1.0
                vis[start : start + count] = np.where(part_vis > 0, 1.0, 0.0)
            annotation_parts[part] = True

    visible_mask = (labels == label).astype(np.uint8)
    area = int(visible_mask.sum())
    if area == 0:
        return None
    ys, xs = np.nonzero(visible_mask)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
    contours, _ = cv2.findContours(visible_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    segmentation = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]

    def part_box(part: str, start: int, count: int) -> list[float]:
        if not annotation_parts[part]:
            return [0.0, 0.0, 0.0, 0.0]
        labelled = vis[start : start + count] > 0
        return _box(kp[start : start + count][labelled])

    foot = slice(17, 23)
    return {
        "segmentation": segmentation,
        "num_keypoints": int((vis[:17] > 0).sum()),
        "area": float(area),
        "iscrowd": 0,
        "keypoints": _flat(kp[:17], vis[:17], as_float=False),
        "image_id": image_id,
        "bbox": bbox,
        "category_id": 1,
        "id": ann_id,
        "face_box": part_box("face", _FACE0, 68),
        "lefthand_box": part_box("lefthand", _LEFT_HAND0, 21),
        "righthand_box": part_box("righthand", _RIGHT_HAND0, 21),
        "lefthand_kpts": _flat(
            kp[_LEFT_HAND0 : _LEFT_HAND0 + 21], vis[_LEFT_HAND0 : _LEFT_HAND0 + 21], False
        ),
        "righthand_kpts": _flat(
            kp[_RIGHT_HAND0 : _RIGHT_HAND0 + 21], vis[_RIGHT_HAND0 : _RIGHT_HAND0 + 21], False
        ),
        "face_kpts": _flat(kp[_FACE0 : _FACE0 + 68], vis[_FACE0 : _FACE0 + 68], as_float=True),
        "face_valid": annotation_parts["face"],
        "lefthand_valid": annotation_parts["lefthand"],
        "righthand_valid": annotation_parts["righthand"],
        "foot_valid": bool((vis[foot] > 0).any()),
        "foot_kpts": _flat(kp[foot], vis[foot], as_float=False),
    }


def render_synthetic_image(
    rng: np.random.Generator, image_size: tuple[int, int] = (256, 256), image_id: int = 1
) -> tuple[np.ndarray, list[dict]]:
    """One synthetic BGR image and its COCO-WholeBody annotations (ids ``image_id * 100 + person``)."""
    width, height = int(image_size[0]), int(image_size[1])
    image = _background(rng, width, height)
    labels = np.zeros((height, width), dtype=np.uint8)
    canvas = _Canvas(image, labels)
    num_people = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    slots = (np.arange(num_people) + 0.5) / num_people
    people = []
    for slot in rng.permutation(slots):
        person_height = height * rng.uniform(0.4, 0.95) * (1.0 if num_people == 1 else rng.uniform(0.7, 1.0))
        hip_x = width * (slot + rng.normal(0.0, 0.12 / num_people))
        low, high = 0.46 * person_height - 0.05 * height, height - 0.52 * person_height + 0.05 * height
        hip_y = rng.uniform(low, high) if high > low else height * 0.5
        people.append(_sample_person(rng, person_height, (hip_x, hip_y)))
    # Depth order: people standing lower in the image are nearer and drawn later (on top).
    people.sort(key=lambda p: float(p["keypoints"][15:17, 1].max()))
    for index, person in enumerate(people):
        canvas.label = index + 1
        _draw_person(canvas, person)
    if rng.random() < 0.4:
        canvas.label = _OCCLUDER_LABEL
        for _ in range(int(rng.integers(1, 3))):
            w = rng.uniform(0.12, 0.35) * width
            h = rng.uniform(0.12, 0.35) * height
            x, y = rng.uniform(-0.1, 0.9) * width, rng.uniform(0.0, 0.9) * height
            colour = rng.uniform(0, 255, size=3)
            corners = np.array([(x, y), (x + w, y), (x + w, y + h), (x, y + h)])
            canvas.polygon(corners, colour)
            for stripe in np.arange(0.0, 1.0, rng.uniform(0.1, 0.3)):
                canvas.line(
                    (x, y + stripe * h), (x + w, y + stripe * h), _shade(colour, 0.7), max(1.0, 0.02 * h)
                )
    annotations = []
    for index, person in enumerate(people):
        later = set(range(index + 2, len(people) + 1))
        annotation = _annotate(person, labels, index + 1, later, image_id, image_id * 100 + index)
        if annotation is not None:
            annotations.append(annotation)
    return image, annotations


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_images: int = 64,
    seed: int = 0,
    image_size: tuple[int, int] = (256, 256),
    ann_name: str = "annotations.json",
) -> Path:
    """Write ``num_images`` synthetic images to ``out_dir/images/`` and annotations to ``out_dir/ann_name``.

    Returns the annotation file path; the image root to pass to ``WholeBodyTopDownDataset`` is
    ``out_dir/images``. Same ``seed``, same bytes.
    """
    if int(num_images) < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images!r}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed!r}")
    width, height = (int(v) for v in image_size)
    if width < 64 or height < 64:
        raise ValueError(f"image_size must be at least (64, 64), got {image_size!r}")
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(int(num_images)):
        rng = np.random.default_rng([int(seed), index])
        image_id = index + 1
        file_name = f"synth_s{int(seed)}_{index:06d}.jpg"
        image, image_annotations = render_synthetic_image(rng, (width, height), image_id=image_id)
        if not cv2.imwrite(str(image_dir / file_name), image, [cv2.IMWRITE_JPEG_QUALITY, 92]):
            raise OSError(f"could not write {image_dir / file_name}")
        images.append(
            {
                "license": 0,
                "file_name": file_name,
                "coco_url": "",
                "height": height,
                "width": width,
                "date_captured": "",
                "flickr_url": "",
                "id": image_id,
            }
        )
        annotations.extend(image_annotations)
    dataset = {
        "info": {
            "description": f"fowkal synthetic COCO-WholeBody-format data, seed {int(seed)}",
            "url": "",
            "version": "1.0",
            "year": "2024",
            "date_created": "",
        },
        "licenses": [{"url": "", "id": 0, "name": "generated by fowkal (no rights reserved)"}],
        "categories": [
            {
                "supercategory": "person",
                "id": 1,
                "name": "person",
                "keypoints": list(KEYPOINT_NAMES[:17]),
                "skeleton": [list(pair) for pair in _COCO_SKELETON_1BASED],
            }
        ],
        "images": images,
        "annotations": annotations,
    }
    ann_file = out / ann_name
    with open(ann_file, "w", encoding="utf-8") as handle:
        json.dump(dataset, handle)
    return ann_file
