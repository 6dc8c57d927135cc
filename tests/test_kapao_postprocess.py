"""KAPAO post-processing: decoding, NMS per object type, keypoint-object fusion, an oracle on the mini set."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from shared_data import ANN

from trainer.kapao.anchors import P6_ANCHORS, STRIDES, outputs_per_anchor
from trainer.kapao.postprocess import (
    Candidates,
    KapaoEvalConfig,
    KapaoEvalSettingError,
    Letterbox,
    candidates,
    decode_outputs,
    fuse_keypoint_objects,
    non_max_suppression,
    poses_from_candidates,
    poses_from_outputs,
    poses_to_results,
    to_wholebody,
)

BACKGROUND = -20.0  # objectness logit of an empty anchor: sigmoid ~2e-9, below every floor


def _logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------


def test_decode_equals_the_formula_element_by_element():
    k, anchors, strides = 2, (((10, 20), (30, 15)), ((50, 60), (70, 40))), (8, 16)
    generator = torch.Generator().manual_seed(0)
    outputs = [torch.randn(2, 2, 3, 4, outputs_per_anchor(k), generator=generator) * 2 for _ in strides]
    outputs[1] = torch.randn(2, 2, 2, 5, outputs_per_anchor(k), generator=generator) * 2  # H != W
    decoded = decode_outputs(outputs, anchors, strides)
    assert decoded.shape == (2, 2 * 3 * 4 + 2 * 2 * 5, 3 * k + 6)
    n = 0
    for out, layer_anchors, s in zip(outputs, anchors, strides, strict=True):
        _, num_anchors, height, width, _ = out.shape
        for a in range(num_anchors):
            for gy in range(height):
                for gx in range(width):
                    aw, ah = layer_anchors[a]
                    for b in range(2):
                        t = out[b, a, gy, gx].double().tolist()
                        sig = [_sigmoid(v) for v in t]
                        expected = [
                            (2 * sig[0] - 0.5 + gx) * s,
                            (2 * sig[1] - 0.5 + gy) * s,
                            (2 * sig[2]) ** 2 * aw,
                            (2 * sig[3]) ** 2 * ah,
                            *sig[4 : 4 + 1 + k + 1],
                        ]
                        for j in range(k):
                            expected.append((4 * sig[4 + k + 2 + 2 * j] - 2) * aw + gx * s)
                            expected.append((4 * sig[4 + k + 2 + 2 * j + 1] - 2) * ah + gy * s)
                        np.testing.assert_allclose(
                            decoded[b, n].double().numpy(), expected, rtol=1e-5, atol=1e-4
                        )
                    n += 1
    assert n == decoded.shape[1]


def _candidate_arrays(c: Candidates):
    """A candidate set as sorted rows (order-free comparison)."""
    poses = torch.cat([c.pose_boxes, c.pose_scores[:, None], c.pose_keypoints.flatten(1)], 1)
    kps = torch.cat([c.kp_boxes, c.kp_scores[:, None], c.kp_classes[:, None].float()], 1)
    return [rows[torch.argsort(rows[:, 4])].numpy() for rows in (poses, kps)]


def test_the_head_layout_and_the_device_gather_give_the_same_candidates_and_poses():
    """Raw outputs as the head returns them (views of [B, A, No, H, W] memory) and contiguous ones, read
    with numpy's plane gather and with torch's gather (the path for outputs on a GPU): the same candidates,
    and the poses with keypoints decoded only for the NMS survivors equal those from every candidate."""
    from trainer.kapao.postprocess import _found_in_outputs

    k = 5
    generator = torch.Generator().manual_seed(2)
    planes = [
        torch.randn(2, 3, outputs_per_anchor(k), 128 // s, 128 // s, generator=generator) for s in STRIDES
    ]
    for plane in planes:
        plane[:, :, 4] = torch.randn(plane[:, :, 4].shape, generator=generator) * 3 - 3
    views = [plane.permute(0, 1, 3, 4, 2) for plane in planes]
    contiguous = [view.contiguous() for view in views]
    settings = KapaoEvalConfig(tau_cp=0.01, tau_ck=0.1, tau_fc=0.05)
    reference = candidates(contiguous, settings.tau_cp, settings.tau_ck)
    for outputs, on_device in ((views, False), (views, True), (contiguous, True)):
        found = _found_in_outputs(outputs, settings.tau_cp, settings.tau_ck, P6_ANCHORS, STRIDES, on_device)
        for got, want in zip(found, reference, strict=True):
            got = got.candidates()
            assert len(want.pose_scores) > 10 and len(want.kp_scores) > 10
            for name in Candidates.__dataclass_fields__:
                assert torch.equal(getattr(got, name), getattr(want, name)), name
    letterboxes = [(0.5, (0.0, 8.0)), (1.0, (0.0, 0.0))]
    from_every_candidate = [
        poses_from_candidates(c, settings, lb) for c, lb in zip(reference, letterboxes, strict=True)
    ]
    for outputs in (views, contiguous):
        for got, want in zip(
            poses_from_outputs(outputs, settings, letterboxes), from_every_candidate, strict=True
        ):
            assert len(want[1]) > 0 and (want[0][..., 2] > want[1][:, None]).any()  # some fused keypoints
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_candidates_from_raw_equal_candidates_from_decoded_and_split_by_arg_max_class():
    k = 3
    generator = torch.Generator().manual_seed(1)
    outputs = [
        torch.randn(2, 3, 80 // s, 80 // s, outputs_per_anchor(k), generator=generator) for s in STRIDES
    ]
    for out in outputs:
        out[..., 4] = torch.randn(out.shape[:4], generator=generator) * 3 - 4  # a few percent above 0.05
    from_raw = candidates(outputs, 0.05, 0.2)
    from_decoded = candidates(decode_outputs(outputs), 0.05, 0.2)
    decoded = decode_outputs(outputs)
    for b in range(2):
        for raw_rows, decoded_rows in zip(
            _candidate_arrays(from_raw[b]), _candidate_arrays(from_decoded[b]), strict=True
        ):
            np.testing.assert_allclose(raw_rows, decoded_rows, rtol=1e-6, atol=1e-5)
        # The split: arg-max class 0 -> pose object, class c > 0 -> keypoint c - 1; conf = obj * class.
        score, label = decoded[b, :, 5 : 5 + k + 1].max(1)
        conf = decoded[b, :, 4] * score
        assert len(from_raw[b].pose_scores) == int(((label == 0) & (conf > 0.05)).sum()) > 0
        assert len(from_raw[b].kp_scores) == int(((label > 0) & (conf > 0.2)).sum()) > 0
        expected_classes = torch.sort(label[(label > 0) & (conf > 0.2)] - 1).values
        assert torch.equal(torch.sort(from_raw[b].kp_classes).values, expected_classes)


# ---------------------------------------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------------------------------------


def _poses(xs, k=1):
    """Poses whose keypoint 0 is at (x, 0), the others far away; scores 0."""
    keypoints = torch.zeros(len(xs), k, 3, dtype=torch.float64)
    keypoints[:, :, 0] = 1e4
    keypoints[:, 0, 0] = torch.tensor(xs, dtype=torch.float64)
    return keypoints


def _fuse(poses, pose_scores, objects, tau_fd=50.0, tau_fc=0.3):
    """objects: (x, y, score, class) rows."""
    objects = torch.tensor(objects, dtype=torch.float64).reshape(-1, 4)
    return fuse_keypoint_objects(
        poses, torch.tensor(pose_scores), objects[:, :2], objects[:, 2], objects[:, 3].long(), tau_fd, tau_fc
    )


def test_fusion_nearest_pose_wins():
    fused = _fuse(_poses([0.0, 30.0]), [0.9, 0.9], [(22.0, 0.0, 0.8, 0)])
    assert fused[1, 0].tolist() == [22.0, 0.0, 0.8]
    assert fused[0, 0].tolist() == [0.0, 0.0, 0.0]


def test_fusion_respects_tau_fd_and_tau_fc():
    assert _fuse(_poses([0.0]), [0.9], [(49.0, 0.0, 0.5, 0)])[0, 0, 2] == 0.5
    assert _fuse(_poses([0.0]), [0.9], [(51.0, 0.0, 0.5, 0)])[0, 0, 2] == 0.0
    assert _fuse(_poses([0.0]), [0.9], [(0.0, 51.0, 0.5, 0)], tau_fd=60.0)[0, 0, 2] == 0.5
    # A pose at exactly tau_fc does not take part, even as the nearest: the object goes to the eligible one.
    fused = _fuse(_poses([0.0, 40.0]), [0.3, 0.31], [(1.0, 0.0, 0.5, 0)])
    assert fused[0, 0].tolist() == [0.0, 0.0, 0.0] and fused[1, 0].tolist() == [1.0, 0.0, 0.5]
    # ... and with no eligible pose within tau_fd it is dropped (not given to the ineligible one).
    fused = _fuse(_poses([0.0, 60.0]), [0.2, 0.9], [(1.0, 0.0, 0.5, 0)])
    assert fused[:, 0, 2].tolist() == [0.0, 0.0]


def test_fusion_higher_score_replaces_lower_only():
    poses = _poses([0.0])
    poses[0, 0, 2] = 0.5  # a starting score
    assert _fuse(poses, [0.9], [(3.0, 0.0, 0.4, 0)])[0, 0].tolist() == [0.0, 0.0, 0.5]
    assert _fuse(poses, [0.9], [(3.0, 0.0, 0.6, 0)])[0, 0].tolist() == [3.0, 0.0, 0.6]
    # Two objects for one keypoint: the better one stays, whatever the input order.
    for objects in ([(3.0, 0.0, 0.6, 0), (1.0, 0.0, 0.7, 0)], [(1.0, 0.0, 0.7, 0), (3.0, 0.0, 0.6, 0)]):
        assert _fuse(_poses([0.0]), [0.9], objects)[0, 0].tolist() == [1.0, 0.0, 0.7]


def _reference_fusion(poses, pose_scores, kp_xy, kp_scores, kp_classes, tau_fd, tau_fc, sort=True):
    """The authors' loop (val.py), object by object, in numpy (their objects come sorted from NMS)."""
    poses = poses.copy()
    mask = pose_scores > tau_fc
    pool = poses[mask]
    if len(pool):
        for j in np.argsort(-kp_scores, kind="stable") if sort else range(len(kp_scores)):
            keypoints = pool[:, kp_classes[j]]
            distance = np.linalg.norm(keypoints[:, :2] - kp_xy[j][None], axis=-1)
            match = np.argmin(distance)
            if kp_scores[j] > keypoints[match, 2] and distance[match] < tau_fd:
                keypoints[match] = [*kp_xy[j], kp_scores[j]]
        poses[mask] = pool
    return poses


