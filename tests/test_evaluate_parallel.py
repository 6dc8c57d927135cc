"""Validation at scale (trainer/evaluation/wholebody.py): the numpy engine, the xtcocotools engine's parallel
passes, the
parse-once evaluator and the vectorised OKS-NMS give today's serial numbers, on the mini set and on a
synthetic val-like set."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from shared_data import ANN, needs_mini

from trainer.datasets.keypoints import SIGMAS
from trainer.evaluation.wholebody import (
    WholeBodyEvaluator,
    detections_to_results,
    evaluate_wholebody,
    oks_nms,
)

GOLDEN = Path(__file__).resolve().parent / "data"
FIELDS = ("keypoints", "foot_kpts", "face_kpts", "lefthand_kpts", "righthand_kpts")


def reference_detections_to_results(image_ids, keypoints, keypoint_scores, box_scores, areas, thr=0.9):
    """The serial path as it was: per-image greedy NMS comparing one kept instance with the rest."""
    above = keypoint_scores > 0.2
    count = above.sum(axis=1)
    total = np.where(above, keypoint_scores, 0.0).sum(axis=1)
    scores = box_scores * np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    variances = (2 * np.asarray(SIGMAS)) ** 2
    by_image = defaultdict(list)
    for index, image_id in enumerate(image_ids.tolist()):
        by_image[image_id].append(index)
    kept = []
    for indices in by_image.values():
        indices = np.asarray(indices)
        order = indices[np.argsort(-scores[indices], kind="stable")]
        while order.size:
            best, rest = order[0], order[1:]
            kept.append(int(best))
            d2 = ((keypoints[rest] - keypoints[best][None]) ** 2).sum(axis=-1)
            mean_area = (areas[best] + areas[rest]) / 2 + np.spacing(1)
            oks = np.exp(-(d2 / variances[None] / mean_area[:, None] / 2)).mean(axis=1)
            order = rest[oks <= thr]
    return sorted(kept), scores


def synthetic_val_set(tmp_path: Path, images: int = 60, seed: int = 0):
    """A val-like file from the mini annotations (1.5 people per image, jittered) and 9 detections per image,
    three near-duplicates per person plus background boxes, as a detector's output."""
    mini = json.loads(ANN.read_text())
    rng = np.random.default_rng(seed)
    sources = mini["images"]
    by_image = defaultdict(list)
    for annotation in mini["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    data = {"categories": mini["categories"], "images": [], "annotations": []}
    people = []
    for image_id in range(1, images + 1):
        source = sources[image_id % len(sources)]
        data["images"].append(dict(source, id=image_id, file_name=f"{image_id:06d}.jpg"))
        real = by_image[source["id"]]
        for j in range(1 + image_id % 2):
            annotation = json.loads(json.dumps(real[(image_id + j) % len(real)]))
            shift = rng.normal(0, 2, size=2)
            for field in FIELDS:
                values = np.asarray(annotation[field], dtype=np.float64).reshape(-1, 3)
                values[values[:, 2] > 0, :2] += shift
                annotation[field] = values.reshape(-1).tolist()
            annotation.update(id=len(data["annotations"]) + 1, image_id=image_id)
            data["annotations"].append(annotation)
            people.append(annotation)
    ann_file = tmp_path / "val.json"
    ann_file.write_text(json.dumps(data))
    ids, keypoints, box_scores, areas = [], [], [], []
    for person in people:
        truth = np.concatenate([np.asarray(person[f], dtype=np.float64).reshape(-1, 3) for f in FIELDS])
        for noise in (0.3, 1.0, 4.0):  # the first two usually suppress each other
            ids.append(person["image_id"])
            keypoints.append(truth[:, :2] + rng.normal(0, noise, size=(133, 2)))
            box_scores.append(rng.uniform(0.3, 1.0))
            areas.append(person["area"] * 1.5)
    for _ in range(9 * images - len(ids)):
        ids.append(int(rng.integers(1, images + 1)))
        keypoints.append(rng.uniform(0, 400, size=(133, 2)))
        box_scores.append(rng.uniform(0.0, 0.3))
        areas.append(rng.uniform(1e3, 3e4))
    predictions = {
        "image_ids": np.asarray(ids),
        "keypoints": np.asarray(keypoints),
        "keypoint_scores": rng.uniform(0, 1, size=(len(ids), 133)),
        "box_scores": np.asarray(box_scores),
        "areas": np.asarray(areas),
    }
    return ann_file, predictions


def _results(predictions):
    return detections_to_results(
        predictions["image_ids"],
        predictions["keypoints"],
        predictions["keypoint_scores"],
        predictions["box_scores"],
        predictions["areas"],
    )


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-12, rel=0), key


