"""KAPAO labels and augmentation: letterbox, pose / keypoint objects, flip, rows, the affine's rules."""

import numpy as np
import pytest
import torch

from trainer.datasets.keypoints import KEYPOINT_NAMES, SIGMAS
from trainer.kapao.augment import KapaoAugmentConfig, mosaic4, random_affine
from trainer.kapao.labels import (
    GREY,
    flip_labels,
    flip_permutation,
    keypoint_box_fractions,
    label_rows,
    letterbox,
    letterbox_to_original,
    pose_and_keypoint_objects,
    scale_labels,
)

FACE = 23 + 28  # face-28, a nose point: sigma 0.007, the smallest
LEFT_WRIST, RIGHT_WRIST = KEYPOINT_NAMES.index("left_wrist"), KEYPOINT_NAMES.index("right_wrist")


class LowEnd:
    """A generator stand-in that always draws the low end of ``uniform`` (gain 1 - scale, shift 0.5 - t)."""

    def uniform(self, low, high, size=None):
        return low if size is None else np.full(size, low, dtype=np.float64)


def _people(num_keypoints=133, seed=0):
    """Three persons on a 640 x 480 image: a labelled one, a crowd one, one without labelled keypoints."""
    rng = np.random.default_rng(seed)
    boxes = np.array([[100, 50, 200, 400], [300, 60, 150, 300], [500, 100, 60, 120]], np.float64)
    keypoints = np.zeros((3, num_keypoints, 3), np.float32)
    keypoints[0, :, 0] = rng.uniform(100, 300, num_keypoints)
    keypoints[0, :, 1] = rng.uniform(50, 450, num_keypoints)
    keypoints[0, :, 2] = rng.choice([0.0, 1.0, 2.0, 0.4], num_keypoints)
    keypoints[1, :, :2] = 350
    keypoints[1, :, 2] = 2  # crowd: none of these may become objects
    return boxes, keypoints, np.array([0, 1, 0])


def test_letterbox_round_trip_and_image_content():
    image = np.full((425, 640, 3), GREY, np.uint8)  # the pad's grey: only the marker weighs below
    image[200:204, 500:504] = 255  # a bright 4 x 4 marker centred on (502, 202)
    boxed, ratio, pad = letterbox(image, 256)
    assert boxed.shape == (256, 256, 3) and ratio == pytest.approx(256 / 640)
    assert pad[0] == 0 and pad[1] == (256 - round(425 * ratio)) // 2
    assert (boxed[: pad[1]] == GREY).all() and (boxed[pad[1] + round(425 * ratio) :] == GREY).all()
    points = np.random.default_rng(0).uniform(0, 425, (50, 2))
    back = letterbox_to_original(points * ratio + np.asarray(pad), ratio, pad)
    np.testing.assert_allclose(back, points, atol=1e-6)
    as_tensor = letterbox_to_original(torch.as_tensor(points * ratio + np.asarray(pad)), ratio, pad)
    np.testing.assert_allclose(as_tensor.numpy(), points, atol=1e-6)
    # The image moved with the mapping: the marker's brightness centroid is where its centre maps to.
    weight = boxed[..., 0].astype(np.float64) - GREY  # area interpolation is linear: centroid kept
    ys, xs = np.mgrid[: boxed.shape[0], : boxed.shape[1]]
    centroid = np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum() + 0.5
    np.testing.assert_allclose(centroid, np.array([502.0, 202.0]) * ratio + pad, atol=0.5)
    with pytest.raises(ValueError, match="multiple of 64"):
        letterbox(image, 200)


