"""COCO-WholeBody evaluation, plus the detection-box post-processing (rescoring, OKS-NMS).

The protocol is COCO-WholeBody v1.0's (Jin et al. 2020, as MMPose runs it): one ``COCOeval`` pass per part
(``keypoints_body``, ``keypoints_foot``, ``keypoints_face``, ``keypoints_lefthand``, ``keypoints_righthand``)
with that part's OKS sigmas, and one ``keypoints_wholebody`` pass with all 133 sigmas, all with
``use_area=True`` (OKS normalised by the ground-truth segmentation area). Every pass ranks detections by the
result's ``score``. Two engines give the same numbers: ``numpy`` (``trainer.evaluation.keypoint_eval``, array
operations, the default) and ``xtcocotools`` (its ``COCOeval``, per-image Python; the reference).
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import io
import json
import multiprocessing
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trainer.datasets.keypoints import ANNOTATION_KEYPOINT_FIELDS, NUM_KEYPOINTS, PART_RANGES, SIGMAS
from trainer.evaluation import keypoint_eval

# Evaluation engines: "numpy" (trainer.evaluation.keypoint_eval) and "xtcocotools" (the reference, and a
# fallback).
# evaluate_wholebody key -> the metric name a training run reports each evaluation (in percent:
# trainer.evaluation.metric_units); a family may report more (ExperimentFamily.val_metrics).
VAL_METRICS: dict[str, str] = {
    "wholebody/AP": "val/wholebody_AP",
    "wholebody/AR": "val/wholebody_AR",
    "body/AP": "val/body_AP",
    "foot/AP": "val/foot_AP",
    "face/AP": "val/face_AP",
    "hand/AP": "val/hand_AP",
}

# Instance rescoring: keypoints scoring above this count towards an instance's mean (MMPose's 0.2).
RESCORE_KEYPOINT_THR = 0.2
# Per-image OKS-NMS: a candidate with OKS above this to a kept one is dropped (MMPose's 0.9).
OKS_NMS_THR = 0.9
ENGINES: tuple[str, ...] = ("numpy", "xtcocotools")

# Part name -> (xtcocotools iouType, result/annotation field). Whole-body concatenates all five fields.
_PART_IOU_TYPES: dict[str, str] = {
    "body": "keypoints_body",
    "foot": "keypoints_foot",
    "face": "keypoints_face",
    "lefthand": "keypoints_lefthand",
    "righthand": "keypoints_righthand",
    "wholebody": "keypoints_wholebody",
}

# Order of ``COCOeval.stats`` for keypoint iouTypes (xtcocotools ``_summarizeKps``, maxDets=20).
_STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "AP_M", "AP_L", "AR", "AR50", "AR75", "AR_M", "AR_L")

_RESULT_FIELDS = ("image_id", "category_id", "score") + tuple(name for name, _ in ANNOTATION_KEYPOINT_FIELDS)


@contextlib.contextmanager
def _silenced():
    """xtcocotools prints its progress; keep it out of the console. Swapping ``builtins.print`` too, since
    Ray Train replaces ``print`` in its workers with one that logs what a redirected stdout would swallow."""
    saved = builtins.print
    builtins.print = lambda *args, **kwargs: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        builtins.print = saved


def _part_sigmas(part: str) -> np.ndarray:
    sigmas = np.asarray(SIGMAS, dtype=np.float64)
    if part == "wholebody":
        return sigmas
    start, stop = PART_RANGES[part]
    return sigmas[start:stop]


def _part_slice(part: str) -> slice:
    return slice(0, NUM_KEYPOINTS) if part == "wholebody" else slice(*PART_RANGES[part])


def _load_results(results, copy_lists: bool = True) -> list[dict]:
    """The checked result list; with ``copy_lists`` a copy of the result-format fields only (what xtcocotools
    may modify), else the caller's dicts themselves (the numpy engine only reads them)."""
    if isinstance(results, (str, Path)):
        path = Path(results)
        try:
            with path.open() as handle:
                results = json.load(handle)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"results file {path} does not exist") from error
        except json.JSONDecodeError as error:
            raise ValueError(f"results file {path} is not valid JSON: {error}") from error
    if not isinstance(results, list):
        raise ValueError(
            f"results must be a list of result dicts or a JSON file path, got {type(results).__name__}"
        )
    checked = []
    for index, result in enumerate(results):
        if not isinstance(result, dict):
            raise ValueError(f"results[{index}] must be a dict, got {type(result).__name__}")
        missing = [field for field in _RESULT_FIELDS if field not in result]
        if missing:
            raise ValueError(
                f"results[{index}] (image_id {result.get('image_id')!r}) is missing fields {missing}"
            )
        for field, length in ANNOTATION_KEYPOINT_FIELDS:
            if len(result[field]) != 3 * length:
                raise ValueError(
                    f"results[{index}] (image_id {result['image_id']!r}): field {field!r} must have "
                    f"{3 * length} values (x, y, score for {length} keypoints), got {len(result[field])}"
                )
        if not copy_lists:
            continue
        # Keep only the result-format fields: xtcocotools' loadRes treats a 'bbox' key as a box result.
        # A copy (flat lists of numbers: a list copy is a deep one), so xtcocotools' additions stay off them.
        checked.append(
            {
                field: list(result[field]) if type(result[field]) is list else copy.deepcopy(result[field])
                for field in _RESULT_FIELDS
            }
        )
    return checked if copy_lists else results