@needs_mini
def test_mini_numbers_equal_the_ones_recorded_before_the_change():
    golden = np.load(GOLDEN / "mini_golden.npz")
    inputs = np.load(GOLDEN / "eval_inputs.npz")
    results = detections_to_results(
        inputs["ids"], inputs["kps"], inputs["kss"], inputs["bss"], inputs["areas"]
    )
    assert [r["image_id"] for r in results] == golden["eval/kept_image_ids"].tolist()
    np.testing.assert_array_equal([r["score"] for r in results], golden["eval/kept_scores"])
    recorded = dict(
        zip(golden["eval/metric_names"].tolist(), golden["eval/metric_values"].tolist(), strict=True)
    )
    evaluator = WholeBodyEvaluator(ANN, processes=2)
    reference = WholeBodyEvaluator(ANN, processes=2, engine="xtcocotools")
    for metrics in (
        evaluate_wholebody(ANN, results, processes=1),
        evaluate_wholebody(ANN, results),
        evaluator.evaluate(results),
        evaluator.evaluate(results),  # the evaluator is reusable: same numbers the second time
        reference.evaluate(results),
        reference.evaluate(results),
    ):
        _assert_same(metrics, recorded)


@needs_mini
def test_synthetic_val_set_parallel_equals_serial_and_nms_equals_the_reference(tmp_path):
    ann_file, predictions = synthetic_val_set(tmp_path)
    results = _results(predictions)
    kept, scores = reference_detections_to_results(
        predictions["image_ids"],
        predictions["keypoints"],
        predictions["keypoint_scores"],
        predictions["box_scores"],
        predictions["areas"],
    )
    assert 0.3 * len(scores) < len(results) == len(kept) < len(scores)  # NMS both keeps and suppresses
    np.testing.assert_array_equal([r["image_id"] for r in results], predictions["image_ids"][kept])
    np.testing.assert_array_equal([r["score"] for r in results], scores[kept])
    serial = WholeBodyEvaluator(ann_file, processes=1, engine="xtcocotools").evaluate(results)
    parallel = WholeBodyEvaluator(ann_file, processes=3, engine="xtcocotools").evaluate(results)
    _assert_same(parallel, serial)
    _assert_same(WholeBodyEvaluator(ann_file).evaluate(results), serial)
    assert 0 < serial["wholebody/AP"] < 1


def test_oks_nms_matrix_equals_one_to_many_greedy_on_random_clusters():
    rng = np.random.default_rng(5)
    sigmas = np.asarray(SIGMAS)
    variances = (2 * sigmas) ** 2
    for _ in range(20):
        count = int(rng.integers(1, 15))
        base = rng.uniform(0, 300, size=(133, 2))
        instances = [
            {
                "keypoints": base + rng.normal(0, rng.choice([0.5, 2.0, 30.0]), size=(133, 2)),
                "score": float(rng.choice([0.5, rng.uniform()])),  # ties too
                "area": float(rng.uniform(1e3, 1e4)),
            }
            for _ in range(count)
        ]
        order = sorted(range(count), key=lambda i: -instances[i]["score"])
        expected = []
        while order:
            best = order.pop(0)
            expected.append(best)
            rest = np.asarray(order, dtype=int)
            if not len(rest):
                break
            d2 = (
                (np.stack([instances[j]["keypoints"] for j in rest]) - instances[best]["keypoints"]) ** 2
            ).sum(-1)
            mean_area = (instances[best]["area"] + np.array([instances[j]["area"] for j in rest])) / 2
            oks = np.exp(-(d2 / variances / (mean_area + np.spacing(1))[:, None] / 2)).mean(axis=1)
            order = rest[oks <= 0.9].tolist()
        assert oks_nms(instances, thr=0.9) == expected


