"""Whole-body evaluation on the real COCO-WholeBody mini set, against direct xtcocotools calls."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from shared_data import ANN, KEYPOINT_FACTS, MINI

from trainer.datasets.keypoints import SIGMAS
from trainer.evaluation.wholebody import (
    detections_to_results,
    evaluate_wholebody,
    keypoints_to_results,
    oks_nms,
    rescore_instances,
)

FIELDS = ("keypoints", "foot_kpts", "face_kpts", "lefthand_kpts", "righthand_kpts")
FIELD_LENGTHS = (17, 6, 68, 21, 21)


@pytest.fixture(scope="module")
def annotations() -> dict:
    if not ANN.is_file():
        pytest.skip(f"COCO-WholeBody mini data set not found at {ANN}")
    return json.loads(ANN.read_text())


def reference_sigmas() -> np.ndarray:
    # Prefer the shared reference file (independent of trainer.datasets.keypoints) when it is there.
    if KEYPOINT_FACTS.is_file():
        return np.asarray(json.loads(KEYPOINT_FACTS.read_text())["sigmas"], dtype=np.float64)
    return np.asarray(SIGMAS, dtype=np.float64)


def ground_truth_results(annotations: dict) -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "score": 1.0,
            **{f: list(a[f]) for f in FIELDS},
        }
        for a in annotations["annotations"]
    ]


def direct_xtcocotools(ann_file: Path, results: list[dict]) -> dict[str, np.ndarray]:
    """The COCO-WholeBody protocol written out with xtcocotools calls, for comparison."""
    from xtcocotools.coco import COCO
    from xtcocotools.cocoeval import COCOeval

    sigmas = reference_sigmas()
    cuts = np.cumsum([0, *FIELD_LENGTHS])
    stats = {}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coco = COCO(str(ann_file))
        detections = coco.loadRes(copy.deepcopy(results))
        for i, part in enumerate(("body", "foot", "face", "lefthand", "righthand")):
            evaluator = COCOeval(
                coco, detections, f"keypoints_{part}", sigmas[cuts[i] : cuts[i + 1]], use_area=True
            )
            evaluator.params.useSegm = None
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats[part] = evaluator.stats.copy()
        evaluator = COCOeval(coco, detections, "keypoints_wholebody", sigmas, use_area=True)
        evaluator.params.useSegm = None
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        stats["wholebody"] = evaluator.stats.copy()
    return stats


def test_ground_truth_scores_one_everywhere(annotations):
    metrics = evaluate_wholebody(ANN, ground_truth_results(annotations))
    for part in ("body", "foot", "face", "lefthand", "righthand", "wholebody", "hand"):
        for stat in ("AP", "AP50", "AP75", "AR"):
            assert metrics[f"{part}/{stat}"] == pytest.approx(1.0), f"{part}/{stat}"
    # Every other statistic is 1 too, except area-range ones of a part with no labelled instance in the range
    # (xtcocotools reports -1 then); check that claim directly on the annotations.
    medium = (32**2, 96**2)
    for key, value in metrics.items():
        if value == -1:
            part, stat = key.split("/")
            assert stat in ("AP_M", "AR_M"), key
            field = "face_kpts" if part == "face" else None
            assert field is not None, key
            labelled_medium = [
                a
                for a in annotations["annotations"]
                if np.any(np.asarray(a[field][2::3]) > 0) and medium[0] <= a["area"] <= medium[1]
            ]
            assert not labelled_medium, key
        else:
            assert value == pytest.approx(1.0), key


def test_perturbed_results_match_direct_xtcocotools(annotations, tmp_path):
    rng = np.random.default_rng(0)
    results = ground_truth_results(annotations)
    for result in results:
        for field in FIELDS:
            values = np.asarray(result[field], dtype=np.float64).reshape(-1, 3)
            values[:, :2] += rng.normal(0, 4.0, size=(values.shape[0], 2))
            values[:, 2] = rng.uniform(0, 1, size=values.shape[0])
            result[field] = values.reshape(-1).tolist()
        result["score"] = float(rng.uniform(0.3, 1.0))
    results = results[1:]  # a missed person
    false_positive = copy.deepcopy(results[0])
    for field in FIELDS:
        values = np.asarray(false_positive[field]).reshape(-1, 3)
        values[:, :2] += 60.0
        false_positive[field] = values.reshape(-1).tolist()
    false_positive["score"] = 0.95
    results.append(false_positive)

    metrics = evaluate_wholebody(ANN, results)
    direct = direct_xtcocotools(ANN, results)
    names = ("AP", "AP50", "AP75", "AP_M", "AP_L", "AR", "AR50", "AR75", "AR_M", "AR_L")
    for part, stats in direct.items():
        for name, value in zip(names, stats, strict=True):
            assert metrics[f"{part}/{name}"] == pytest.approx(value, abs=1e-12), f"{part}/{name}"
    assert metrics["hand/AP"] == pytest.approx((direct["lefthand"][0] + direct["righthand"][0]) / 2)
    assert metrics["hand/AR"] == pytest.approx((direct["lefthand"][5] + direct["righthand"][5]) / 2)
    assert metrics["wholebody/AP"] < 1.0  # the perturbation is visible

    # The results list is left untouched, and a JSON file gives the same numbers.
    assert set(results[0]) == {"image_id", "category_id", "score", *FIELDS}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert evaluate_wholebody(ANN, str(path)) == metrics
    assert evaluate_wholebody(str(ANN), path) == metrics


def test_unknown_image_ids_are_named(annotations):
    results = ground_truth_results(annotations)
    results[0] = dict(results[0], image_id=123456789)
    results[1] = dict(results[1], image_id=987654321)
    with pytest.raises(ValueError, match="123456789.*987654321"):
        evaluate_wholebody(ANN, results)


def test_malformed_results_are_named(annotations):
    results = ground_truth_results(annotations)
    bad = dict(results[0], face_kpts=results[0]["face_kpts"][:-3])
    with pytest.raises(ValueError, match="face_kpts"):
        evaluate_wholebody(ANN, [bad])
    missing = {k: v for k, v in results[0].items() if k != "lefthand_kpts"}
    with pytest.raises(ValueError, match="lefthand_kpts"):
        evaluate_wholebody(ANN, [missing])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_wholebody(MINI / "nope.json", results)


def test_keypoints_to_results_splits_parts():
    rng = np.random.default_rng(1)
    keypoints = rng.uniform(0, 100, size=(2, 133, 3))
    results = keypoints_to_results([7, 9], keypoints, [0.5, 0.25], category_id=1)
    assert [r["image_id"] for r in results] == [7, 9]
    assert [r["score"] for r in results] == [0.5, 0.25]
    start = 0
    for field, length in zip(FIELDS, FIELD_LENGTHS, strict=True):
        for n in range(2):
            expected = [v for k in range(start, start + length) for v in keypoints[n, k]]
            assert results[n][field] == pytest.approx(expected)
        start += length
    with pytest.raises(ValueError, match="keypoints_133x3"):
        keypoints_to_results([1], np.zeros((1, 17, 3)), [1.0])
    with pytest.raises(ValueError, match="scores"):
        keypoints_to_results([1, 2], np.zeros((2, 133, 3)), [1.0])


def test_rescore_instances_by_hand():
    keypoint_scores = np.array([[0.9, 0.1, 0.5, 0.2], [0.1, 0.0, 0.2, 0.15], [0.3, 0.3, 0.3, 0.3]])
    scores = rescore_instances([0.8, 0.9, 0.5], keypoint_scores)
    # 0.2 is not above the threshold 0.2.
    np.testing.assert_allclose(scores, [0.8 * (0.9 + 0.5) / 2, 0.0, 0.5 * 0.3])
    np.testing.assert_allclose(rescore_instances([1.0], [[0.05, 0.15]], keypoint_score_thr=0.1), [0.15])


def reference_oks(a: np.ndarray, b: np.ndarray, area_a: float, area_b: float, sigmas: np.ndarray) -> float:
    total = 0.0
    for k in range(len(sigmas)):
        d2 = (a[k, 0] - b[k, 0]) ** 2 + (a[k, 1] - b[k, 1]) ** 2
        total += np.exp(-d2 / ((2 * sigmas[k]) ** 2) / ((area_a + area_b) / 2) / 2)
    return total / len(sigmas)


def test_oks_nms_against_reference_greedy_loop():
    rng = np.random.default_rng(2)
    sigmas = np.full(5, 0.05)
    base = rng.uniform(0, 200, size=(5, 2))
    instances = []
    for i in range(12):
        shift = rng.normal(0, 1.5 if i % 3 else 40.0, size=(5, 2))
        instances.append({"keypoints": base + shift, "score": float(rng.uniform()), "area": 2000.0 + 100 * i})
    thr = 0.5
    # Independent greedy NMS.
    remaining = sorted(range(len(instances)), key=lambda i: -instances[i]["score"])
    expected = []
    while remaining:
        best = remaining.pop(0)
        expected.append(best)
        remaining = [
            j
            for j in remaining
            if reference_oks(
                instances[best]["keypoints"],
                instances[j]["keypoints"],
                instances[best]["area"],
                instances[j]["area"],
                sigmas,
            )
            <= thr
        ]
    kept = oks_nms(instances, thr=thr, sigmas=sigmas)
    assert kept == expected
    assert 1 < len(kept) < len(instances)  # the case exercises both keeping and suppressing


def test_oks_nms_identical_and_far_instances():
    kpts = np.tile(np.array([[10.0, 20.0, 1.0]]), (133, 1))
    far = kpts.copy()
    far[:, :2] += 500
    instances = [
        {"keypoints": kpts, "score": 0.5, "area": 100.0},
        {"keypoints": kpts.copy(), "score": 0.9, "area": 100.0},  # duplicate, higher score
        {"keypoints": far, "score": 0.1, "area": 100.0},
    ]
    assert oks_nms(instances) == [1, 2]
    assert oks_nms([]) == []
    with pytest.raises(ValueError, match="area"):
        oks_nms([{"keypoints": kpts, "score": 1.0}])


def test_detections_to_results_rescoring_and_nms_per_image():
    kpts = np.full((3, 133, 2), 50.0)
    keypoint_scores = np.full((3, 133), 0.5)
    keypoint_scores[1] = 0.8
    # Detections 0 and 1 duplicate each other on image 5; detection 2 is on image 6 at the same place as 0
    # would be, so NMS must not compare across images.
    kpts[2] = kpts[0]
    results = detections_to_results([5, 5, 6], kpts, keypoint_scores, [0.9, 0.9, 0.4], [1e4, 1e4, 1e4])
    assert [r["image_id"] for r in results] == [5, 6]
    assert results[0]["score"] == pytest.approx(0.9 * 0.8)
    assert results[1]["score"] == pytest.approx(0.4 * 0.5)
    assert results[0]["keypoints"][:3] == pytest.approx([50.0, 50.0, 0.8])


@pytest.mark.parametrize("processes", [1, 2])
def test_scoring_prints_nothing_even_through_a_patched_print(annotations, monkeypatch, capsys, processes):
    # Ray Train's workers replace builtins.print with one that logs; xtcocotools' progress lines must not
    # reach the console either way (the numpy engine prints nothing of its own).
    import builtins

    from trainer.evaluation.wholebody import WholeBodyEvaluator

    printed = []
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: printed.append(args))
    metrics = evaluate_wholebody(ANN, ground_truth_results(annotations), processes=processes)
    assert metrics["wholebody/AP"] == pytest.approx(1.0)
    reference = WholeBodyEvaluator(ANN, processes=processes, engine="xtcocotools")
    assert reference.evaluate(ground_truth_results(annotations)) == metrics
    assert printed == [] and capsys.readouterr().out == ""