class WholeBodyEvaluator:
    """COCO-WholeBody evaluation against one annotation file, parsed once (e.g. once per training run).

    ``evaluate(results)`` runs the six passes (five parts and whole-body). With ``engine="numpy"`` (the
    default) they are ``trainer.evaluation.keypoint_eval``'s array operations, in this process (seconds at
    val scale).
    With ``engine="xtcocotools"`` they are xtcocotools' ``COCOeval``: with ``processes > 1`` in forked
    worker processes that inherit the parsed ground truth and results (nothing is pickled but the ten
    statistics of each pass), when the calling process runs no other thread (forking a threaded process can
    deadlock the child); otherwise in this process. Same numbers either way (to 1e-12; identical on the
    tested sets).
    """

    def __init__(self, ann_file, processes: int | None = None, *, engine: str = "numpy") -> None:
        self.ann_file = Path(ann_file)
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"annotation file {self.ann_file} does not exist")
        self.engine = engine
        # xtcocotools engine: one process per pass, at most one per core; 1 runs the passes here.
        self.processes = (
            min(len(_PART_IOU_TYPES), os.cpu_count() or 1) if processes is None else int(processes)
        )
        if engine == "numpy":
            with self.ann_file.open() as handle:
                self.ground_truth = keypoint_eval.ground_truth_from_dataset(json.load(handle))
            self._known_ids = set(self.ground_truth.image_ids)
        else:
            from xtcocotools.coco import COCO

            with _silenced():  # xtcocotools prints progress to stdout
                self.coco_gt = COCO(str(self.ann_file))
            self._known_ids = set(self.coco_gt.getImgIds())

    @classmethod
    def for_file(cls, ann_file) -> WholeBodyEvaluator:
        """This process's evaluator for ``ann_file``, parsed at the first call and reused while the file's
        path, size and mtime stay the same (the validation epochs of one training run)."""
        path = Path(ann_file)
        stat = path.stat() if path.is_file() else None
        key = (str(path.resolve()), stat and stat.st_size, stat and stat.st_mtime_ns)
        cached = _EVALUATORS.get("last")
        if cached is None or cached[0] != key:
            _EVALUATORS["last"] = cached = (key, cls(path))
        return cached[1]

    def evaluate(self, results) -> dict[str, float]:
        """Metrics of ``results``; arguments, return value and errors as ``evaluate_wholebody``."""
        return self._evaluate_checked(_load_results(results, copy_lists=self.engine == "xtcocotools"))

    def _evaluate_checked(self, checked: list[dict]) -> dict[str, float]:
        unknown_ids = sorted({result["image_id"] for result in checked} - self._known_ids, key=str)
        if unknown_ids:
            shown = ", ".join(repr(i) for i in unknown_ids[:20]) + (" ..." if len(unknown_ids) > 20 else "")
            raise ValueError(
                f"results refer to {len(unknown_ids)} image id(s) not in {self.ann_file}: {shown}"
            )
        metrics: dict[str, float] = {}
        # No result at all (a model that finds no one): xtcocotools' loadRes cannot take an empty list, but
        # its accumulation gives 0 where ground truth exists, as the numpy engine computes (-1 stays "no
        # ground truth in the range", never "no prediction").
        if self.engine == "numpy" or not checked:
            if not hasattr(self, "ground_truth"):  # the xtcocotools engine's file, as arrays
                self.ground_truth = keypoint_eval.ground_truth_from_dataset(self.coco_gt.dataset)
            detections = keypoint_eval.detections_from_results(self.ground_truth, checked)
            all_stats = {
                part: keypoint_eval.evaluate_part(
                    self.ground_truth, detections, _part_slice(part), _part_sigmas(part)
                )
                for part in _PART_IOU_TYPES
            }
        else:
            with _silenced(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not found, use 'score' instead.*")
                coco_dt = self.coco_gt.loadRes(checked)
            all_stats = self._run_passes(coco_dt)
        for part in _PART_IOU_TYPES:
            for name, value in zip(_STAT_NAMES, all_stats[part], strict=True):
                metrics[f"{part}/{name}"] = float(value)
        for name in ("AP", "AP50", "AP75", "AR"):
            metrics[f"hand/{name}"] = 0.5 * (metrics[f"lefthand/{name}"] + metrics[f"righthand/{name}"])
        return metrics

    def _run_passes(self, coco_dt) -> dict[str, np.ndarray]:
        parts = list(_PART_IOU_TYPES)
        # Fork only a single-threaded process: a child forked while another thread holds a lock (a Ray
        # Train worker has dozens of threads) inherits the lock held and can wait on it forever.
        threaded = threading.active_count() > 1
        if self.processes <= 1 or threaded or "fork" not in multiprocessing.get_all_start_methods():
            return {part: _evaluate_pass(self.coco_gt, coco_dt, part) for part in parts}
        global _FORKED_STATE
        _FORKED_STATE = (self.coco_gt, coco_dt)
        try:
            # Heaviest passes first (133 and 68 keypoints), so the short ones fill in behind them.
            order = ["wholebody", "face", "body", "lefthand", "righthand", "foot"]
            with multiprocessing.get_context("fork").Pool(min(self.processes, len(parts))) as pool:
                stats = dict(zip(order, pool.map(_evaluate_forked_pass, order, chunksize=1), strict=True))
        finally:
            _FORKED_STATE = None
        return {part: stats[part] for part in parts}


# The last evaluator WholeBodyEvaluator.for_file built in this process: {"last": (file key, evaluator)}.
_EVALUATORS: dict = {}
# (coco_gt, coco_dt) for the forked pass workers, set only while a pool runs.
_FORKED_STATE = None


def _evaluate_forked_pass(part: str) -> np.ndarray:
    coco_gt, coco_dt = _FORKED_STATE
    return _evaluate_pass(coco_gt, coco_dt, part)


def _evaluate_pass(coco_gt, coco_dt, part: str) -> np.ndarray:
    """One xtcocotools pass: the part's sigmas, OKS over the GT area, the ten keypoint statistics."""
    from xtcocotools.cocoeval import COCOeval

    with _silenced(), warnings.catch_warnings():
        # Results carry one 'score' per instance; xtcocotools warns that it uses it for every part.
        warnings.filterwarnings("ignore", message=".*not found, use 'score' instead.*")
        coco_eval = COCOeval(coco_gt, coco_dt, _PART_IOU_TYPES[part], _part_sigmas(part), use_area=True)
        coco_eval.params.useSegm = None
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.asarray(coco_eval.stats, dtype=np.float64)


def evaluate_wholebody(ann_file, results, processes: int | None = None) -> dict[str, float]:
    """COCO-WholeBody keypoint AP/AR of ``results`` against the annotation file ``ann_file``.

    Parses ``ann_file`` at every call: a caller that scores many result sets against one file (a training
    run's validation epochs) builds one ``WholeBodyEvaluator`` instead.

    Args:
        ann_file: COCO-WholeBody v1.0 annotation JSON (path).
        results: list of result dicts (``image_id``, ``category_id``, ``keypoints`` 17x3, ``foot_kpts`` 6x3,
            ``face_kpts`` 68x3, ``lefthand_kpts`` 21x3, ``righthand_kpts`` 21x3, flattened, with a keypoint
            score as third value, and ``score``), or the path of a JSON file holding that list. Other keys
            are ignored. The inputs are not modified.
        processes: worker processes for the six passes of the xtcocotools engine (None: one per core, at
            most 6; 1: this process); the default numpy engine runs them in this process.

    Returns:
        ``{part}/{stat}`` for part in body, foot, face, lefthand, righthand, wholebody and stat in AP, AP50,
        AP75, AP_M, AP_L, AR, AR50, AR75, AR_M, AR_L (xtcocotools' keypoint summary, maxDets 20), plus
        ``hand/AP``, ``hand/AR``, ``hand/AP50``, ``hand/AP75`` (means of the two hands). A statistic is -1
        when the part has no labelled ground truth in the range (xtcocotools' convention); with no result
        at all, the others are 0.

    Raises:
        ValueError: a result is malformed, or refers to image ids absent from ``ann_file`` (named).
    """
    ann_path = Path(ann_file)
    if not ann_path.is_file():
        raise FileNotFoundError(f"annotation file {ann_path} does not exist")
    # Malformed results are reported before the file is parsed (the numpy engine only reads the dicts).
    checked = _load_results(results, copy_lists=False)
    return WholeBodyEvaluator(ann_path, processes=processes)._evaluate_checked(checked)


def keypoints_to_results(image_ids, keypoints_133x3, scores, category_id: int = 1) -> list[dict]:
    """Predictions as COCO-WholeBody result dicts.

    Args:
        image_ids: ``[N]`` image id of each instance.
        keypoints_133x3: ``[N, 133, 3]`` (x, y, keypoint score) in image pixels, in COCO-WholeBody order.
        scores: ``[N]`` instance scores (e.g. from ``rescore_instances``).
        category_id: category of every instance (1 = person).

    Returns:
        One dict per instance with ``image_id``, ``category_id``, ``score`` and the five keypoint fields
        (``keypoints``, ``foot_kpts``, ``face_kpts``, ``lefthand_kpts``, ``righthand_kpts``) as flat lists.
    """
    keypoints = np.asarray(keypoints_133x3, dtype=np.float64)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"keypoints_133x3 must have shape [N, {NUM_KEYPOINTS}, 3], got {keypoints.shape}")
    image_ids = list(np.asarray(image_ids).reshape(-1).tolist())
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(image_ids) != keypoints.shape[0]:
        raise ValueError(f"image_ids has {len(image_ids)} entries, keypoints_133x3 has {keypoints.shape[0]}")
    if scores.shape[0] != keypoints.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} entries, keypoints_133x3 has {keypoints.shape[0]}")
    results = []
    start = 0
    field_slices = []
    for field, length in ANNOTATION_KEYPOINT_FIELDS:
        field_slices.append((field, slice(start, start + length)))
        start += length
    # One tolist per field for all instances (the same Python floats as per instance, far fewer calls).
    columns = [
        (field, keypoints[:, part_slice].reshape(len(keypoints), -1).tolist())
        for field, part_slice in field_slices
    ]
    for n, (image_id, score) in enumerate(zip(image_ids, scores.tolist(), strict=True)):
        result = {"image_id": image_id, "category_id": int(category_id), "score": score}
        for field, values in columns:
            result[field] = values[n]
        results.append(result)
    return results


