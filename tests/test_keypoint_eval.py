"""trainer.evaluation.keypoint_eval (the numpy engine of WholeBodyEvaluator) against xtcocotools' COCOeval:
every
statistic of every part to 1e-12, on the real mini set with hard cases and on a synthetic val-like set."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from shared_data import ANN, needs_mini

from trainer.datasets.keypoints import PART_RANGES, SIGMAS
from trainer.evaluation import keypoint_eval
from trainer.evaluation.wholebody import WholeBodyEvaluator, detections_to_results

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("keypoints", "foot_kpts", "face_kpts", "lefthand_kpts", "righthand_kpts")
PARTS = ("body", "foot", "face", "lefthand", "righthand", "wholebody")
STATS = ("AP", "AP50", "AP75", "AP_M", "AP_L", "AR", "AR50", "AR75", "AR_M", "AR_L")


def _assert_identical(ours: dict, reference: dict) -> None:
    assert sorted(ours) == sorted(reference)
    for key in reference:
        assert ours[key] == pytest.approx(reference[key], abs=1e-12, rel=0), key


def _both_engines(ann_file: Path, results: list[dict]) -> tuple[dict, dict]:
    ours = WholeBodyEvaluator(ann_file).evaluate(results)
    reference = WholeBodyEvaluator(ann_file, processes=1, engine="xtcocotools").evaluate(results)
    return ours, reference


def _noisy(annotation: dict, rng: np.random.Generator, pixels: float) -> dict:
    result = {"image_id": annotation["image_id"], "category_id": annotation["category_id"]}
    for field in FIELDS:
        values = np.asarray(annotation[field], dtype=np.float64).reshape(-1, 3).copy()
        values[:, :2] += rng.normal(0.0, pixels, size=(len(values), 2))
        values[:, 2] = rng.uniform(-0.2, 1.0, size=len(values))  # some <= 0: not predicted
        result[field] = values.reshape(-1).tolist()
    result["score"] = float(rng.choice([0.5, 0.75, rng.uniform()]))  # ties across images and within one
    return result


def _unscored(values: list) -> list:
    """The keypoint scores set to 0: the part is not predicted (the reference drops such a result)."""
    return [0.0 if i % 3 == 2 else v for i, v in enumerate(values)]


def hard_mini_set(tmp_path: Path, seed: int, second_category: bool = False) -> tuple[Path, list[dict]]:
    """The mini annotations plus a crowd region, a person with no labelled keypoint, a person annotated twice
    and an image without people; noisy predictions with duplicates, misses, ties, over 20 on one image, a
    part left unpredicted, results on the empty image and in a category the file does not have."""
    data = json.loads(ANN.read_text())
    rng = np.random.default_rng(seed)
    people = data["annotations"]
    crowd = copy.deepcopy(people[0])
    crowd.update(id=990001, iscrowd=1, area=crowd["area"] * 3)
    unlabelled = copy.deepcopy(people[1])
    unlabelled["id"] = 990002
    for field in FIELDS:
        unlabelled[field] = [0] * len(unlabelled[field])
    twin = dict(copy.deepcopy(people[3]), id=990004)  # a person annotated twice
    people += [crowd, unlabelled, twin]
    empty_image = dict(data["images"][0], id=990003, file_name="990003.jpg")
    data["images"].append(empty_image)
    if second_category:
        data["categories"].append(dict(data["categories"][0], id=2, name="other"))
        for annotation in people[::3]:
            annotation["category_id"] = 2
    ann_file = tmp_path / f"hard_{seed}.json"
    ann_file.write_text(json.dumps(data))

    results = []
    for annotation in people:
        for _ in range(int(rng.integers(0, 4))):  # 0: a miss; 2-3: duplicates
            results.append(_noisy(annotation, rng, float(rng.choice([0.5, 2.0, 6.0, 20.0]))))
    crowded = people[2]["image_id"]
    for index in range(25):  # more than maxDets (20) on one image
        source = people[2] if index % 2 else people[3]
        results.append(dict(_noisy(source, rng, 10.0), image_id=crowded))
    results.append(copy.deepcopy(results[0]))  # an exact duplicate
    far = _noisy(people[0], rng, 1.0)
    for field in FIELDS:
        values = np.asarray(far[field]).reshape(-1, 3)
        values[:, :2] += 150.0
        far[field] = values.reshape(-1).tolist()
    results.append(dict(far, score=0.99))  # a confident false positive
    results.append(dict(_noisy(people[0], rng, 2.0), image_id=empty_image["id"]))  # no GT on that image
    unpredicted = _noisy(people[4], rng, 1.0)
    unpredicted["lefthand_kpts"] = _unscored(unpredicted["lefthand_kpts"])
    results.append(unpredicted)
    results.append(dict(_noisy(people[5], rng, 1.0), category_id=7))  # a category absent from the file
    return ann_file, results


@needs_mini
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hard_mini_cases_equal_xtcocotools(tmp_path, seed):
    ann_file, results = hard_mini_set(tmp_path, seed)
    ours, reference = _both_engines(ann_file, results)
    _assert_identical(ours, reference)
    assert 0 < ours["wholebody/AP"] < 1


@needs_mini
def test_two_categories_equal_xtcocotools(tmp_path):
    ann_file, results = hard_mini_set(tmp_path, seed=4, second_category=True)
    for result in results[::2]:
        result["category_id"] = 2 if result["category_id"] == 1 else result["category_id"]
    _assert_identical(*_both_engines(ann_file, results))


@needs_mini
def test_a_part_nobody_predicts_and_ground_truth_as_results(tmp_path):
    ann_file, results = hard_mini_set(tmp_path, seed=5)
    for result in results:
        result["face_kpts"] = _unscored(result["face_kpts"])
    ours, reference = _both_engines(ann_file, results)
    _assert_identical(ours, reference)
    assert ours["face/AP"] == 0.0 and ours["face/AR"] == 0.0
    truth = json.loads(ANN.read_text())["annotations"]
    perfect = [
        {"image_id": a["image_id"], "category_id": 1, "score": 1.0, **{f: a[f] for f in FIELDS}}
        for a in truth
    ]
    ours, reference = _both_engines(ANN, perfect)
    _assert_identical(ours, reference)
    assert ours["wholebody/AP"] == 1.0


@needs_mini
def test_pair_oks_is_bitwise_xtcocotools_compute_oks(tmp_path):
    import contextlib
    import io
    import warnings

    from xtcocotools.coco import COCO
    from xtcocotools.cocoeval import COCOeval

    ann_file, results = hard_mini_set(tmp_path, seed=6)
    data = json.loads(ann_file.read_text())
    truth = keypoint_eval.ground_truth_from_dataset(data)
    sigmas = np.asarray(SIGMAS)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coco = COCO(str(ann_file))
        coco_dt = coco.loadRes(copy.deepcopy(results))
        for part, (start, stop) in {**PART_RANGES, "wholebody": (0, 133)}.items():
            iou_type = f"keypoints_{part}"
            evaluator = COCOeval(coco, coco_dt, iou_type, sigmas[start:stop], use_area=True)
            evaluator.params.useSegm = None
            evaluator.evaluate()
            for (image_id, category), ious in evaluator.ious.items():
                if len(ious) == 0:
                    continue
                gts = evaluator._gts[image_id, category]
                dts = evaluator._dts[image_id, category]
                order = np.argsort([-d["score"] for d in dts], kind="mergesort")[:20]
                dt_rows = [d["id"] - 1 for d in (dts[i] for i in order)]
                gt_rows = [int(np.flatnonzero(truth.ids == g["id"])[0]) for g in gts]
                dets = keypoint_eval.detections_from_results(truth, [results[i] for i in dt_rows])
                d, g = np.meshgrid(np.arange(len(dt_rows)), gt_rows, indexing="ij")
                oks = keypoint_eval._pair_oks(
                    dets.keypoints[d.ravel(), start:stop],
                    truth.keypoints[g.ravel(), start:stop],
                    truth.area[g.ravel()],
                    truth.bbox[g.ravel()],
                    (sigmas[start:stop] * 2) ** 2,
                )
                np.testing.assert_array_equal(oks.reshape(ious.shape), ious, err_msg=f"{part} {image_id}")


def test_errors_are_named(tmp_path):
    data = {
        "images": [{"id": 1, "width": 10, "height": 10}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}],
    }
    with pytest.raises(ValueError, match=r"\[5\].*'area'"):
        keypoint_eval.ground_truth_from_dataset(data)
    data["annotations"][0]["area"] = 1.0
    with pytest.raises(ValueError, match="keypoint fields"):
        keypoint_eval.ground_truth_from_dataset(data)
    for field, length in zip(FIELDS, (17, 6, 68, 21, 21), strict=True):
        data["annotations"][0][field] = [0.0] * (3 * length)
    truth = keypoint_eval.ground_truth_from_dataset(data)
    with pytest.raises(ValueError, match="image id 3"):
        keypoint_eval.detections_from_results(truth, [{"image_id": 3}])
    with pytest.raises(ValueError, match="sigmas"):
        no_results = keypoint_eval.detections_from_results(truth, [])
        keypoint_eval.evaluate_part(truth, no_results, slice(0, 17), [0.1])
    with pytest.raises(ValueError, match="engine"):
        WholeBodyEvaluator(tmp_path / "any.json", engine="cython")


def _load_bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_mini
def test_synthetic_val_like_set_equals_xtcocotools(tmp_path):
    # bench/scale.py's generators at 1/5 of val: 1,000 images, 1,500 people, 9,000 detections through
    # rescoring and OKS-NMS, as at full size.
    scale = _load_bench_scale()
    ann_file, det_file = tmp_path / "val.json", tmp_path / "det.json"
    scale.write_annotation_file(ann_file, 1000, 1500, seed=1)
    scale.write_detections(det_file, ann_file, 9000, seed=2)
    predictions = scale.val_predictions(ann_file, det_file)
    results = detections_to_results(
        predictions["image_ids"],
        predictions["keypoints"],
        predictions["keypoint_scores"],
        predictions["box_scores"],
        predictions["areas"],
    )
    ours, reference = _both_engines(ann_file, results)
    _assert_identical(ours, reference)
    assert all(0 < ours[f"{part}/AR"] <= 1 for part in PARTS)
