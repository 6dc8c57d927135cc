"""KAPAO inference: raw head outputs -> objects -> NMS per object type -> keypoint-object fusion -> poses.

The steps of the paper's Sec. 3.3 (numbers: ``kapao_facts.md``, "Inference"):

1. ``decode_outputs``: every anchor's box, objectness, K + 1 class scores, K pose keypoints (input pixels).
2. ``candidates``: per image, the anchors whose confidence ``obj * max(class)`` is above a floor, split by the
   arg-max class into pose objects (class 0) and keypoint objects (class k + 1 = keypoint k). From the raw
   outputs it decodes only those anchors (the logit of the objectness is compared first: ``conf <= obj``).
3. ``non_max_suppression``: greedy NMS per object type (what torchvision's ``nms`` / ``batched_nms`` keep).
4. ``fuse_keypoint_objects``: the authors' fusion rule (their ``val.py``), in original-image pixels.
5. ``poses_from_candidates``: 3, back to original-image pixels, 4, scores for the unfused keypoints.

Unlike the authors' ``scale_coords``, nothing is clipped to the image: they clip the keypoint-object boxes
before taking their centres (which moves keypoints near the border) and, by a slip, only the first two pose
keypoints. Greedy rules that are sequential per object (NMS within a class, fusion) are solved as fixed
points over all objects at once (``_fixed_point``): the same result, a few tensor passes instead of a loop.

Steps 3-5 read only the compact ``Candidates`` of step 2, so an inference-time sweep caches the candidates
above its lowest thresholds once per image and re-runs only ``poses_from_candidates`` per trial.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from trainer.datasets.keypoints import NUM_KEYPOINTS
from trainer.evaluation.wholebody import keypoints_to_results
from trainer.kapao.anchors import P6_ANCHORS, STRIDES, keypoints_from_outputs

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


class KapaoEvalSettingError(ValueError):
    """A KAPAO inference setting out of range; ``field`` names the :class:`KapaoEvalConfig` field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


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


# --------------------------------------------------------------------------------------------------------
# Decoding (kapao_facts.md, "Network"; the paper's Eq. 1-2). ``grid`` (cell x, y), ``stride`` and ``anchor``
# (w, h in input pixels) broadcast against the raw values' (x, y) pairs.
# --------------------------------------------------------------------------------------------------------


def _decode_boxes(raw_xywh: torch.Tensor, grid: torch.Tensor, stride, anchor: torch.Tensor) -> torch.Tensor:
    """Raw ``[..., 4]`` -> box centre x, y, w, h in input pixels."""
    y = raw_xywh.float().sigmoid()
    xy = (2 * y[..., 0:2] - 0.5 + grid) * stride  # the cell and half of each neighbour
    wh = (2 * y[..., 2:4]).square() * anchor  # up to 4x the anchor
    return torch.cat([xy, wh], dim=-1)


def _decode_keypoints(
    raw_offsets: torch.Tensor, grid: torch.Tensor, stride, anchor: torch.Tensor
) -> torch.Tensor:
    """Raw ``[..., 2K]`` -> ``[..., K, 2]`` keypoints in input pixels: relative to the cell corner, scaled by
    the anchor, within +-2 anchors of the corner."""
    offsets = (4 * raw_offsets.float().sigmoid() - 2).unflatten(-1, (-1, 2))
    return offsets * anchor.unsqueeze(-2) + (grid * stride).unsqueeze(-2)


def _anchor_table(anchors, device) -> torch.Tensor:
    """``[L, A, 2]`` float32 anchors on ``device`` (a tensor or nested tuples such as ``P6_ANCHORS``)."""
    table = torch.as_tensor(anchors, dtype=torch.float32, device=device)
    if table.ndim != 3 or table.shape[-1] != 2:
        raise ValueError(f"anchors must be [L, A, 2] (w, h per anchor), got {tuple(table.shape)}")
    return table


def _check_layers(outputs: Sequence[torch.Tensor], anchors: torch.Tensor, strides: Sequence[float]) -> None:
    if not (len(outputs) == len(anchors) == len(strides)):
        raise ValueError(
            f"{len(outputs)} output layers, {len(anchors)} anchor layers, {len(strides)} strides: must agree"
        )
    for level, out in enumerate(outputs):
        if out.ndim != 5 or out.shape[1] != anchors.shape[1]:
            raise ValueError(
                f"output layer {level} must be [B, {anchors.shape[1]}, H, W, 3K + 6], got {tuple(out.shape)}"
            )