def rescore_instances(
    box_scores, keypoint_scores, keypoint_score_thr: float = RESCORE_KEYPOINT_THR
) -> np.ndarray:
    """Instance score = box score x mean of the keypoint scores above a threshold (MMPose's rescoring).

    Args:
        box_scores: ``[N]`` person-detector scores (1 for ground-truth boxes).
        keypoint_scores: ``[N, K]`` per-keypoint confidences (e.g. heatmap maxima from ``decode_dark``).
        keypoint_score_thr: only keypoints scoring strictly above this count towards the mean; an instance
            with none keeps a mean of 0 (score 0).

    Returns:
        ``[N]`` float64 instance scores.
    """
    box_scores = np.asarray(box_scores, dtype=np.float64).reshape(-1)
    keypoint_scores = np.asarray(keypoint_scores, dtype=np.float64)
    if keypoint_scores.ndim != 2 or keypoint_scores.shape[0] != box_scores.shape[0]:
        raise ValueError(
            f"keypoint_scores must have shape [N, K] with N = len(box_scores) = {box_scores.shape[0]}, "
            f"got {keypoint_scores.shape}"
        )
    above = keypoint_scores > keypoint_score_thr
    count = above.sum(axis=1)
    total = np.where(above, keypoint_scores, 0.0).sum(axis=1)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return box_scores * mean


