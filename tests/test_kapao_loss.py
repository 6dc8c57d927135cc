"""trainer.kapao.loss: each part against a hand computation, gain scaling, anchor/cell matching, edge cases.

Expected values are computed here with the ``math`` module (an independent CIoU included), not with the code
under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.kapao.anchors import P6_ANCHORS, STRIDES, outputs_per_anchor
from trainer.kapao.loss import (
    KapaoLoss,
    KapaoLossConfig,
    KapaoLossSettingError,
    build_targets,
    match_targets,
    scaled_gains,
)

LN2 = math.log(2.0)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def bce(logit_: float, target: float) -> float:
    p = sigmoid(logit_)
    return -(target * math.log(p) + (1.0 - target) * math.log(1.0 - p))


def ciou_by_hand(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """CIoU of two (cx, cy, w, h) boxes, Zheng et al. 2020 Eq. 9-11 (no epsilons)."""
    ax1, ax2, ay1, ay2 = a[0] - a[2] / 2, a[0] + a[2] / 2, a[1] - a[3] / 2, a[1] + a[3] / 2
    bx1, bx2, by1, by2 = b[0] - b[2] / 2, b[0] + b[2] / 2, b[1] - b[3] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    iou = inter / (a[2] * a[3] + b[2] * b[3] - inter)
    diag2 = (max(ax2, bx2) - min(ax1, bx1)) ** 2 + (max(ay2, by2) - min(ay1, by1)) ** 2
    rho2 = (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2
    v = 4 / math.pi**2 * (math.atan(b[2] / b[3]) - math.atan(a[2] / a[3])) ** 2
    alpha = v / (1 - iou + v)
    return iou - rho2 / diag2 - alpha * v


def target_row(image, cls, box, keypoints=()) -> list[float]:
    """One label row; ``keypoints`` as (x, y, v) triples, all normalised."""
    return [float(image), float(cls), *box, *[c for kp in keypoints for c in kp]]


# A two-layer toy head (input 64: grids 8 x 8 and 4 x 4) whose anchors make a 16 px square target match
# exactly one anchor: (16, 16) at stride 8; the others are >= 4x larger or smaller.
TOY_STRIDES = (8, 16)
TOY_ANCHORS = (((16, 16), (128, 128), (3, 3)), ((128, 128), (100, 100), (2, 2)))
TOY_CONFIG = KapaoLossConfig(obj_layer_weights=(4.0, 1.0))
TOY_INPUT = 64


def toy_outputs(batch: int, num_keypoints: int) -> list[torch.Tensor]:
    no = outputs_per_anchor(num_keypoints)
    return [torch.zeros(batch, 3, TOY_INPUT // s, TOY_INPUT // s, no) for s in TOY_STRIDES]


def test_one_positive_every_part_equals_the_formula():
    # K = 2, batch 2; the target in image 1, centred in cell (x=3, y=2) of the 8 x 8 grid: a centre in the
    # middle of its cell takes no neighbour cell, so (image 1, anchor 0, y 2, x 3) is the only positive.
    k = 2
    target = target_row(
        1, 0, (3.5 * 8 / 64, 2.5 * 8 / 64, 16 / 64, 16 / 64), [(30 / 64, 22 / 64, 2), (50 / 64, 10 / 64, 0)]
    )
    outputs = toy_outputs(2, k)
    box_logits, obj_logit, cls_logits, kp_logits = (0.3, -0.2, 0.1, 0.4), 0.5, (1.0, -1.0, 0.5), (0.2, -0.3)
    row = [*box_logits, obj_logit, *cls_logits, *kp_logits, 1.5, -2.0]  # the v = 0 keypoint's logits: ignored
    outputs[0][1, 0, 2, 3] = torch.tensor(row)
    total, parts = KapaoLoss(TOY_CONFIG, anchors=TOY_ANCHORS, strides=TOY_STRIDES)(
        outputs, torch.tensor([target])
    )

    gains = {
        "box": 0.05 * 1.5,
        "obj": 0.7 * (64 / 640) ** 2 * 1.5,
        "cls": 0.3 * 3 / 80 * 1.5,
        "kps": 0.025 * 1.5,
    }
    anchor = 16 / 8  # grid units
    pred_box = (
        2 * sigmoid(0.3) - 0.5,
        2 * sigmoid(-0.2) - 0.5,
        (2 * sigmoid(0.1)) ** 2 * anchor,
        (2 * sigmoid(0.4)) ** 2 * anchor,
    )
    ciou = ciou_by_hand(pred_box, (0.5, 0.5, 2.0, 2.0))
    expected_box = 1 - ciou
    # Objectness: 2 x 3 x 8 x 8 = 384 anchors at layer 0 (383 zero logits against 0, one against the CIoU),
    # 2 x 3 x 4 x 4 = 96 zero logits against 0 at layer 1.
    expected_obj = 4.0 * (383 * LN2 + bce(obj_logit, ciou)) / 384 + 1.0 * LN2
    expected_cls = (bce(1.0, 1.0) + bce(-1.0, 0.0) + bce(0.5, 0.0)) / 3
    # Keypoint 0 at (30, 22) px = (3.75, 2.75) grid = (0.75, 0.75) from the cell corner (3, 2).
    pred_kp = ((4 * sigmoid(0.2) - 2) * anchor, (4 * sigmoid(-0.3) - 2) * anchor)
    expected_kps = math.hypot(pred_kp[0] - 0.75, pred_kp[1] - 0.75)

    expected = {"box": expected_box, "obj": expected_obj, "cls": expected_cls, "kps": expected_kps}
    for name, value in expected.items():
        assert parts[name].item() == pytest.approx(gains[name] * value, rel=1e-5, abs=1e-9), name
    assert total.item() == pytest.approx(2 * sum(gains[n] * v for n, v in expected.items()), rel=1e-5)
    assert total.item() == pytest.approx(2 * sum(p.item() for p in parts.values()), rel=1e-6)
    assert all(not p.requires_grad for p in parts.values())


def test_shared_positive_objectness_target_is_the_larger_ciou():
    # Two targets with the same centre (one cell, one anchor), 16 and 20 px: both positives count in box,
    # the shared objectness target is the larger of the two CIoUs.
    rows = [target_row(0, 0, (3.5 / 8, 2.5 / 8, size / 64, size / 64), [(0, 0, 0)]) for size in (16, 20)]
    outputs = toy_outputs(1, 1)
    outputs[0][0, 0, 2, 3, :5] = torch.tensor([0.3, -0.2, 0.1, 0.4, -0.7])
    _, parts = KapaoLoss(TOY_CONFIG, anchors=TOY_ANCHORS, strides=TOY_STRIDES)(outputs, torch.tensor(rows))
    pred_box = (
        2 * sigmoid(0.3) - 0.5,
        2 * sigmoid(-0.2) - 0.5,
        (2 * sigmoid(0.1)) ** 2 * 2,
        (2 * sigmoid(0.4)) ** 2 * 2,
    )
    cious = [ciou_by_hand(pred_box, (0.5, 0.5, s / 8, s / 8)) for s in (16, 20)]
    gains = scaled_gains(TOY_CONFIG, 1, 64, num_layers=2)
    assert parts["box"].item() == pytest.approx(gains["box"] * (2 - sum(cious)) / 2, rel=1e-5)
    expected_obj = 4.0 * (191 * LN2 + bce(-0.7, max(cious))) / 192 + LN2  # 1 x 3 x 8 x 8 anchors
    assert parts["obj"].item() == pytest.approx(gains["obj"] * expected_obj, rel=1e-5)


def test_gain_scaling_at_1280_with_17_keypoints():
    gains = scaled_gains(KapaoLossConfig(), num_keypoints=17, input_size=1280)
    assert gains == pytest.approx({"box": 0.0375, "obj": 2.1, "cls": 0.050625, "kps": 0.01875})


def test_loss_takes_input_size_from_the_grid_and_gains_from_k():
    # All-zero logits, no targets: only objectness, ln 2 per anchor, so obj = gain * ln2 * sum(layer weights)
    # with the gain at input 256 = 32 cells x stride 8.
    k, batch = 3, 2
    outputs = [torch.zeros(batch, 3, 256 // s, 256 // s, outputs_per_anchor(k)) for s in STRIDES]
    total, parts = KapaoLoss()(outputs, torch.zeros(0, 6 + 3 * k))
    expected_obj = 0.7 * (256 / 640) ** 2 * 0.75 * LN2 * (4 + 1 + 0.25 + 0.06)
    assert parts["obj"].item() == pytest.approx(expected_obj, rel=1e-6)
    assert parts["box"].item() == parts["cls"].item() == parts["kps"].item() == 0.0
    assert total.item() == pytest.approx(batch * expected_obj, rel=1e-6)


@pytest.mark.parametrize("num_keypoints", [17, 133])
@pytest.mark.parametrize("with_targets", [False, True])
def test_finite_gradients(num_keypoints, with_targets):
    torch.manual_seed(0)
    no = outputs_per_anchor(num_keypoints)
    outputs = [(torch.randn(2, 3, 128 // s, 128 // s, no) * 2).requires_grad_() for s in STRIDES]
    targets = torch.zeros(0, 6 + 3 * num_keypoints)
    if with_targets:
        poses = torch.cat(
            (
                torch.tensor([[0.0, 0, 0.4, 0.5, 0.3, 0.6], [1.0, 0, 0.7, 0.3, 0.5, 0.4]]),
                torch.cat(
                    (torch.rand(2, num_keypoints, 2), torch.randint(0, 3, (2, num_keypoints, 1))), 2
                ).flatten(1),
            ),
            dim=1,
        )
        keypoint_objects = torch.zeros(3, 6 + 3 * num_keypoints)
        keypoint_objects[:, :6] = torch.tensor(
            [
                [0, 1, 0.41, 0.3, 0.05, 0.05],
                [1, num_keypoints, 0.9, 0.9, 0.05, 0.05],
                [1, 2, 0.01, 0.99, 0.05, 0.05],
            ]
        )
        targets = torch.cat((poses, keypoint_objects))
    total, parts = KapaoLoss()(outputs, targets)
    total.backward()
    assert total.item() >= 0 and math.isfinite(total.item())
    assert all(torch.isfinite(o.grad).all() for o in outputs)
    assert all(p.item() >= 0 for p in parts.values())
    assert (parts["box"].item() > 0) == with_targets and (parts["kps"].item() > 0) == with_targets


def test_keypoint_objects_add_nothing_to_the_keypoint_term():
    torch.manual_seed(1)
    k = 5
    outputs = [
        torch.randn(1, 3, 128 // s, 128 // s, outputs_per_anchor(k), requires_grad=True) for s in STRIDES
    ]
    rows = [
        target_row(0, c, (x, y, 0.15, 0.15), [(0, 0, 0)] * k) for c, x, y in [(1, 0.3, 0.3), (4, 0.6, 0.45)]
    ]
    total, parts = KapaoLoss()(outputs, torch.tensor(rows))
    total.backward()
    assert parts["kps"].item() == 0.0 and parts["box"].item() > 0
    # No gradient reaches the keypoint-offset channels (the last 2K).
    assert all((o.grad[..., -2 * k :] == 0).all() for o in outputs)
    assert any((o.grad[..., : -2 * k] != 0).any() for o in outputs)

    # Adding keypoint objects to a pose target leaves the keypoint term as it was.
    pose = target_row(0, 0, (0.5, 0.5, 0.4, 0.6), [(0.45 + 0.02 * i, 0.4, 2) for i in range(k)])
    _, alone = KapaoLoss()(outputs, torch.tensor([pose]))
    _, mixed = KapaoLoss()(outputs, torch.tensor([pose, *rows]))
    assert alone["kps"].item() > 0
    assert mixed["kps"].item() == pytest.approx(alone["kps"].item(), rel=1e-6)


def test_perfect_prediction_gives_zero_box_loss():
    # Every anchor of every cell gets logits that decode to the target box (where that box is reachable from
    # it), without asking the matcher which ones are positive.
    k, size = 1, 128
    cx, cy, w, h = 0.43, 0.58, 0.35, 0.2  # normalised
    outputs = []
    for stride, anchors in zip(STRIDES, P6_ANCHORS, strict=True):
        n = size // stride
        out = torch.zeros(1, 3, n, n, outputs_per_anchor(k))
        for a, (aw, ah) in enumerate(anchors):
            for gy in range(n):
                for gx in range(n):
                    rel_x, rel_y = cx * n - gx, cy * n - gy
                    if not (-0.5 < rel_x < 1.5 and -0.5 < rel_y < 1.5):
                        continue
                    rw, rh = w * size / aw, h * size / ah  # target / anchor
                    if not (rw < 4 and rh < 4):
                        continue
                    out[0, a, gy, gx, 0] = logit((rel_x + 0.5) / 2)
                    out[0, a, gy, gx, 1] = logit((rel_y + 0.5) / 2)
                    out[0, a, gy, gx, 2] = logit(math.sqrt(rw) / 2)
                    out[0, a, gy, gx, 3] = logit(math.sqrt(rh) / 2)
        outputs.append(out.double())  # double logits: the loss casts to float32
    target = torch.tensor([target_row(0, 0, (cx, cy, w, h), [(0, 0, 0)])])
    _, parts = KapaoLoss()(outputs, target)
    gains = scaled_gains(KapaoLossConfig(), k, size)
    assert parts["box"].item() / gains["box"] < 1e-5
    # Not trivially zero: a shifted prediction gives a clearly positive box loss.
    outputs[1][..., 0] += 1.0
    _, worse = KapaoLoss()(outputs, target)
    assert worse["box"].item() / gains["box"] > 1e-2


def test_wh_ratio_above_anchor_t_is_not_matched():
    anchors = torch.tensor([[2.0, 2.0]])  # grid units, one anchor, grid 8 x 8
    sides = [2.0 * 4.5, 2.0 * 3.9, 2.0 / 4.5, 2.0 / 3.9]  # in grid units: too big, ok, too small, ok
    rows = [
        target_row(0, 0, (0.5 / 8 + 0.125 * i, 0.5 / 8, 2.0 / 8, s / 8), [(0, 0, 0)])
        for i, s in enumerate(sides)
    ]
    matched = match_targets(torch.tensor(rows), (8, 8), anchors, anchor_t=4.0)
    # A centre in the middle of its cell takes no neighbour: one positive per matched target, in column i.
    assert sorted(matched.cell_x.tolist()) == [1, 3]
    assert matched.box[:, 3].tolist() == pytest.approx([sides[1], sides[3]])


def test_neighbour_cells_and_relative_coordinates():
    # Grid 8 x 8, one anchor; centre at grid (3.3, 5.7): own cell (3, 5), left neighbour (2, 5) because x's
    # fraction < 0.5, lower neighbour (3, 6) because y's fraction > 0.5. A keypoint at grid (4.0, 5.0).
    anchors = torch.tensor([[1.0, 1.0]])
    row = target_row(2, 0, (3.3 / 8, 5.7 / 8, 1.5 / 8, 1.2 / 8), [(4.0 / 8, 5.0 / 8, 1)])
    matched = match_targets(torch.tensor([row], dtype=torch.float64), (8, 8), anchors, anchor_t=4.0)
    cells = sorted(zip(matched.cell_x.tolist(), matched.cell_y.tolist(), strict=True))
    assert cells == [(2, 5), (3, 5), (3, 6)]
    by_cell = {
        (x, y): (box.tolist(), kp.tolist())
        for x, y, box, kp in zip(
            matched.cell_x.tolist(), matched.cell_y.tolist(), matched.box, matched.keypoints, strict=True
        )
    }
    for (x, y), (box, kps) in by_cell.items():
        assert box == pytest.approx([3.3 - x, 5.7 - y, 1.5, 1.2])
        assert kps == [pytest.approx([4.0 - x, 5.0 - y, 1.0])]
    assert matched.image.tolist() == [2, 2, 2] and matched.cls.tolist() == [0, 0, 0]

    # Near the grid's edge (centre within one cell of it) no neighbour beyond it is taken: (0.3, 7.7).
    row = target_row(0, 0, (0.3 / 8, 7.7 / 8, 1.0 / 8, 1.0 / 8), [(0, 0, 0)])
    matched = match_targets(torch.tensor([row]), (8, 8), anchors, anchor_t=4.0)
    assert list(zip(matched.cell_x.tolist(), matched.cell_y.tolist(), strict=True)) == [(0, 7)]

    # A non-square grid (H 4, W 8): x scales by W, y by H. Centre (3.3, 1.7): cells (3, 1), (2, 1), (3, 2).
    row = target_row(0, 0, (3.3 / 8, 1.7 / 4, 1.0 / 8, 1.0 / 4), [(4.0 / 8, 1.0 / 4, 2)])
    matched = match_targets(torch.tensor([row], dtype=torch.float64), (4, 8), anchors, anchor_t=4.0)
    cells = list(zip(matched.cell_x.tolist(), matched.cell_y.tolist(), strict=True))
    assert sorted(cells) == [(2, 1), (3, 1), (3, 2)]
    for (x, y), box, kp in zip(cells, matched.box, matched.keypoints, strict=True):
        assert box.tolist() == pytest.approx([3.3 - x, 1.7 - y, 1.0, 1.0])
        assert kp[0].tolist() == pytest.approx([4.0 - x, 1.0 - y, 2.0])


def test_build_targets_one_entry_per_layer_with_layer_grids():
    row = target_row(0, 0, (0.5, 0.5, 0.25, 0.25), [(0, 0, 0)])
    anchors = [torch.tensor([[2.0, 2.0]]), torch.tensor([[1.0, 1.0]])]
    layers = build_targets(torch.tensor([row]), [(8, 8), (4, 4)], anchors, anchor_t=4.0)
    assert len(layers) == 2
    # Centre (4, 4) and (2, 2) in grid units: fractions 0 < 0.5 take left and up, and (inverse 4 % 1 = 0) also
    # right and down, the authors' tie at an exact cell edge.
    assert len(layers[0]) == 5 and len(layers[1]) == 5
    assert layers[0].box[0].tolist() == pytest.approx([0.0, 0.0, 2.0, 2.0])
    assert layers[1].box[0].tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])


def test_runs_under_autocast_in_float32():
    torch.manual_seed(2)
    k = 2
    outputs = [torch.randn(1, 3, 128 // s, 128 // s, outputs_per_anchor(k)).bfloat16() for s in STRIDES]
    rows = torch.tensor([target_row(0, 0, (0.5, 0.5, 0.4, 0.6), [(0.5, 0.4, 2), (0.55, 0.4, 2)])])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = KapaoLoss()(outputs, rows)
    reference, _ = KapaoLoss()([o.float() for o in outputs], rows)
    assert total.dtype == torch.float32 and all(p.dtype == torch.float32 for p in parts.values())
    assert total.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"box": -0.1}, "box"),
        ({"kp": float("nan")}, "kp"),
        ({"anchor_t": 1.0}, "anchor_t"),
        ({"obj_layer_weights": (4.0, 1.0, 0.25)}, "obj_layer_weights"),
        ({"obj_layer_weights": (4.0, 1.0, -0.25, 0.06)}, "obj_layer_weights"),
    ],
)
def test_validate_names_the_field(change, field):
    config = KapaoLossConfig(**change)
    with pytest.raises(KapaoLossSettingError) as err:
        config.validate()
    assert err.value.field == field and isinstance(err.value, ValueError)
    with pytest.raises(KapaoLossSettingError):
        KapaoLoss(config)


def test_defaults_validate():
    KapaoLossConfig().validate()


def test_shape_errors_are_named():
    outputs = [torch.zeros(1, 3, 128 // s, 128 // s, outputs_per_anchor(2)) for s in STRIDES]
    with pytest.raises(ValueError, match="targets have shape"):
        KapaoLoss()(outputs, torch.zeros(0, 6 + 3 * 3))
    with pytest.raises(ValueError, match="output layers"):
        KapaoLoss()(outputs[:3], torch.zeros(0, 12))
    with pytest.raises(ValueError, match="implies input"):
        KapaoLoss()([outputs[0], outputs[0], outputs[2], outputs[3]], torch.zeros(0, 12))


def test_ciou_gradient_is_finite_for_a_predicted_height_below_float32_resolution():
    """A height of 1e-6 at centre 100 vanishes in ``y2 - y1`` (float32), where torchvision's CIoU divides by
    it: the NaN gradient that ended a KAPAO run. The authors add eps to the height; so do we."""
    from trainer.kapao.loss import complete_iou

    pred = torch.tensor([[100.0, 100.0, 3.0, 1e-6]], requires_grad=True)
    target = torch.tensor([[100.5, 100.0, 4.0, 4.0]])
    ciou = complete_iou(pred, target)
    ciou.sum().backward()
    assert torch.isfinite(ciou).all() and torch.isfinite(pred.grad).all()
    regular = torch.tensor([[0.4, 0.6, 1.5, 2.5]])
    assert complete_iou(regular, torch.tensor([[0.5, 0.5, 2.0, 2.0]])).item() == pytest.approx(
        ciou_by_hand((0.4, 0.6, 1.5, 2.5), (0.5, 0.5, 2.0, 2.0)), rel=1e-5
    )
