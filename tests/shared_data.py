"""Where the tests find the project's shared real data (``../shared``, beside the repository; never copied
into it) and the skip mark of the tests that need it: the real COCO-WholeBody mini set (4 COCO images, their
whole-body annotations, 118 person detections) and the keypoint reference facts."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
MINI = SHARED / "data" / "coco_wholebody_mini"
ANN = MINI / "test_coco_wholebody.json"
DET = MINI / "test_coco_det_AP_H_56.json"
KEYPOINT_FACTS = SHARED / "reference" / "coco_wholebody_keypoints.json"

needs_mini = pytest.mark.skipif(
    not (ANN.is_file() and DET.is_file()),
    reason=f"real COCO-WholeBody mini data not found at {MINI} (../shared is absent)",
)
