"""Procedurally posed and drawn people for the synthetic COCO-WholeBody data set (``trainer.datasets.synth``).

``_sample_person(rng, height, hip_center)`` poses one person (133 keypoints in image pixels and its
appearance); ``_draw_person(canvas, person)`` draws it into a ``_Canvas``, which paints every shape into the
image and, with the person's label, into a label map (what ``trainer.datasets.synth`` reads visibility, box,
area
and segmentation from); ``_background`` draws the textured background. Every random draw comes from the
``numpy.random.Generator`` passed in, in a fixed order: the data set's bytes depend on it.
"""

from __future__ import annotations

import cv2
import numpy as np

from trainer.datasets.keypoints import KEYPOINT_NAMES, NUM_KEYPOINTS, PART_RANGES

_SHIFT = 4  # cv2 drawing with 4 fractional bits: sub-pixel placement of every shape.
_ONE = 1 << _SHIFT

# 68-point face layout (iBUG 300-W order) for a frontal face of width 1, centred near the nose, y down.
# Index 0 is the subject's right jaw end (image left for a face looking at the camera).
FACE_TEMPLATE: np.ndarray = np.array(
    # jaw 0-16
    [
        (
            -0.5 * np.cos(np.pi * i / 16) * (1.0 - 0.18 * np.sin(np.pi * i / 16)),
            -0.12 + 0.58 * np.sin(np.pi * i / 16),
        )
        for i in range(17)
    ]
    # right brow 17-21 (image left), left brow 22-26
    + [(x, -0.33 - 0.05 * np.sin(np.pi * (x + 0.40) / 0.32)) for x in np.linspace(-0.40, -0.08, 5)]
    + [(x, -0.33 - 0.05 * np.sin(np.pi * (0.40 - x) / 0.32)) for x in np.linspace(0.08, 0.40, 5)]
    # nose bridge 27-30, nose bottom 31-35
    + [(0.0, -0.22), (0.0, -0.14), (0.0, -0.06), (0.0, 0.02)]
    + [(-0.10, 0.08), (-0.05, 0.10), (0.0, 0.11), (0.05, 0.10), (0.10, 0.08)]
    # right eye 36-41 (outer corner, upper two, inner corner, lower two), left eye 42-47 (inner corner first)
    + [(-0.30, -0.17), (-0.24, -0.205), (-0.18, -0.205), (-0.12, -0.17), (-0.18, -0.14), (-0.24, -0.14)]
    + [(0.12, -0.17), (0.18, -0.205), (0.24, -0.205), (0.30, -0.17), (0.24, -0.14), (0.18, -0.14)]
    # outer lips 48-59 (left corner, upper lip to right corner, lower lip back)
    + [(-0.17, 0.26), (-0.11, 0.22), (-0.04, 0.20), (0.0, 0.21), (0.04, 0.20), (0.11, 0.22), (0.17, 0.26)]
    + [(0.11, 0.31), (0.04, 0.33), (0.0, 0.335), (-0.04, 0.33), (-0.11, 0.31)]
    # inner lips 60-67 (left corner, upper, right corner, lower)
    + [(-0.13, 0.26), (-0.05, 0.245), (0.0, 0.245), (0.05, 0.245), (0.13, 0.26), (0.05, 0.28), (0.0, 0.28)]
    + [(-0.05, 0.28)],
    dtype=np.float64,
)
_FACE_INNER_LOWER_LIP = np.array([65, 66, 67])  # opened by the random mouth opening
# Depth of each face point (towards the camera), for turning the face with yaw.
_FACE_DEPTH = 0.25 - 1.0 * FACE_TEMPLATE[:, 0] ** 2
_FACE_DEPTH[27:36] += np.array([0.10, 0.14, 0.18, 0.22, 0.12, 0.15, 0.18, 0.15, 0.12])

