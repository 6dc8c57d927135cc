"""KAPAO's inference settings: the ``eval:`` section of a KAPAO config (the paper's six thresholds, fusion,
the unfused-keypoint score, caps, test-time augmentation) and their check. ``trainer.kapao.postprocess``
applies them (and re-exports these names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.setting_error import SettingError

# The score an unfused keypoint gets: "pose" = its pose's confidence; "zero" = the authors' 0, with which the
# evaluator (as xtcocotools) drops a result on every part where no keypoint was fused (kapao_facts.md).
UNFUSED_SCORES: tuple[str, ...] = ("pose", "zero")

# Test-time augmentation: per mode, the network passes as (scale, left-right flip), their candidates merged
# before NMS (the authors' ``forward_augment``; ``trainer.kapao.tta``). "scales" is the authors' published
# recipe, ``val.py --scales 0.8 1 1.2 --flips -1 3 -1``: the flip is the middle pass.
TTA_MODES: dict[str, tuple[tuple[float, bool], ...]] = {
    "none": ((1.0, False),),
    "flip": ((1.0, False), (1.0, True)),
    "scales": ((0.8, False), (1.0, True), (1.2, False)),
}

# At most this many candidates of each object type enter NMS (highest confidence first): the authors'
# ``max_nms``. Bounds the quadratic NMS when an untrained model scores every anchor above tau_cp.
NMS_INPUT_CAP = 30_000


class KapaoEvalSettingError(SettingError):
    """A KAPAO inference setting out of range; ``field`` names the :class:`KapaoEvalConfig` field."""


@dataclass
class KapaoEvalConfig:
    """How KAPAO's outputs become poses: the six thresholds of Sec. 3.3 (the authors' ``val.py`` defaults),
    fusion on/off, the unfused-keypoint score and the caps. The KAPAO family's ``eval:`` config section."""

    # Pose objects (class 0): confidence floor and NMS IoU (tau_cp, tau_bp).
    tau_cp: float = 0.001
    tau_bp: float = 0.65
    # Keypoint objects (classes 1..K): confidence floor and NMS IoU (tau_ck, tau_bk).
    tau_ck: float = 0.2
    tau_bk: float = 0.25
    # Fusion: distance tolerance in ORIGINAL-image pixels; the pose confidence above which a pose takes part.
    tau_fd: float = 50.0
    tau_fc: float = 0.3
    # False: the pose objects' keypoints alone (the paper's Table 4 ablation).
    fusion: bool = True
    # Score of a keypoint no keypoint object replaced: one of UNFUSED_SCORES.
    unfused_score: str = "pose"
    # Poses returned per image, best first. 20 = the evaluator's maxDets: a result below an image's top 20
    # changes no statistic, and 20 instead of the authors' 300 keeps 133-keypoint result lists 15x smaller.
    # Fusion still sees every pose above tau_fc (the cap applies after it).
    max_poses: int = 20
    # Keypoint objects kept after NMS per image, best first: 133 types x 20 people (the evaluator's maxDets),
    # where the authors' 300 would starve whole-body fusion (a COCO image can hold 20 people).
    max_keypoint_objects: int = 2660
    # Test-time augmentation: one of TTA_MODES (each mode's passes run the network once per batch).
    tta: str = "none"

    def validate(self) -> None:
        """Raise :class:`KapaoEvalSettingError` naming the field of the first setting out of range."""
        for name in ("tau_cp", "tau_ck", "tau_fc"):  # confidences: products of two sigmoids
            value = getattr(self, name)
            if not _is_finite_number(value) or not 0 <= value < 1:
                raise KapaoEvalSettingError(name, f"{name} must be a number in [0, 1), got {value!r}")
        for name in ("tau_bp", "tau_bk"):  # IoU thresholds
            value = getattr(self, name)
            if not _is_finite_number(value) or not 0 < value <= 1:
                raise KapaoEvalSettingError(name, f"{name} must be a number in (0, 1], got {value!r}")
        if not _is_finite_number(self.tau_fd) or self.tau_fd <= 0:
            raise KapaoEvalSettingError("tau_fd", f"tau_fd must be a positive number, got {self.tau_fd!r}")
        if not isinstance(self.fusion, bool):
            raise KapaoEvalSettingError("fusion", f"fusion must be true or false, got {self.fusion!r}")
        if self.unfused_score not in UNFUSED_SCORES:
            raise KapaoEvalSettingError(
                "unfused_score",
                f"unfused_score={self.unfused_score!r} is not one of {', '.join(map(repr, UNFUSED_SCORES))}",
            )
        if self.tta not in TTA_MODES:
            raise KapaoEvalSettingError(
                "tta", f"tta={self.tta!r} is not one of {', '.join(map(repr, TTA_MODES))}"
            )
        for name in ("max_poses", "max_keypoint_objects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KapaoEvalSettingError(name, f"{name} must be an integer >= 1, got {value!r}")


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


__all__ = ["NMS_INPUT_CAP", "TTA_MODES", "UNFUSED_SCORES", "KapaoEvalConfig", "KapaoEvalSettingError"]