def test_fusion_takes_objects_in_descending_score_order():
    # Poses A (x = 0) and B (x = 30). Best first: 0.9 at x = 10 goes to A (A moves to 10); 0.8 at x = 16 is
    # then nearest to A (6 < 14) and loses to 0.9: B stays unfused. In input order (0.8 first) B gets 0.8 at
    # 16, then 0.9 at 10 goes to B (6 < 10) and replaces it: A unfused. The input order must not matter.
    objects = [(16.0, 0.0, 0.8, 0), (10.0, 0.0, 0.9, 0)]
    fused = _fuse(_poses([0.0, 30.0]), [0.9, 0.9], objects)
    assert fused[0, 0].tolist() == [10.0, 0.0, 0.9]
    assert fused[1, 0].tolist() == [30.0, 0.0, 0.0]
    assert torch.equal(_fuse(_poses([0.0, 30.0]), [0.9, 0.9], objects[::-1]), fused)
    arrays = np.array(objects)
    in_input_order = _reference_fusion(
        _poses([0.0, 30.0]).numpy(),
        np.array([0.9, 0.9]),
        arrays[:, :2],
        arrays[:, 2],
        [0, 0],
        50,
        0.3,
        sort=False,
    )
    assert in_input_order[:, 0].tolist() == [
        [0.0, 0.0, 0.0],
        [10.0, 0.0, 0.9],
    ]  # the order changes the outcome