# 21-point hand in units of hand length: u along the hand (wrist -> fingertips), v across (thumb side +).
_HAND_FINGER_BASES = np.array([(0.10, 0.14), (0.42, 0.13), (0.45, 0.03), (0.43, -0.07), (0.38, -0.16)])
_HAND_FINGER_ANGLES = np.array([0.75, 0.12, 0.0, -0.10, -0.22])  # radians from the hand axis
_HAND_SEGMENTS = np.array(
    [
        (0.13, 0.12, 0.10),  # thumb: CMC -> MCP -> IP -> tip
        (0.18, 0.12, 0.10),  # forefinger: MCP -> PIP -> DIP -> tip
        (0.20, 0.13, 0.11),  # middle
        (0.18, 0.12, 0.10),  # ring
        (0.14, 0.10, 0.08),  # pinky
    ]
)
_FINGER_TINTS = np.array(
    [(60, 60, 230), (40, 170, 250), (60, 230, 230), (90, 200, 60), (230, 140, 60)], dtype=np.float64
)  # BGR: thumb red, forefinger orange, middle yellow, ring green, pinky blue
_SKIN_TONES = np.array(
    [(190, 210, 245), (150, 180, 225), (110, 150, 205), (80, 115, 165), (55, 80, 120)], dtype=np.float64
)
_HAIR_COLOURS = np.array([(20, 20, 25), (30, 50, 90), (40, 90, 150), (120, 160, 200), (90, 90, 95)])

_BODY = {name: i for i, name in enumerate(KEYPOINT_NAMES[:23])}
_FACE0 = PART_RANGES["face"][0]
_LEFT_HAND0 = PART_RANGES["lefthand"][0]
_RIGHT_HAND0 = PART_RANGES["righthand"][0]


def _rot(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _unit(angle: float) -> np.ndarray:
    """Unit vector at ``angle`` from straight down (+y), positive towards +x."""
    return np.array([np.sin(angle), np.cos(angle)])


def _fixed(points) -> np.ndarray:
    """Float pixel coordinates -> int32 fixed point for cv2 drawing with ``shift=_SHIFT``."""
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32)


class _Canvas:
    """Draws every shape into the image and, with the person's label, into the label map."""

    def __init__(self, image: np.ndarray, labels: np.ndarray) -> None:
        self.image = image
        self.labels = labels
        self.label = 0

    def line(self, p, q, colour, thickness: float) -> None:
        t = max(1, int(round(thickness)))
        a, b = tuple(_fixed(p)), tuple(_fixed(q))
        cv2.line(self.image, a, b, tuple(float(c) for c in colour), t, cv2.LINE_AA, _SHIFT)
        cv2.line(self.labels, a, b, self.label, t, cv2.LINE_8, _SHIFT)

    def polyline(self, points, colour, thickness: float, closed: bool = False) -> None:
        t = max(1, int(round(thickness)))
        pts = [_fixed(points).reshape(-1, 1, 2)]
        cv2.polylines(self.image, pts, closed, tuple(float(c) for c in colour), t, cv2.LINE_AA, _SHIFT)
        cv2.polylines(self.labels, pts, closed, self.label, t, cv2.LINE_8, _SHIFT)

    def polygon(self, points, colour) -> None:
        pts = [_fixed(points).reshape(-1, 1, 2)]
        cv2.fillPoly(self.image, pts, tuple(float(c) for c in colour), cv2.LINE_AA, _SHIFT)
        cv2.fillPoly(self.labels, pts, self.label, cv2.LINE_8, _SHIFT)

    def ellipse(self, center, axes, angle_deg: float, colour) -> None:
        c = tuple(_fixed(center))
        ax = tuple(int(v) for v in _fixed(np.maximum(axes, 0.5)))
        cv2.ellipse(
            self.image, c, ax, angle_deg, 0, 360, tuple(float(v) for v in colour), -1, cv2.LINE_AA, _SHIFT
        )
        cv2.ellipse(self.labels, c, ax, angle_deg, 0, 360, self.label, -1, cv2.LINE_8, _SHIFT)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Textured background: gradient + low-frequency colour noise + stripes + clutter + pixel noise."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height + 1.0) * 0.5
    c0, c1 = rng.uniform(30, 230, size=3), rng.uniform(30, 230, size=3)
    image = c0 + (c1 - c0) * ramp[..., None]
    cells = int(rng.integers(3, 9))
    noise = rng.uniform(-45, 45, size=(cells, cells, 3)).astype(np.float32)
    image += cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.6:
        frequency = rng.uniform(0.03, 0.25)
        direction = rng.uniform(0, np.pi)
        phase = (np.cos(direction) * xs + np.sin(direction) * ys) * frequency
        image += (rng.uniform(8, 30) * np.sin(phase))[..., None]
    image = np.clip(image, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 12))):
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        kind = rng.integers(0, 3)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        size = rng.uniform(0.03, 0.25) * min(width, height)
        if kind == 0:
            x2, y2 = cx + rng.uniform(-1, 1) * size * 2, cy + rng.uniform(-1, 1) * size * 2
            cv2.rectangle(image, (int(cx), int(cy)), (int(x2), int(y2)), colour, -1)
        elif kind == 1:
            cv2.circle(image, (int(cx), int(cy)), int(size * 0.6) + 1, colour, -1, cv2.LINE_AA)
        else:
            x2, y2 = cx + rng.uniform(-1, 1) * size * 3, cy + rng.uniform(-1, 1) * size * 3
            cv2.line(
                image, (int(cx), int(cy)), (int(x2), int(y2)), colour, int(rng.integers(1, 5)), cv2.LINE_AA
            )
    grain = rng.normal(0, 4, size=image.shape)
    return np.clip(image.astype(np.float64) + grain, 0, 255).astype(np.uint8)


