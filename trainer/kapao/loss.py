"""The KAPAO training loss: YOLOv5's box / objectness / class terms plus the pose keypoint term.

McNally et al. (ECCV 2022), Sec. 3.3 and Eq. 2-5; the facts file ``kapao_facts.md`` ("Targets and loss") holds
the formulas and defaults, checked against the authors' ``utils/loss.py``. Per output layer ``l``:

- targets are matched to anchors (:func:`match_targets`): an anchor takes a target when
  ``max(r, 1/r) < anchor_t`` for both sides (r = target wh / anchor wh), in the target's cell and in the two
  neighbouring cells nearest to its centre;
- ``box_l``: mean ``1 - CIoU`` over the positives, boxes decoded as ``xy = 2σ - 0.5`` (relative to the cell
  corner) and ``wh = (2σ)^2 A`` (grid units);
- ``obj_l``: BCE-with-logits over every anchor of the layer against ``CIoU.detach().clamp(0)`` at the
  positives and 0 elsewhere, times the layer weight (4, 1, 0.25, 0.06 for strides 8-64);
- ``cls_l``: BCE-with-logits against the one-hot class, averaged over positives x (K + 1) classes;
- ``kps_l``: mean unsquared L2 distance (grid units) between ``(4σ - 2) A`` and the target keypoint relative
  to the cell corner, over the positives' keypoints with v > 0 (keypoint objects carry v = 0, so only pose
  objects take part).

``total = batch_size * (g_box Σ_l box_l + g_obj Σ_l obj_l + g_cls Σ_l cls_l + g_kp Σ_l kps_l)``, gains
from :func:`scaled_gains`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.kapao.anchors import P6_ANCHORS, STRIDES, keypoints_from_outputs
from trainer.setting_error import SettingError

# Columns of a target row (the authors' label rows): image index, class, box, then K x (x, y, v).
TARGET_BOX_COLUMNS = 6
# Channels of an output row: box (4), objectness (1), then K + 1 class scores, then 2K keypoint offsets.
CLASS_START = 5
# Neighbour-cell bias of YOLOv5: a neighbour takes the target when the centre is within 0.5 cell of its side.
NEIGHBOUR_BIAS = 0.5


class KapaoLossSettingError(SettingError):
    """A KAPAO loss setting out of range; ``field`` names the :class:`KapaoLossConfig` field."""


@dataclass
class KapaoLossConfig:
    """Settings of :class:`KapaoLoss` (the ``loss:`` section of a KAPAO config); defaults: ``hyp.kp-p6.yaml``.

    The gains are the unscaled P6 values; :func:`scaled_gains` applies the authors' scaling by layers,
    classes and input size.
    """

    # Loss gains before scaling: box (CIoU), objectness, class, keypoints (λkps, tuned by the paper).
    box: float = 0.05
    obj: float = 0.7
    cls: float = 0.3
    kp: float = 0.025
    # An anchor takes a target when max(r, 1/r) < anchor_t for w and h (r = target / anchor size).
    anchor_t: float = 4.0
    # Objectness weight per output layer, strides 8, 16, 32, 64 (YOLOv5's "balance").
    obj_layer_weights: tuple[float, ...] = (4.0, 1.0, 0.25, 0.06)

    def validate(self, num_layers: int = len(STRIDES)) -> None:
        """Raise :class:`KapaoLossSettingError` naming the field of the first setting out of range."""
        for name in ("box", "obj", "cls", "kp"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value < 0:
                raise KapaoLossSettingError(name, f"{name} must be a finite number >= 0, got {value!r}")
        if not _is_finite_number(self.anchor_t) or self.anchor_t <= 1:
            raise KapaoLossSettingError(
                "anchor_t", f"anchor_t must be a finite number > 1, got {self.anchor_t!r}"
            )
        weights = self.obj_layer_weights
        if not isinstance(weights, list | tuple) or len(weights) != num_layers:
            raise KapaoLossSettingError(
                "obj_layer_weights",
                f"obj_layer_weights must hold {num_layers} numbers (one per output layer), got {weights!r}",
            )
        if not all(_is_finite_number(w) and w >= 0 for w in weights):
            raise KapaoLossSettingError(
                "obj_layer_weights", f"obj_layer_weights must be finite numbers >= 0, got {weights!r}"
            )


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def scaled_gains(
    config: KapaoLossConfig, num_keypoints: int, input_size: float, num_layers: int = len(STRIDES)
) -> dict[str, float]:
    """The gains as the authors' ``train.py`` scales them (facts file, "Total").

    All four by ``3 / num_layers``; ``cls`` also by ``(K + 1) / 80`` (classes vs. COCO detection's 80);
    ``obj`` also by ``(input_size / 640)^2`` (more anchors at a larger input). At 1280 with K = 17:
    box 0.0375, obj 2.1, cls 0.050625, kp 0.01875.
    """
    layers = 3.0 / num_layers
    return {
        "box": config.box * layers,
        "obj": config.obj * (input_size / 640.0) ** 2 * layers,
        "cls": config.cls * (num_keypoints + 1) / 80.0 * layers,
        "kps": config.kp * layers,
    }


@dataclass
class LayerTargets:
    """The positives of one output layer: one row per (target, anchor, cell) match, P rows.

    A target usually appears in up to 3 cells per matching anchor; two targets may share a cell and anchor.
    """

    image: Tensor  # [P] long, image index in the batch
    anchor: Tensor  # [P] long, anchor index in the layer
    cell_y: Tensor  # [P] long, grid row (clamped into the grid)
    cell_x: Tensor  # [P] long, grid column (clamped into the grid)
    cls: Tensor  # [P] long, 0 = pose object, k + 1 = keypoint object of keypoint k
    box: Tensor  # [P, 4] float: x, y relative to the cell corner, w, h; grid units
    keypoints: Tensor  # [P, K, 3] float: x, y relative to the cell corner (grid units), v
    anchor_wh: Tensor  # [P, 2] float, the matched anchor in grid units

    def __len__(self) -> int:
        return self.image.shape[0]


def match_targets(
    targets: Tensor, grid_hw: tuple[int, int], anchors_grid: Tensor, anchor_t: float
) -> LayerTargets:
    """Match the targets to the anchors and cells of one output layer (YOLOv5's ``build_targets``).

    ``targets``: ``[N, 6 + 3K]`` rows (image, class, cx, cy, w, h, K x (x, y, v)), coordinates normalised
    to the input size. ``grid_hw``: the layer's grid (H, W). ``anchors_grid``: ``[A, 2]`` anchor (w, h) in
    grid units (pixels / stride). Vectorised over targets: no Python loop.

    A target goes to every anchor with ``max(r, 1/r) < anchor_t`` on both sides, and for each such anchor to
    its own cell plus the horizontal and the vertical neighbour nearest to its centre (bias 0.5), skipped at
    the grid's outer ring. Box and keypoints are stored relative to the corner of the cell that takes them
    (before clamping the cell index into the grid, as the authors do).
    """
    device, dtype = targets.device, targets.dtype
    grid_h, grid_w = grid_hw
    num_targets = targets.shape[0]
    num_keypoints = (targets.shape[1] - TARGET_BOX_COLUMNS) // 3

    # Normalised coordinates -> grid units (x by W, y by H) for the box and every keypoint.
    grid_wh = torch.tensor([grid_w, grid_h], device=device, dtype=dtype)
    gxy = targets[:, 2:4] * grid_wh
    gwh = targets[:, 4:6] * grid_wh
    keypoints = targets[:, TARGET_BOX_COLUMNS:].reshape(num_targets, num_keypoints, 3)
    kp_xy = keypoints[..., :2] * grid_wh
    kp_v = keypoints[..., 2:]

    # Anchor matching by the size ratio: [A, N].
    ratio = gwh[None, :, :] / anchors_grid[:, None, :]
    worst = torch.maximum(ratio, 1.0 / ratio).amax(dim=2)
    anchor_idx, target_idx = (worst < anchor_t).nonzero(as_tuple=True)

    # The target's cell and its nearest neighbours: left/up when the centre lies in the lower half of its
    # cell, right/down when in the upper half, never off the grid (the "> 1" tests keep the outer ring out).
    centre = gxy[target_idx]  # [M, 2]
    inverse = grid_wh - centre
    low = (centre % 1.0 < NEIGHBOUR_BIAS) & (centre > 1.0)  # [M, 2]: left (x), up (y)
    high = (inverse % 1.0 < NEIGHBOUR_BIAS) & (inverse > 1.0)  # [M, 2]: right (x), down (y)
    take = torch.stack((torch.ones_like(low[:, 0]), low[:, 0], low[:, 1], high[:, 0], high[:, 1]))  # [5, M]
    shifts = NEIGHBOUR_BIAS * torch.tensor(
        [[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device, dtype=dtype
    )  # subtracted from the centre: own cell, left, up, right, down
    which, match = take.nonzero(as_tuple=True)
    t_idx, a_idx = target_idx[match], anchor_idx[match]
    cell = (gxy[t_idx] - shifts[which]).floor()  # [P, 2] (x, y), inside the grid but for a centre on its edge

    box = torch.cat((gxy[t_idx] - cell, gwh[t_idx]), dim=1)
    kps = torch.cat((kp_xy[t_idx] - cell[:, None, :], kp_v[t_idx]), dim=2)
    cell = cell.long()
    return LayerTargets(
        image=targets[t_idx, 0].long(),
        anchor=a_idx,
        cell_y=cell[:, 1].clamp(0, grid_h - 1),
        cell_x=cell[:, 0].clamp(0, grid_w - 1),
        cls=targets[t_idx, 1].long(),
        box=box,
        keypoints=kps,
        anchor_wh=anchors_grid[a_idx],
    )


def build_targets(
    targets: Tensor, grids_hw: list[tuple[int, int]], anchors_grid: list[Tensor], anchor_t: float
) -> list[LayerTargets]:
    """:func:`match_targets` for every layer (``anchors_grid[l]``: ``[A, 2]`` in layer l's grid units)."""
    return [match_targets(targets, hw, a, anchor_t) for hw, a in zip(grids_hw, anchors_grid, strict=True)]


def complete_iou(pred_xywh: Tensor, target_xywh: Tensor, eps: float = 1e-7) -> Tensor:
    """CIoU (Zheng et al. 2020) of matching rows of ``[P, 4]`` centre-size boxes, as the authors'
    ``bbox_iou``: ``eps`` added to the heights and the union. Not torchvision's ``complete_box_iou_loss``:
    it divides by the height recomputed as ``y2 - y1``, which is exactly 0 for a predicted height below
    float32's resolution at its centre, and its gradient there is NaN (seen in a KAPAO run at update 213)."""
    (px, py, pw, ph), (tx, ty, tw, th) = pred_xywh.unbind(-1), target_xywh.unbind(-1)
    ph, th = ph + eps, th + eps
    inter_w = (torch.minimum(px + pw / 2, tx + tw / 2) - torch.maximum(px - pw / 2, tx - tw / 2)).clamp(min=0)
    inter_h = (torch.minimum(py + ph / 2, ty + th / 2) - torch.maximum(py - ph / 2, ty - th / 2)).clamp(min=0)
    inter = inter_w * inter_h
    iou = inter / (pw * ph + tw * th - inter + eps)
    enclosing_w = torch.maximum(px + pw / 2, tx + tw / 2) - torch.minimum(px - pw / 2, tx - tw / 2)
    enclosing_h = torch.maximum(py + ph / 2, ty + th / 2) - torch.minimum(py - ph / 2, ty - th / 2)
    diagonal2 = enclosing_w**2 + enclosing_h**2 + eps
    centre2 = (px - tx) ** 2 + (py - ty) ** 2
    aspect = (4 / math.pi**2) * (torch.atan(tw / th) - torch.atan(pw / ph)) ** 2
    with torch.no_grad():
        alpha = aspect / (aspect - iou + (1 + eps))
    return iou - (centre2 / diagonal2 + aspect * alpha)


class KapaoLoss(nn.Module):
    """KAPAO's loss: ``KapaoLoss(config)(outputs, targets) -> (total, parts)``.

    ``outputs``: one raw head tensor per stride, ``[B, A, H, W, 3K + 6]`` (x, y, w, h, objectness, K + 1
    class scores, 2K keypoint offsets; any float dtype, computed in float32). ``targets``: ``[N, 6 + 3K]``
    rows (image, class, cx, cy, w, h, K x (x, y, v)) normalised to the input size; keypoint objects carry
    all-zero keypoints. K comes from the outputs, the input size from the first layer's grid x its stride.

    Convention: ``parts`` holds ``box``, ``obj``, ``cls``, ``kps``, each the gain-weighted part summed over
    the layers (detached scalars), so that ``sum(parts.values()) == total / batch_size``; ``total`` is
    YOLOv5's batch-size-scaled loss (gradients as the authors'). ``anchors`` (in input pixels, per stride)
    and ``strides`` default to the P6 model's; tests override them.
    """

    def __init__(
        self,
        config: KapaoLossConfig | None = None,
        *,
        anchors: tuple[tuple[tuple[float, float], ...], ...] = P6_ANCHORS,
        strides: tuple[int, ...] = STRIDES,
    ):
        super().__init__()
        self.config = config if config is not None else KapaoLossConfig()
        if len(anchors) != len(strides):
            raise ValueError(f"{len(anchors)} anchor sets for {len(strides)} strides")
        self.config.validate(num_layers=len(strides))
        self.anchors = anchors
        self.strides = tuple(strides)

    def _check(self, outputs: list[Tensor], targets: Tensor) -> int:
        if len(outputs) != len(self.strides):
            raise ValueError(f"{len(outputs)} output layers, expected {len(self.strides)} (one per stride)")
        batch, _, _, _, channels = outputs[0].shape
        for layer, (out, stride, anchors) in enumerate(zip(outputs, self.strides, self.anchors, strict=True)):
            if (
                out.ndim != 5
                or out.shape[0] != batch
                or out.shape[1] != len(anchors)
                or out.shape[4] != channels
            ):
                raise ValueError(
                    f"output layer {layer} has shape {tuple(out.shape)}; "
                    f"expected [{batch}, {len(anchors)}, H, W, {channels}]"
                )
            input_hw = (out.shape[2] * stride, out.shape[3] * stride)
            first_hw = (outputs[0].shape[2] * self.strides[0], outputs[0].shape[3] * self.strides[0])
            if input_hw != first_hw:
                raise ValueError(
                    f"output layer {layer}'s grid implies input {input_hw}, layer 0's {first_hw}"
                )
        num_keypoints = keypoints_from_outputs(channels)
        if targets.ndim != 2 or targets.shape[1] != TARGET_BOX_COLUMNS + 3 * num_keypoints:
            raise ValueError(
                f"targets have shape {tuple(targets.shape)}; "
                f"expected [N, {TARGET_BOX_COLUMNS + 3 * num_keypoints}] for K = {num_keypoints}"
            )
        return num_keypoints

    def forward(self, outputs: list[Tensor], targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        num_keypoints = self._check(outputs, targets)
        num_classes = num_keypoints + 1
        device = outputs[0].device
        batch = outputs[0].shape[0]
        input_size = max(outputs[0].shape[2], outputs[0].shape[3]) * self.strides[0]
        gains = scaled_gains(self.config, num_keypoints, input_size, len(self.strides))

        # float32 arithmetic whatever the head's dtype: autocast off, predictions cast up.
        with torch.autocast(device_type=device.type, enabled=False):
            targets = targets.to(device=device, dtype=torch.float32)
            anchors_grid = [
                torch.tensor(a, device=device, dtype=torch.float32) / s
                for a, s in zip(self.anchors, self.strides, strict=True)
            ]
            layer_targets = build_targets(
                targets, [(o.shape[2], o.shape[3]) for o in outputs], anchors_grid, self.config.anchor_t
            )
            sums = {name: torch.zeros((), device=device) for name in ("box", "obj", "cls", "kps")}
            for out, matched, weight in zip(
                outputs, layer_targets, self.config.obj_layer_weights, strict=True
            ):
                layer = _layer_loss(out.float(), matched, num_classes, num_keypoints)
                sums["box"] = sums["box"] + layer["box"]
                sums["obj"] = sums["obj"] + weight * layer["obj"]
                sums["cls"] = sums["cls"] + layer["cls"]
                sums["kps"] = sums["kps"] + layer["kps"]
            weighted = {name: gains[name] * value for name, value in sums.items()}
            total = (weighted["box"] + weighted["obj"] + weighted["cls"] + weighted["kps"]) * batch
        return total, {name: value.detach() for name, value in weighted.items()}


def _layer_loss(
    pred: Tensor, matched: LayerTargets, num_classes: int, num_keypoints: int
) -> dict[str, Tensor]:
    """The four unweighted terms of one layer; ``pred`` is ``[B, A, H, W, No]`` in float32."""
    zero = pred.new_zeros(())
    obj_target = pred.new_zeros(pred.shape[:4])  # contiguous, whatever the layout of the head's outputs
    box_loss = cls_loss = kps_loss = zero
    if len(matched):
        rows = pred[matched.image, matched.anchor, matched.cell_y, matched.cell_x]  # [P, No]
        # Box decoding (facts file, "Decoding"), grid units relative to the cell corner.
        xy = 2.0 * rows[:, 0:2].sigmoid() - 0.5
        wh = (2.0 * rows[:, 2:4].sigmoid()) ** 2 * matched.anchor_wh
        ciou = complete_iou(torch.cat((xy, wh), dim=1), matched.box)
        box_loss = (1.0 - ciou).mean()

        # Objectness target: the CIoU at the positives. Where several matches share an anchor the authors'
        # indexed write keeps an arbitrary one (the last on a CPU, unspecified on CUDA); we keep the largest,
        # which is deterministic (YOLOv5's later sort_obj_iou does the same).
        flat = (
            (matched.image * pred.shape[1] + matched.anchor) * pred.shape[2] + matched.cell_y
        ) * pred.shape[3] + matched.cell_x
        obj_target.view(-1).scatter_reduce_(0, flat, ciou.detach().clamp(min=0), reduce="amax")

        if num_classes > 1:  # a single class would be all-positive, as in YOLOv5 (no class loss)
            logits = rows[:, CLASS_START : CLASS_START + num_classes]
            cls_loss = F.binary_cross_entropy_with_logits(logits, F.one_hot(matched.cls, num_classes).float())

        # Keypoints: (4σ - 2) A relative to the cell corner; mean distance over (positive, keypoint) pairs
        # with v > 0, as the authors average (a match counts once per cell it lands in). The masked sum keeps
        # the shapes fixed; a zero distance has a zero (not NaN) gradient in vector_norm.
        offsets = rows[:, CLASS_START + num_classes :].reshape(-1, num_keypoints, 2)
        kp_pred = (4.0 * offsets.sigmoid() - 2.0) * matched.anchor_wh[:, None, :]
        visible = (matched.keypoints[..., 2] > 0).float()
        distance = torch.linalg.vector_norm(kp_pred - matched.keypoints[..., :2], dim=-1)
        kps_loss = (distance * visible).sum() / visible.sum().clamp(min=1.0)

    obj_loss = F.binary_cross_entropy_with_logits(pred[..., 4], obj_target)
    return {"box": box_loss, "obj": obj_loss, "cls": cls_loss, "kps": kps_loss}
