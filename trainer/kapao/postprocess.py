"""KAPAO inference: raw head outputs -> objects -> NMS per object type -> keypoint-object fusion -> poses.

The steps of the paper's Sec. 3.3 (numbers: ``kapao_facts.md``, "Inference"):

1. ``decode_outputs``: every anchor's box, objectness, K + 1 class scores, K pose keypoints (input pixels).
2. ``candidates``: per image, the anchors whose confidence ``obj * max(class)`` is above a floor, split by the
   arg-max class into pose objects (class 0) and keypoint objects (class k + 1 = keypoint k). From the raw
   outputs it decodes only those anchors (the logit of the objectness is compared first: ``conf <= obj``),
   reading the head's per-anchor planes, and from there on works in numpy on the CPU: the survivors are few.
3. ``non_max_suppression``: greedy NMS per object type (what torchvision's ``nms`` / ``batched_nms`` keep).
4. ``fuse_keypoint_objects``: the authors' fusion rule (their ``val.py``), in original-image pixels.
5. ``poses_from_candidates``: 3, back to original-image pixels, 4, scores for the unfused keypoints.

Unlike the authors' ``scale_coords``, nothing is clipped to the image: they clip the keypoint-object boxes
before taking their centres (which moves keypoints near the border) and, by a slip, only the first two pose
keypoints. Steps 3-4 are ``trainer.kapao.nms_fusion``'s (numpy; greedy rules solved as fixed points over all
objects at once). ``poses_from_outputs`` decodes the keypoints of the poses NMS keeps only.

Steps 3-5 read only the compact ``Candidates`` of step 2, so an inference-time sweep caches the candidates
above its lowest thresholds once per image and re-runs only ``poses_from_candidates`` per trial.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from trainer.datasets.keypoints import NUM_KEYPOINTS
from trainer.evaluation.wholebody import keypoints_to_results
from trainer.kapao import nms_fusion
from trainer.kapao.anchors import P6_ANCHORS, STRIDES, keypoints_from_outputs
from trainer.kapao.eval_settings import (  # noqa: F401 (re-exported: the family, the cache and tests import them here)
    NMS_INPUT_CAP,
    TTA_MODES,
    UNFUSED_SCORES,
    KapaoEvalConfig,
    KapaoEvalSettingError,
)

# --------------------------------------------------------------------------------------------------------
# Decoding (kapao_facts.md, "Network"; the paper's Eq. 1-2). ``grid`` (cell x, y), ``stride`` and ``anchor``
# (w, h in input pixels) broadcast against the raw values' (x, y) pairs.
# --------------------------------------------------------------------------------------------------------


def _sigmoid(x):
    """The logistic function of a tensor (in float32 at least) or of a numpy array."""
    if isinstance(x, torch.Tensor):
        return x.float().sigmoid()
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for very negative x: sigmoid 0, as torch's
        return 1 / (1 + np.exp(-x))


def _decode_boxes(raw_xywh, grid, stride, anchor):
    """Raw ``[..., 4]`` -> box centres (x, y) and sizes (w, h) in input pixels, ``[..., 2]`` each (tensors or
    numpy arrays)."""
    y = _sigmoid(raw_xywh)
    centre = (2 * y[..., 0:2] - 0.5 + grid) * stride  # the cell and half of each neighbour
    size = (2 * y[..., 2:4]) ** 2 * anchor  # up to 4x the anchor
    return centre, size


def _corners(centre, size):
    """Box centres and sizes ``[..., 2]`` -> corners x1, y1, x2, y2 ``[..., 4]`` (tensors or numpy arrays)."""
    half = size / 2
    if isinstance(centre, torch.Tensor):
        return torch.cat((centre - half, centre + half), dim=-1)
    return np.concatenate((centre - half, centre + half), axis=-1)


def _decode_keypoints(raw_offsets, grid, stride, anchor):
    """Raw ``[..., 2K]`` -> ``[..., K, 2]`` keypoints in input pixels (tensors or numpy arrays): relative to
    the cell corner, scaled by the anchor, within +-2 anchors of the corner."""
    offsets = 4 * _sigmoid(raw_offsets) - 2
    offsets = offsets.reshape(*offsets.shape[:-1], offsets.shape[-1] // 2, 2)  # (no -1: numpy's empty rows)
    return offsets * anchor[..., None, :] + (grid * stride)[..., None, :]


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
        boxes = torch.cat(_decode_boxes(out[..., :4], grid, float(stride), anchor), dim=-1)
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
        boxes = _corners(boxes[:, :2], boxes[:, 2:4])
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
    return [
        found.candidates()
        for found in _found_in_outputs(outputs, conf_floor, keypoint_floor, anchors, strides)
    ]


@dataclass
class _Found:
    """One image's objects above the floors as numpy arrays on the CPU (what NMS and fusion read); the pose
    keypoints are decoded on demand (``pose_keypoints_of(indices) -> [n, K, 2]``): a pose that NMS drops
    never needs its 2K values."""

    pose_boxes: np.ndarray
    pose_scores: np.ndarray
    kp_boxes: np.ndarray
    kp_scores: np.ndarray
    kp_classes: np.ndarray
    pose_keypoints_of: Callable[[np.ndarray], np.ndarray]

    @classmethod
    def of(cls, cands: Candidates) -> _Found:
        return cls(
            pose_boxes=_numpy(cands.pose_boxes),
            pose_scores=_numpy(cands.pose_scores),
            kp_boxes=_numpy(cands.kp_boxes),
            kp_scores=_numpy(cands.kp_scores),
            kp_classes=_numpy(cands.kp_classes),
            pose_keypoints_of=_numpy(cands.pose_keypoints).__getitem__,
        )

    def candidates(self) -> Candidates:
        every_pose = np.arange(len(self.pose_scores))
        arrays = (
            self.pose_boxes,
            self.pose_scores,
            self.pose_keypoints_of(every_pose),
            self.kp_boxes,
            self.kp_scores,
            self.kp_classes,
        )
        return Candidates(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))


def _found_in_outputs(
    outputs, conf_floor: float, keypoint_floor: float, anchors, strides, on_device: bool | None = None
) -> list[_Found]:
    """``candidates`` of raw per-stride outputs, per image as a :class:`_Found`. Only the anchors whose
    objectness clears the lower floor are read (confidence <= objectness); the keypoint channels only for
    the poses asked for. ``on_device``: gather with torch where the outputs are (default: off the CPU)."""
    table = _anchor_table(anchors, outputs[0].device)
    _check_layers(outputs, table, strides)
    k = keypoints_from_outputs(outputs[0].shape[-1])
    # Objectness logit floor, a hair low so that rounding never drops an anchor the exact test below keeps.
    floor = min(conf_floor, keypoint_floor)
    logit_floor = (
        math.log(floor / (1 - floor)) - 1e-3 if 0 < floor < 1 else (math.inf if floor >= 1 else -math.inf)
    )
    # The anchors above the floor, every layer together: head rows (box, objectness, classes), image, and
    # the cell's constants (cell x, y, stride, anchor w, h), float32 as the decoded outputs'.
    batch = outputs[0].shape[0]
    anchor_sizes = table.cpu().numpy()
    if on_device is None:
        on_device = outputs[0].device.type != "cpu"
    layers = [_LayerRows(out, logit_floor, 5 + k + 1, on_device) for out in outputs]
    cells = []
    for level, (out, stride, rows) in enumerate(zip(outputs, strides, layers, strict=True)):
        cell = np.empty((len(rows.image), 5), np.float32)
        cell[:, 1], cell[:, 0] = np.divmod(rows.pixel, out.shape[3])
        cell[:, 2] = stride
        cell[:, 3:5] = anchor_sizes[level][rows.anchor]
        cells.append(cell)
    # The survivors are few: the rest runs in numpy on the CPU (torch's per-operation cost dominated here).
    head = np.concatenate([rows.head for rows in layers])
    image = np.concatenate([rows.image for rows in layers])
    level_of = np.concatenate([np.full(len(rows.image), level) for level, rows in enumerate(layers)])
    local = np.concatenate([np.arange(len(rows.image)) for rows in layers])
    cell = np.concatenate(cells)
    grid, stride, anchor = cell[:, 0:2], cell[:, 2:3], cell[:, 3:5]
    boxes = _corners(*_decode_boxes(head[:, :4], grid, stride, anchor))
    label = head[:, 5:].argmax(axis=1)  # sigmoid is monotonic: the same arg-max
    class_logit = np.take_along_axis(head, 5 + label[:, None], axis=1)[:, 0]
    conf = _sigmoid(head[:, 4]) * _sigmoid(class_logit)

    def keypoints_of(chosen: np.ndarray) -> np.ndarray:
        """``[n, K, 2]`` pose keypoints of rows ``chosen``."""
        raw = np.empty((len(chosen), 2 * k), np.float32)
        for level, rows in enumerate(layers):
            mine = np.flatnonzero(level_of[chosen] == level)
            if len(mine):
                raw[mine] = rows.tail(local[chosen[mine]])
        return _decode_keypoints(raw, grid[chosen], stride[chosen], anchor[chosen])

    def found(mine: np.ndarray) -> _Found:
        is_pose = mine[(label[mine] == 0) & (conf[mine] > conf_floor)]
        is_kp = mine[(label[mine] > 0) & (conf[mine] > keypoint_floor)]
        return _Found(
            boxes[is_pose],
            conf[is_pose],
            boxes[is_kp],
            conf[is_kp],
            label[is_kp].astype(np.int64) - 1,
            lambda chosen: keypoints_of(is_pose[chosen]),
        )

    if batch == 1:
        return [found(np.arange(len(head)))]
    return [found(np.flatnonzero(image == b)) for b in range(batch)]


class _LayerRows:
    """One layer's anchors whose objectness logit is above the floor, in (image, anchor, row, column) order:
    ``head`` = their first ``head_channels`` raw values ``[n, head_channels]`` (float32), ``image``,
    ``anchor`` and ``pixel`` (row * W + column) ``[n]``, numpy on the CPU; ``tail(indices)`` reads the rest
    of the chosen rows' channels (the keypoint offsets) where the outputs are."""

    def __init__(self, out: torch.Tensor, logit_floor: float, head_channels: int, on_device: bool):
        batch, anchors, height, width, channels = out.shape
        self.head_channels = head_channels
        self._out = out if on_device else None
        if on_device:  # scan and gather where the outputs are (a GPU); only the survivors travel
            self._index = (out[..., 4] > logit_floor).nonzero().unbind(1)
            image, anchor, row, column = self._index
            self.head = out[image, anchor, row, column, :head_channels].float().cpu().numpy()
            self.image, self.anchor = image.cpu().numpy(), anchor.cpu().numpy()
            self.pixel = (row * width + column).cpu().numpy()
            return
        # Per (image, anchor) the outputs as planes [No, H * W] (a view both for the head's layout and for
        # a contiguous [B, A, H, W, No] tensor): one pass over the objectness plane, then the survivors'
        # columns.
        array = out.detach().float().numpy()
        self._planes = array.transpose(0, 1, 4, 2, 3).reshape(batch * anchors, channels, height * width)
        keep = np.flatnonzero(self._planes[:, 4] > logit_floor)
        self._plane, self._pixel = np.divmod(keep, height * width)
        self.head = self._planes[self._plane, :head_channels, self._pixel]
        self.image, self.anchor = np.divmod(self._plane, anchors)
        self.pixel = self._pixel

    def tail(self, chosen: np.ndarray) -> np.ndarray:
        if self._out is not None:
            index = tuple(i[torch.from_numpy(chosen).to(i.device)] for i in self._index)
            return self._out[index][:, self.head_channels :].float().cpu().numpy()
        return self._planes[self._plane[chosen], self.head_channels :, self._pixel[chosen]]