def _hand_points(rng: np.random.Generator, wrist, direction: float, length: float, thumb_side: float):
    """21 hand keypoints (root, thumb 1-4, fore/middle/ring/pinky 1-4) at ``wrist``; direction from down."""
    points = np.zeros((21, 2))
    axis_rot = _rot(-direction)  # hand frame (u down, v to +x) -> image: rotate by the hand direction
    curl = rng.uniform(0.0, 1.0, size=5) ** 1.5
    spread = rng.normal(0.0, 0.08, size=5)
    for finger in range(5):
        base = _HAND_FINGER_BASES[finger] * np.array([1.0, thumb_side])
        angle = (_HAND_FINGER_ANGLES[finger] + spread[finger]) * thumb_side
        chain = [base]
        for joint, segment in enumerate(_HAND_SEGMENTS[finger]):
            # Curling towards the palm foreshortens each further segment in the image.
            foreshorten = np.cos(min(curl[finger] * 0.55 * (joint + 1), 1.35))
            step = segment * foreshorten * np.array([np.cos(angle), np.sin(angle)])
            chain.append(chain[-1] + step)
            angle += curl[finger] * 0.15 * thumb_side
        # Thumb: CMC, MCP, IP, tip; fingers: MCP, PIP, DIP, tip (COCO-WholeBody order 1-4).
        points[1 + 4 * finger : 5 + 4 * finger] = np.array(chain[:4])
    # (u, v) -> image: u along the direction vector, v perpendicular.
    uv_to_xy = np.array([[0.0, 1.0], [1.0, 0.0]])  # u -> +y (down), v -> +x before rotating
    local = points @ uv_to_xy.T * length
    return wrist + local @ axis_rot.T


