"""Top-down geometry: person box -> (centre, scale) -> affine warp to the network input, and back.

Conventions (shared by the data pipeline, the codec and evaluation):
- ``center`` is (x, y) in image pixels; ``scale`` is the (w, h) of the image region, in pixels, that is
  warped onto the network input. ``scale`` always has the input's aspect ratio (w / h).
- ``output_size`` is (w, h), as OpenCV expects.
- ``rot_deg`` rotates the region counter-clockwise in the image (positive = the person appears
  rotated clockwise in the crop). Augmentation draws it symmetrically, so only consistency matters.
"""

from __future__ import annotations

import numpy as np


def box_to_center_scale(
    box_xywh, aspect_ratio: float, padding: float = 1.25
) -> tuple[np.ndarray, np.ndarray]:
    """COCO box (x, y, w, h) -> centre and padded scale at ``aspect_ratio`` (= input w / h)."""
    x, y, w, h = (float(v) for v in box_xywh[:4])
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    # Grow the short side so the region has the input's aspect ratio, then pad (MMPose: 1.25).
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    scale = np.array([w * padding, h * padding], dtype=np.float32)
    return center, scale


def get_warp_matrix(center, scale, rot_deg: float, output_size, inv: bool = False) -> np.ndarray:
    """2x3 affine matrix taking image pixels of the region (center, scale, rot) to ``output_size``.

    Maps ``center`` to the output's centre, scales by output_w / scale_w (the same factor for both
    axes since ``scale`` has the output's aspect ratio) and rotates by ``rot_deg``. With ``inv=True``
    returns the inverse map (output pixels -> image pixels).
    """
    center = np.asarray(center, dtype=np.float64)
    out_w, out_h = float(output_size[0]), float(output_size[1])
    s = out_w / float(scale[0])
    theta = np.deg2rad(rot_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.array([[cos, sin], [-sin, cos]])
    out_center = np.array([out_w * 0.5, out_h * 0.5])
    if not inv:
        linear = s * rot
        shift = out_center - linear @ center
    else:
        linear = rot.T / s
        shift = center - linear @ out_center
    return np.concatenate([linear, shift[:, None]], axis=1).astype(np.float32)


def apply_affine(points, matrix) -> np.ndarray:
    """Apply a 2x3 affine matrix to points of shape [..., 2]."""
    points = np.asarray(points, dtype=np.float32)
    matrix = np.asarray(matrix, dtype=np.float32)
    return points @ matrix[:, :2].T + matrix[:, 2]