def _oks_matrix(keypoints: np.ndarray, areas: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """``[M, M]`` OKS between the instances of one image, normalised by the mean of the two areas (MMPose's
    oks_iou); entry ``[i, j]`` takes exactly the operations of ``oks_iou(keypoints[i], keypoints[j])``."""
    squared_distance = ((keypoints[None, :] - keypoints[:, None]) ** 2).sum(axis=-1)  # [M, M, K]
    mean_area = (areas[:, None] + areas[None, :]) / 2 + np.spacing(1)
    exponent = squared_distance / variances / mean_area[..., None] / 2
    return np.exp(-exponent).mean(axis=-1)


def _greedy_keep(oks: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """Greedy NMS on a precomputed OKS matrix: highest score first, drop later ones with OKS > ``thr``."""
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(order), dtype=bool)
    keep: list[int] = []
    for index in order.tolist():
        if suppressed[index]:
            continue
        keep.append(index)
        suppressed |= oks[index] > thr
    return keep


# Size of one batch of OKS terms [images, M, M, K] in float64: bounds the NMS temporaries.
_NMS_BATCH_BYTES = 32 * 2**20


def _nms_keep_per_image(image_ids, keypoints, scores, areas, variances, thr) -> np.ndarray:
    """Sorted indices kept by greedy OKS-NMS within each image: per image what ``_greedy_keep`` keeps on
    ``_oks_matrix`` (the same operations, batched over the images with the same number of candidates)."""
    by_image = np.argsort(image_ids, kind="stable")  # each image's candidates together, in input order
    if not len(by_image):
        return np.zeros(0, dtype=np.int64)
    sorted_ids = image_ids[by_image]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    counts = np.diff(np.r_[starts, len(by_image)])
    keep = np.zeros(len(by_image), dtype=bool)
    xs, ys = np.ascontiguousarray(keypoints[..., 0]), np.ascontiguousarray(keypoints[..., 1])
    for count in np.unique(counts).tolist():
        members = by_image[starts[counts == count][:, None] + np.arange(count)]  # [images, M]
        per_batch = max(1, _NMS_BATCH_BYTES // (count * count * keypoints.shape[1] * 8))
        for first in range(0, len(members), per_batch):
            batch = members[first : first + per_batch]
            x, y, batch_areas = xs[batch], ys[batch], areas[batch]
            mean_area = (batch_areas[:, :, None] + batch_areas[:, None, :]) / 2 + np.spacing(1)
            # _oks_matrix's operations in place ([images, M, M, K]; dx^2 + dy^2 is its sum over the pair).
            terms = np.subtract(x[:, None, :], x[:, :, None])
            dy = np.subtract(y[:, None, :], y[:, :, None])
            np.square(terms, out=terms)
            np.add(terms, np.square(dy, out=dy), out=terms)
            del dy
            np.divide(terms, variances, out=terms)
            np.divide(terms, mean_area[..., None], out=terms)
            np.divide(terms, 2, out=terms)
            np.exp(np.negative(terms, out=terms), out=terms)
            oks = terms.mean(axis=-1)  # [images, M, M]
            order = np.argsort(-scores[batch], axis=1, kind="stable")
            rows = np.arange(len(batch))[:, None]
            ranked = oks[rows[:, :, None], order[:, :, None], order[:, None, :]]  # rows, columns by score
            suppressed = np.zeros((len(batch), count), dtype=bool)
            kept = np.zeros_like(suppressed)
            for rank in range(count):
                kept[:, rank] = live = ~suppressed[:, rank]
                suppressed |= live[:, None] & (ranked[:, rank] > thr)
            keep[batch[rows, order][kept]] = True
    return np.flatnonzero(keep)


def oks_nms(instances: Sequence[dict], thr: float = OKS_NMS_THR, sigmas=SIGMAS) -> list[int]:
    """Greedy non-maximum suppression by object keypoint similarity, within one image.

    Args:
        instances: the candidates of one image, each a dict with ``keypoints`` (``[K, 2]`` or ``[K, 3]``,
            image pixels; a third column is ignored), ``score`` (float) and ``area`` (float, the instance
            area used to normalise OKS, e.g. the product of the crop scale as MMPose).
        thr: a candidate is suppressed when its OKS with an already kept, higher-scoring one is > ``thr``.
        sigmas: ``[K]`` OKS sigmas (default: the 133 COCO-WholeBody ones).

    Returns:
        Indices into ``instances`` of the kept candidates, highest score first.
    """
    if len(instances) == 0:
        return []
    sigmas = np.asarray(sigmas, dtype=np.float64)
    try:
        keypoints = np.stack([np.asarray(inst["keypoints"], dtype=np.float64)[:, :2] for inst in instances])
        scores = np.array([float(inst["score"]) for inst in instances])
        areas = np.array([float(inst["area"]) for inst in instances])
    except KeyError as error:
        raise ValueError(
            f"oks_nms: every instance needs 'keypoints', 'score' and 'area'; missing {error}"
        ) from error
    if keypoints.shape[1] != sigmas.shape[0]:
        raise ValueError(
            f"oks_nms: instances have {keypoints.shape[1]} keypoints but sigmas has {sigmas.shape[0]}"
        )
    return _greedy_keep(_oks_matrix(keypoints, areas, (2 * sigmas) ** 2), scores, thr)


def detections_to_results(
    image_ids,
    keypoints,
    keypoint_scores,
    box_scores,
    areas,
    keypoint_score_thr: float = RESCORE_KEYPOINT_THR,
    nms_thr: float = OKS_NMS_THR,
    sigmas=SIGMAS,
    category_id: int = 1,
) -> list[dict]:
    """Detection-box inference output -> result dicts: rescoring, per-image OKS-NMS, result format.

    Args:
        image_ids: ``[N]`` image of each detection box.
        keypoints: ``[N, 133, 2]`` decoded keypoints in image pixels.
        keypoint_scores: ``[N, 133]`` keypoint confidences.
        box_scores: ``[N]`` detector scores.
        areas: ``[N]`` areas for OKS-NMS (MMPose uses the product of the crop scale).
        keypoint_score_thr, nms_thr, sigmas: see ``rescore_instances`` and ``oks_nms``.
        category_id: category of every result.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    keypoint_scores = np.asarray(keypoint_scores, dtype=np.float64)
    image_ids = np.asarray(image_ids).reshape(-1)
    areas = np.asarray(areas, dtype=np.float64).reshape(-1)
    if keypoints.ndim != 3 or keypoints.shape[-1] != 2 or keypoints.shape[:2] != keypoint_scores.shape:
        raise ValueError(
            f"keypoints must be [N, K, 2] and keypoint_scores [N, K]; got {keypoints.shape} and "
            f"{keypoint_scores.shape}"
        )
    if not (image_ids.shape[0] == areas.shape[0] == keypoints.shape[0]):
        raise ValueError(
            f"image_ids ({image_ids.shape[0]}), areas ({areas.shape[0]}) and keypoints "
            f"({keypoints.shape[0]}) must have the same length"
        )
    scores = rescore_instances(box_scores, keypoint_scores, keypoint_score_thr)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if keypoints.shape[1] != sigmas.shape[0]:
        raise ValueError(f"keypoints have {keypoints.shape[1]} keypoints but sigmas has {sigmas.shape[0]}")
    kept = _nms_keep_per_image(image_ids, keypoints, scores, areas, (2 * sigmas) ** 2, nms_thr)
    keypoints_133x3 = np.concatenate([keypoints[kept], keypoint_scores[kept][..., None]], axis=-1)
    return keypoints_to_results(image_ids[kept], keypoints_133x3, scores[kept], category_id)