def test_fusion_equals_the_sequential_rule_on_random_crowds():
    rng = np.random.default_rng(0)
    fused_any = 0
    for case in range(60):
        people, k, objects = rng.integers(1, 12), rng.integers(1, 6), rng.integers(0, 80)
        centres = rng.uniform(0, 200, (people, 1, 2))
        poses = np.concatenate([centres + rng.normal(0, 15, (people, k, 2)), np.zeros((people, k, 1))], -1)
        if case % 3 == 0:
            poses[..., 2] = rng.uniform(0, 0.5, (people, k))  # nonzero starting scores
        pose_scores = rng.uniform(0, 1, people)
        kp_classes = rng.integers(0, k, objects)
        owners = rng.integers(0, people, objects)
        kp_xy = poses[owners, kp_classes, :2] + rng.normal(0, 20, (objects, 2))
        kp_scores = np.round(rng.uniform(0.2, 1, objects), 1 if case % 2 else 6)  # ties on odd cases
        expected = _reference_fusion(poses, pose_scores, kp_xy, kp_scores, kp_classes, 30.0, 0.3)
        got = fuse_keypoint_objects(
            torch.from_numpy(poses),
            torch.from_numpy(pose_scores),
            torch.from_numpy(kp_xy),
            torch.from_numpy(kp_scores),
            torch.from_numpy(kp_classes),
            30.0,
            0.3,
        )
        np.testing.assert_array_equal(got.numpy(), expected)
        fused_any += int((expected != poses).any(-1).sum())
    assert fused_any > 100  # the cases exercise the rule


