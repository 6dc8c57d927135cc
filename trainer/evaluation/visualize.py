"""Pure drawing helpers for whole-body predictions (NumPy + OpenCV, BGR uint8 images; no I/O).

Used by ``fowkal show`` (``orchestrator/evaluation/show.py``): whole-body skeletons with one colour per part,
the
per-part OKS of an instance, arrows/circles on the keypoints that moved most between two runs (the paper's
Figs. 3-4), and heatmaps overlaid on the network's input crop.

The skeleton drawn is ``trainer.datasets.keypoints.SKELETON`` (COCO-WholeBody's body, feet and hands) plus the
connections it leaves out: the 68-point face contour (iBUG 300-W layout, which COCO-WholeBody's face follows)
and wrist -> hand root, so that the hands hang off the arms.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from trainer.datasets.keypoints import COCO_WHOLEBODY_PARTS, NUM_KEYPOINTS, PART_RANGES, SIGMAS, SKELETON

_FACE_START = PART_RANGES["face"][0]


def _chain(indices: Sequence[int], closed: bool = False) -> list[tuple[int, int]]:
    pairs = [(indices[i], indices[i + 1]) for i in range(len(indices) - 1)]
    if closed:
        pairs.append((indices[-1], indices[0]))
    return pairs


def _face_edges() -> tuple[tuple[int, int], ...]:
    # iBUG 68 landmarks (0-based within the face): jaw 0-16, brows 17-21 and 22-26, nose bridge 27-30,
    # nostrils 31-35, eyes 36-41 and 42-47 (closed), outer lip 48-59 and inner lip 60-67 (closed).
    local = (
        _chain(range(0, 17))
        + _chain(range(17, 22))
        + _chain(range(22, 27))
        + _chain(range(27, 31))
        + _chain(range(31, 36))
        + [(30, 33)]
        + _chain(range(36, 42), closed=True)
        + _chain(range(42, 48), closed=True)
        + _chain(range(48, 60), closed=True)
        + _chain(range(60, 68), closed=True)
    )
    return tuple((_FACE_START + a, _FACE_START + b) for a, b in local)


FACE_SKELETON: tuple[tuple[int, int], ...] = _face_edges()
# Left wrist (9) -> left hand root (91), right wrist (10) -> right hand root (112).
WRIST_TO_HAND: tuple[tuple[int, int], ...] = (
    (9, PART_RANGES["lefthand"][0]),
    (10, PART_RANGES["righthand"][0]),
)
DRAW_SKELETON: tuple[tuple[int, int], ...] = tuple(SKELETON) + FACE_SKELETON + WRIST_TO_HAND

# BGR colours, one per part (distinct hues, readable on photos).
PART_COLOURS: dict[str, tuple[int, int, int]] = {
    "body": (255, 128, 0),  # blue
    "foot": (0, 165, 255),  # orange
    "face": (80, 220, 80),  # green
    "lefthand": (255, 0, 255),  # magenta
    "righthand": (180, 0, 255),  # purple-pink
}
# Keypoints scoring below this are not drawn (``fowkal show --kpt-thr``'s default).
DRAW_KEYPOINT_THR = 0.3
BETTER_COLOUR = (0, 200, 0)  # the second run is closer to the ground truth
WORSE_COLOUR = (0, 0, 255)  # the second run is farther from the ground truth
TEXT_COLOUR = (0, 0, 0)
BAND_COLOUR = (255, 255, 255)

# Caption bands: one line of text per LINE_HEIGHT pixels (cv2 Hershey simplex at FONT_SCALE).
LINE_HEIGHT = 18
FONT_SCALE = 0.45
# White gap between the panels of a side-by-side comparison.
PANEL_GAP = 8


def _part_of(index: int) -> str:
    for name, (start, stop) in PART_RANGES.items():
        if start <= index < stop:
            return name
    raise ValueError(f"keypoint index {index} is outside 0..{NUM_KEYPOINTS - 1}")


def _edge_colour(a: int, b: int) -> tuple[int, int, int]:
    part_a, part_b = _part_of(a), _part_of(b)
    # A link between two parts (ankle -> toe, wrist -> hand) takes the colour of the non-body part.
    return PART_COLOURS[part_b if part_a == "body" else part_a]


def _check_keypoints(keypoints, scores) -> tuple[np.ndarray, np.ndarray]:
    points = np.asarray(keypoints, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] != NUM_KEYPOINTS or points.shape[1] < 2:
        raise ValueError(f"keypoints must have shape [{NUM_KEYPOINTS}, 2], got {points.shape}")
    values = np.ones(NUM_KEYPOINTS) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.shape != (NUM_KEYPOINTS,):
        raise ValueError(f"scores must have shape [{NUM_KEYPOINTS}], got {values.shape}")
    return points[:, :2], values


def draw_wholebody(
    image: np.ndarray,
    keypoints,
    scores=None,
    score_thr: float = DRAW_KEYPOINT_THR,
    thickness: int = 2,
    radius: int = 2,
) -> np.ndarray:
    """Draw one whole-body pose (``DRAW_SKELETON``, one colour per part) on a copy of ``image``.

    Args:
        image: ``[H, W, 3]`` BGR uint8.
        keypoints: ``[133, 2]`` (x, y) in image pixels.
        scores: ``[133]`` keypoint confidences (None: all drawn); a keypoint (and every link touching it) is
            drawn only when its score is >= ``score_thr``.
        thickness, radius: line width and dot radius in pixels (face and hand links use half the width).

    Returns:
        The new image.
    """
    canvas = np.ascontiguousarray(image).copy()
    points, values = _check_keypoints(keypoints, scores)
    shown = (values >= score_thr) & np.isfinite(points).all(axis=1)
    pixel = np.round(np.where(np.isfinite(points), points, 0.0)).astype(np.int64)  # NaN: not shown
    for a, b in DRAW_SKELETON:
        if shown[a] and shown[b]:
            dense = _part_of(a) in ("face", "lefthand", "righthand")
            width = max(1, thickness // 2) if dense else thickness
            cv2.line(
                canvas,
                tuple(int(v) for v in pixel[a]),
                tuple(int(v) for v in pixel[b]),
                _edge_colour(a, b),
                width,
                cv2.LINE_AA,
            )
    for k in np.flatnonzero(shown):
        dense = _part_of(int(k)) in ("face", "lefthand", "righthand")
        cv2.circle(
            canvas,
            tuple(int(v) for v in pixel[k]),
            max(1, radius - 1) if dense else radius,
            PART_COLOURS[_part_of(int(k))],
            -1,
            cv2.LINE_AA,
        )
    return canvas


def part_oks(
    predicted, ground_truth, area: float, parts: dict[str, Sequence[int]] | None = None, sigmas=SIGMAS
) -> dict[str, float]:
    """COCO object keypoint similarity of one prediction, per part, against its ground truth.

    ``OKS = mean over labelled keypoints k of exp(-d_k^2 / (2 s^2 kappa_k^2))`` with ``kappa_k = 2 sigma_k``
    and ``s^2`` the ground-truth ``area`` (COCO's definition, as the evaluator's ``use_area=True``).

    Args:
        predicted: ``[133, 2+]`` predicted (x, y) in image pixels.
        ground_truth: ``[133, 3]`` ground truth (x, y, v); keypoints with ``v > 0`` count.
        area: the ground-truth instance area (the annotation's ``area``).
        parts: part name -> keypoint indices (default: body, foot, face, hand as in the paper, plus
            ``wholebody`` = all 133).
        sigmas: ``[133]`` OKS sigmas.

    Returns:
        Part name -> OKS in [0, 1], NaN when the part has no labelled keypoint.
    """
    prediction = np.asarray(predicted, dtype=np.float64)[:, :2]
    truth = np.asarray(ground_truth, dtype=np.float64)
    sigma = np.asarray(sigmas, dtype=np.float64)
    if prediction.shape[0] != truth.shape[0] or truth.shape[0] != sigma.shape[0] or truth.shape[1] < 3:
        raise ValueError(
            f"predicted {prediction.shape}, ground_truth {truth.shape} and sigmas {sigma.shape} must cover "
            "the same keypoints (ground truth as x, y, v)"
        )
    if parts is None:
        parts = {**COCO_WHOLEBODY_PARTS, "wholebody": tuple(range(truth.shape[0]))}
    squared = ((prediction - truth[:, :2]) ** 2).sum(axis=1)
    similarity = np.exp(-squared / ((2.0 * sigma) ** 2) / (float(area) + np.spacing(1)) / 2.0)
    labelled = truth[:, 2] > 0
    out: dict[str, float] = {}
    for name, indices in parts.items():
        index = np.asarray(indices, dtype=np.int64)
        mask = labelled[index]
        out[name] = float(similarity[index][mask].mean()) if mask.any() else float("nan")
    return out


def format_oks(oks: dict[str, float]) -> str:
    """``body .82 foot .40 face n/a ...``: a compact caption of ``part_oks``'s output."""
    return " ".join(f"{name} {'n/a' if not np.isfinite(v) else f'{v:.2f}'}" for name, v in oks.items())


def moved_keypoints(first, second, candidates=None, top_k: int = 5, min_distance: float = 2.0) -> np.ndarray:
    """Indices of the ``top_k`` keypoints whose predictions differ most between two runs, largest first.

    Args:
        first, second: ``[K, 2+]`` predictions of the same instance by the two runs (image pixels).
        candidates: boolean ``[K]`` mask of keypoints to consider (e.g. those labelled in the ground truth).
        top_k: at most this many indices.
        min_distance: ignore keypoints that moved less than this many pixels.
    """
    a = np.asarray(first, dtype=np.float64)[:, :2]
    b = np.asarray(second, dtype=np.float64)[:, :2]
    if a.shape != b.shape:
        raise ValueError(f"first {a.shape} and second {b.shape} must have the same shape")
    distance = np.sqrt(((a - b) ** 2).sum(axis=1))
    distance = np.where(np.isfinite(distance), distance, -1.0)
    if candidates is not None:
        distance = np.where(np.asarray(candidates, dtype=bool), distance, -1.0)
    order = np.argsort(-distance, kind="stable")
    return np.asarray([int(k) for k in order[:top_k] if distance[k] >= min_distance], dtype=np.int64)


def mark_moved(
    image: np.ndarray,
    origins,
    targets,
    colours: Sequence[tuple[int, int, int]],
    arrows: bool,
    radius: int = 9,
) -> np.ndarray:
    """Circle each point of ``origins`` (``[M, 2]``) and, with ``arrows``, draw an arrow to ``targets``."""
    canvas = np.ascontiguousarray(image).copy()
    start = np.round(np.asarray(origins, dtype=np.float64).reshape(-1, 2)).astype(np.int64)
    end = np.round(np.asarray(targets, dtype=np.float64).reshape(-1, 2)).astype(np.int64)
    for a, b, colour in zip(start, end, colours, strict=True):
        if arrows:
            cv2.arrowedLine(
                canvas, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), colour, 2, cv2.LINE_AA, 0, 0.3
            )
            cv2.circle(canvas, (int(b[0]), int(b[1])), radius, colour, 2, cv2.LINE_AA)
        else:
            cv2.circle(canvas, (int(a[0]), int(a[1])), radius, colour, 2, cv2.LINE_AA)
    return canvas


