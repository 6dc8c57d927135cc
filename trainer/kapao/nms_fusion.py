"""KAPAO's two greedy rules on one image's objects, in numpy: NMS within an object type (and, for keypoint
objects, within a class) and the fusion of keypoint objects into poses (the paper's Sec. 3.3, steps 3-4).

numpy on the CPU, not torch: an image holds tens to a few thousand small objects, where each torch operation
costs microseconds of dispatch and numpy's a fraction of that (``bench/kapao.py``, ``bench/RESULTS.md``).
``trainer.kapao.postprocess`` hands tensors in and takes tensors back.

Both rules are sequential per object and solved exactly as fixed points over all objects at once
(``_fixed_point``): a few array passes instead of a loop over objects. Arithmetic as torchvision's NMS
(float32 IoU, suppress when IoU > threshold) and numpy's norm.
"""

from __future__ import annotations

import numpy as np
import torch

# Largest padded per-class IoU table (classes x m x m) ``nms_per_class`` builds; beyond it torchvision's.
PADDED_NMS_LIMIT = 4_000_000


def pairwise_iou(x1, y1, x2, y2) -> np.ndarray:
    """Box corners ``[..., n]`` each -> ``[..., n, n]`` IoU, with the operations of torchvision's NMS."""
    area = (x2 - x1) * (y2 - y1)
    row, col = (..., slice(None), None), (..., None, slice(None))
    width = np.minimum(x2[row], x2[col]) - np.maximum(x1[row], x1[col])
    height = np.minimum(y2[row], y2[col]) - np.maximum(y1[row], y1[col])
    inter = np.maximum(width, 0) * np.maximum(height, 0)
    with np.errstate(invalid="ignore", divide="ignore"):  # two empty boxes: 0 / 0, never above a threshold
        return inter / (area[..., :, None] + area[..., None, :] - inter)


def best_first(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties in index order."""
    return np.argsort(-scores, kind="stable")


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS, best first: torchvision's ``nms`` (its C++ loop on the CPU)."""
    from torchvision.ops import nms as torchvision_nms  # here: importing torchvision costs seconds

    kept = torchvision_nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou_threshold)
    return kept.numpy()


def nms_best(boxes, scores, iou_threshold: float, wanted: int, all_above: float, cap: int) -> np.ndarray:
    """Indices of greedy-NMS survivors, best first: at least the best ``wanted`` ones (all when fewer) and
    every survivor scoring above ``all_above``; maybe more. A box is suppressed only by better ones, so NMS
    on the best n candidates decides them exactly: grow n until enough survive, not NMS on thousands. At most
    the best ``cap`` candidates take part."""
    order = best_first(scores)[:cap]
    n = max(4 * wanted, int((scores > all_above).sum()) + wanted)
    while True:
        prefix = order[:n]
        kept = prefix[nms(boxes[prefix], scores[prefix], iou_threshold)]
        if len(kept) >= wanted or n >= len(order):
            return kept
        n *= 4