def _sample_person(rng: np.random.Generator, height: float, hip_center) -> dict:
    """Keypoints ``[133, 2]`` (image pixels) and appearance of one procedurally posed person."""
    kp = np.zeros((NUM_KEYPOINTS, 2))
    yaw = rng.uniform(-np.pi, np.pi) if rng.random() < 0.25 else rng.normal(0.0, 0.5)
    facing = np.cos(yaw)  # > 0: looking at the camera (the person's left side on the image right)
    side = np.sign(facing) * max(abs(facing), 0.2)  # lateral spread of left/right joints
    turn = np.sin(yaw)
    lean = rng.normal(0.0, 0.08)
    tilt = rng.normal(0.0, 0.12) if rng.random() < 0.85 else rng.uniform(-0.9, 0.9)
    h = height

    hip = np.zeros(2)
    up = -_unit(lean)
    neck = hip + up * 0.30 * h
    across = np.array([-up[1], up[0]])  # +x when upright
    kp[_BODY["left_shoulder"]] = neck + across * 0.11 * h * side + up * -0.01 * h
    kp[_BODY["right_shoulder"]] = neck - across * 0.11 * h * side + up * -0.01 * h
    kp[_BODY["left_hip"]] = hip + across * 0.075 * h * side
    kp[_BODY["right_hip"]] = hip - across * 0.075 * h * side

    # Arms: angle from hanging down, outward positive (outward = towards the person's own side).
    for name, sign in (("left", 1.0), ("right", -1.0)):
        outward = sign * np.sign(side)
        upper = rng.uniform(-0.4, 2.6) if rng.random() < 0.7 else rng.uniform(-0.4, 0.5)
        bend = rng.uniform(0.0, 2.2) * rng.choice([-1.0, 1.0])
        shoulder = kp[_BODY[f"{name}_shoulder"]]
        elbow = shoulder + _unit(lean + outward * upper) * 0.16 * h
        wrist = elbow + _unit(lean + outward * (upper + bend)) * 0.145 * h
        kp[_BODY[f"{name}_elbow"]] = elbow
        kp[_BODY[f"{name}_wrist"]] = wrist
        hand_direction = lean + outward * (upper + bend) + rng.normal(0.0, 0.35)
        thumb_side = float(rng.choice([-1.0, 1.0]))
        hand0 = _LEFT_HAND0 if name == "left" else _RIGHT_HAND0
        hand_length = 0.105 * h * rng.uniform(0.9, 1.1)
        kp[hand0 : hand0 + 21] = _hand_points(rng, wrist, hand_direction, hand_length, thumb_side)

    # Legs: thigh from the hip, knee bend shows more when the person is turned sideways.
    for name, sign in (("left", 1.0), ("right", -1.0)):
        outward = sign * np.sign(side)
        thigh = rng.normal(0.08, 0.12) if rng.random() < 0.8 else rng.uniform(-0.4, 1.4)
        bend = rng.uniform(0.0, 1.1) * (abs(turn) + 0.25) * np.sign(turn if turn != 0 else 1.0) * -sign
        hip_point = kp[_BODY[f"{name}_hip"]]
        knee = hip_point + _unit(lean * 0.5 + outward * thigh) * 0.245 * h
        ankle = knee + _unit(lean * 0.5 + outward * thigh + bend) * 0.235 * h
        kp[_BODY[f"{name}_knee"]] = knee
        kp[_BODY[f"{name}_ankle"]] = ankle
        # Foot: toes point the way the person faces; seen from the front they are foreshortened.
        toe_dir = np.sign(turn) if abs(turn) > 0.2 else outward
        reach = 0.13 * h * max(abs(turn), 0.3)
        sole = ankle + np.array([0.0, 0.045 * h])
        toe = sole + np.array([toe_dir * reach, 0.0])
        medial = -outward * 0.025 * h * max(abs(facing), 0.3)
        kp[_BODY[f"{name}_big_toe"]] = toe + np.array([medial, 0.0])
        kp[_BODY[f"{name}_small_toe"]] = (
            sole + np.array([toe_dir * reach * 0.7, 0.0]) - np.array([medial, 0.0])
        )
        kp[_BODY[f"{name}_heel"]] = sole + np.array([-toe_dir * 0.035 * h * abs(turn), -0.01 * h])

    # Head and face: face width ~7.5% of the height (real COCO-WholeBody face boxes: ~7-8% of the person).
    face_width = 0.075 * h * rng.uniform(0.9, 1.1)
    head_roll = rng.normal(0.0, 0.15)
    head_center = neck + up * 0.115 * h
    face = FACE_TEMPLATE.copy()
    mouth_open = rng.uniform(0.0, 0.06)
    face[_FACE_INNER_LOWER_LIP, 1] += mouth_open
    face[[55, 56, 57, 58, 59], 1] += mouth_open
    projected = np.stack([face[:, 0] * abs(facing) + _FACE_DEPTH * turn, face[:, 1]], axis=1)
    face_center = head_center + np.array([turn * 0.12 * face_width, 0.1 * face_width])
    face_xy = face_center + (projected * face_width) @ _rot(head_roll).T
    kp[_FACE0 : _FACE0 + 68] = face_xy
    kp[_BODY["nose"]] = face_xy[30]
    kp[_BODY["left_eye"]] = face_xy[42:48].mean(axis=0)
    kp[_BODY["right_eye"]] = face_xy[36:42].mean(axis=0)
    ear_out = 0.56 * face_width * max(abs(facing), 0.3)
    ear_axis = _rot(head_roll) @ np.array([1.0, 0.0])
    ear_mid = head_center + np.array([turn * -0.2 * face_width, -0.02 * face_width])
    kp[_BODY["left_ear"]] = ear_mid + ear_axis * ear_out * np.sign(side)
    kp[_BODY["right_ear"]] = ear_mid - ear_axis * ear_out * np.sign(side)

    # Whole-body in-plane tilt about the hips, then place in the image.
    kp = kp @ _rot(tilt).T + np.asarray(hip_center, dtype=np.float64)
    head_center = _rot(tilt) @ head_center + hip_center
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.92, 1.08)
    return {
        "keypoints": kp,
        "facing": float(facing),
        "turn": float(turn),
        "height": float(h),
        "face_width": float(face_width),
        "head_center": head_center,
        "head_angle": float(np.degrees(tilt + head_roll)),
        "skin": np.clip(skin, 0, 255),
        "hair": _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))].astype(np.float64),
        "shirt": rng.uniform(20, 235, size=3),
        "pants": rng.uniform(20, 200, size=3),
        "shoes": rng.uniform(10, 120, size=3),
        "long_sleeves": bool(rng.random() < 0.5),
    }


