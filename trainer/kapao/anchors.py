"""The YOLOv5-P6 output layout KAPAO uses: 4 strides, 3 anchors each (in input pixels)."""

from __future__ import annotations

STRIDES: tuple[int, ...] = (8, 16, 32, 64)

# Anchors (w, h) in input pixels per stride: P3, P4, P5, P6 (the authors' P6 model files).
P6_ANCHORS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((19, 27), (44, 40), (38, 94)),
    ((96, 68), (86, 152), (180, 137)),
    ((140, 301), (303, 264), (238, 542)),
    ((436, 615), (739, 380), (925, 792)),
)
ANCHORS_PER_STRIDE = 3


def outputs_per_anchor(num_keypoints: int) -> int:
    """No = 3K + 6: box (4), objectness (1), K + 1 classes (person pose + one per keypoint), 2K offsets."""
    return 3 * num_keypoints + 6


def keypoints_from_outputs(outputs_per_anchor_: int) -> int:
    """K from No = 3K + 6 (raises when No is not of that form)."""
    k, rest = divmod(outputs_per_anchor_ - 6, 3)
    if rest or k < 1:
        raise ValueError(f"{outputs_per_anchor_} outputs per anchor is not 3K + 6 for any K >= 1")
    return k
