"""COCO-WholeBody reading and the top-down pipeline (trainer/topdown/data.py).

Most tests use the real mini data set (4 images, 14 annotations, 118 detections) and skip without it; the
augmentation geometry is checked on a tiny generated image whose only bright dot is the one labelled keypoint.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from shared_data import ANN, DET, MINI, needs_mini

from trainer.datasets.keypoints import ANNOTATION_KEYPOINT_FIELDS, FLIP_PAIRS, NUM_KEYPOINTS
from trainer.topdown.data import (
    DatasetError,
    PipelineConfig,
    WholeBodyTopDownDataset,
    half_body_center_scale,
    load_detections,
    load_wholebody_annotations,
    sample_augmentation,
)

LEFT_WRIST, RIGHT_WRIST = 9, 10


GOLDEN = Path(__file__).resolve().parent / "data" / "mini_golden.npz"


@pytest.fixture(autouse=True)
def _annotation_cache_in_tmp(tmp_path, monkeypatch):
    """The default annotation cache directory goes under tmp_path, never into the real home cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _no_aug(**overrides) -> PipelineConfig:
    base = dict(flip_prob=0.0, half_body_prob=0.0, rot_prob=0.0, scale_range=(1.0, 1.0), shift_factor=0.0)
    base.update(overrides)
    return PipelineConfig(**base)


def _denormalise(image: torch.Tensor, config: PipelineConfig) -> np.ndarray:
    """[3, H, W] normalised RGB -> [H, W, 3] RGB in 0..255 (independent of the pipeline's own code)."""
    rgb = image.numpy().transpose(1, 2, 0)
    return (rgb * np.array(config.std) + np.array(config.mean)) * 255.0


def _mini_copy(tmp_path: Path, edit=None, drop_images=()) -> tuple[Path, Path]:
    """Annotation copy (optionally edited) and an image root linking the real images but ``drop_images``."""
    data = json.loads(ANN.read_text())
    if edit is not None:
        edit(data)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    root = tmp_path / "images"
    root.mkdir()
    for image in json.loads(ANN.read_text())["images"]:
        if image["file_name"] not in drop_images:
            (root / image["file_name"]).symlink_to(MINI / image["file_name"])
    return ann, root


# ----------------------------------------------------------------------------------------------- reading


@needs_mini
def test_mini_annotations_load_with_the_right_counts_and_keypoint_order():
    annotations = load_wholebody_annotations(ANN)
    assert len(annotations.images) == 4
    assert len(annotations.instances) == 14
    assert len(annotations.instances_with_keypoints()) == 12
    raw = {a["id"]: a for a in json.loads(ANN.read_text())["annotations"]}
    for inst in annotations.instances:
        assert inst.keypoints.shape == (NUM_KEYPOINTS, 3)
        # [133, 3] is the five fields concatenated in the published order.
        expected = np.concatenate(
            [
                np.asarray(raw[inst.ann_id][name], dtype=np.float64).reshape(-1, 3)
                for name, _ in ANNOTATION_KEYPOINT_FIELDS
            ]
        )
        np.testing.assert_allclose(inst.keypoints, expected, rtol=0, atol=1e-3)
        assert inst.bbox == pytest.approx(raw[inst.ann_id]["bbox"])
        assert inst.num_keypoints == raw[inst.ann_id]["num_keypoints"]
    first = next(i for i in annotations.instances if i.ann_id == 442619)
    assert first.part_valid == {"face": True, "lefthand": False, "righthand": True, "foot": True}


@needs_mini
def test_detections_load_and_threshold():
    assert len(load_detections(DET)) == 118
    kept = load_detections(DET, score_thr=0.3)
    assert len(kept) == 33
    assert all(d.score >= 0.3 for d in kept)