# ---------------------------------------------------------------------------------------------------------
# NMS, scores, letterbox, results, settings
# ---------------------------------------------------------------------------------------------------------


def _box(cx, cy, side):
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


def test_nms_per_object_type():
    # Pose boxes: 0 and 1 overlap with IoU 0.8 (> tau_bp 0.65: 1 goes), 0 and 2 with IoU 0.6 (both stay).
    pose_boxes = torch.tensor([[0, 0, 100, 100], [0, 0, 100, 80], [0, 0, 100, 60]], dtype=torch.float32)
    # Keypoint boxes: 0/1 same class, IoU 0.6 > tau_bk (0.25): 1 goes; 2 is box 0 in another class (stays);
    # 3 is exactly pose box 0 (another object type: neither suppresses the other).
    kp_boxes = torch.tensor([_box(10, 10, 20), _box(15, 10, 20), _box(10, 10, 20), [0, 0, 100, 100]])
    cands = Candidates(
        pose_boxes=pose_boxes,
        pose_scores=torch.tensor([0.9, 0.8, 0.7]),
        pose_keypoints=torch.zeros(3, 2, 2),
        kp_boxes=kp_boxes,
        kp_scores=torch.tensor([0.9, 0.8, 0.7, 0.6]),
        kp_classes=torch.tensor([0, 0, 1, 0]),
    )
    kept = non_max_suppression(cands, KapaoEvalConfig())
    assert kept.pose_scores.tolist() == pytest.approx([0.9, 0.7])
    assert kept.kp_scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert kept.kp_classes.tolist() == [0, 1, 0]
    # Thresholds: below tau_ck a keypoint object is gone; the keypoint cap keeps the best.
    kept = non_max_suppression(cands, KapaoEvalConfig(tau_ck=0.65, tau_cp=0.75, max_keypoint_objects=1))
    assert kept.kp_scores.tolist() == pytest.approx([0.9]) and kept.pose_scores.tolist() == pytest.approx(
        [0.9]
    )