def decode_outputs(outputs: Sequence[torch.Tensor], anchors=P6_ANCHORS, strides=STRIDES) -> torch.Tensor:
    """Every anchor decoded: ``[B, N, 3K + 6]``, N = the sum of A * H * W (order: layer, anchor, row, column).

    Args:
        outputs: per stride, the raw head output ``[B, A, H, W, 3K + 6]`` (x, y, w, h, objectness, K + 1 class
            scores, 2K keypoint offsets).
        anchors: ``[L, A, 2]`` anchor (w, h) in input pixels (tensor or nested tuples).
        strides: the L strides in input pixels.

    Returns:
        Box centre x, y, w, h and keypoint (x, y) pairs in input pixels; objectness and class scores after the
        sigmoid. On the outputs' device, float32.
    """
    table = _anchor_table(anchors, outputs[0].device)
    _check_layers(outputs, table, strides)
    decoded = []
    for out, anchor, stride in zip(outputs, table, strides, strict=True):
        height, width = out.shape[2:4]
        rows, cols = torch.meshgrid(
            torch.arange(height, device=out.device), torch.arange(width, device=out.device), indexing="ij"
        )
        grid = torch.stack([cols, rows], dim=-1).float()[None, None]  # [1, 1, H, W, 2] as (x, y)
        anchor = anchor[None, :, None, None, :]
        k = keypoints_from_outputs(out.shape[-1])
        boxes = _decode_boxes(out[..., :4], grid, float(stride), anchor)
        keypoints = _decode_keypoints(out[..., 4 + k + 2 :], grid, float(stride), anchor)
        scores = out[..., 4 : 4 + k + 2].float().sigmoid()
        decoded.append(torch.cat([boxes, scores, keypoints.flatten(-2)], dim=-1).flatten(1, 3))
    return torch.cat(decoded, dim=1)


