"""Synthetic COCO-WholeBody data set (trainer/datasets/synth.py) and ``fowkal data synth``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shared_data import ANN

from orchestrator.cli import main as cli_main
from trainer.datasets.keypoints import (
    ANNOTATION_KEYPOINT_FIELDS,
    FLIP_PAIRS,
    KEYPOINT_NAMES,
    NUM_KEYPOINTS,
    PART_RANGES,
)
from trainer.datasets.synth import (
    _OCCLUDER_LABEL,
    FACE_TEMPLATE,
    _annotate,
    _sample_person,
    write_synthetic_dataset,
)
from trainer.topdown.data import PipelineConfig, WholeBodyTopDownDataset, load_wholebody_annotations


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    ann_file = write_synthetic_dataset(out, num_images=24, seed=3)
    return ann_file, json.loads(ann_file.read_text())


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", num_images=4, seed=7)
    b = write_synthetic_dataset(tmp_path / "b", num_images=4, seed=7)
    c = write_synthetic_dataset(tmp_path / "c", num_images=4, seed=8)
    assert a.read_bytes() == b.read_bytes()
    images_a = sorted((tmp_path / "a" / "images").iterdir())
    images_b = sorted((tmp_path / "b" / "images").iterdir())
    assert [p.name for p in images_a] == [p.name for p in images_b] and len(images_a) == 4
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(images_a, images_b, strict=True))
    assert json.loads(a.read_text())["annotations"] != json.loads(c.read_text())["annotations"]
    # Image i depends on (seed, i) only: a longer run starts with the same images.
    longer = write_synthetic_dataset(tmp_path / "d", num_images=6, seed=7)
    assert json.loads(longer.read_text())["annotations"][:3] == json.loads(a.read_text())["annotations"][:3]


def test_structure_matches_the_real_v1_file(synth):
    _, data = synth
    assert len(data["images"]) == 24 and len(data["annotations"]) >= 24
    if ANN.is_file():
        real = json.loads(ANN.read_text())
        assert set(data) == set(real)
        assert set(data["images"][0]) == set(real["images"][0])
        real_keys = set(real["annotations"][0])
        assert all(set(a) == real_keys for a in data["annotations"])
        assert data["categories"][0]["keypoints"] == real["categories"][0]["keypoints"]
        assert data["categories"][0]["skeleton"] == real["categories"][0]["skeleton"]
    lengths = dict(ANNOTATION_KEYPOINT_FIELDS)
    ids = [a["id"] for a in data["annotations"]]
    assert len(set(ids)) == len(ids)
    for a in data["annotations"]:
        for name, count in lengths.items():
            assert len(a[name]) == 3 * count
        assert a["category_id"] == 1 and a["iscrowd"] == 0 and a["area"] > 0


def test_visibility_flags_counts_and_boxes_are_consistent(synth):
    _, data = synth
    parts = {
        "face": "face_kpts",
        "lefthand": "lefthand_kpts",
        "righthand": "righthand_kpts",
        "foot": "foot_kpts",
    }
    for a in data["annotations"]:
        body = np.array(a["keypoints"], dtype=float).reshape(-1, 3)
        assert a["num_keypoints"] == int((body[:, 2] > 0).sum())
        for name, field in list(parts.items()) + [("body", "keypoints")]:
            kp = np.array(a[field], dtype=float).reshape(-1, 3)
            allowed = {0.0, 1.0} if name == "face" else {0.0, 1.0, 2.0}
            assert set(kp[:, 2].tolist()) <= allowed
            assert np.all(kp[kp[:, 2] == 0, :2] == 0)  # COCO: unlabelled points are (0, 0, 0)
            if name != "body":
                assert a[f"{name}_valid"] == bool((kp[:, 2] > 0).any())
            if name in ("face", "lefthand", "righthand"):
                box = np.array(a[f"{name}_box"])
                if not a[f"{name}_valid"]:
                    assert np.all(box == 0)
                else:
                    labelled = kp[kp[:, 2] > 0, :2]
                    assert np.all(labelled >= box[:2] - 0.02) and np.all(labelled <= box[:2] + box[2:] + 0.02)
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 256 and y + h <= 256


def test_occlusion_and_truncation_show_up_in_the_labels(synth):
    _, data = synth
    body = np.concatenate([np.array(a["keypoints"]).reshape(-1, 3)[:, 2] for a in data["annotations"]])
    counts = np.bincount(body.astype(int), minlength=3)
    assert counts[2] > counts[1] > 0  # mostly visible, some occluded
    assert counts[0] > 0  # some unlabelled (outside the image or turned away)
    valid = [a["face_valid"] for a in data["annotations"]]
    assert any(valid) and not all(valid)


def test_visibility_follows_the_label_map():
    rng = np.random.default_rng(0)
    person = None
    while person is None or person["facing"] < 0.9 or abs(person["turn"]) > 0.3:
        person = _sample_person(rng, 180.0, (128.0, 120.0))
    labels = np.ones((256, 256), dtype=np.uint8)  # the person itself everywhere ...
    labels[:, :128] = _OCCLUDER_LABEL  # ... except an occluder over the left half of the image
    annotation = _annotate(person, labels, label=1, later=set(), image_id=1, ann_id=100)
    kp = person["keypoints"]
    body = np.array(annotation["keypoints"]).reshape(-1, 3)
    for k in range(17):
        x, y = kp[k]
        inside = 0 <= x <= 255 and 0 <= y <= 255
        if not inside:
            assert body[k, 2] == 0
        elif k in (1, 2, 0):  # nose and eyes: visible unless covered (facing the camera here)
            assert body[k, 2] == (1 if round(x) < 128 else 2)
        elif k not in (3, 4):  # ears may be self-occluded when turned; skip them
            assert body[k, 2] == (1 if round(x) < 128 else 2), KEYPOINT_NAMES[k]


def test_dense_parts_are_small_relative_to_the_body(synth):
    _, data = synth
    face_ratio, hand_ratio, body_ratio = [], [], []
    for a in data["annotations"]:
        body = np.array(a["keypoints"], dtype=float).reshape(-1, 3)
        labelled = body[body[:, 2] > 0, :2]
        if len(labelled) < 15:
            continue
        body_extent = float(np.ptp(labelled, axis=0).max())
        body_ratio.append(body_extent)
        for name, field, store in (
            ("face", "face_kpts", face_ratio),
            ("lefthand", "lefthand_kpts", hand_ratio),
            ("righthand", "righthand_kpts", hand_ratio),
        ):
            if a[f"{name}_valid"]:
                kp = np.array(a[field], dtype=float).reshape(-1, 3)
                store.append(float(np.ptp(kp[kp[:, 2] > 0, :2], axis=0).max()) / body_extent)
    assert len(face_ratio) >= 5 and len(hand_ratio) >= 10
    # Real COCO-WholeBody: face and hand boxes are well under a fifth of the person.
    assert max(face_ratio) < 0.2 and max(hand_ratio) < 0.25
    assert 0.03 < np.median(face_ratio) < 0.12 and 0.04 < np.median(hand_ratio) < 0.15


def test_face_template_matches_the_68_point_layout_and_flip_pairs():
    face = FACE_TEMPLATE
    assert face.shape == (68, 2)
    # Mirroring the face (x -> -x) and swapping the COCO-WholeBody face flip pairs gives the face back.
    start = PART_RANGES["face"][0]
    index = list(range(68))
    for i, j in FLIP_PAIRS:
        if start <= i < start + 68:
            index[i - start], index[j - start] = j - start, i - start
    mirrored = face[index] * np.array([-1.0, 1.0])
    np.testing.assert_allclose(mirrored, face, atol=1e-9)
    # iBUG order: jaw 0 on the image left, chin 8 lowest; brows above eyes above nose tip above mouth.
    assert face[0, 0] < face[16, 0] and np.argmax(face[:17, 1]) == 8
    assert face[17:27, 1].max() < face[36:48, 1].min()
    assert face[36:48, 1].max() < face[30, 1] < face[48:68, 1].min()
    assert face[36:42, 0].max() < 0 < face[42:48, 0].min()
    assert face[48, 0] < face[54, 0] and face[51, 1] < face[57, 1]


def test_the_loader_reads_the_synthetic_set(synth):
    ann_file, data = synth
    annotations = load_wholebody_annotations(ann_file)
    assert len(annotations.instances) == len(data["annotations"])
    assert all(inst.keypoints.shape == (NUM_KEYPOINTS, 3) for inst in annotations.instances)
    dataset = WholeBodyTopDownDataset(ann_file, ann_file.parent / "images", config=PipelineConfig())
    assert len(dataset) == len(annotations.instances_with_keypoints()) > 0
    sample = dataset[0]
    assert sample["image"].shape == (3, 256, 192) and float(sample["target_weight"].sum()) > 20


def test_cli_data_synth(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["data", "synth", "--out", str(out), "--images", "3", "--seed", "5"]) == 0
    data = json.loads((out / "annotations.json").read_text())
    assert len(data["images"]) == 3
    assert all((out / "images" / image["file_name"]).is_file() for image in data["images"])
    assert "annotations.json" in capsys.readouterr().out
    # Same command, same seed: the same file (what the README promises).
    write_synthetic_dataset(tmp_path / "api", num_images=3, seed=5)
    assert (tmp_path / "api" / "annotations.json").read_bytes() == (out / "annotations.json").read_bytes()


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        write_synthetic_dataset(tmp_path, num_images=0)
    with pytest.raises(ValueError, match="image_size"):
        write_synthetic_dataset(tmp_path, num_images=1, image_size=(32, 32))