@needs_mini
def test_dataset_sizes_for_training_gt_eval_and_detection_eval():
    train = WholeBodyTopDownDataset(ANN, MINI, train=True)
    gt_eval = WholeBodyTopDownDataset(ANN, MINI, train=False)
    det_eval = WholeBodyTopDownDataset(ANN, MINI, train=False, det_file=DET, det_score_thr=0.3)
    assert len(train) == 12 and len(gt_eval) == 12 and len(det_eval) == 33
    assert 1202706 not in {train[i]["ann_id"] for i in range(len(train))}  # the num_keypoints = 0 instance
    sample = det_eval[0]
    assert sample["ann_id"] == -1
    raw = json.loads(DET.read_text())
    assert sample["bbox_score"] == pytest.approx(raw[0]["score"], rel=1e-6)
    assert float(sample["target_weight"].sum()) == 0.0


@needs_mini
def test_sample_ids_match_the_samples_without_reading_images():
    gt_eval = WholeBodyTopDownDataset(ANN, MINI, train=False)
    image_ids, ann_ids = gt_eval.sample_ids
    for index in (0, len(gt_eval) - 1):
        sample = gt_eval[index]
        assert (image_ids[index], ann_ids[index]) == (sample["image_id"], sample["ann_id"])
    det_eval = WholeBodyTopDownDataset(ANN, MINI, train=False, det_file=DET, det_score_thr=0.3)
    det_images, det_anns = det_eval.sample_ids
    raw = [d for d in json.loads(DET.read_text()) if d["score"] >= 0.3]
    assert sorted(det_images.tolist()) == sorted(d["image_id"] for d in raw)
    assert set(det_anns.tolist()) == {-1}
    image_ids[0] = -5  # a copy: the dataset is unchanged
    assert gt_eval.sample_ids[0][0] != -5


# ------------------------------------------------------------------------------------------------ samples


@needs_mini
def test_sample_shapes_and_types():
    config = PipelineConfig()
    sample = WholeBodyTopDownDataset(ANN, MINI, config=config)[0]
    w, h = config.input_size
    hw, hh = config.heatmap_size
    assert sample["image"].shape == (3, h, w) and sample["image"].dtype == torch.float32
    assert sample["heatmaps"].shape == (NUM_KEYPOINTS, hh, hw) and sample["heatmaps"].dtype == torch.float32
    assert (
        sample["target_weight"].shape == (NUM_KEYPOINTS,) and sample["target_weight"].dtype == torch.float32
    )
    assert sample["center"].shape == (2,) and sample["scale"].shape == (2,)
    assert isinstance(sample["image_id"], int) and isinstance(sample["ann_id"], int)
    assert isinstance(sample["bbox_score"], float)