def _shade(colour, factor: float) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float64) * factor + (factor - 1.0) * 40.0, 0, 255)


def _draw_person(canvas: _Canvas, person: dict) -> None:
    """Draw one person; left limbs lighter, right limbs darker, so left/right is visible to a CNN."""
    kp = person["keypoints"]
    h = person["height"]
    b = _BODY
    leg_t, arm_t = 0.065 * h, 0.048 * h
    light, dark = 1.2, 0.8
    # Legs and feet first (behind the torso).
    for name, factor in (("right", dark), ("left", light)):
        pants = _shade(person["pants"], factor)
        canvas.line(kp[b[f"{name}_hip"]], kp[b[f"{name}_knee"]], pants, leg_t)
        canvas.line(kp[b[f"{name}_knee"]], kp[b[f"{name}_ankle"]], pants, leg_t * 0.9)
        foot = [
            kp[b[f"{name}_heel"]],
            kp[b[f"{name}_small_toe"]],
            kp[b[f"{name}_big_toe"]],
            kp[b[f"{name}_ankle"]],
        ]
        shoes = _shade(person["shoes"], factor)
        canvas.polygon(foot, shoes)
        canvas.polyline(foot, shoes, 0.03 * h, closed=True)
    # Torso.
    torso = [kp[b["left_shoulder"]], kp[b["right_shoulder"]], kp[b["right_hip"]], kp[b["left_hip"]]]
    canvas.polygon(torso, person["shirt"])
    canvas.polyline(torso, person["shirt"], arm_t, closed=True)
    # Neck and head.
    neck = (kp[b["left_shoulder"]] + kp[b["right_shoulder"]]) * 0.5
    head = person["head_center"]
    fw = person["face_width"]
    canvas.line(neck, head, _shade(person["skin"], 0.9), 0.05 * h)
    facing = person["facing"] > 0.34
    axes = np.array([0.64 * fw, 0.8 * fw])
    head_rot = _rot(np.radians(person["head_angle"]))
    canvas.ellipse(
        head + head_rot @ np.array([0.0, -0.1 * fw]), axes * 1.06, person["head_angle"], person["hair"]
    )
    if facing:
        skin_axes = axes * np.array([0.95, 0.9])
        canvas.ellipse(
            head + head_rot @ np.array([0.0, 0.08 * fw]), skin_axes, person["head_angle"], person["skin"]
        )
        face = kp[_FACE0 : _FACE0 + 68]
        line = max(1.0, 0.05 * fw)
        canvas.polyline(face[0:17], _shade(person["skin"], 0.7), line)
        canvas.polyline(face[17:22], person["hair"], line * 1.4)
        canvas.polyline(face[22:27], person["hair"], line * 1.4)
        canvas.polyline(face[27:31], _shade(person["skin"], 0.75), line)
        canvas.polyline(face[31:36], _shade(person["skin"], 0.6), line)
        for eye in (face[36:42], face[42:48]):
            canvas.polygon(eye, (245, 245, 245))
            canvas.polyline(eye, (30, 30, 30), 1.0, closed=True)
            canvas.ellipse(eye.mean(axis=0), (0.035 * fw, 0.035 * fw), 0.0, (40, 25, 20))
        canvas.polygon(face[48:60], (70, 60, 190))
        canvas.polyline(face[60:68], (40, 30, 110), 1.0, closed=True)
    # Arms and hands on top.
    for name, factor in (("right", dark), ("left", light)):
        sleeve = _shade(person["shirt"], factor)
        canvas.line(kp[b[f"{name}_shoulder"]], kp[b[f"{name}_elbow"]], sleeve, arm_t)
        forearm = sleeve if person["long_sleeves"] else _shade(person["skin"], factor * 0.95 + 0.05)
        canvas.line(kp[b[f"{name}_elbow"]], kp[b[f"{name}_wrist"]], forearm, arm_t * 0.85)
        hand0 = _LEFT_HAND0 if name == "left" else _RIGHT_HAND0
        hand = kp[hand0 : hand0 + 21]
        palm = hand[[0, 1, 5, 9, 13, 17]]
        canvas.polygon(palm, _shade(person["skin"], factor * 0.5 + 0.5))
        finger_t = max(1.0, 0.016 * h)
        for finger in range(5):
            chain = hand[[0, 1, 2, 3, 4]] if finger == 0 else hand[1 + 4 * finger : 5 + 4 * finger]
            tint = 0.55 * _FINGER_TINTS[finger] + 0.45 * person["skin"]
            canvas.polyline(chain, tint, finger_t)
