"""Keypoint COCOeval as array operations: the numbers of xtcocotools' ``COCOeval`` (keypoint iouTypes,
``use_area=True``, maxDets 20), in seconds at val scale instead of a minute of per-image Python.

Semantics followed (xtcocotools ``cocoeval.py``, read, not copied):

- ground truth: the annotations of the file's images and categories, per image in file order (looked up by
  id, so a duplicated id yields its last annotation, as ``loadAnns``); ``ignore`` = ``iscrowd`` or no
  keypoint of the part with visibility > 0; per area range also ignored outside ``[lo, hi]`` (its ``area``);
- results: dropped for a part when none of its keypoint scores is > 0; per image sorted by score (stable,
  ties in input order) and cut to 20; a result's area is that of the box around its 17 body keypoints;
- OKS over the GT area (+ eps) on the GT's visible keypoints, or, for a GT with none, on every keypoint's
  distance outside the GT box doubled; the sum of exponentials taken over exactly those values, so the
  floating-point order is the reference's;
- greedy matching per threshold, results in score order: the best OKS >= threshold among unmatched (or
  crowd) non-ignored GTs, else among ignored ones, the last of equal OKS; a matched result takes its GT's
  ignore flag, an unmatched one outside the area range is ignored;
- precision over all images by a stable sort of the scores, the 101 recall thresholds, -1 where a range
  has no non-ignored GT; the ten statistics as ``summarize()`` averages them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from trainer.datasets.keypoints import ANNOTATION_KEYPOINT_FIELDS, NUM_KEYPOINTS

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
AREA_RANGES = ((0.0**2, 1e5**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))
AREA_LABELS = ("all", "medium", "large")
MAX_DETS = 20
# (ap, iou threshold, area label) of the ten statistics, in summarize()'s order.
_STATS = (
    (True, None, "all"),
    (True, 0.5, "all"),
    (True, 0.75, "all"),
    (True, None, "medium"),
    (True, None, "large"),
    (False, None, "all"),
    (False, 0.5, "all"),
    (False, 0.75, "all"),
    (False, None, "medium"),
    (False, None, "large"),
)
_FIELDS = tuple(name for name, _ in ANNOTATION_KEYPOINT_FIELDS)
_VALUES_PER_INSTANCE = 3 * NUM_KEYPOINTS
# Pairs (result, GT) whose OKS terms are computed at once: bounds the [pairs, K] temporaries (~20 MB each).
_PAIR_CHUNK = 16384


@dataclass
class GroundTruth:
    """One annotation file's people as arrays (rows in the reference's per-image order)."""

    image_ids: list  # sorted, as ``params.imgIds``
    category_ids: list  # sorted, as ``params.catIds``
    ids: np.ndarray  # [N] annotation id
    image_index: np.ndarray  # [N] index into image_ids
    category: np.ndarray  # [N] category id
    keypoints: np.ndarray  # [N, 133, 3] float64 (x, y, visibility), the five fields concatenated
    area: np.ndarray  # [N] 'area' (OKS normaliser and area range)
    crowd: np.ndarray  # [N] bool
    bbox: np.ndarray  # [N, 4]


@dataclass
class Detections:
    """Result dicts as arrays, in input order."""

    image_index: np.ndarray  # [N]
    category: np.ndarray  # [N]
    score: np.ndarray  # [N] float64
    keypoints: np.ndarray  # [N, 133, 3] float64 (x, y, keypoint score)
    area: np.ndarray  # [N] area of the box around the 17 body keypoints


def _flat_keypoints(instances: Sequence[dict], what: str) -> np.ndarray:
    count = len(instances)
    try:
        flat = np.fromiter(
            chain.from_iterable(inst[f] for inst in instances for f in _FIELDS),
            dtype=np.float64,
            count=count * _VALUES_PER_INSTANCE,
        )
    except (KeyError, ValueError) as error:
        raise ValueError(f"{what}: every instance needs the keypoint fields {_FIELDS} ({error})") from error
    return flat.reshape(count, NUM_KEYPOINTS, 3)


def ground_truth_from_dataset(dataset: Mapping) -> GroundTruth:
    """``GroundTruth`` of a parsed COCO-WholeBody annotation file (the JSON's top-level dict)."""
    image_ids = sorted({image["id"] for image in dataset.get("images", [])})
    category_ids = sorted({category["id"] for category in dataset.get("categories", [])})
    annotations = dataset.get("annotations", [])
    by_id = {annotation["id"]: annotation for annotation in annotations}
    images, categories = set(image_ids), set(category_ids)
    # With no categories the reference filters none (and then evaluates none: every statistic is -1).
    rows = [
        by_id[a["id"]]
        for a in annotations
        if a["image_id"] in images and (not categories or a["category_id"] in categories)
    ]
    rows = [a for a in rows if a["image_id"] in images]  # a duplicated id may point elsewhere
    index_of = {image_id: index for index, image_id in enumerate(image_ids)}
    image_index = np.array([index_of[a["image_id"]] for a in rows], dtype=np.int64)
    # The reference lists each image's annotations together, in file order within the image.
    order = np.argsort(image_index, kind="stable")
    rows = [rows[i] for i in order.tolist()]
    missing = [a["id"] for a in rows if "area" not in a]
    if missing:
        raise ValueError(f"annotations {missing[:10]} have no 'area' (OKS is normalised by it)")
    return GroundTruth(
        image_ids=image_ids,
        category_ids=category_ids,
        ids=np.array([a["id"] for a in rows]).reshape(-1),
        image_index=image_index[order],
        category=np.array([a["category_id"] for a in rows]).reshape(-1),
        keypoints=_flat_keypoints(rows, "ground truth"),
        area=np.array([a["area"] for a in rows], dtype=np.float64).reshape(-1),
        crowd=np.array([bool(a.get("iscrowd", 0)) for a in rows], dtype=bool).reshape(-1),
        bbox=np.array([a["bbox"] for a in rows], dtype=np.float64).reshape(-1, 4),
    )


def detections_from_results(truth: GroundTruth, results: Sequence[dict]) -> Detections:
    """``Detections`` of result dicts (``image_id``, ``category_id``, ``score``, the five keypoint fields)."""
    index_of = {image_id: index for index, image_id in enumerate(truth.image_ids)}
    try:
        image_index = np.array([index_of[r["image_id"]] for r in results], dtype=np.int64)
    except KeyError as error:
        raise ValueError(f"a result refers to image id {error} absent from the ground truth") from error
    keypoints = _flat_keypoints(results, "results")
    body = keypoints[:, :17, :2]
    if len(results):
        extent = body.max(axis=1) - body.min(axis=1)
        area = extent[:, 0] * extent[:, 1]
    else:
        area = np.zeros(0)
    return Detections(
        image_index=image_index,
        category=np.array([r["category_id"] for r in results]).reshape(-1),
        score=np.array([r["score"] for r in results], dtype=np.float64).reshape(-1),
        keypoints=keypoints,
        area=area,
    )


# ------------------------------------------------------------------------------------------------- OKS


def _pair_oks(dt_kpts, gt_kpts, gt_area, gt_bbox, variances) -> np.ndarray:
    """OKS of pairs: ``dt_kpts`` [P, k, 3], ``gt_kpts`` [P, k, 3], ``gt_area`` [P], ``gt_bbox`` [P, 4]."""
    visible = gt_kpts[..., 2] > 0
    counts = visible.sum(axis=1)
    dx = dt_kpts[..., 0] - gt_kpts[..., 0]
    dy = dt_kpts[..., 1] - gt_kpts[..., 1]
    boxed = counts == 0
    if boxed.any():  # no visible keypoint: distance outside the GT box doubled on each side
        x, y, w, h = (gt_bbox[boxed, i, None] for i in range(4))
        xd, yd = dt_kpts[boxed, :, 0], dt_kpts[boxed, :, 1]
        dx[boxed] = np.maximum(0.0, (x - w) - xd) + np.maximum(0.0, xd - (x + w * 2))
        dy[boxed] = np.maximum(0.0, (y - h) - yd) + np.maximum(0.0, yd - (y + h * 2))
    e = (dx**2 + dy**2) / variances / (gt_area[:, None] + np.spacing(1)) / 2
    oks = np.empty(len(e))
    # Sum exactly the reference's values (visible ones, or all) as contiguous rows of that length, so the
    # pairwise summation adds them in the same order.
    for count in np.unique(counts).tolist():
        rows = np.flatnonzero(counts == count)
        if count == 0:
            oks[rows] = np.exp(-e[rows]).sum(axis=1) / e.shape[1]
        else:
            columns = np.nonzero(visible[rows])[1].reshape(len(rows), count)
            terms = np.ascontiguousarray(np.take_along_axis(e[rows], columns, axis=1))
            oks[rows] = np.exp(-terms).sum(axis=1) / count
    return oks


# ------------------------------------------------------------------------------------------- matching


def _match_bucket(oks, gt_valid, gt_ignore, gt_crowd):
    """Greedy matching of a set of images padded alike.

    ``oks`` [n, D, G] (-inf where absent), ``gt_valid`` [n, G], ``gt_ignore`` [n, A, G], ``gt_crowd`` [n, G].
    Returns the matched GT column [n, A, T, D] (-1: none).
    """
    n, dets, columns = oks.shape
    areas = gt_ignore.shape[1]
    thresholds = IOU_THRESHOLDS[None, None, :, None]
    taken = np.zeros((n, areas, len(IOU_THRESHOLDS), columns), dtype=bool)
    matched = np.full((n, areas, len(IOU_THRESHOLDS), dets), -1, dtype=np.int64)
    ignored = gt_ignore[:, :, None, :]
    free_crowd = (gt_crowd & gt_valid)[:, None, None, :]
    valid = gt_valid[:, None, None, :]
    for rank in range(dets):
        row = oks[:, rank, None, None, :]  # [n, 1, 1, G]
        candidate = (row >= thresholds) & valid & (~taken | free_crowd)
        regular = candidate & ~ignored
        pool = np.where(regular.any(axis=-1, keepdims=True), regular, candidate)
        found = pool.any(axis=-1)
        key = np.where(pool, row, -np.inf)
        # The last of equal best OKS: argmax over the columns reversed.
        best = columns - 1 - np.argmax(key[..., ::-1], axis=-1)
        best = np.where(found, best, -1)
        matched[..., rank] = best
        hit = np.nonzero(found)
        taken[(*hit, best[hit])] = True
    return matched


def _evaluate_category(truth, dets, gt_rows, dt_rows, part, variances):
    """Precision [T, R, A] and recall [T, A] of one category for one part (-1 where undefined)."""
    ranges = np.asarray(AREA_RANGES)
    thresholds_count, recall_count, areas = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(ranges)
    precision = -np.ones((thresholds_count, recall_count, areas))
    recall = -np.ones((thresholds_count, areas))
    images = len(truth.image_ids)

    gt_kpts = truth.keypoints[:, part][gt_rows]
    dt_kpts = dets.keypoints[:, part]  # a view: rows are taken from it, not from all 133
    gt_image = truth.image_index[gt_rows]
    gt_area = truth.area[gt_rows]
    gt_crowd = truth.crowd[gt_rows]
    base_ignore = gt_crowd | ~(gt_kpts[..., 2] > 0).any(axis=1)
    # [A, N]: ignored, or outside the area range
    gt_ignore = base_ignore[None] | (gt_area[None] < ranges[:, :1]) | (gt_area[None] > ranges[:, 1:])
    regular_count = (~gt_ignore).sum(axis=1)
    gt_per_image = np.bincount(gt_image, minlength=images)
    gt_start = np.concatenate([[0], np.cumsum(gt_per_image)[:-1]])

    # Results of the part: per image by score (stable), the first MAX_DETS.
    scored = dt_rows[(dt_kpts[dt_rows, :, 2] > 0).any(axis=1)]
    scored = scored[np.argsort(-dets.score[scored], kind="stable")]
    scored = scored[np.argsort(dets.image_index[scored], kind="stable")]
    dt_image = dets.image_index[scored]
    first = np.searchsorted(dt_image, dt_image, side="left")
    rank = np.arange(len(scored)) - first
    keep = rank < MAX_DETS
    scored, dt_image, rank = scored[keep], dt_image[keep], rank[keep]
    dt_count = len(scored)

    # Every (result, GT) pair of an image, and its OKS.
    repeats = gt_per_image[dt_image]
    pair_dt = np.repeat(np.arange(dt_count), repeats)
    offsets = np.arange(len(pair_dt)) - np.repeat(np.cumsum(repeats) - repeats, repeats)
    pair_gt = gt_start[dt_image[pair_dt]] + offsets
    pair_oks = np.empty(len(pair_dt))
    for start in range(0, len(pair_dt), _PAIR_CHUNK):
        chunk = slice(start, start + _PAIR_CHUNK)
        d, g = pair_dt[chunk], pair_gt[chunk]
        pair_oks[chunk] = _pair_oks(
            dt_kpts[scored[d]],
            gt_kpts[g],
            gt_area[g],
            truth.bbox[gt_rows[g]],
            variances,
        )

    # Matching, images grouped by their GT count padded to a power of two.
    match = np.full((areas, thresholds_count, dt_count), -1, dtype=np.int64)  # GT row (within gt_rows)
    dt_per_image = np.bincount(dt_image, minlength=images)
    busy = np.flatnonzero((dt_per_image > 0) & (gt_per_image > 0))
    padded = 1 << np.ceil(np.log2(np.maximum(gt_per_image[busy], 1))).astype(np.int64)
    pair_image = dt_image[pair_dt]
    for width in np.unique(padded).tolist():
        group = busy[padded == width]
        local = np.full(images, -1, dtype=np.int64)
        local[group] = np.arange(len(group))
        depth = int(dt_per_image[group].max())
        oks = np.full((len(group), depth, width), -np.inf)
        in_group = local[pair_image] >= 0
        oks[local[pair_image[in_group]], rank[pair_dt[in_group]], offsets[in_group]] = pair_oks[in_group]
        column = np.arange(width)
        gt_valid = column[None] < gt_per_image[group][:, None]
        rows = np.minimum(gt_start[group][:, None] + column[None], max(len(gt_rows) - 1, 0))
        columns = _match_bucket(oks, gt_valid, gt_ignore[:, rows].transpose(1, 0, 2), gt_crowd[rows])
        members = np.flatnonzero(local[dt_image] >= 0)
        picked = columns[local[dt_image[members]], :, :, rank[members]]  # [m, A, T]
        gt_row = np.where(picked >= 0, gt_start[dt_image[members]][:, None, None] + picked, -1)
        match[:, :, members] = gt_row.transpose(1, 2, 0)

    # Per result and range: true positive, or ignored (matched to an ignored GT, or unmatched outside).
    found = match >= 0
    safe = np.maximum(match, 0)
    # The reference stores the GT's id as the match and counts "id >= 0" as matched.
    counted = found & (truth.ids[gt_rows][safe] >= 0) if len(gt_rows) else found
    area_index = np.arange(areas)[:, None, None]
    dt_ignore = np.where(found, gt_ignore[area_index, safe] if len(gt_rows) else False, False)
    dt_area = dets.area[scored]
    outside = (dt_area[None] < ranges[:, :1]) | (dt_area[None] > ranges[:, 1:])  # [A, D]
    dt_ignore = dt_ignore | (~counted & outside[:, None, :])

    by_score = np.argsort(-dets.score[scored], kind="mergesort")
    true_pos = (counted & ~dt_ignore)[..., by_score]
    false_pos = (~counted & ~dt_ignore)[..., by_score]
    tp_sum = np.cumsum(true_pos, axis=-1).astype(np.float64)
    fp_sum = np.cumsum(false_pos, axis=-1).astype(np.float64)
    for a in range(areas):
        if regular_count[a] == 0:
            continue
        for t in range(thresholds_count):
            tp, fp = tp_sum[a, t], fp_sum[a, t]
            rc = tp / regular_count[a]
            pr = tp / (fp + tp + np.spacing(1))
            recall[t, a] = rc[-1] if dt_count else 0
            if not dt_count:
                precision[t, :, a] = 0.0
                continue
            envelope = np.maximum.accumulate(pr[::-1])[::-1]
            at = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
            precision[t, :, a] = np.where(at < dt_count, envelope[np.minimum(at, dt_count - 1)], 0.0)
    return precision, recall


def _summary(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """The ten keypoint statistics, averaged as ``summarize()`` does (same slices, same mean)."""
    stats = np.zeros(len(_STATS))
    for index, (ap, threshold, label) in enumerate(_STATS):
        area = [i for i, name in enumerate(AREA_LABELS) if name == label]
        max_det = [0]  # the one maxDets setting, 20
        values = precision if ap else recall
        if threshold is not None:
            values = values[np.where(threshold == IOU_THRESHOLDS)[0]]
        values = values[:, :, :, area, max_det] if ap else values[:, :, area, max_det]
        kept = values[values > -1]
        stats[index] = -1 if len(kept) == 0 else np.mean(kept)
    return stats


def evaluate_part(truth: GroundTruth, dets: Detections, part: slice, sigmas) -> np.ndarray:
    """The ten keypoint statistics (AP, AP50, AP75, AP_M, AP_L, AR, AR50, AR75, AR_M, AR_L) of one part:
    ``part`` selects its keypoints of the 133, ``sigmas`` their OKS sigmas."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if len(range(*part.indices(NUM_KEYPOINTS))) != len(sigmas):
        raise ValueError(f"part {part} and sigmas ({len(sigmas)}) differ in length")
    variances = (sigmas * 2) ** 2
    categories = truth.category_ids
    shape = (len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(categories), len(AREA_RANGES), 1)
    precision, recall = -np.ones(shape), -np.ones((shape[0], *shape[2:]))
    for k, category in enumerate(categories):
        gt_rows = np.flatnonzero(truth.category == category)
        dt_rows = np.flatnonzero(dets.category == category)
        precision[:, :, k, :, 0], recall[:, k, :, 0] = _evaluate_category(
            truth, dets, gt_rows, dt_rows, part, variances
        )
    return _summary(precision, recall)