@needs_mini
def test_test_time_crop_is_centred_on_the_box_and_normalised():
    config = PipelineConfig()
    dataset = WholeBodyTopDownDataset(ANN, MINI, config=config, train=False)
    raw = {a["id"]: a for a in json.loads(ANN.read_text())["annotations"]}
    images = {i["id"]: i for i in json.loads(ANN.read_text())["images"]}
    for index in (0, 5):
        sample = dataset[index]
        x, y, bw, bh = raw[sample["ann_id"]]["bbox"]
        cx, cy = x + bw / 2, y + bh / 2
        assert sample["center"].numpy() == pytest.approx([cx, cy], abs=1e-3)
        # Hand-computed padded scale at the 3:4 input aspect ratio.
        aspect = config.input_size[0] / config.input_size[1]
        sw, sh = (bw, bw / aspect) if bw > aspect * bh else (bh * aspect, bh)
        assert sample["scale"].numpy() == pytest.approx([sw * 1.25, sh * 1.25], rel=1e-4)
        # The crop's centre pixel is the image at the box centre (bilinear), in RGB.
        image = cv2.imread(str(MINI / images[sample["image_id"]]["file_name"]))[:, :, ::-1].astype(np.float64)
        x0, y0 = int(np.floor(cx)), int(np.floor(cy))
        fx, fy = cx - x0, cy - y0
        expected = (
            image[y0, x0] * (1 - fx) * (1 - fy)
            + image[y0, x0 + 1] * fx * (1 - fy)
            + image[y0 + 1, x0] * (1 - fx) * fy
            + image[y0 + 1, x0 + 1] * fx * fy
        )
        crop = _denormalise(sample["image"], config)
        got = crop[config.input_size[1] // 2, config.input_size[0] // 2]
        np.testing.assert_allclose(got, expected, atol=2.0)


@needs_mini
def test_test_time_keypoints_follow_the_hand_computed_similarity():
    config = PipelineConfig()
    dataset = WholeBodyTopDownDataset(ANN, MINI, config=config, train=False)
    annotations = {i.ann_id: i for i in load_wholebody_annotations(ANN).instances}
    sample = dataset[0]
    kp = annotations[sample["ann_id"]].keypoints
    factor = config.input_size[0] / float(sample["scale"][0])
    expected = (kp[:, :2] - sample["center"].numpy()) * factor + np.array(config.input_size) / 2
    labelled = kp[:, 2] > 0
    np.testing.assert_allclose(sample["keypoints"].numpy()[labelled], expected[labelled], atol=1e-3)
    np.testing.assert_array_equal(sample["keypoints_visible"].numpy(), labelled.astype(np.float32))


@needs_mini
def test_target_argmax_lands_on_the_warped_keypoint():
    torch.manual_seed(0)
    config = PipelineConfig()
    dataset = WholeBodyTopDownDataset(ANN, MINI, config=config, train=True)
    ratio = np.array(config.heatmap_size) / np.array(config.input_size)
    checked = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        heatmaps = sample["heatmaps"].numpy()
        points = sample["keypoints"].numpy() * ratio
        weights = sample["target_weight"].numpy()
        assert np.all(weights[sample["keypoints_visible"].numpy() == 0] == 0)
        for k in np.nonzero(weights > 0)[0]:
            x, y = points[k]
            if not (0 <= x <= config.heatmap_size[0] - 1 and 0 <= y <= config.heatmap_size[1] - 1):
                continue
            row, col = np.unravel_index(np.argmax(heatmaps[k]), heatmaps[k].shape)
            assert abs(col - x) <= 0.5 + 1e-4 and abs(row - y) <= 0.5 + 1e-4, (index, k, (col, row), (x, y))
            checked += 1
    assert checked > 200


@needs_mini
def test_flip_mirrors_the_crop_and_swaps_left_and_right():
    plain = WholeBodyTopDownDataset(ANN, MINI, config=_no_aug(), train=True)
    flipped = WholeBodyTopDownDataset(ANN, MINI, config=_no_aug(flip_prob=1.0), train=True)
    width = plain.config.input_size[0]
    a, b = plain[0], flipped[0]
    assert b["flipped"] and not a["flipped"]
    # The flipped input is the mirrored plain crop (up to one grey level of OpenCV's fixed-point bilinear).
    one_level = 1.0 / (255.0 * min(plain.config.std))
    difference = np.abs(b["image"].numpy() - a["image"].flip(-1).numpy())
    assert difference.max() <= 1.01 * one_level and difference.mean() < 0.01 * one_level
    # Left wrist of the flipped sample = mirrored right wrist of the plain one, and vice versa.
    for src, dst in ((RIGHT_WRIST, LEFT_WRIST), (LEFT_WRIST, RIGHT_WRIST)):
        x, y = a["keypoints"][src].tolist()
        assert b["keypoints"][dst].tolist() == pytest.approx([width - 1 - x, y], abs=1e-3)
        assert b["keypoints_visible"][dst] == a["keypoints_visible"][src]
    # Every flip pair swaps, unpaired points (nose, face midline) stay.
    mirrored = a["keypoints"].numpy().copy()
    mirrored[:, 0] = width - 1 - mirrored[:, 0]
    index = list(range(NUM_KEYPOINTS))
    for i, j in FLIP_PAIRS:
        index[i], index[j] = j, i
    labelled = b["keypoints_visible"].numpy() > 0
    np.testing.assert_allclose(b["keypoints"].numpy()[labelled], mirrored[index][labelled], atol=1e-3)


# ----------------------------------------------------------------------------------- augmentation geometry


def _dot_dataset(
    tmp_path: Path, config: PipelineConfig
) -> tuple[WholeBodyTopDownDataset, tuple[float, float]]:
    """A 240x320 black image with one bright dot at the only labelled keypoint (the left wrist)."""
    dot = (141.0, 163.0)
    image = np.zeros((320, 240, 3), dtype=np.uint8)
    cv2.circle(image, (int(dot[0]), int(dot[1])), 2, (255, 255, 255), -1)
    root = tmp_path / "dot"
    root.mkdir()
    cv2.imwrite(str(root / "dot.png"), image)
    lengths = dict(ANNOTATION_KEYPOINT_FIELDS)
    annotation = {name: [0] * (3 * count) for name, count in lengths.items()}
    annotation["keypoints"][3 * LEFT_WRIST : 3 * LEFT_WRIST + 3] = [dot[0], dot[1], 2]
    annotation.update(
        id=7, image_id=1, bbox=[90.0, 80.0, 100.0, 180.0], area=9000.0, iscrowd=0, num_keypoints=1
    )
    data = {
        "images": [{"id": 1, "file_name": "dot.png", "width": 240, "height": 320}],
        "annotations": [annotation],
    }
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return WholeBodyTopDownDataset(ann, root, config=config, train=True), dot


def test_augmented_image_and_keypoints_share_one_transform(tmp_path):
    torch.manual_seed(1)
    config = PipelineConfig(half_body_prob=0.0)
    dataset, _ = _dot_dataset(tmp_path, config)
    ratio = np.array(config.heatmap_size) / np.array(config.input_size)
    seen_flip, seen_rot = set(), 0
    for _ in range(40):
        sample = dataset[0]
        visible = np.nonzero(sample["keypoints_visible"].numpy())[0].tolist()
        # The left wrist is relabelled right wrist exactly when the crop is mirrored.
        assert visible == [RIGHT_WRIST if sample["flipped"] else LEFT_WRIST]
        seen_flip.add(sample["flipped"])
        seen_rot += sample["rotation"] != 0.0
        k = visible[0]
        x, y = sample["keypoints"][k].tolist()
        crop = _denormalise(sample["image"], config).sum(axis=2)
        if 3 <= x <= config.input_size[0] - 4 and 3 <= y <= config.input_size[1] - 4:
            # Centroid of the bright dot (a disc, flat at the top, so not its argmax).
            rows, cols = np.nonzero(crop > crop.max() * 0.5)
            col, row = cols.mean(), rows.mean()
            assert abs(col - x) <= 1.0 and abs(row - y) <= 1.0, (sample["rotation"], (col, row), (x, y))
            heatmap = sample["heatmaps"][k].numpy()
            hrow, hcol = np.unravel_index(np.argmax(heatmap), heatmap.shape)
            assert abs(hcol - x * ratio[0]) <= 0.5 + 1e-4 and abs(hrow - y * ratio[1]) <= 0.5 + 1e-4
        others = np.delete(sample["target_weight"].numpy(), k)
        assert np.all(others == 0)
    assert seen_flip == {True, False} and seen_rot > 5


def test_sample_augmentation_ranges_and_probabilities():
    config = PipelineConfig(half_body_prob=0.0)
    rng = np.random.default_rng(0)
    center, scale = np.array([100.0, 200.0], np.float32), np.array([150.0, 200.0], np.float32)
    keypoints = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    draws = [sample_augmentation(keypoints, center, scale, config, rng) for _ in range(3000)]
    factors = np.array([d[1][0] / scale[0] for d in draws])
    rotations = np.array([d[2] for d in draws])
    flips = np.array([d[3] for d in draws])
    assert factors.min() >= 0.5 - 1e-6 and factors.max() <= 1.5 + 1e-6
    assert factors.min() < 0.55 and factors.max() > 1.45  # the whole range is used
    assert np.allclose([d[1][1] / scale[1] for d in draws], factors)  # aspect ratio kept
    assert np.all(np.abs(rotations) <= 40.0 + 1e-9)
    assert abs(np.mean(rotations != 0) - 0.6) < 0.04  # rot_prob
    assert abs(flips.mean() - 0.5) < 0.04
    # Centre shift (MMPose defaults): p 0.3, at most 0.16 of the box scale per axis.
    shifts = np.array([(d[0] - center) / scale for d in draws])
    shifted = np.any(shifts != 0, axis=1)
    assert abs(shifted.mean() - 0.3) < 0.04
    assert np.abs(shifts).max() <= 0.16 + 1e-6 and np.abs(shifts).max() > 0.15
    off = PipelineConfig(half_body_prob=0.0, shift_factor=0.0)
    assert all(
        np.array_equal(sample_augmentation(keypoints, center, scale, off, rng)[0], center) for _ in range(200)
    )


def test_half_body_box_covers_the_chosen_half():
    config = PipelineConfig(half_body_upper_prob=1.0)
    rng = np.random.default_rng(0)
    keypoints = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    body_y = np.linspace(10, 170, 17)
    keypoints[:17, 0] = np.linspace(40, 60, 17)
    keypoints[:17, 1] = body_y
    keypoints[:17, 2] = 2
    keypoints[23:91] = [30.0, 5.0, 1.0]  # a face point further out: the upper half includes the face
    keypoints[17:23] = [55.0, 190.0, 2.0]  # feet belong to the lower half
    center, scale = half_body_center_scale(keypoints, config, rng)
    # Upper half = body 0-10 + face: x in [30, 40 + 20 * 10 / 16], y in [5, body_y[10]].
    x_lo, x_hi, y_lo, y_hi = 30.0, 40 + 20 * 10 / 16, 5.0, body_y[10]
    assert center.tolist() == pytest.approx([(x_lo + x_hi) / 2, (y_lo + y_hi) / 2], abs=1e-4)
    h = max(y_hi - y_lo, (x_hi - x_lo) / 0.75)
    assert scale.tolist() == pytest.approx([h * 0.75 * 1.5, h * 1.5], rel=1e-4)
    lower = half_body_center_scale(keypoints, PipelineConfig(half_body_upper_prob=0.0), rng)
    assert lower[0][1] == pytest.approx((body_y[11] + 190.0) / 2, abs=1e-4)
    keypoints[9:17, 2] = 0  # only 9 body keypoints labelled ...
    keypoints[8, 2] = 0  # ... now 8: not eligible
    assert half_body_center_scale(keypoints, config, rng) is None


# ------------------------------------------------------------------------------------------------ bad data


@needs_mini
def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text(ANN.read_text()[:5000])
    with pytest.raises(DatasetError, match=r"broken\.json.*malformed JSON"):
        load_wholebody_annotations(bad)


@needs_mini
def test_missing_field_names_the_file_annotation_and_field(tmp_path):
    def drop_bbox(data):
        del next(a for a in data["annotations"] if a["id"] == 230195)["bbox"]

    ann, root = _mini_copy(tmp_path, drop_bbox)
    with pytest.raises(DatasetError, match=r"ann\.json.*id=230195.*'bbox'"):
        WholeBodyTopDownDataset(ann, root)


@needs_mini
def test_wrong_length_keypoints_name_the_field_and_length(tmp_path):
    def truncate_face(data):
        annotation = next(a for a in data["annotations"] if a["id"] == 442619)
        annotation["face_kpts"] = annotation["face_kpts"][:-3]

    ann, _ = _mini_copy(tmp_path, truncate_face)
    with pytest.raises(DatasetError, match=r"ann\.json.*id=442619.*'face_kpts'.*201 values, expected 204"):
        load_wholebody_annotations(ann)


@needs_mini
def test_non_numeric_keypoint_value_is_reported(tmp_path):
    def corrupt(data):
        next(a for a in data["annotations"] if a["id"] == 437295)["lefthand_kpts"][4] = "x"

    ann, _ = _mini_copy(tmp_path, corrupt)
    with pytest.raises(DatasetError, match=r"id=437295.*'lefthand_kpts'"):
        load_wholebody_annotations(ann)


@needs_mini
def test_missing_image_errors_by_default_and_is_counted_when_skipped(tmp_path, caplog):
    ann, root = _mini_copy(tmp_path, drop_images=("000000040083.jpg",))
    with pytest.raises(DatasetError, match=r"000000040083\.jpg.*image_id=40083.*198196"):
        WholeBodyTopDownDataset(ann, root)
    with caplog.at_level(logging.WARNING, logger="trainer.topdown.data"):
        dataset = WholeBodyTopDownDataset(ann, root, missing_images="skip")
    # Image 40083 holds 2 labelled instances (198196, 230195) out of 12.
    assert len(dataset) == 10
    assert dataset.num_skipped_missing_images == 1
    assert any("skipping 1 missing image" in r.getMessage() for r in caplog.records)


@needs_mini
def test_unreadable_image_names_the_file_and_annotation(tmp_path):
    ann, root = _mini_copy(tmp_path, drop_images=("000000000785.jpg",))
    (root / "000000000785.jpg").write_bytes(b"not a jpeg at all")
    dataset = WholeBodyTopDownDataset(ann, root, train=False)
    index = [dataset[i]["ann_id"] for i in range(1, len(dataset))]  # others still load
    assert 442619 not in index
    with pytest.raises(DatasetError, match=r"000000000785\.jpg.*unreadable.*ann_id=442619"):
        dataset[0]


@needs_mini
def test_bad_detections_are_reported(tmp_path):
    detections = json.loads(DET.read_text())
    del detections[3]["score"]
    bad = tmp_path / "det.json"
    bad.write_text(json.dumps(detections))
    with pytest.raises(DatasetError, match=r"det\.json.*\[3\].*'score'"):
        load_detections(bad)
    detections = json.loads(DET.read_text())
    detections[0]["image_id"] = 999
    bad.write_text(json.dumps(detections))
    with pytest.raises(DatasetError, match=r"image_id=999"):
        WholeBodyTopDownDataset(ANN, MINI, train=False, det_file=bad)


def test_config_defaults_are_the_papers_recipe():
    config = PipelineConfig()
    assert config.input_size == (192, 256) and config.heatmap_size == (48, 64)
    assert config.sigma == 2.0 and config.padding == 1.25
    assert config.scale_range == (0.5, 1.5) and config.rot_range == 40.0
    assert config.flip_prob == 0.5 and config.half_body_prob == 0.3
    with pytest.raises(ValueError, match="flip_prob"):
        PipelineConfig(flip_prob=1.5)


# ------------------------------------------------------------------------------------------- DataLoader


@needs_mini
def test_dataloader_with_two_workers(tmp_path):
    dataset = WholeBodyTopDownDataset(ANN, MINI)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    batches = list(loader)
    assert len(batches) == 3
    assert batches[0]["image"].shape == (4, 3, 256, 192)
    assert batches[0]["heatmaps"].shape == (4, NUM_KEYPOINTS, 64, 48)
    assert sorted(int(i) for b in batches for i in b["ann_id"]) == sorted(
        dataset[i]["ann_id"] for i in range(len(dataset))
    )


def test_workers_do_not_repeat_augmentations(tmp_path):
    dataset, _ = _dot_dataset(tmp_path, PipelineConfig())
    repeated = torch.utils.data.Subset(dataset, [0] * 8)
    loader = torch.utils.data.DataLoader(repeated, batch_size=1, num_workers=2)
    views = [(float(b["scale"][0, 0]), float(b["rotation"][0])) for b in loader]
    # Batches alternate between the two workers: identical worker seeds would give pairs of equal views.
    assert len(set(views)) == 8


def test_main_process_augmentation_is_reproducible_with_torch_seed(tmp_path):
    dataset, _ = _dot_dataset(tmp_path, PipelineConfig())
    torch.manual_seed(5)
    first = [dataset[0]["scale"].tolist() for _ in range(3)]
    (tmp_path / "again").mkdir()
    dataset2, _ = _dot_dataset(tmp_path / "again", PipelineConfig())
    torch.manual_seed(5)
    second = [dataset2[0]["scale"].tolist() for _ in range(3)]
    assert first == second
    assert first[0] != first[1]


def test_dataset_survives_pickling(tmp_path):
    # DataLoader workers started with "spawn" receive a pickled copy: it must hold no open handles.
    dataset, _ = _dot_dataset(tmp_path, PipelineConfig())
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(clone) == 1 and clone[0]["image"].shape == (3, 256, 192)


# -------------------------------------------------------------------- today's outputs and MMPose's rules


def _sample_stats(sample: dict) -> dict[str, np.ndarray]:
    stats = {
        k: sample[k].numpy() for k in ("center", "scale", "keypoints", "keypoints_visible", "target_weight")
    }
    stats["heatmap_sum"] = sample["heatmaps"].double().sum(dim=(1, 2)).numpy()
    stats["image_sum"] = sample["image"].double().sum(dim=(1, 2)).numpy()
    return stats


@needs_mini
def test_samples_equal_the_outputs_recorded_before_the_annotation_cache(tmp_path):
    """tests/data/mini_golden.npz holds the pipeline's outputs before the cache, the vectorised box code and
    the MMPose alignments; with the centre shift off they must come out the same, to the last bit except
    where encode_unbiased now keeps a keypoint that lies 6-7 heatmap px outside the map (MMPose's bound)."""
    golden = np.load(GOLDEN)
    cache = tmp_path / "cache"
    torch.manual_seed(0)
    cases = {
        "gt_eval": (WholeBodyTopDownDataset(ANN, MINI, train=False, cache_dir=cache), 12),
        "det_eval": (
            WholeBodyTopDownDataset(ANN, MINI, train=False, det_file=DET, det_score_thr=0.3, cache_dir=cache),
            33,
        ),
        "train": (
            WholeBodyTopDownDataset(ANN, MINI, config=PipelineConfig(shift_factor=0.0), cache_dir=cache),
            24,
        ),
    }
    for prefix, (dataset, count) in cases.items():
        for i in range(count):
            sample = dataset[i % len(dataset)]
            assert [sample["image_id"], sample["ann_id"]] == golden[f"{prefix}/ids"][i].tolist()
            assert sample["rotation"] == golden[f"{prefix}/rot"][i]
            assert sample["flipped"] == golden[f"{prefix}/flip"][i]
            stats = _sample_stats(sample)
            changed = stats["target_weight"] != golden[f"{prefix}/target_weight"][i]
            for name, value in stats.items():
                expected = golden[f"{prefix}/{name}"][i]
                if name in ("target_weight", "heatmap_sum"):
                    value, expected = value[~changed], expected[~changed]
                np.testing.assert_array_equal(value, expected, err_msg=f"{prefix}[{i}] {name}")
            if changed.any():  # only newly kept keypoints, 6 to 7 heatmap px outside the map
                ratio = np.array(dataset.config.heatmap_size) / np.array(dataset.config.input_size)
                points = stats["keypoints"][changed] * ratio
                size = np.array(dataset.config.heatmap_size)
                outside = np.maximum(-points, points - (size - 1)).max(axis=1)
                assert np.all(stats["target_weight"][changed] == 1) and np.all((outside > 6) & (outside <= 7))


def _face_only_copy(tmp_path: Path) -> tuple[Path, Path]:
    """Mini copy where instance 460541 keeps its hands but loses every body keypoint (num_keypoints 0)."""

    def face_only(data):
        annotation = next(a for a in data["annotations"] if a["id"] == 460541)
        annotation["keypoints"] = [0] * 51
        annotation["num_keypoints"] = 0

    return _mini_copy(tmp_path, face_only)


@needs_mini
def test_gt_instances_without_body_keypoints_are_dropped_as_mmpose_unless_switched(tmp_path):
    ann, root = _face_only_copy(tmp_path)
    default = WholeBodyTopDownDataset(ann, root, train=False)
    anyone = WholeBodyTopDownDataset(ann, root, train=False, gt_instances="any")
    assert 460541 not in default.sample_ids[1].tolist() and len(default) == 11
    assert 460541 in anyone.sample_ids[1].tolist() and len(anyone) == 12
    with pytest.raises(ValueError, match="gt_instances"):
        WholeBodyTopDownDataset(ann, root, gt_instances="face")