@needs_mini
@pytest.mark.parametrize("engine", ["numpy", "xtcocotools"])
def test_evaluator_parses_the_file_once_and_checks_its_inputs(tmp_path, monkeypatch, engine):
    import xtcocotools.coco

    from trainer.evaluation import keypoint_eval

    calls, arrays = [], []
    real_init = xtcocotools.coco.COCO.__init__
    real_ground_truth = keypoint_eval.ground_truth_from_dataset

    def counting(self, *args, **kwargs):
        calls.append(args)
        real_init(self, *args, **kwargs)

    def counting_ground_truth(dataset):
        arrays.append(1)
        return real_ground_truth(dataset)

    monkeypatch.setattr(xtcocotools.coco.COCO, "__init__", counting)
    monkeypatch.setattr(keypoint_eval, "ground_truth_from_dataset", counting_ground_truth)
    evaluator = WholeBodyEvaluator(ANN, engine=engine)
    parsed = len(calls) if engine == "xtcocotools" else len(arrays)
    truth = json.loads(ANN.read_text())["annotations"]
    results = [
        {"image_id": a["image_id"], "category_id": 1, "score": 1.0, **{f: a[f] for f in FIELDS}}
        for a in truth
    ]
    for _ in range(3):
        evaluator.evaluate(results)
    if engine == "xtcocotools":
        assert len([c for c in calls if c and isinstance(c[0], str)]) == parsed == 1  # loadRes builds COCO()
    else:
        assert len(arrays) == parsed == 1 and calls == []  # the numpy engine never builds a COCO
    with pytest.raises(ValueError, match="123456789"):
        evaluator.evaluate([dict(results[0], image_id=123456789)])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        WholeBodyEvaluator(tmp_path / "nope.json", engine=engine)
    empty = evaluator.evaluate([])  # no prediction: 0 where ground truth exists, -1 only where none
    assert empty["wholebody/AP"] == empty["body/AR"] == 0.0 and empty["face/AP_M"] == -1.0


@needs_mini
def test_for_file_reuses_one_evaluator_until_the_file_changes(tmp_path):
    ann = tmp_path / "val.json"
    ann.write_text(ANN.read_text())
    first = WholeBodyEvaluator.for_file(ann)
    assert WholeBodyEvaluator.for_file(str(ann)) is first
    stat = ann.stat()
    os.utime(ann, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert WholeBodyEvaluator.for_file(ann) is not first


def test_passes_fork_only_from_a_single_threaded_process(tmp_path, monkeypatch):
    import multiprocessing
    import threading

    from trainer.evaluation import wholebody as evaluate

    ann_file, predictions = synthetic_val_set(tmp_path)
    results = _results(predictions)
    serial = WholeBodyEvaluator(ann_file, processes=1, engine="xtcocotools").evaluate(results)
    forks = []
    real_get_context = multiprocessing.get_context

    def spy(method=None):
        forks.append(method)
        return real_get_context(method)

    monkeypatch.setattr(evaluate.multiprocessing, "get_context", spy)
    # Another thread alive (as in a Ray Train worker): the passes run in this process, no fork.
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, daemon=True)
    worker.start()
    forking = WholeBodyEvaluator(ann_file, processes=3, engine="xtcocotools")
    try:
        _assert_same(forking.evaluate(results), serial)
    finally:
        stop.set()
        worker.join()
    assert forks == []
    # A single-threaded process forks its pass workers.
    monkeypatch.setattr(evaluate.threading, "active_count", lambda: 1)
    _assert_same(forking.evaluate(results), serial)
    assert forks == ["fork"]
    # The numpy engine forks nothing.
    _assert_same(WholeBodyEvaluator(ann_file, processes=3).evaluate(results), serial)
    assert forks == ["fork"]