def test_pose_and_keypoint_objects_fixed_mode():
    boxes, keypoints, iscrowd = _people()
    labels = pose_and_keypoint_objects(boxes, keypoints, (640, 480), kp_bbox=0.05, iscrowd=iscrowd)
    # Pose objects: the non-crowd ones, also the one without a labelled keypoint.
    assert len(labels.boxes) == 2 and labels.ann_ids.tolist() == [0, 2]
    np.testing.assert_allclose(labels.boxes[1], [500, 100, 560, 220])
    labelled = keypoints[0, :, 2] > 0
    assert len(labels.kp_classes) == labelled.sum() > 0
    np.testing.assert_array_equal(labels.kp_classes, np.nonzero(labelled)[0] + 1)
    np.testing.assert_allclose(labels.kp_points, keypoints[0, labelled, :2])
    np.testing.assert_allclose(labels.kp_sides, 0.05 * 640)
    # Unlabelled pose keypoints carry (0, 0, 0).
    assert (labels.keypoints[0, ~labelled] == 0).all()


def test_keypoint_box_sizes_sigma_mode():
    boxes, keypoints, iscrowd = _people()
    fractions = keypoint_box_fractions(133, kp_bbox=0.05, kp_bbox_mode="sigma")
    # Default c keeps the fixed mode's mean size: c = 0.05 / mean(sigma) = 1.722 for the 133 keypoints.
    assert fractions.mean() == pytest.approx(0.05)
    assert fractions[0] / SIGMAS[0] == pytest.approx(0.05 / np.mean(SIGMAS))
    assert 1.7 < fractions[0] / SIGMAS[0] < 1.75
    np.testing.assert_allclose(keypoint_box_fractions(17, kp_bbox_mode="sigma").mean(), 0.05)
    np.testing.assert_allclose(
        keypoint_box_fractions(133, kp_bbox_mode="sigma", sigma_scale=2.0), 2.0 * np.asarray(SIGMAS)
    )
    labels = pose_and_keypoint_objects(
        boxes, keypoints, (640, 480), kp_bbox_mode="sigma", sigma_scale=1.5, iscrowd=iscrowd
    )
    np.testing.assert_allclose(
        labels.kp_sides, 1.5 * np.asarray(SIGMAS)[labels.kp_classes - 1] * 640, rtol=1e-6
    )
    # A face keypoint's box is much smaller than a hip's (the point of the sigma mode).
    assert fractions[23:91].max() < fractions[11]
    with pytest.raises(ValueError, match="kp_bbox_mode"):
        keypoint_box_fractions(133, kp_bbox_mode="oks")


def test_flip_twice_is_identity_and_classes_swap_sides():
    boxes, keypoints, iscrowd = _people()
    keypoints[0, LEFT_WRIST] = (120.0, 200.0, 2.0)
    keypoints[0, RIGHT_WRIST] = 0.0  # only the left wrist labelled
    labels = pose_and_keypoint_objects(boxes, keypoints, (640, 480), iscrowd=iscrowd)
    flipped = flip_labels(labels, 640.0)
    twice = flip_labels(flipped, 640.0)
    for name in ("boxes", "keypoints", "kp_classes", "kp_points", "kp_sides", "ann_ids"):
        np.testing.assert_allclose(getattr(twice, name), getattr(labels, name), atol=1e-4, err_msg=name)
    # The left wrist object becomes a right wrist object at the mirrored position.
    was = np.nonzero(labels.kp_classes == LEFT_WRIST + 1)[0]
    assert len(was) == 1 and RIGHT_WRIST + 1 not in labels.kp_classes
    assert flipped.kp_classes[was[0]] == RIGHT_WRIST + 1
    np.testing.assert_allclose(flipped.kp_points[was[0]], [640 - 120, 200])
    np.testing.assert_allclose(flipped.keypoints[0, RIGHT_WRIST], [520, 200, 2])
    assert flipped.keypoints[0, LEFT_WRIST, 2] == 0
    np.testing.assert_allclose(flipped.boxes[0], [640 - 300, 50, 640 - 100, 450])
    # K = 17: the body subset's permutation (the authors' kp_flip).
    assert flip_permutation(17).tolist() == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