# --------------------------------------------------------------------------------------------------------
# NMS, fusion, poses
# --------------------------------------------------------------------------------------------------------


def _numpy(tensor) -> np.ndarray:
    """A CPU numpy view of a tensor (a copy from another device), or the array itself."""
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().cpu().numpy()
    return np.asarray(tensor)


def _survivors(arrays: _Found, settings: KapaoEvalConfig, all_poses: bool) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the pose and keypoint objects NMS keeps, best first (``non_max_suppression``)."""
    pose = np.flatnonzero(arrays.pose_scores > settings.tau_cp)
    wanted = len(pose) if all_poses else settings.max_poses
    all_above = settings.tau_fc if settings.fusion and not all_poses else math.inf
    pose = pose[
        nms_fusion.nms_best(
            arrays.pose_boxes[pose],
            arrays.pose_scores[pose],
            settings.tau_bp,
            wanted,
            all_above,
            NMS_INPUT_CAP,
        )
    ]
    kp = np.flatnonzero(arrays.kp_scores > settings.tau_ck)
    if len(kp) > NMS_INPUT_CAP:  # (NMS per class sorts by itself, ties in index order)
        kp = kp[nms_fusion.best_first(arrays.kp_scores[kp])[:NMS_INPUT_CAP]]
    kept = nms_fusion.nms_per_class(
        arrays.kp_boxes[kp], arrays.kp_scores[kp], arrays.kp_classes[kp], settings.tau_bk
    )
    return pose, kp[kept[: settings.max_keypoint_objects]]


def non_max_suppression(cands: Candidates, settings: KapaoEvalConfig, all_poses: bool = True) -> Candidates:
    """The survivors of NMS per object type, best first: pose objects above tau_cp with IoU tau_bp, keypoint
    objects above tau_ck with IoU tau_bk within their class (at most ``max_keypoint_objects``). A pose box
    never suppresses a keypoint box, nor a keypoint box one of another class.

    ``all_poses=False`` returns only the pose survivors ``poses_from_candidates`` reads (at least the best
    ``max_poses`` and, with fusion, every one above tau_fc), found without running NMS on all of them.
    """
    pose, kp = _survivors(_Found.of(cands), settings, all_poses)
    pose = torch.from_numpy(pose).to(cands.pose_scores.device)
    kp = torch.from_numpy(kp).to(cands.kp_scores.device)
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
    Solved in numpy (``trainer.kapao.nms_fusion.fuse``); the result is on ``pose_keypoints``' device.
    """
    poses = torch.as_tensor(pose_keypoints)
    fused = nms_fusion.fuse(
        _numpy(poses), *(_numpy(t) for t in (pose_scores, kp_xy, kp_scores, kp_classes)), tau_fd, tau_fc
    )
    return torch.from_numpy(fused).to(poses.device)


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

    def to_original(self, xy):
        """Points ``[..., 2]`` (a tensor or a numpy array) in input pixels -> original-image pixels:
        ``(input - pad) / ratio``, in the points' dtype."""
        if isinstance(xy, np.ndarray):
            return (xy - np.asarray(self.pad, xy.dtype)) / np.asarray(self.ratio, xy.dtype)
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
    keypoints, scores = _poses(_Found.of(cands), settings, letterbox)
    device = cands.pose_scores.device
    return torch.from_numpy(keypoints).to(device), torch.from_numpy(scores).to(device)


