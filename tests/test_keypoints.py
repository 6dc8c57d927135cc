"""trainer/datasets/keypoints.py checked against ../shared/reference/coco_wholebody_keypoints.json."""

from __future__ import annotations

import json

import pytest
from shared_data import KEYPOINT_FACTS

from trainer.datasets import keypoints as kp

REFERENCE = KEYPOINT_FACTS


@pytest.fixture(scope="module")
def reference() -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"reference keypoint facts not found at {REFERENCE} (../shared is absent)")
    return json.loads(REFERENCE.read_text())


def test_count_parts_and_names(reference):
    assert kp.NUM_KEYPOINTS == reference["num_keypoints"] == 133
    assert {name: list(r) for name, r in kp.PART_RANGES.items()} == reference["parts"]
    assert list(kp.KEYPOINT_NAMES) == reference["keypoint_names"]
    # The annotation fields tile the 133 keypoints in part order.
    assert [n for _, n in kp.ANNOTATION_KEYPOINT_FIELDS] == [b - a for a, b in kp.PART_RANGES.values()]


def test_flip_pairs_and_flip_index(reference):
    assert sorted(map(tuple, map(sorted, kp.FLIP_PAIRS))) == sorted(
        map(tuple, map(sorted, reference["flip_pairs"]))
    )
    index = kp.flip_index()
    assert sorted(index) == list(range(kp.NUM_KEYPOINTS))
    assert all(index[index[k]] == k for k in range(kp.NUM_KEYPOINTS))  # an involution
    for a, b in reference["flip_pairs"]:
        assert index[a] == b and index[b] == a
        assert kp.part_of_keypoint(a) in ("body", "foot", "face") or {
            kp.part_of_keypoint(a),
            kp.part_of_keypoint(b),
        } == {
            "lefthand",
            "righthand",
        }


def test_sigmas_and_skeleton(reference):
    assert list(kp.SIGMAS) == pytest.approx(reference["sigmas"], abs=0, rel=0)
    assert sorted(map(tuple, kp.SKELETON)) == sorted(map(tuple, reference["skeleton"]))


def test_paper_parts_cover_the_keypoints_once():
    covered = sorted(k for indices in kp.COCO_WHOLEBODY_PARTS.values() for k in indices)
    assert covered == list(range(kp.NUM_KEYPOINTS))
    assert kp.COCO_WHOLEBODY_PARTS["hand"] == tuple(range(*kp.PART_RANGES["lefthand"])) + tuple(
        range(*kp.PART_RANGES["righthand"])
    )
    with pytest.raises(ValueError, match="133"):
        kp.part_of_keypoint(133)