# --------------------------------------------------------------------------------------------------------
# Candidates: what a sweep caches
# --------------------------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """One image's objects above a confidence floor, in input pixels (boxes x1, y1, x2, y2), any order."""

    pose_boxes: torch.Tensor  # [P, 4]
    pose_scores: torch.Tensor  # [P] obj * class-0 score
    pose_keypoints: torch.Tensor  # [P, K, 2]
    kp_boxes: torch.Tensor  # [M, 4]
    kp_scores: torch.Tensor  # [M] obj * class score
    kp_classes: torch.Tensor  # [M] int64 keypoint index, 0-based

    @property
    def num_keypoints(self) -> int:
        return self.pose_keypoints.shape[1]

    def to(self, device) -> Candidates:
        return Candidates(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


def _split_by_type(
    boxes, conf, label, pose_keypoints, pose_floor: float, keypoint_floor: float, xyxy: bool = False
) -> Candidates:
    """One image's rows (box centre x, y, w, h, or corners with ``xyxy``; confidence; arg-max class) -> pose
    and keypoint objects above the floors. ``pose_keypoints(rows)``: the ``[n, K, 2]`` keypoints of those
    rows (indices)."""
    if not xyxy:
        boxes = _corners(boxes)
    is_pose = ((label == 0) & (conf > pose_floor)).nonzero().squeeze(1)
    is_kp = ((label > 0) & (conf > keypoint_floor)).nonzero().squeeze(1)
    return Candidates(
        pose_boxes=boxes[is_pose],
        pose_scores=conf[is_pose],
        pose_keypoints=pose_keypoints(is_pose),
        kp_boxes=boxes[is_kp],
        kp_scores=conf[is_kp],
        kp_classes=label[is_kp] - 1,
    )


def candidates(
    outputs,
    conf_floor: float = KapaoEvalConfig.tau_cp,
    keypoint_floor: float | None = None,
    anchors=P6_ANCHORS,
    strides=STRIDES,
) -> list[Candidates]:
    """Per image, the pose objects with confidence > ``conf_floor`` and the keypoint objects with confidence
    > ``keypoint_floor`` (default ``conf_floor``): the cache of an inference-time sweep.

    Confidence = objectness x the arg-max class score; class 0 makes a pose object, class k + 1 a keypoint
    object of keypoint k (Sec. 3.3). ``outputs`` is the decoded ``[B, N, 3K + 6]`` of ``decode_outputs`` or
    the raw per-stride outputs; of raw outputs only the anchors whose objectness clears the lower floor are
    decoded (confidence <= objectness), and keypoints only for the pose objects.
    """
    keypoint_floor = conf_floor if keypoint_floor is None else keypoint_floor
    if isinstance(outputs, torch.Tensor):
        if outputs.ndim != 3:
            raise ValueError(f"decoded outputs must be [B, N, 3K + 6], got {tuple(outputs.shape)}")
        k = keypoints_from_outputs(outputs.shape[-1])
        per_image = []
        for rows in outputs.float():
            class_score, label = rows[:, 5 : 5 + k + 1].max(dim=1)
            keypoints = partial(torch.index_select, rows[:, 5 + k + 1 :].unflatten(-1, (k, 2)), 0)
            conf = rows[:, 4] * class_score
            per_image.append(_split_by_type(rows[:, :4], conf, label, keypoints, conf_floor, keypoint_floor))
        return per_image
    table = _anchor_table(anchors, outputs[0].device)
    _check_layers(outputs, table, strides)
    k = keypoints_from_outputs(outputs[0].shape[-1])
    # Objectness logit floor, a hair low so that rounding never drops an anchor the exact test below keeps.
    floor = min(conf_floor, keypoint_floor)
    logit_floor = (
        math.log(floor / (1 - floor)) - 1e-3 if 0 < floor < 1 else (math.inf if floor >= 1 else -math.inf)
    )
    # The anchors above the floor, every layer together: raw row, image, and (cell x, y, stride, anchor w, h).
    # Per layer the outputs are read as [B * A * H * W, 3K + 6] rows: one pass over the objectness column,
    # then only the survivors' rows are gathered, with their cell's constants from a table kept per shape.
    batch = outputs[0].shape[0]
    key = tuple(table.flatten().tolist())
    rows, images, cells = [], [], []
    for level, (out, stride) in enumerate(zip(outputs, strides, strict=True)):
        flat = out.reshape(-1, out.shape[-1])
        keep = (flat[:, 4] > logit_floor).nonzero().squeeze(1)
        rows.append(flat.index_select(0, keep))
        per_image = out.shape[1] * out.shape[2] * out.shape[3]
        cell = keep if batch == 1 else keep % per_image
        cells.append(_cell_table(key, level, table[level], out.shape[1:4], float(stride), out.device)[cell])
        if batch > 1:
            images.append(keep // per_image)
    rows, cell = torch.cat(rows), torch.cat(cells)
    grid, stride, anchor = cell[:, 0:2], cell[:, 2:3], cell[:, 3:5]
    boxes = _corners(_decode_boxes(rows[:, :4], grid, stride, anchor))
    class_logit, label = rows[:, 5 : 5 + k + 1].max(dim=1)  # sigmoid is monotonic: the same arg-max
    conf = rows[:, 4].float().sigmoid() * class_logit.float().sigmoid()

    def pose_keypoints(chosen):
        return _decode_keypoints(rows[chosen, 4 + k + 2 :], grid[chosen], stride[chosen], anchor[chosen])

    if batch == 1:
        return [_split_by_type(boxes, conf, label, pose_keypoints, conf_floor, keypoint_floor, xyxy=True)]
    image = torch.cat(images)
    per_image = []
    for b in range(batch):
        mine = (image == b).nonzero().squeeze(1)
        per_image.append(
            _split_by_type(
                boxes[mine],
                conf[mine],
                label[mine],
                lambda chosen, mine=mine: pose_keypoints(mine[chosen]),
                conf_floor,
                keypoint_floor,
                xyxy=True,
            )
        )
    return per_image


# (anchors, level, (A, H, W), stride, device) -> [A * H * W, 5]: cell x, y, stride, anchor w, h per anchor
# slot in the order of the raw rows. A few shapes per process (one per input size and layer).
_CELL_TABLES: dict = {}


def _cell_table(key, level: int, anchor: torch.Tensor, shape, stride: float, device) -> torch.Tensor:
    full_key = (key, level, tuple(shape), stride, str(device))
    table = _CELL_TABLES.get(full_key)
    if table is None:
        num_anchors, height, width = shape
        a, gy, gx = torch.meshgrid(
            torch.arange(num_anchors, device=device),
            torch.arange(height, device=device),
            torch.arange(width, device=device),
            indexing="ij",
        )
        grid = torch.stack([gx, gy], dim=-1).reshape(-1, 2).float()
        strides = torch.full((len(grid), 1), stride, device=device)
        table = torch.cat([grid, strides, anchor[a.reshape(-1)]], dim=1)
        if len(_CELL_TABLES) > 64:
            _CELL_TABLES.clear()
        _CELL_TABLES[full_key] = table
    return table


# --------------------------------------------------------------------------------------------------------
# NMS, fusion, poses
# --------------------------------------------------------------------------------------------------------


def _top(scores: torch.Tensor, cap: int) -> torch.Tensor:
    """Indices of the ``cap`` highest scores (all when fewer), best first."""
    if len(scores) > cap:
        return scores.topk(cap).indices
    return torch.argsort(scores, descending=True, stable=True)


def _fixed_point(step, start: torch.Tensor) -> torch.Tensor:
    """The solution of a greedy rule in which the decision of item j depends only on those of the items
    before it, with ``step(decisions) -> decisions`` applying the rule to every item at once: iterate from any
    guess until nothing changes. After t steps the first t decisions are final, so this ends within n + 1
    steps and the fixed point is the sequential rule's unique solution; in crowds it takes 2-4 steps."""
    decisions = start
    while True:
        following = step(decisions)
        if torch.equal(following, decisions):
            return decisions
        decisions = following


def _pairwise_iou(x1, y1, x2, y2) -> torch.Tensor:
    """Box corners ``[..., n]`` each -> ``[..., n, n]`` IoU, with the operations of torchvision's NMS."""
    area = (x2 - x1) * (y2 - y1)
    row, col = (..., slice(None), None), (..., None, slice(None))
    width = torch.minimum(x2[row], x2[col]) - torch.maximum(x1[row], x1[col])
    height = torch.minimum(y2[row], y2[col]) - torch.maximum(y1[row], y1[col])
    inter = width.clamp_(min=0) * height.clamp_(min=0)
    return inter / (area[..., :, None] + area[..., None, :] - inter)


def _corners(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes as centre x, y, w, h -> corners x1, y1, x2, y2."""
    centre, size = boxes[:, :2], boxes[:, 2:4]
    return torch.cat((centre - size / 2, centre + size / 2), dim=1)


# Largest padded per-class IoU table (classes x m x m) ``_nms_per_class`` builds; beyond it torchvision's.
_PADDED_NMS_LIMIT = 4_000_000


def _nms_per_class(boxes, scores, classes, iou_threshold: float) -> torch.Tensor:
    """Indices kept by greedy NMS within each class, best first: what ``torchvision.ops.batched_nms`` keeps.

    Keypoint objects are many classes of a few boxes each (up to 133 x people): one padded IoU table per
    class ``[classes, m, m]`` and the greedy rule as a fixed point, instead of the all-pairs work of
    class-offset boxes (quadratic in every box of every class on a CPU).
    """
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(classes[order], stable=True)]  # by class, best first within a class
    sorted_classes = classes[order]
    counts = torch.bincount(sorted_classes)
    m = int(counts.max()) if len(order) else 0
    if len(counts) * m * m > _PADDED_NMS_LIMIT:
        from torchvision.ops import batched_nms

        return batched_nms(boxes, scores, classes, iou_threshold)
    rank = torch.arange(len(order), device=order.device) - (counts.cumsum(0) - counts)[sorted_classes]
    corners = boxes.new_zeros(4, len(counts), m)  # x1, y1, x2, y2 of box `rank` of each class
    corners[:, sorted_classes, rank] = boxes[order].T
    valid = torch.zeros(len(counts), m, dtype=torch.bool, device=boxes.device)
    valid[sorted_classes, rank] = True
    later = torch.ones(m, m, dtype=torch.bool, device=boxes.device).triu(1)
    # suppresses[c, i, j] = 1: box i of class c, if kept, removes the later box j (IoU > threshold).
    suppresses = ((_pairwise_iou(*corners) > iou_threshold) & later).to(boxes.dtype)

    def keep(kept: torch.Tensor) -> torch.Tensor:
        return (torch.bmm(kept.to(boxes.dtype).unsqueeze(1), suppresses).squeeze(1) == 0) & valid

    kept = order[_fixed_point(keep, valid)[sorted_classes, rank]]
    return kept[torch.argsort(scores[kept], descending=True, stable=True)]


def _nms_best(boxes, scores, iou_threshold: float, wanted: int, all_above: float) -> torch.Tensor:
    """Indices of greedy-NMS survivors, best first: at least the best ``wanted`` ones (all when fewer) and
    every survivor scoring above ``all_above``; maybe more. A box is suppressed only by better ones, so NMS
    on the best n candidates decides them exactly: grow n until enough survive, not NMS on thousands."""
    from torchvision.ops import nms  # here: importing torchvision costs seconds at every start

    order = _top(scores, NMS_INPUT_CAP)
    n = max(4 * wanted, int((scores > all_above).sum()) + wanted)
    while True:
        prefix = order[:n]
        kept = prefix[nms(boxes[prefix], scores[prefix], iou_threshold)]
        if len(kept) >= wanted or n >= len(order):
            return kept
        n *= 4


def non_max_suppression(cands: Candidates, settings: KapaoEvalConfig, all_poses: bool = True) -> Candidates:
    """The survivors of NMS per object type, best first: pose objects above tau_cp with IoU tau_bp, keypoint
    objects above tau_ck with IoU tau_bk within their class (at most ``max_keypoint_objects``). A pose box
    never suppresses a keypoint box, nor a keypoint box one of another class.

    ``all_poses=False`` returns only the pose survivors ``poses_from_candidates`` reads (at least the best
    ``max_poses`` and, with fusion, every one above tau_fc), found without running NMS on all of them.
    """
    pose = (cands.pose_scores > settings.tau_cp).nonzero().squeeze(1)
    wanted = len(pose) if all_poses else settings.max_poses
    all_above = settings.tau_fc if settings.fusion and not all_poses else math.inf
    pose = pose[
        _nms_best(cands.pose_boxes[pose], cands.pose_scores[pose], settings.tau_bp, wanted, all_above)
    ]
    kp = (cands.kp_scores > settings.tau_ck).nonzero().squeeze(1)
    kp = kp[_top(cands.kp_scores[kp], NMS_INPUT_CAP)]
    kept = _nms_per_class(cands.kp_boxes[kp], cands.kp_scores[kp], cands.kp_classes[kp], settings.tau_bk)
    kp = kp[kept[: settings.max_keypoint_objects]]
    return Candidates(
        pose_boxes=cands.pose_boxes[pose],
        pose_scores=cands.pose_scores[pose],
        pose_keypoints=cands.pose_keypoints[pose],
        kp_boxes=cands.kp_boxes[kp],
        kp_scores=cands.kp_scores[kp],
        kp_classes=cands.kp_classes[kp],
    )


def fuse_keypoint_objects(
    pose_keypoints: torch.Tensor,
    pose_scores: torch.Tensor,
    kp_xy: torch.Tensor,
    kp_scores: torch.Tensor,
    kp_classes: torch.Tensor,
    tau_fd: float = KapaoEvalConfig.tau_fd,
    tau_fc: float = KapaoEvalConfig.tau_fc,
) -> torch.Tensor:
    """The pose keypoints ``[P, K, 3]`` (x, y, score) with keypoint objects fused in (the authors' Alg. 1).

    Only poses with score > ``tau_fc`` take part. Keypoint objects are taken in descending score order; each
    goes to the eligible pose whose keypoint of its type is nearest (as that keypoint stands, earlier fusions
    included; the first pose on a tie) and replaces it with (x, y, score) when the distance is < ``tau_fd``
    and its score is above that keypoint's current one; else it is dropped. The third column of
    ``pose_keypoints`` is the starting score (0 in the paper's pipeline). ``kp_classes``: 0-based indices.

    In that order a fused keypoint is final (a later object never scores higher), so object j sees each
    pose's keypoint either as given or at the first earlier object of its type fused there: the rule is a
    fixed point over all objects at once (``_fixed_point``), not a loop over objects.
    """
    fused = torch.as_tensor(pose_keypoints).clone()
    device, dtype = fused.device, fused.dtype
    pose_scores, kp_xy, kp_scores, kp_classes = (
        torch.as_tensor(t, device=device) for t in (pose_scores, kp_xy, kp_scores, kp_classes)
    )
    eligible = (pose_scores > tau_fc).nonzero().squeeze(1)
    count, num_types = len(kp_scores), fused.shape[1]
    if len(eligible) == 0 or count == 0:
        return fused
    order = torch.argsort(kp_scores, descending=True, stable=True)
    x, y, score = (v.to(dtype) for v in (kp_xy[order, 0], kp_xy[order, 1], kp_scores[order]))
    # Keypoint slots of the eligible poses, flat (pose * K + type), and one more: "no slot" (dropped).
    none = len(eligible) * num_types
    keypoints = torch.cat([fused[eligible].view(-1, 3), fused.new_zeros(1, 3)])
    slot = torch.arange(len(eligible), device=device) * num_types + kp_classes[order][:, None]  # [M, E]
    # Each object's keypoint type in every eligible pose, as given: distance (as numpy's norm) and score.
    given_distance = _distance(keypoints[:, 0].take(slot), keypoints[:, 1].take(slot), x, y)
    given_score = keypoints[:, 2].take(slot)
    position = torch.arange(count, device=device)
    dropped = torch.full((count,), none, device=device)

    def targets(target: torch.Tensor) -> torch.Tensor:
        """Each object's slot (``none``: dropped), given the slots of the objects before it."""
        first = torch.full((none + 1,), count, device=device).scatter_reduce_(0, target, position, "amin")
        seen = first.take(slot)  # [M, E]: the first object fused at that slot
        moved = seen < position[:, None]  # ... before this one: the keypoint stands there, with its score
        seen = seen.clamp_(max=count - 1)
        distance = torch.where(moved, _distance(x.take(seen), y.take(seen), x, y), given_distance)
        current = torch.where(moved, score.take(seen), given_score)
        nearest_distance, nearest = distance.min(dim=1)  # the first pose on a tie, as numpy's argmin
        accept = (nearest_distance < tau_fd) & (score > current.gather(1, nearest[:, None]).squeeze(1))
        return torch.where(accept, slot.gather(1, nearest[:, None]).squeeze(1), dropped)

    target = _fixed_point(targets, dropped)
    # At the fixed point every slot takes at most one object (a second one never outscores the first);
    # the dropped ones all write the extra row.
    keypoints[target] = torch.stack([x, y, score], dim=1)
    fused[eligible] = keypoints[:none].view(len(eligible), num_types, 3)
    return fused


def _distance(x: torch.Tensor, y: torch.Tensor, to_x: torch.Tensor, to_y: torch.Tensor) -> torch.Tensor:
    """``[M, E]`` distances from ``(x, y)`` to each row's ``(to_x, to_y)`` (``[M]``), as numpy's norm."""
    return ((x - to_x[:, None]).square() + (y - to_y[:, None]).square()).sqrt()


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the network input: ``input = original * ratio + pad`` per axis (x, y)."""

    ratio: tuple[float, float]
    pad: tuple[float, float]

    @classmethod
    def of(cls, value) -> Letterbox:
        """A ``Letterbox`` from itself or ``(ratio, (pad_x, pad_y))``, the ratio a number or ``(ratio_x,
        ratio_y)`` (YOLOv5's ``shapes[i][1]``)."""
        if isinstance(value, Letterbox):
            return value
        ratio, pad = value
        ratio = (float(ratio), float(ratio)) if np.ndim(ratio) == 0 else tuple(float(r) for r in ratio)
        return cls(ratio=ratio, pad=tuple(float(p) for p in pad))

    def to_original(self, xy: torch.Tensor) -> torch.Tensor:
        """Points ``[..., 2]`` in input pixels -> original-image pixels: ``(input - pad) / ratio``."""
        pad = xy.new_tensor(self.pad)
        ratio = xy.new_tensor(self.ratio)
        return (xy - pad) / ratio


def poses_from_candidates(
    cands: Candidates, settings: KapaoEvalConfig, letterbox
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's poses: NMS per type, back to original-image pixels, fusion, unfused-keypoint scores.

    Args:
        cands: the image's ``Candidates`` (floors at or below ``settings.tau_cp`` / ``tau_ck``).
        settings: thresholds, fusion, scores and caps (``validate()`` is the caller's job).
        letterbox: a ``Letterbox`` or ``(ratio, (pad_x, pad_y))``.

    Returns:
        ``keypoints [P, K, 3]`` (x, y, score) in original-image pixels and the pose confidences ``[P]``, best
        first, P <= ``settings.max_poses``. Fused keypoints score their keypoint object's confidence.
    """
    kept = non_max_suppression(cands, settings, all_poses=False)
    scores = kept.pose_scores
    # Poses are sorted: those above tau_fc (fusion's pool) and the top max_poses (the output) are a prefix.
    used = max(settings.max_poses, int((scores > settings.tau_fc).sum()) if settings.fusion else 0)
    scores = scores[:used]
    lb = Letterbox.of(letterbox)
    xy = lb.to_original(kept.pose_keypoints[:used])
    keypoints = torch.cat([xy, xy.new_zeros(xy.shape[:-1] + (1,))], dim=-1)  # every score starts at 0
    if settings.fusion and len(kept.kp_scores):
        kp_xy = lb.to_original((kept.kp_boxes[:, :2] + kept.kp_boxes[:, 2:]) / 2)
        keypoints = fuse_keypoint_objects(
            keypoints, scores, kp_xy, kept.kp_scores, kept.kp_classes, settings.tau_fd, settings.tau_fc
        )
    if settings.unfused_score == "pose":
        # A fused keypoint scores > tau_ck >= 0; an unfused one is still at 0.
        unfused = keypoints[..., 2] <= 0
        keypoints[..., 2] = torch.where(unfused, scores[:, None].to(keypoints.dtype), keypoints[..., 2])
    cap = settings.max_poses
    return keypoints[:cap], scores[:cap]


def poses_from_outputs(
    outputs, settings: KapaoEvalConfig, letterboxes: Sequence, anchors=P6_ANCHORS, strides=STRIDES
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image ``(keypoints [P, K, 3], scores [P])`` in original-image pixels (``poses_from_candidates``).

    ``outputs``: the raw per-stride head outputs (only anchors above the thresholds are decoded) or the
    decoded ``[B, N, 3K + 6]``; ``letterboxes``: one ``Letterbox`` or ``(ratio, pad)`` per image.
    """
    settings.validate()
    per_image = candidates(outputs, settings.tau_cp, settings.tau_ck, anchors, strides)
    if len(letterboxes) != len(per_image):
        raise ValueError(f"{len(letterboxes)} letterboxes for {len(per_image)} images")
    return [poses_from_candidates(c, settings, lb) for c, lb in zip(per_image, letterboxes, strict=True)]


# --------------------------------------------------------------------------------------------------------
# Results for the evaluator
# --------------------------------------------------------------------------------------------------------


def to_wholebody(keypoints) -> np.ndarray:
    """``[P, K, 3]`` -> ``[P, 133, 3]`` float64: K = 17 (COCO body, the first 17 of COCO-WholeBody) padded
    with zeros (score 0: the evaluator drops those parts), K = 133 unchanged."""
    if isinstance(keypoints, torch.Tensor):
        keypoints = keypoints.detach().cpu().numpy()
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.ndim != 3 or keypoints.shape[1] not in (17, NUM_KEYPOINTS) or keypoints.shape[2] != 3:
        raise ValueError(f"keypoints must be [P, 17 or {NUM_KEYPOINTS}, 3], got {keypoints.shape}")
    padded = np.zeros((keypoints.shape[0], NUM_KEYPOINTS, 3))
    padded[:, : keypoints.shape[1]] = keypoints
    return padded


def poses_to_results(image_ids: Sequence, poses: Sequence[tuple]) -> list[dict]:
    """COCO-WholeBody result dicts (``trainer.evaluation.wholebody.keypoints_to_results``) of per-image
    ``(keypoints,
    scores)`` as ``poses_from_outputs`` returns them, ``image_ids`` in the same order."""
    if len(image_ids) != len(poses):
        raise ValueError(f"{len(image_ids)} image ids for {len(poses)} images")
    ids, keypoints, scores = [], [], []
    for image_id, (image_keypoints, image_scores) in zip(image_ids, poses, strict=True):
        keypoints.append(to_wholebody(image_keypoints))
        scores.append(torch.as_tensor(image_scores).detach().cpu().double().numpy().reshape(-1))
        ids.extend([image_id] * len(scores[-1]))
    if not ids:
        return []
    return keypoints_to_results(ids, np.concatenate(keypoints), np.concatenate(scores))