def _poses(found: _Found, settings: KapaoEvalConfig, letterbox) -> tuple[np.ndarray, np.ndarray]:
    """``poses_from_candidates`` on a :class:`_Found`, as numpy arrays."""
    pose, kp = _survivors(found, settings, all_poses=False)
    scores = found.pose_scores[pose]
    # Poses are sorted: those above tau_fc (fusion's pool) and the top max_poses (the output) are a prefix.
    used = max(settings.max_poses, int((scores > settings.tau_fc).sum()) if settings.fusion else 0)
    pose, scores = pose[:used], scores[:used]
    lb = Letterbox.of(letterbox)
    xy = lb.to_original(found.pose_keypoints_of(pose))
    keypoints = np.concatenate([xy, np.zeros(xy.shape[:-1] + (1,), xy.dtype)], axis=-1)  # scores start at 0
    if settings.fusion and len(kp):
        boxes = found.kp_boxes[kp]
        kp_xy = lb.to_original((boxes[:, :2] + boxes[:, 2:]) / 2)
        keypoints = nms_fusion.fuse(
            keypoints,
            scores,
            kp_xy,
            found.kp_scores[kp],
            found.kp_classes[kp],
            settings.tau_fd,
            settings.tau_fc,
        )
    if settings.unfused_score == "pose":
        # A fused keypoint scores > tau_ck >= 0; an unfused one is still at 0.
        unfused = keypoints[..., 2] <= 0
        keypoints[..., 2] = np.where(unfused, scores[:, None].astype(keypoints.dtype), keypoints[..., 2])
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
    if isinstance(outputs, torch.Tensor):  # decoded
        per_image = [_Found.of(c) for c in candidates(outputs, settings.tau_cp, settings.tau_ck)]
    else:  # raw: the keypoints of the poses that NMS keeps are the only ones decoded
        per_image = _found_in_outputs(outputs, settings.tau_cp, settings.tau_ck, anchors, strides)
    if len(letterboxes) != len(per_image):
        raise ValueError(f"{len(letterboxes)} letterboxes for {len(per_image)} images")
    poses = [_poses(found, settings, lb) for found, lb in zip(per_image, letterboxes, strict=True)]
    return [(torch.from_numpy(keypoints), torch.from_numpy(scores)) for keypoints, scores in poses]


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