def put_label(image: np.ndarray, text: str, origin: tuple[int, int], colour=(255, 255, 255)) -> np.ndarray:
    """Write ``text`` at ``origin`` (bottom-left, pixels) with a dark outline, on a copy of ``image``."""
    canvas = np.ascontiguousarray(image).copy()
    x, y = int(origin[0]), int(origin[1])
    cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, FONT_SCALE, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, FONT_SCALE, colour, 1, cv2.LINE_AA)
    return canvas


def caption_band_height(num_lines: int) -> int:
    """Height in pixels of a caption band with ``num_lines`` lines of text."""
    return LINE_HEIGHT * int(num_lines) + LINE_HEIGHT // 3


def add_caption_band(image: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``image`` with a white band below it holding ``lines`` (height ``caption_band_height(len(lines))``)."""
    height, width = image.shape[:2]
    band = np.full((caption_band_height(len(lines)), width, 3), BAND_COLOUR, dtype=np.uint8)
    for row, line in enumerate(lines):
        cv2.putText(
            band,
            line,
            (4, LINE_HEIGHT * (row + 1) - 4),
            cv2.FONT_HERSHEY_SIMPLEX,
            FONT_SCALE,
            TEXT_COLOUR,
            1,
            cv2.LINE_AA,
        )
    return np.concatenate([np.ascontiguousarray(image), band], axis=0)


def add_legend_band(image: np.ndarray, entries: Sequence[tuple[tuple[int, int, int], str]]) -> np.ndarray:
    """``image`` with a white band below it: per entry a circle in the entry's colour and its meaning."""
    height, width = image.shape[:2]
    band = np.full((caption_band_height(len(entries)), width, 3), BAND_COLOUR, dtype=np.uint8)
    for row, (colour, text) in enumerate(entries):
        baseline = LINE_HEIGHT * (row + 1) - 4
        cv2.circle(band, (10, baseline - 5), 6, colour, 2, cv2.LINE_AA)
        cv2.putText(
            band, text, (24, baseline), cv2.FONT_HERSHEY_SIMPLEX, FONT_SCALE, TEXT_COLOUR, 1, cv2.LINE_AA
        )
    return np.concatenate([np.ascontiguousarray(image), band], axis=0)


def fit_text(
    text: str, width: int, font_scale: float = FONT_SCALE, min_scale: float = 0.3
) -> tuple[str, float]:
    """``(text, scale)`` that fits ``width`` pixels: the font shrunk down to ``min_scale``, then the text
    shortened with "..." (so tile titles never run into their neighbours)."""

    def size(candidate: str, scale: float) -> int:
        return cv2.getTextSize(candidate, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]

    scale = font_scale
    while size(text, scale) > width and scale > min_scale:
        scale = max(min_scale, scale - 0.05)
    while len(text) > 1 and size(text, scale) > width:
        text = text[:-4] + "..." if len(text) > 4 else text[:-1]
    return text, scale


def side_by_side(panels: Sequence[np.ndarray]) -> np.ndarray:
    """Panels left to right, ``PANEL_GAP`` white pixels apart, padded with white to the tallest one."""
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    height = max(p.shape[0] for p in panels)
    pieces = []
    for position, panel in enumerate(panels):
        if position:
            pieces.append(np.full((height, PANEL_GAP, 3), BAND_COLOUR, dtype=np.uint8))
        pad = height - panel.shape[0]
        if pad:
            panel = np.concatenate([panel, np.full((pad, panel.shape[1], 3), BAND_COLOUR, np.uint8)], axis=0)
        pieces.append(panel)
    return np.concatenate(pieces, axis=1)


def heatmap_overlay(crop: np.ndarray, heatmap, alpha: float = 0.55, vmax: float | None = None) -> np.ndarray:
    """One heatmap ``[h, w]`` upsampled to the crop, colour-mapped (JET) and blended over the BGR crop.

    Values are mapped from [0, ``vmax``] (default: the heatmap's maximum, at least 1e-6) to the colour map;
    negative values count as 0, so the background's level relative to the peak is what shows.
    """
    values = np.asarray(heatmap, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"heatmap must be 2-D [h, w], got shape {values.shape}")
    top = max(float(values.max()) if vmax is None else float(vmax), 1e-6)
    normalised = np.clip(values / top, 0.0, 1.0)
    height, width = crop.shape[:2]
    resized = cv2.resize(normalised.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    coloured = cv2.applyColorMap(np.round(resized * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(np.ascontiguousarray(crop), 1.0 - alpha, coloured, alpha, 0.0)


def tile_grid(tiles: Sequence[np.ndarray], labels: Sequence[str], columns: int) -> np.ndarray:
    """Equal-size tiles in a grid, ``columns`` wide (the last row padded with white), each labelled."""
    if not tiles or len(tiles) != len(labels):
        raise ValueError(
            f"tile_grid needs as many labels as tiles (>= 1), got {len(tiles)} and {len(labels)}"
        )
    height, width = tiles[0].shape[:2]
    if any(t.shape[:2] != (height, width) for t in tiles):
        raise ValueError("tile_grid: all tiles must have the same size")
    columns = max(1, min(int(columns), len(tiles)))
    rows = -(-len(tiles) // columns)
    # Each title in a band of its own above its tile, fitted to the tile's width.
    cell_height = height + LINE_HEIGHT
    grid = np.full((rows * cell_height, columns * width, 3), BAND_COLOUR, dtype=np.uint8)
    for index, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        row, column = divmod(index, columns)
        top, left = row * cell_height, column * width
        text, scale = fit_text(label, width - 6)
        title = grid[top : top + LINE_HEIGHT, left : left + width]
        cv2.putText(
            title, text, (3, LINE_HEIGHT - 5), cv2.FONT_HERSHEY_SIMPLEX, scale, TEXT_COLOUR, 1, cv2.LINE_AA
        )
        grid[top + LINE_HEIGHT : top + cell_height, left : left + width] = tile
    return grid


__all__ = [
    "BETTER_COLOUR",
    "DRAW_KEYPOINT_THR",
    "DRAW_SKELETON",
    "FACE_SKELETON",
    "LINE_HEIGHT",
    "PANEL_GAP",
    "PART_COLOURS",
    "WORSE_COLOUR",
    "WRIST_TO_HAND",
    "add_caption_band",
    "add_legend_band",
    "caption_band_height",
    "draw_wholebody",
    "fit_text",
    "format_oks",
    "heatmap_overlay",
    "mark_moved",
    "moved_keypoints",
    "part_oks",
    "put_label",
    "side_by_side",
    "tile_grid",
]
