"""KapaoDataset: the real mini set, a synthetic set, labels that land on the drawn keypoints, determinism."""

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from shared_data import ANN, MINI, needs_mini

from trainer.datasets.annotations import DatasetError
from trainer.datasets.keypoints import ANNOTATION_KEYPOINT_FIELDS
from trainer.datasets.synth import write_synthetic_dataset
from trainer.kapao.dataset import KapaoDataset, KapaoPipelineConfig, collate_kapao, images_to_float
from trainer.kapao.labels import flip_permutation, letterbox_to_original

SMALL = KapaoPipelineConfig(input_size=256)


def _json_keypoints(annotation: dict) -> np.ndarray:
    return np.concatenate(
        [np.asarray(annotation[name], np.float32).reshape(-1, 3) for name, _ in ANNOTATION_KEYPOINT_FIELDS]
    )


def _same(a: dict, b: dict) -> bool:
    return all(
        torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key] for key in a
    )


# ----------------------------------------------------------------------------------------------------------
# The real mini set


@needs_mini
@pytest.mark.parametrize("num_keypoints", [133, 17])
def test_mini_validation_samples_match_the_annotation_file(num_keypoints, tmp_path):
    data = json.loads(ANN.read_text())
    dataset = KapaoDataset(ANN, MINI, SMALL, train=False, num_keypoints=num_keypoints, cache_dir=tmp_path)
    assert len(dataset) == len(data["images"]) == 4
    assert dataset.image_ids.tolist() == [image["id"] for image in data["images"]]  # file order
    for index, image in enumerate(data["images"]):
        sample = dataset[index]
        assert sample["image"].shape == (3, 256, 256) and sample["image"].dtype == torch.uint8
        assert sample["image_id"] == image["id"]
        people = [a for a in data["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
        keypoints = np.stack([_json_keypoints(a)[:num_keypoints] for a in people])
        assert sample["ann_ids"].tolist() == [a["id"] for a in people]
        assert sample["keypoints"].shape == (len(people), num_keypoints, 3)
        labelled = keypoints[..., 2] > 0
        assert len(sample["kp_classes"]) == labelled.sum()
        # Mapped back with ratio and pad, the labels are the file's (boxes, keypoints, keypoint objects).
        ratio, pad = sample["ratio"], sample["pad"]
        assert ratio == pytest.approx(256 / max(image["width"], image["height"]))
        assert sample["orig_size"] == (image["width"], image["height"])
        back = letterbox_to_original(sample["keypoints"][..., :2].numpy().astype(np.float64), ratio, pad)
        np.testing.assert_allclose(back[labelled], keypoints[labelled, :2], atol=1e-3)
        boxes = np.array([a["bbox"] for a in people])
        boxes[:, 2:] += boxes[:, :2]
        np.testing.assert_allclose(
            letterbox_to_original(sample["boxes"].numpy(), ratio, pad), boxes, atol=1e-3
        )
        person, kind = np.nonzero(labelled)
        np.testing.assert_array_equal(sample["kp_classes"].numpy(), kind + 1)
        np.testing.assert_allclose(
            letterbox_to_original(sample["kp_points"].numpy(), ratio, pad),
            keypoints[person, kind, :2],
            atol=1e-3,
        )
        np.testing.assert_allclose(sample["kp_sides"].numpy(), 0.05 * 256, rtol=1e-6)
    batch = collate_kapao([dataset[i] for i in range(4)])
    assert batch["targets"].shape[1] == 6 + 3 * num_keypoints
    assert (
        batch["ratios"].shape == (4,)
        and batch["pads"].shape == (4, 2)
        and batch["orig_sizes"].shape == (4, 2)
    )


@needs_mini
def test_mini_mosaic_labels_land_on_their_persons(tmp_path):
    data = json.loads(ANN.read_text())
    # Which labelled keypoints lie inside their own person box in the file (5 of 701 do not).
    inside_box = {}
    for a in data["annotations"]:
        keypoints = _json_keypoints(a)
        x, y, w, h = a["bbox"]
        inside_box[a["id"]] = (
            (keypoints[:, 2] > 0)
            & (keypoints[:, 0] >= x) & (keypoints[:, 0] <= x + w)
            & (keypoints[:, 1] >= y) & (keypoints[:, 1] <= y + h)
        )  # fmt: skip
    dataset = KapaoDataset(ANN, MINI, SMALL, train=True, cache_dir=tmp_path)
    torch.manual_seed(0)
    checked = 0
    for step in range(6):
        sample = dataset[step % len(dataset)]
        keypoints, boxes = sample["keypoints"].numpy(), sample["boxes"].numpy()
        labelled = keypoints[..., 2] > 0
        assert ((keypoints[labelled, :2] >= 0) & (keypoints[labelled, :2] <= 256)).all()
        assert (keypoints[~labelled] == 0).all()
        assert ((boxes >= 0) & (boxes <= 256)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        for pose, ann_id in enumerate(sample["ann_ids"].tolist()):
            # Keypoints inside their box in the file are inside their (clipped) box after the augmentation.
            # (after a flip, keypoint j of a pose is the mirrored keypoint flip[j] of the file)
            order = flip_permutation(133) if sample["flipped"] else np.arange(133)
            was_inside = inside_box[ann_id][order] & labelled[pose]
            points = keypoints[pose, was_inside, :2]
            box = boxes[pose]
            assert ((points >= box[:2] - 1e-3) & (points <= box[2:] + 1e-3)).all(), (step, ann_id)
            checked += int(was_inside.sum())
        # Every labelled pose keypoint is also a keypoint object of its class at the same place.
        objects = {(int(c), round(float(x), 3), round(float(y), 3)) for c, (x, y) in
                   zip(sample["kp_classes"].tolist(), sample["kp_points"].numpy(), strict=True)}  # fmt: skip
        person, kind = np.nonzero(labelled)
        for p, k in zip(person, kind, strict=True):
            x, y = keypoints[p, k, :2]
            assert (int(k) + 1, round(float(x), 3), round(float(y), 3)) in objects
    assert checked > 100  # the check saw many keypoints


# ----------------------------------------------------------------------------------------------------------
# A data set whose keypoints are coloured squares: labels must land on their colours


PALETTE = np.array(
    [
        (b, g, r)
        for b in (0, 128, 255)
        for g in (0, 128, 255)
        for r in (0, 128, 255)
        if (b, g, r) != (128,) * 3
    ][:17],
    np.float64,
)


def _dot_dataset(root: Path) -> Path:
    """Five PNG images (sizes differ, one without persons): persons whose 17 body keypoints are 11 x 11
    squares of colour PALETTE[k] on a 16 px grid, one crowd annotation; COCO-WholeBody format."""
    rng = np.random.default_rng(0)
    sizes = [(320, 240), (240, 320), (300, 300), (256, 192), (200, 200)]
    images, annotations = [], []
    for image_id, (width, height) in enumerate(sizes, start=1):
        canvas = np.full((height, width, 3), 114, np.uint8)
        people = 0 if image_id == 5 else 2
        for person in range(people):
            x0 = 10 + person * (width // 2)
            y0 = int(rng.integers(10, height - 100))
            grid = np.array([(x0 + 8 + 16 * (k % 5), y0 + 8 + 16 * (k // 5)) for k in range(17)], np.float64)
            keypoints = np.zeros((133, 3))
            keypoints[:17, :2] = grid + 0.5  # the square's centre, continuous pixels
            keypoints[:17, 2] = 2
            keypoints[int(rng.integers(0, 17)), :] = 0  # one unlabelled
            for k in range(17):
                if keypoints[k, 2] > 0:
                    gx, gy = grid[k].astype(int)
                    canvas[gy - 5 : gy + 6, gx - 5 : gx + 6] = PALETTE[k]
            annotation = {
                "id": image_id * 10 + person, "image_id": image_id, "bbox": [x0, y0, 84, 68],
                "area": 84 * 68.0, "iscrowd": 0, "num_keypoints": int((keypoints[:17, 2] > 0).sum()),
            }  # fmt: skip
            start = 0
            for name, count in ANNOTATION_KEYPOINT_FIELDS:
                annotation[name] = keypoints[start : start + count].reshape(-1).tolist()
                start += count
            annotations.append(annotation)
        if people:
            crowd = dict(annotations[-1], id=image_id * 10 + 9, iscrowd=1)
            annotations.append(crowd)
        name = f"dots_{image_id}.png"
        cv2.imwrite(str(root / name), canvas)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    ann_file = root / "dots.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return ann_file


def test_augmented_labels_land_on_their_coloured_squares(tmp_path):
    ann_file = _dot_dataset(tmp_path)
    config = KapaoPipelineConfig(input_size=256, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, scale=0.3)
    dataset = KapaoDataset(ann_file, tmp_path, config, train=True, num_keypoints=17, cache_dir=tmp_path)
    assert len(dataset) == 5
    flip = flip_permutation(17)
    torch.manual_seed(1)
    seen = flipped_seen = 0
    for step in range(10):
        sample = dataset[step % len(dataset)]
        image = sample["image"].numpy().transpose(1, 2, 0)[:, :, ::-1].astype(np.float64)  # back to BGR
        expected = flip if sample["flipped"] else np.arange(17)
        points = [
            (k, xy) for kp in sample["keypoints"].numpy() for k, xy in enumerate(kp[:, :2]) if kp[k, 2] > 0
        ]
        points += [
            (c - 1, xy)
            for c, xy in zip(sample["kp_classes"].tolist(), sample["kp_points"].numpy(), strict=True)
        ]
        for k, (x, y) in points:
            colour = image[int(y), int(x)]
            nearest = int(np.argmin(((PALETTE - colour) ** 2).sum(axis=1)))
            assert nearest == expected[k], (step, k, colour)
        # No crowd person became a pose object; each pose holds its 16 labelled keypoints unless cut.
        assert all(ann_id % 10 != 9 for ann_id in sample["ann_ids"].tolist())
        seen += len(points)
        flipped_seen += int(sample["flipped"])
    assert seen > 200 and 0 < flipped_seen < 10  # many labels checked, flipped and not


def test_validation_keeps_images_without_persons_and_pickles(tmp_path):
    ann_file = _dot_dataset(tmp_path)
    dataset = KapaoDataset(ann_file, tmp_path, SMALL, train=False, num_keypoints=17, cache_dir=tmp_path)
    assert dataset.image_ids.tolist() == [1, 2, 3, 4, 5]
    empty = dataset[4]
    assert empty["boxes"].shape == (0, 4) and empty["keypoints"].shape == (0, 17, 3)
    assert len(empty["kp_classes"]) == 0 and empty["image"].shape == (3, 256, 256)
    batch = collate_kapao([dataset[3], empty])
    assert (batch["targets"][:, 0] == 0).all() and len(batch["targets"]) == 2 + 2 * 16
    # DataLoader workers receive a pickled data set (the annotation cache pickles as its path).
    copy = pickle.loads(pickle.dumps(dataset))
    assert len(pickle.dumps(dataset)) < 20_000
    assert _same(copy[3], dataset[3])


# ----------------------------------------------------------------------------------------------------------
# The project's synthetic generator, determinism, batches, files


def test_synthetic_dataset_loads_and_collates(tmp_path):
    ann_file = write_synthetic_dataset(tmp_path, num_images=4, seed=0)
    data = json.loads(Path(ann_file).read_text())
    val = KapaoDataset(ann_file, tmp_path / "images", SMALL, train=False, cache_dir=tmp_path)
    train = KapaoDataset(ann_file, tmp_path / "images", SMALL, train=True, cache_dir=tmp_path)
    assert len(val) == len(train) == 4
    for index, image in enumerate(data["images"]):
        people = [a for a in data["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
        sample = val[index]
        assert len(sample["boxes"]) == len(people)
        assert len(sample["kp_classes"]) == sum(int((_json_keypoints(a)[:, 2] > 0).sum()) for a in people)
    torch.manual_seed(0)
    samples = [train[i] for i in range(4)]
    batch = collate_kapao(samples)
    assert batch["images"].shape == (4, 3, 256, 256) and batch["images"].dtype == torch.uint8
    assert batch["targets"].shape == (
        sum(len(s["boxes"]) + len(s["kp_classes"]) for s in samples),
        6 + 3 * 133,
    )
    for index, sample in enumerate(samples):  # each sample's rows carry its position in the batch
        assert int((batch["targets"][:, 0] == index).sum()) == len(sample["boxes"]) + len(
            sample["kp_classes"]
        )
    floats = images_to_float(batch["images"])
    assert floats.dtype == torch.float32 and 0 <= floats.min() and floats.max() <= 1
    assert torch.allclose(floats * 255, batch["images"].float())
    assert batch["flipped"].dtype == torch.bool and "ratios" not in batch


def test_training_samples_are_deterministic_and_resumable(tmp_path):
    ann_file = write_synthetic_dataset(tmp_path, num_images=4, seed=0)
    first = KapaoDataset(ann_file, tmp_path / "images", SMALL, train=True, cache_dir=tmp_path)
    second = KapaoDataset(ann_file, tmp_path / "images", SMALL, train=True, cache_dir=tmp_path)
    torch.manual_seed(7)
    a = first[2]
    torch.manual_seed(7)
    b = second[2]
    assert _same(a, b)
    torch.manual_seed(8)
    third = KapaoDataset(ann_file, tmp_path / "images", SMALL, train=True, cache_dir=tmp_path)
    assert not torch.equal(third[2]["image"], a["image"])  # another seed, another sample
    # A checkpoint's generator state continues the same stream.
    state = first.generator_state()
    assert state is not None
    expected = [first[i] for i in (0, 1)]
    second.restore_generator_state(state)
    assert all(_same(x, second[i]) for i, x in zip((0, 1), expected, strict=True))


def test_missing_images_error_or_skip(tmp_path):
    ann_file = write_synthetic_dataset(tmp_path, num_images=3, seed=0)
    missing = sorted((tmp_path / "images").iterdir())[1]
    missing.unlink()
    with pytest.raises(DatasetError, match=missing.name):
        KapaoDataset(ann_file, tmp_path / "images", SMALL, train=False, cache_dir=tmp_path)
    dataset = KapaoDataset(
        ann_file, tmp_path / "images", SMALL, train=False, missing_images="skip", cache_dir=tmp_path
    )
    assert len(dataset) == 2 and dataset.num_skipped_missing_images == 1
    assert dataset.image_ids.tolist() == [1, 3]


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of 64"):
        KapaoPipelineConfig(input_size=1000)
    with pytest.raises(ValueError, match="kp_bbox_mode"):
        KapaoPipelineConfig(kp_bbox_mode="oks")
    with pytest.raises(ValueError, match="scale"):
        KapaoPipelineConfig(scale=1.0)
    with pytest.raises(ValueError, match="num_keypoints"):
        KapaoDataset("unused.json", ".", num_keypoints=23)
    defaults = KapaoPipelineConfig()
    assert (defaults.hsv_h, defaults.hsv_s, defaults.hsv_v) == (0.015, 0.7, 0.4)
    assert (defaults.translate, defaults.scale, defaults.fliplr, defaults.mosaic) == (0.1, 0.9, 0.5, 1.0)
    assert (defaults.input_size, defaults.kp_bbox, defaults.kp_bbox_mode) == (1280, 0.05, "fixed")