def _random_crowd_candidates(rng, people=15, k=17) -> Candidates:
    """Clustered pose and keypoint boxes, so that NMS both keeps and suppresses."""
    centres = rng.uniform(0, 600, (people, 2))
    pose_centres = np.repeat(centres, 40, axis=0) + rng.normal(0, 8, (people * 40, 2))
    pose_sizes = rng.uniform(60, 200, (people, 1, 2)).repeat(40, axis=1).reshape(-1, 2) * rng.uniform(
        0.8, 1.2, (people * 40, 2)
    )
    kp_centres = pose_centres[rng.integers(0, len(pose_centres), 1500)] + rng.normal(0, 20, (1500, 2))
    kp_sizes = rng.uniform(20, 40, (1500, 1)).repeat(2, axis=1)

    def boxes(centre, size):
        return torch.tensor(np.concatenate([centre - size / 2, centre + size / 2], 1), dtype=torch.float32)

    return Candidates(
        pose_boxes=boxes(pose_centres, pose_sizes),
        pose_scores=torch.tensor(rng.uniform(0, 1, len(pose_centres)) ** 3, dtype=torch.float32),
        pose_keypoints=torch.zeros(len(pose_centres), k, 2),
        kp_boxes=boxes(kp_centres, kp_sizes),
        kp_scores=torch.tensor(rng.uniform(0.1, 1, 1500), dtype=torch.float32),
        kp_classes=torch.tensor(rng.integers(0, k, 1500)),
    )


def test_nms_equals_torchvision_and_the_pose_shortcut_is_exact(monkeypatch):
    from torchvision.ops import batched_nms, nms

    from trainer.kapao import nms_fusion

    rng = np.random.default_rng(3)
    settings = KapaoEvalConfig()
    for _ in range(3):
        cands = _random_crowd_candidates(rng)
        pose = (cands.pose_scores > settings.tau_cp).nonzero().squeeze(1)
        expected_poses = pose[nms(cands.pose_boxes[pose], cands.pose_scores[pose], settings.tau_bp)]
        kp = (cands.kp_scores > settings.tau_ck).nonzero().squeeze(1)
        expected_kps = kp[
            batched_nms(cands.kp_boxes[kp], cands.kp_scores[kp], cands.kp_classes[kp], settings.tau_bk)
        ]
        kept = non_max_suppression(cands, settings)
        assert torch.equal(kept.pose_scores, cands.pose_scores[expected_poses])
        assert torch.equal(kept.kp_scores, cands.kp_scores[expected_kps])
        assert 30 < len(kept.kp_scores) < len(kp) and 20 < len(kept.pose_scores) < len(
            pose
        )  # both keep and cut
        assert torch.equal(kept.kp_classes, cands.kp_classes[expected_kps])
        # all_poses=False: a prefix of the same survivors, at least max_poses and every one above tau_fc.
        some = non_max_suppression(cands, settings, all_poses=False)
        assert torch.equal(some.pose_scores, kept.pose_scores[: len(some.pose_scores)])
        assert len(some.pose_scores) >= settings.max_poses
        assert (some.pose_scores > settings.tau_fc).sum() == (kept.pose_scores > settings.tau_fc).sum()
        assert len(some.pose_scores) < len(kept.pose_scores)
        # Past its size limit the padded per-class NMS hands over to torchvision's: the same survivors.
        monkeypatch.setattr(nms_fusion, "PADDED_NMS_LIMIT", 0)
        assert torch.equal(non_max_suppression(cands, settings).kp_scores, kept.kp_scores)
        monkeypatch.undo()