def test_label_rows_format():
    boxes, keypoints, iscrowd = _people(num_keypoints=17)
    labels = pose_and_keypoint_objects(boxes, keypoints, (640, 480), iscrowd=iscrowd)
    ratio, size = 0.4, 256
    labels = scale_labels(labels, ratio, (0, 32))
    rows = label_rows(
        labels.boxes, labels.keypoints, labels.kp_classes, labels.kp_points, labels.kp_sides, 3, size
    )
    poses, objects = len(labels.boxes), len(labels.kp_classes)
    assert rows.shape == (poses + objects, 6 + 3 * 17) and rows.dtype == torch.float32
    assert (rows[:, 0] == 3).all()
    assert (rows[:poses, 1] == 0).all() and (rows[poses:, 1] >= 1).all()
    # Pose box: centre and size of (100, 50, 300, 450) scaled by 0.4 and shifted by 32 in y, over 256.
    np.testing.assert_allclose(rows[0, 2:6], np.array([200 * 0.4, 250 * 0.4 + 32, 80, 160]) / size, rtol=1e-6)
    pose_kp = rows[0, 6:].reshape(17, 3)
    np.testing.assert_allclose(pose_kp[:, :2], labels.keypoints[0, :, :2] / size, rtol=1e-6)
    np.testing.assert_allclose(pose_kp[:, 2], labels.keypoints[0, :, 2])
    # Keypoint objects: normalised centre on the keypoint, square side 0.05 * 640 * 0.4 / 256, no keypoints.
    np.testing.assert_allclose(rows[poses:, 2:4], labels.kp_points / size, rtol=1e-6)
    np.testing.assert_allclose(rows[poses:, 4], 0.05 * 640 * ratio / size, rtol=1e-6)
    assert (rows[poses:, 4] == rows[poses:, 5]).all() and (rows[poses:, 6:] == 0).all()
    assert 0 <= rows[:, 2:4].min() and rows[:, 2:4].max() <= 1
    # An image without objects has no rows, but the width of the batch's rows.
    empty = label_rows(np.zeros((0, 4)), np.zeros((0, 17, 3)), [], np.zeros((0, 2)), [], 0, size)
    assert empty.shape == (0, 6 + 3 * 17)


def _square_scene(num_keypoints=133):
    """A 256 x 256 image with one person in the middle and a face keypoint (small sigma box)."""
    boxes = np.array([[96.0, 96.0, 64.0, 64.0]])
    keypoints = np.zeros((1, num_keypoints, 3), np.float32)
    keypoints[0, 0] = (128, 128, 2)  # the centre: maps to the translation target
    keypoints[0, FACE] = (110, 100, 1)  # a face keypoint with the smallest sigma (0.007)
    keypoints[0, 9] = (2, 128, 2)  # near the left border
    labels = pose_and_keypoint_objects(boxes, keypoints, (256, 256), kp_bbox_mode="sigma")
    image = np.full((256, 256, 3), 50, np.uint8)
    return image, labels


def test_small_face_object_survives_a_tenth_scale_gain_and_outside_keypoints_lose_v():
    image, labels = _square_scene()
    config = KapaoAugmentConfig(scale=0.9, translate=0.1)
    face_side = labels.kp_sides[labels.kp_classes == FACE + 1][0]
    assert face_side < 3.2  # 1.722 * 0.007 * 256 = 3.1 px: YOLOv5's 2 px rule drops it at gain 0.1
    out, moved = random_affine(image, labels, 256, config, LowEnd())  # gain 0.1, centre to 0.4 * 256
    assert out.shape == (256, 256, 3)
    gain, target = 0.1, 0.4 * 256
    np.testing.assert_allclose(moved.keypoints[0, 0], [target, target, 2], atol=1e-4)
    np.testing.assert_allclose(moved.keypoints[0, FACE], [target - 1.8, target - 2.8, 1], atol=1e-4)
    face = moved.kp_classes == FACE + 1
    assert face.sum() == 1 and moved.kp_sides[face][0] == face_side  # alive, nominal side kept
    np.testing.assert_allclose(moved.kp_points[face][0], [target - 1.8, target - 2.8], atol=1e-4)
    np.testing.assert_allclose(
        moved.boxes[0], [target - 3.2, target - 3.2, target + 3.2, target + 3.2], atol=1e-4
    )
    assert gain * 128 < target  # the border keypoint stays inside here ...
    # ... and at gain 1 (scale 0) the same shift pushes it out.
    out, moved = random_affine(image, labels, 256, KapaoAugmentConfig(scale=0.0, translate=0.1), LowEnd())
    expected_x = 1.0 * (2 - 128) + target
    assert expected_x < 0
    assert (moved.keypoints[0, 9] == 0).all()
    assert 10 not in moved.kp_classes  # its keypoint object is gone with it
    assert (moved.keypoints[0, 0, :2] == target).all()