def nms_per_class(boxes, scores, classes, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS within each class, best first: what ``torchvision.ops.batched_nms`` keeps.

    Keypoint objects are many classes of a few boxes each (up to 133 x people): one padded IoU table per
    class ``[classes, m, m]`` and the greedy rule as a fixed point, instead of the all-pairs work of
    class-offset boxes.
    """
    if len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((-scores, classes))  # by class, best first within a class, ties in index order
    sorted_classes = classes[order]
    counts = np.bincount(sorted_classes)
    m = int(counts.max())
    if len(counts) * m * m > PADDED_NMS_LIMIT:
        from torchvision.ops import batched_nms

        kept = batched_nms(
            torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), iou_threshold
        )
        return kept.numpy()
    rank = np.arange(len(order)) - (np.cumsum(counts) - counts)[sorted_classes]
    corners = np.zeros((4, len(counts), m), dtype=boxes.dtype)  # x1, y1, x2, y2 of box `rank` of each class
    corners[:, sorted_classes, rank] = boxes[order].T
    valid = np.zeros((len(counts), m), dtype=bool)
    valid[sorted_classes, rank] = True
    # suppresses[c, i, j] = 1: box i of class c, if kept, removes the later box j (IoU > threshold).
    later = np.triu(np.ones((m, m), dtype=bool), 1)
    suppresses = ((pairwise_iou(*corners) > iou_threshold) & later).astype(np.float32)

    def keep(kept: np.ndarray) -> np.ndarray:
        return (np.matmul(kept.astype(np.float32)[:, None, :], suppresses)[:, 0] == 0) & valid

    kept = order[_fixed_point(keep, valid)[sorted_classes, rank]]
    return kept[best_first(scores[kept])]


def distance(x, y, to_x, to_y) -> np.ndarray:
    """``[M, E]`` distances from ``(x, y)`` to each row's ``(to_x, to_y)`` (``[M]``), as numpy's norm."""
    return np.sqrt(np.square(x - to_x[:, None]) + np.square(y - to_y[:, None]))


def _fixed_point(step, start: np.ndarray) -> np.ndarray:
    """The solution of a greedy rule in which the decision of item j depends only on those of the items
    before it, with ``step(decisions) -> decisions`` applying the rule to every item at once: iterate from any
    guess until nothing changes. After t steps the first t decisions are final, so this ends within n + 1
    steps and the fixed point is the sequential rule's unique solution; in crowds it takes 2-4 steps."""
    decisions = start
    while True:
        following = step(decisions)
        if np.array_equal(following, decisions):
            return decisions
        decisions = following


def fuse(
    pose_keypoints, pose_scores, kp_xy, kp_scores, kp_classes, tau_fd: float, tau_fc: float
) -> np.ndarray:
    """The authors' fusion rule (their ``val.py``) on numpy arrays: ``pose_keypoints [P, K, 3]`` (x, y,
    score) -> a fused copy (``trainer.kapao.postprocess.fuse_keypoint_objects`` says the rule).

    In descending score order a fused keypoint is final (a later object never scores higher), so object j
    sees each pose's keypoint either as given or at the first earlier object of its type fused there: the
    rule is a fixed point over all objects at once, not a loop over objects.
    """
    fused = np.array(pose_keypoints, copy=True)
    dtype = fused.dtype
    eligible = np.flatnonzero(pose_scores > tau_fc)
    count, num_types = len(kp_scores), fused.shape[1]
    if len(eligible) == 0 or count == 0:
        return fused
    order = best_first(kp_scores)
    x, y, score = (v.astype(dtype, copy=False) for v in (kp_xy[order, 0], kp_xy[order, 1], kp_scores[order]))
    # Keypoint slots of the eligible poses, flat (pose * K + type), and one more: "no slot" (dropped).
    none = len(eligible) * num_types
    keypoints = np.concatenate([fused[eligible].reshape(-1, 3), np.zeros((1, 3), dtype)])
    slot = np.arange(len(eligible)) * num_types + kp_classes[order][:, None]  # [M, E]
    # Each object's keypoint type in every eligible pose, as given: distance and score.
    given_distance = distance(keypoints[:, 0][slot], keypoints[:, 1][slot], x, y)
    given_score = keypoints[:, 2][slot]
    position = np.arange(count)
    rows = np.arange(count)
    dropped = np.full(count, none)

    def targets(target: np.ndarray) -> np.ndarray:
        """Each object's slot (``none``: dropped), given the slots of the objects before it."""
        first = np.full(none + 1, count)
        np.minimum.at(first, target, position)
        seen = first[slot]  # [M, E]: the first object fused at that slot
        moved = seen < position[:, None]  # ... before this one: the keypoint stands there, with its score
        seen = np.minimum(seen, count - 1)
        distances = np.where(moved, distance(x[seen], y[seen], x, y), given_distance)
        nearest = distances.argmin(axis=1)  # the first pose on a tie, as the authors' argmin
        current = np.where(moved[rows, nearest], score[seen[rows, nearest]], given_score[rows, nearest])
        accept = (distances[rows, nearest] < tau_fd) & (score > current)
        return np.where(accept, slot[rows, nearest], dropped)

    target = _fixed_point(targets, dropped)
    # At the fixed point every slot takes at most one object (a second one never outscores the first);
    # the dropped ones all write the extra row.
    keypoints[target] = np.stack([x, y, score], axis=1)
    fused[eligible] = keypoints[:none].reshape(len(eligible), num_types, 3)
    return fused


__all__ = ["PADDED_NMS_LIMIT", "distance", "fuse", "nms", "nms_best", "nms_per_class", "pairwise_iou"]