def test_empty_outputs_give_no_poses():
    outputs = [torch.full((2, 3, 64 // s, 64 // s, outputs_per_anchor(17)), BACKGROUND) for s in STRIDES]
    poses = poses_from_outputs(outputs, KapaoEvalConfig(), [(1.0, (0.0, 0.0))] * 2)
    assert [(tuple(kps.shape), tuple(scores.shape)) for kps, scores in poses] == [((0, 17, 3), (0,))] * 2
    assert poses_to_results([1, 2], poses) == []


def test_poses_from_candidates_letterbox_fusion_and_unfused_scores():
    # Two poses, 2 keypoints, in input pixels; letterbox ratio 2, pad (10, 20): original = (input - pad) / 2.
    pose_keypoints = torch.tensor([[[110.0, 220.0], [130.0, 220.0]], [[410.0, 420.0], [430.0, 420.0]]])
    cands = Candidates(
        pose_boxes=torch.tensor([_box(120, 220, 80), _box(420, 420, 80)]),
        pose_scores=torch.tensor([0.9, 0.6]),
        pose_keypoints=pose_keypoints,
        # Keypoint 1 of pose 0, 40 input px = 20 original px away: within tau_fd = 25 original px, while 60
        # input px (30 original) would not be: tau_fd is compared in original pixels.
        kp_boxes=torch.tensor([_box(170, 220, 16), _box(410, 480, 16)]),
        kp_scores=torch.tensor([0.7, 0.8]),
        kp_classes=torch.tensor([1, 0]),
    )
    letterbox = (2.0, (10.0, 20.0))
    keypoints, scores = poses_from_candidates(cands, KapaoEvalConfig(tau_fd=25.0), letterbox)
    assert scores.tolist() == pytest.approx([0.9, 0.6])
    expected = [[[50, 100, 0.9], [80, 100, 0.7]], [[200, 200, 0.6], [210, 200, 0.6]]]
    np.testing.assert_allclose(keypoints.numpy(), expected, rtol=1e-6)
    zero, _ = poses_from_candidates(cands, KapaoEvalConfig(tau_fd=25.0, unfused_score="zero"), letterbox)
    np.testing.assert_allclose(zero[..., 2].numpy(), [[0, 0.7], [0, 0]], rtol=1e-6)
    off, _ = poses_from_candidates(cands, KapaoEvalConfig(tau_fd=25.0, fusion=False), letterbox)
    assert off[0, 1].tolist() == pytest.approx([60, 100, 0.9])
    capped, capped_scores = poses_from_candidates(cands, KapaoEvalConfig(tau_fd=25.0, max_poses=1), letterbox)
    assert capped.shape == (1, 2, 3) and torch.equal(capped, keypoints[:1]) and len(capped_scores) == 1


def test_letterbox_and_wholebody_results():
    lb = Letterbox.of(((2.0, 4.0), (1.0, 2.0)))
    assert lb.to_original(torch.tensor([[5.0, 10.0]])).tolist() == [[2.0, 2.0]]
    body = torch.rand(2, 17, 3)
    padded = to_wholebody(body)
    assert (
        padded.shape == (2, 133, 3) and np.allclose(padded[:, :17], body.numpy()) and not padded[:, 17:].any()
    )
    with pytest.raises(ValueError):
        to_wholebody(torch.zeros(1, 20, 3))
    results = poses_to_results([7, 8], [(body, torch.tensor([0.5, 0.4])), (body[:0], torch.zeros(0))])
    assert [r["image_id"] for r in results] == [7, 7] and results[1]["score"] == pytest.approx(0.4)
    assert len(results[0]["keypoints"]) == 51 and not any(results[0]["face_kpts"])


@pytest.mark.parametrize(
    ("field", "value"),
    [("tau_cp", 1.0), ("tau_bp", 0.0), ("tau_ck", -0.1), ("tau_bk", float("nan")), ("tau_fd", 0.0),
     ("tau_fc", "0.3"), ("fusion", 1), ("unfused_score", "keypoint"), ("max_poses", 0),
     ("max_keypoint_objects", 2.5)],
)  # fmt: skip
def test_settings_validate_names_the_field(field, value):
    KapaoEvalConfig().validate()
    with pytest.raises(KapaoEvalSettingError) as error:
        KapaoEvalConfig(**{field: value}).validate()
    assert error.value.field == field and isinstance(error.value, ValueError)


# ---------------------------------------------------------------------------------------------------------
# Oracle: ground truth -> raw head outputs -> post-processing -> the project's evaluator
# ---------------------------------------------------------------------------------------------------------

ORACLE_SIZE = 640
ORACLE_CONF = 0.95  # class score of every oracle object, and objectness of the keypoint objects


class _Head:
    """Raw outputs of one image at ORACLE_SIZE, written one object at a time into free (layer, anchor, cell)
    slots, with the anchor/cell search of the authors' target assignment (a centre may sit in a neighbour)."""

    def __init__(self, k: int):
        self.k = k
        self.outputs = [
            torch.zeros(1, 3, ORACLE_SIZE // s, ORACLE_SIZE // s, outputs_per_anchor(k), dtype=torch.float64)
            for s in STRIDES
        ]
        for out in self.outputs:
            out[..., 4] = BACKGROUND
            out[..., 5 : 5 + k + 1] = BACKGROUND
        self.used: set[tuple[int, int, int, int]] = set()
        self.missed = 0

    def put(self, centre, size, cls: int, keypoints=None, objectness: float = ORACLE_CONF) -> bool:
        """An object with box centre/size (input px), class ``cls`` and optional keypoints ``[K, 2]`` (NaN =
        unlabelled). Returns False (and counts a miss) when no free slot can represent it exactly."""
        choices = []
        for level, layer_anchors in enumerate(P6_ANCHORS):
            for a, anchor in enumerate(layer_anchors):
                ratio = np.asarray(size) / np.asarray(anchor)
                if (ratio < 3.9).all():
                    choices.append((max(ratio.max(), (1 / ratio).max()), level, a))
        for _, level, a in sorted(choices):
            s, anchor = STRIDES[level], np.asarray(P6_ANCHORS[level][a], dtype=np.float64)
            cells = self.outputs[level].shape[2]
            home = np.floor(np.asarray(centre) / s).astype(int)
            for dx, dy in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
                gx, gy = home[0] + dx, home[1] + dy
                offset = np.asarray(centre) / s - (gx, gy)  # the box formula reaches (-0.5, 1.5)
                if not (0 <= gx < cells and 0 <= gy < cells) or (level, a, gy, gx) in self.used:
                    continue
                if not ((offset > -0.45) & (offset < 1.45)).all():
                    continue
                corner = np.array([gx, gy]) * s
                if keypoints is not None:
                    labelled = ~np.isnan(keypoints[:, 0])
                    reach = np.abs(keypoints[labelled] - corner) / anchor  # the keypoint formula reaches 2
                    if (reach > 1.95).any():
                        continue
                self._write(
                    level, a, gy, gx, centre, size, cls, keypoints, corner, anchor, offset, objectness
                )
                return True
        self.missed += 1
        return False

    def _write(self, level, a, gy, gx, centre, size, cls, keypoints, corner, anchor, offset, objectness):
        self.used.add((level, a, gy, gx))
        row = self.outputs[level][0, a, gy, gx]
        row[0:2] = torch.from_numpy(_logit((offset + 0.5) / 2))
        row[2:4] = torch.from_numpy(_logit(np.sqrt(np.asarray(size) / anchor) / 2))
        row[4] = float(_logit(objectness))
        row[5 + cls] = float(_logit(ORACLE_CONF))
        if keypoints is not None:
            relative = np.nan_to_num((keypoints - corner) / anchor, nan=0.0)
            row[4 + self.k + 2 :] = torch.from_numpy(_logit((relative + 2) / 4).reshape(-1))


def _oracle_outputs(annotations, image_index: int, noise_px: float, rng):
    """The raw outputs of a perfect model for one image, its letterbox, and how many objects found no slot."""
    width, height = int(annotations.image_widths[image_index]), int(annotations.image_heights[image_index])
    ratio = ORACLE_SIZE / max(width, height)
    pad = ((ORACLE_SIZE - round(width * ratio)) / 2, (ORACLE_SIZE - round(height * ratio)) / 2)
    head = _Head(k=133)
    rows = np.flatnonzero(
        (annotations.ann_image_ids == annotations.image_ids[image_index]) & (annotations.iscrowd == 0)
    )
    side = 0.05 * max(width, height) * ratio  # the keypoint-object box (kp_bbox = 0.05)
    for row in rows:
        x, y, w, h = annotations.bboxes[row]
        labels = np.asarray(annotations.keypoints[row], dtype=np.float64)
        visible = labels[:, 2] > 0
        exact = labels[:, :2] * ratio + pad
        noisy = np.where(visible[:, None], exact + rng.normal(0, noise_px, exact.shape), np.nan)
        centre = (np.array([x + w / 2, y + h / 2]) * ratio) + pad
        # Distinct pose confidences: the evaluator ranks by them, and ties would make the part APs depend on
        # the order of equal scores (a person without labels on a part matches that part only through the
        # box rule, so its detection can be a false positive there, while whole-body is unaffected).
        objectness = ORACLE_CONF - 0.001 * int(row)
        head.put(centre, np.maximum(np.array([w, h]) * ratio, 2.0), 0, noisy, objectness)
        for kp in np.flatnonzero(visible):
            head.put(exact[kp], (side, side), kp + 1)
    return head.outputs, (ratio, pad), head.missed


def _oracle_metrics(settings: KapaoEvalConfig, noise_px: float) -> tuple[dict, int]:
    from trainer.datasets.annotations import load_wholebody_annotations
    from trainer.evaluation.wholebody import WholeBodyEvaluator

    annotations = load_wholebody_annotations(ANN)
    rng = np.random.default_rng(0)
    results, missed = [], 0
    for index, image_id in enumerate(annotations.image_ids.tolist()):
        outputs, letterbox, image_missed = _oracle_outputs(annotations, index, noise_px, rng)
        missed += image_missed
        poses = poses_from_outputs([out.float() for out in outputs], settings, [letterbox])
        results += poses_to_results([image_id], poses)
    return WholeBodyEvaluator.for_file(ANN).evaluate(results), missed


PARTS = ("body", "foot", "face", "lefthand", "righthand", "wholebody")


@pytest.mark.skipif(not ANN.is_file(), reason=f"the COCO-WholeBody mini set is absent ({ANN})")
def test_oracle_outputs_score_near_perfect_and_fusion_restores_noisy_poses(one_torch_thread):
    exact, missed = _oracle_metrics(KapaoEvalConfig(), noise_px=0.0)
    noisy_off, _ = _oracle_metrics(KapaoEvalConfig(fusion=False), noise_px=3.0)
    noisy_on, _ = _oracle_metrics(KapaoEvalConfig(), noise_px=3.0)
    print(f"\noracle (input {ORACLE_SIZE}, {missed} objects without a free slot); AP per part:")
    for name, metrics in (("exact", exact), ("noisy, fusion off", noisy_off), ("noisy, fusion on", noisy_on)):
        print(f"  {name:18s} " + "  ".join(f"{part} {metrics[f'{part}/AP']:.3f}" for part in PARTS))
    assert exact["wholebody/AP"] >= 0.97
    assert noisy_on["wholebody/AP"] > noisy_off["wholebody/AP"]
    assert noisy_on["wholebody/AP"] >= 0.97  # the exact keypoint objects replace the noisy pose keypoints
    # Fusion puts the exact keypoint objects back: the small face and hand keypoints gain most.
    assert noisy_on["face/AP"] > noisy_off["face/AP"]