def test_random_affine_moves_labels_and_pixels_together():
    """Over many seeds: every labelled keypoint is inside the output, a keypoint whose mapped position is
    outside has v = 0, and the pixels follow the labels (a marker under a keypoint stays under it)."""
    image, labels = _square_scene()
    image[126:130, 126:130] = 250  # marker around keypoint 0 at (128, 128)
    config = KapaoAugmentConfig(scale=0.5, translate=0.1)
    outside = kept = 0
    for seed in range(30):
        out, moved = random_affine(image, labels, 256, config, np.random.default_rng(seed))
        box = moved.boxes[0]
        gain = (box[2] - box[0]) / 64.0  # the person box stays whole: it gives the map
        offset = box[:2] - gain * 96.0
        expected = gain * labels.keypoints[0, :, :2] + offset
        inside = (expected >= 0).all(axis=1) & (expected <= 256).all(axis=1) & (labels.keypoints[0, :, 2] > 0)
        np.testing.assert_array_equal(moved.keypoints[0, :, 2] > 0, inside)
        np.testing.assert_allclose(moved.keypoints[0, inside, :2], expected[inside], atol=1e-3)
        outside += int(not inside[9])
        kept += int(inside[9])
        x, y = moved.keypoints[0, 0, :2]
        assert out[int(y), int(x)].min() > 150  # the marker is where its keypoint went
    assert outside and kept  # both cases happened


def test_random_affine_pixels_follow_labels_to_a_tenth_of_a_pixel():
    """A smooth blob's brightness centroid lands on its keypoint's mapped position (the half-pixel terms of
    the warp: without them the image is 0.5 * |gain - 1| px off its labels)."""
    image, labels = _square_scene()
    ys, xs = np.mgrid[:256, :256] + 0.5  # pixel centres, continuous coordinates
    blob = 100 * np.exp(-((xs - 128) ** 2 + (ys - 128) ** 2) / (2 * 4.0**2))
    image = np.repeat((GREY + blob)[..., None], 3, axis=2).astype(np.float32)  # float: no rounding
    for seed in range(6):
        out, moved = random_affine(
            image, labels, 256, KapaoAugmentConfig(scale=0.5), np.random.default_rng(seed)
        )
        weight = out[..., 0].astype(np.float64) - GREY  # the border is GREY too
        centroid = np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum()
        np.testing.assert_allclose(centroid, moved.keypoints[0, 0, :2], atol=0.03)  # found: < 0.007


def test_mosaic_tiles_cut_their_objects_at_the_canvas():
    image, labels = _square_scene()
    tiles = [(image, labels)] * 4
    canvas, placed = mosaic4(tiles, 256, np.random.default_rng(1))
    assert canvas.shape == (512, 512, 3)
    labelled = placed.keypoints[..., 2] > 0
    assert ((placed.keypoints[labelled, :2] >= 0) & (placed.keypoints[labelled, :2] <= 512)).all()
    assert (placed.boxes >= 0).all() and (placed.boxes <= 512).all()
    # No person is cut away whole here, so every keypoint object is one of the labelled pose keypoints.
    assert len(placed.kp_classes) == labelled.sum()
