"""``fowkal tune-eval``: the heatmap cache, a trial's evaluation against ``fowkal eval``, the eval settings
(``EvalConfig``, ``fowkal eval --set``), errors before Ray, and (slow) a small sweep end to end.

The model is test_eval_cli's untrained ``hrnet_w18_small`` at 32x32 (8x8 heatmaps): its AP is 0, so the
trial path is checked against ``fowkal eval`` result by result (image, score and every keypoint), which
fixes the metrics as well.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from shared_data import ANN, DET, MINI, needs_mini
from test_eval_cli import TINY_CONFIG, _save_checkpoint, _tiny_model

from orchestrator.cli import main
from orchestrator.sweeps.definition_file import SearchSpaceError
from trainer.checkpoint import CheckpointMismatchError, load_checkpoint_model
from trainer.config import EVAL_SETTING_KEYS, ConfigError, EvalConfig, config_from_dict
from trainer.datasets.keypoints import ANNOTATION_KEYPOINT_FIELDS

REPO = Path(__file__).resolve().parents[1]
EVAL_SPACE = REPO / "search_spaces" / "eval_space.yaml"

pytestmark = needs_mini

OTHER_SETTINGS = [
    "eval.flip_mode=exact",
    "eval.blur_kernel=5",
    "eval.rescore_keypoint_thr=0.05",
    "eval.nms_thr=0.5",
    "data.det_score_thr=0.5",
]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return _save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", _tiny_model(), TINY_CONFIG)


@pytest.fixture(scope="module")
def det_cache(tiny_checkpoint, tmp_path_factory):
    from trainer.topdown.heatmap_cache import build_heatmap_cache

    loaded = load_checkpoint_model(tiny_checkpoint)
    root = tmp_path_factory.mktemp("heatmap_cache")
    return build_heatmap_cache(loaded, ANN, MINI, root, det_file=DET, workers=0, progress=False)


def _eval_cli(checkpoint, tmp_path, extra) -> tuple[list[dict], str]:
    out = tmp_path / "results.json"
    args = ["eval", "--checkpoint", str(checkpoint), "--ann", str(ANN), "--images", str(MINI)]
    args += ["--det-file", str(DET), "--out", str(out), "--workers", "0", "--no-progress", *extra]
    assert main(args) == 0
    return json.loads(out.read_text()), str(out)


def _assert_identical(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected) > 0
    for a, e in zip(actual, expected, strict=True):
        assert a["image_id"] == e["image_id"]
        assert a["score"] == e["score"]
        for name, _ in ANNOTATION_KEYPOINT_FIELDS:
            assert a[name] == e[name]


# ----------------------------------------------------------------------------------------------------------
# the evaluation settings


def test_eval_settings_have_one_default_each_and_are_checked():
    assert EVAL_SETTING_KEYS == (
        "eval.flip_mode",
        "eval.blur_kernel",
        "eval.rescore_keypoint_thr",
        "eval.nms_thr",
        "data.det_score_thr",
    )
    # Today's behaviour: MMPose's shift, DARK's 11 kernel, rescoring above 0.2, OKS-NMS at 0.9.
    assert (EvalConfig.flip_mode, EvalConfig.blur_kernel) == ("shift", 11)
    assert (EvalConfig.rescore_keypoint_thr, EvalConfig.nms_thr) == (0.2, 0.9)
    for key, value, words in (
        ("blur_kernel", 4, "odd"),
        ("blur_kernel", -1, "odd"),
        ("nms_thr", 1.5, "[0, 1]"),
        ("rescore_keypoint_thr", -0.1, "[0, 1]"),
    ):
        with pytest.raises(ConfigError, match=rf"eval\.{key}.*{re.escape(words)}"):
            config_from_dict({"eval": {key: value}})
    with pytest.raises(ConfigError, match="data.det_score_thr"):
        config_from_dict({"data": {"det_score_thr": -0.5}})


def test_eval_set_applies_settings_and_names_a_bad_key(tiny_checkpoint, tmp_path, capsys):
    defaults, _ = _eval_cli(tiny_checkpoint, tmp_path, [])
    changed, _ = _eval_cli(tiny_checkpoint, tmp_path, [f"--set={s}" for s in OTHER_SETTINGS])
    # data.det_score_thr=0.5 keeps fewer boxes and NMS at 0.5 drops more: fewer results.
    assert len(changed) < len(defaults)
    capsys.readouterr()
    args = ["eval", "--checkpoint", str(tiny_checkpoint), "--ann", str(ANN), "--images", str(MINI)]
    assert main(args + ["--set", "loss.tau=0.1", "--no-progress"]) == 2
    assert "loss.tau" in capsys.readouterr().err
    assert main(args + ["--set", "eval.blur_kernel=4", "--no-progress"]) == 2
    assert "eval.blur_kernel" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# the cache and a trial's evaluation


@pytest.mark.parametrize("settings", [[], OTHER_SETTINGS], ids=["defaults", "other"])
def test_trial_evaluation_equals_fowkal_eval(tiny_checkpoint, det_cache, tmp_path, settings):
    from trainer.evaluation.model_eval import apply_eval_settings
    from trainer.evaluation.wholebody import WholeBodyEvaluator, evaluate_wholebody
    from trainer.topdown.inference import results_from_predictions

    expected, results_file = _eval_cli(tiny_checkpoint, tmp_path, [f"--set={s}" for s in settings])
    config = apply_eval_settings(load_checkpoint_model(tiny_checkpoint).config, settings)
    batch = config.data.val_batch_size
    predictions = det_cache.predictions(config.eval, config.data.det_score_thr, True, batch)
    _assert_identical(results_from_predictions(predictions, config.eval), expected)
    metrics, boxes = det_cache.evaluate(
        config.eval, config.data.det_score_thr, WholeBodyEvaluator.for_file(ANN), True, batch
    )
    assert boxes == (118 if not settings else len(predictions["image_ids"]))
    assert metrics == evaluate_wholebody(ANN, results_file)


def test_cache_is_reused_selects_boxes_and_refuses_thresholds_it_cannot_answer(
    tiny_checkpoint, det_cache, tmp_path
):
    from trainer.topdown.heatmap_cache import CACHE_DTYPE, HeatmapCache, build_heatmap_cache

    assert det_cache.plain.shape == det_cache.mirrored.shape == (118, 133, 8, 8)
    assert det_cache.plain.dtype == CACHE_DTYPE and det_cache.stride == 4.0
    # Mirrored heatmaps are the model's on the mirrored crop, not a copy of the plain ones.
    assert not np.array_equal(np.asarray(det_cache.plain), np.asarray(det_cache.mirrored))
    loaded = load_checkpoint_model(tiny_checkpoint)
    stamp = (det_cache.path / "plain.npy").stat().st_mtime_ns
    again = build_heatmap_cache(loaded, ANN, MINI, det_cache.path.parent, det_file=DET, progress=False)
    assert again.path == det_cache.path and (again.path / "plain.npy").stat().st_mtime_ns == stamp
    scores = det_cache.box_scores
    assert len(det_cache.select(0.5)) == int((scores >= np.float32(0.5)).sum()) < len(scores)
    # Built from 0.3 up, the cache cannot answer 0.2 (those boxes never ran through the model).
    high = build_heatmap_cache(
        loaded, ANN, MINI, tmp_path, det_file=DET, det_score_thr=0.3, workers=0, progress=False
    )
    assert high.path != det_cache.path and len(high.image_ids) < 118
    with pytest.raises(ValueError, match="below the 0.3"):
        high.select(0.2)
    # A damaged cache directory reads as an error naming it.
    (high.path / "boxes.npz").unlink()
    with pytest.raises(ValueError, match=str(high.path)):
        HeatmapCache.open(high.path)


def test_decoded_keypoints_are_kept_per_flip_mode_and_kernel(det_cache, tmp_path, monkeypatch):
    from trainer.topdown.heatmap_cache import HeatmapCache
    from trainer.topdown.inference import decode_heatmaps

    calls = []
    original = HeatmapCache.decode

    def counting(self, flip_mode, kernels, batch_size=64):
        calls.append((flip_mode, tuple(sorted(kernels))))
        return original(self, flip_mode, kernels, batch_size)

    monkeypatch.setattr(HeatmapCache, "decode", counting)
    memo = tmp_path / "decoded"
    first = HeatmapCache.open(det_cache.path)  # a trial process
    keypoints, scores = first.decoded("exact", 5, True, 32, kernels=(3, 5, 11), memo_dir=memo)
    # Every box, as decode_heatmaps gives them in batches of 32.
    rows = slice(32, 64)
    mirrored = torch.from_numpy(np.array(det_cache.mirrored[rows]))
    expected = decode_heatmaps(
        torch.from_numpy(np.array(det_cache.plain[rows])),
        mirrored,
        det_cache.center[rows],
        det_cache.scale[rows],
        "exact",
        det_cache.stride,
        5,
    )
    assert np.array_equal(keypoints[rows], expected[0]) and np.array_equal(scores[rows], expected[1])
    assert calls == [("exact", (3, 5, 11))]  # one pass for the three kernels of the space
    assert sorted(p.name for p in memo.glob("*.npz")) == [f"flip-exact-k{k}.npz" for k in (11, 3, 5)]
    first.decoded("exact", 3, True, 32, kernels=(3, 5, 11), memo_dir=memo)  # from memory
    second = HeatmapCache.open(det_cache.path)  # another trial process: from the files
    again = second.decoded("exact", 11, True, 32, kernels=(3, 5, 11), memo_dir=memo)
    assert len(calls) == 1
    assert np.array_equal(again[0], first.decoded("exact", 11, True, 32, memo_dir=memo)[0])
    # Another flip mode, or no flip test, is decoded (once).
    second.decoded("shift", 11, True, 32, kernels=(3, 5, 11), memo_dir=memo)
    second.decoded("exact", 11, False, 32, memo_dir=memo)
    second.decoded("shift", 5, True, 32, kernels=(3, 5, 11), memo_dir=memo)
    assert calls[1:] == [("shift", (3, 5, 11)), (None, (11,))]
    # A damaged file is decoded again, not read.
    (memo / "flip-exact-k3.npz").write_bytes(b"not a zip")
    HeatmapCache.open(det_cache.path).decoded("exact", 3, True, 32, memo_dir=memo)
    assert calls[-1] == ("exact", (3,))


# ----------------------------------------------------------------------------------------------------------
# the space and the settings of a trial


def _space(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_eval_space_loads_and_rejects_keys_that_are_not_evaluation_settings(tmp_path):
    from orchestrator.evaluation.tune_eval import (
        base_settings,
        defaults_point,
        load_eval_space,
        trial_settings,
    )

    space = load_eval_space(EVAL_SPACE)
    assert set(space.parameters) == set(EVAL_SETTING_KEYS) and space.metric == "eval/wholebody_AP"
    settings = base_settings(config_from_dict({}))
    point = defaults_point(space, settings, EVAL_SPACE)
    assert point == {
        "eval.flip_mode": "shift",
        "eval.blur_kernel": 11,
        "eval.rescore_keypoint_thr": 0.2,
        "eval.nms_thr": 0.9,
        "data.det_score_thr": 0.0,
    }
    for text, words in (
        ("parameters:\n  loss.tau: {distribution: uniform, low: 0.1, high: 0.2}\n", "loss.tau"),
        ("parameters:\n  eval.nms_tr: {distribution: uniform, low: 0.1, high: 0.2}\n", "eval.nms_tr"),
        (
            "metric: val/loss\nparameters:\n  eval.nms_thr: {distribution: uniform, low: 0.1, high: 1.0}\n",
            "metric",
        ),
        ("parameters:\n  eval.blur_kernel: {distribution: categorical, choices: [3, 4]}\n", "blur_kernel"),
    ):
        with pytest.raises(SearchSpaceError, match=re.escape(words)):
            load_eval_space(_space(tmp_path, text))
    # The defaults are the first trial: a space that excludes them is an error naming the key and value.
    narrow = load_eval_space(
        _space(tmp_path, "parameters:\n  eval.nms_thr: {distribution: uniform, low: 0.3, high: 0.8}\n")
    )
    with pytest.raises(SearchSpaceError, match=r"eval\.nms_thr.*0\.9"):
        defaults_point(narrow, settings, "narrow.yaml")

    from orchestrator.evaluation.tune_eval import EvalSweepPlan

    plan = EvalSweepPlan("s", str(tmp_path), str(tmp_path), str(ANN), settings, True, 8, "", "", "", space)
    chosen, det = trial_settings(plan, {**point, "eval.nms_thr": 0.5, "data.det_score_thr": 0.25})
    assert chosen == EvalConfig(nms_thr=0.5) and det == 0.25


def test_parameter_importances_rank_the_parameter_that_decides():
    from orchestrator.evaluation.tune_eval import load_eval_space, parameter_importances

    space = load_eval_space(EVAL_SPACE)
    rng = np.random.default_rng(0)
    trials = []
    for _ in range(24):
        point = {
            "eval.flip_mode": str(rng.choice(["shift", "none", "exact"])),
            "eval.blur_kernel": int(rng.choice([3, 5, 7, 9, 11, 13, 15])),
            "eval.rescore_keypoint_thr": float(rng.uniform(0, 0.6)),
            "eval.nms_thr": float(rng.uniform(0.3, 1.0)),
            "data.det_score_thr": float(rng.uniform(0, 0.7)),
        }
        trials.append((point, 0.5 - (point["eval.nms_thr"] - 0.7) ** 2))
    importances = parameter_importances(space, trials, "max")
    assert set(importances) == set(space.sampled_names)
    assert max(importances, key=importances.get) == "eval.nms_thr"
    assert parameter_importances(space, trials[:1], "max") == {}


# ----------------------------------------------------------------------------------------------------------
# errors, before Ray


def test_bad_inputs_fail_before_ray_starts(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import ray

    import orchestrator.runs.ray_utils

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started although the inputs are invalid")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(orchestrator.runs.ray_utils, "init_ray", no_ray)
    base = ["tune-eval", "--ann", str(ANN), "--images", str(MINI), "--samples", "2"]
    base += ["--storage-path", str(tmp_path / "store"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    ckpt = ["--checkpoint", str(tiny_checkpoint)]

    bad_space = _space(tmp_path, "parameters:\n  optim.lr: {distribution: uniform, low: 0.1, high: 0.2}\n")
    assert main(base + ckpt + ["--space", str(bad_space)]) == 2
    assert "optim.lr" in capsys.readouterr().err

    broken = tmp_path / "dets.json"
    broken.write_text('[{"image_id": 1, "bbox": [0, 0, 10], "score": 0.9}]')
    assert main(base + ckpt + ["--space", str(EVAL_SPACE), "--det-file", str(broken)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "bbox" in err
    broken.write_text("[{")
    assert main(base + ckpt + ["--space", str(EVAL_SPACE), "--det-file", str(broken)]) == 2
    assert str(broken) in capsys.readouterr().err

    # 17 keypoints saved under a 133-keypoint config: the model does not fit the checkpoint.
    mismatched = _save_checkpoint(tmp_path / "k17.pt", _tiny_model(num_keypoints=17), TINY_CONFIG)
    args = base + ["--checkpoint", str(mismatched), "--space", str(EVAL_SPACE)]
    assert main(args) == 2
    assert "k17.pt" in capsys.readouterr().err
    with pytest.raises(CheckpointMismatchError):
        load_checkpoint_model(mismatched)

    # Both or neither model source: argparse says so (exit 2).
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--space", str(EVAL_SPACE)])
    assert exit_info.value.code == 2
    capsys.readouterr()
    assert main(base + ckpt + ["--space", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert not list((tmp_path / "store").glob("*/tune"))  # no sweep was started


# ----------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_tune_eval_end_to_end(tiny_checkpoint, tmp_path, capsys):
    from orchestrator import tracking
    from orchestrator.evaluation.eval_command import run_eval
    from orchestrator.evaluation.tune_eval import run_tune_eval
    from orchestrator.reports.records import child_runs
    from orchestrator.runs.ray_utils import shutdown_ray

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        outcome = run_tune_eval(
            checkpoint=str(tiny_checkpoint),
            ann_file=str(ANN),
            image_dir=str(MINI),
            det_file=str(DET),
            space_path=str(EVAL_SPACE),
            samples=4,
            seed=1,
            tracking_uri=uri,
            storage_path=str(tmp_path / "store"),
            max_concurrent=2,
            verbose=0,
            print_fn=lambda _: None,
        )
    finally:
        shutdown_ray()
    client = tracking.make_client(uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = child_runs(client, parent.info.experiment_id, outcome.parent_run_id)
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    assert set(outcome.trial_statuses.values()) == {"TERMINATED"}
    # The first trial (ev-001: with two at once, not necessarily the first run to start) is the
    # checkpoint's own settings, scored like fowkal eval scores them, and the parent names it.
    first = next(c for c in children if c.info.run_name == "ev-001")
    assert parent.data.tags["fowkal.defaults_run"] == f"ev-001 ({first.info.run_id})"
    assert first.data.params["eval.nms_thr"] == "0.9" and first.data.params["eval.flip_mode"] == "shift"
    defaults = run_eval(
        ann_file=str(ANN),
        image_dir=str(MINI),
        checkpoint=str(tiny_checkpoint),
        det_file=str(DET),
        workers=0,
        progress=False,
        out=str(tmp_path / "d.json"),
        print_fn=lambda _: None,
    )
    assert outcome.default_score == defaults["wholebody/AP"]
    assert first.data.metrics["eval/wholebody_AP"] == defaults["wholebody/AP"]
    # best_eval.yaml holds every evaluation setting; applied with fowkal eval --set it gives the best score.
    best = yaml.safe_load(Path(outcome.best_eval_path).read_text())
    assert set(best) == {"eval", "data"} and set(best["eval"]) == {
        "flip_mode",
        "blur_kernel",
        "rescore_keypoint_thr",
        "nms_thr",
    }
    sets = [f"eval.{k}={v}" for k, v in best["eval"].items()] + [
        f"data.det_score_thr={best['data']['det_score_thr']}"
    ]
    applied = run_eval(
        ann_file=str(ANN),
        image_dir=str(MINI),
        checkpoint=str(tiny_checkpoint),
        det_file=str(DET),
        workers=0,
        progress=False,
        out=str(tmp_path / "b.json"),
        overrides=sets,
        print_fn=lambda _: None,
    )
    assert applied["wholebody/AP"] == outcome.best_score
    names = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"best_eval.yaml", "summary.md"} <= names
    assert "gain/eval/wholebody_AP" in parent.data.metrics
    # fowkal report reads the real sweep: the first trial as the defaults, the gain the sweep logged.
    from orchestrator.reports.report import write_report

    md_path, _ = write_report(
        outcome.sweep_id, tracking_uri=uri, out_dir=tmp_path / "report", print_fn=lambda _: None
    )
    text = md_path.read_text()
    assert f"| {first.info.run_name} (defaults) | FINISHED |" in text
    gain = parent.data.metrics["gain/eval/wholebody_AP"]  # in points: trials log AP in percent
    assert f"gain **{gain:+.2f}** points" in text and first.info.run_id in text


# ----------------------------------------------------------------------------------------------------------
# fowkal report of a tune-eval (the command's own parent logging; the trials' scores made up, no Ray)

# A made-up score that the OKS-NMS threshold decides (best at 0.6) and the exact flip test nudges up.
BEST_POINT = {
    "eval.flip_mode": "exact",
    "eval.blur_kernel": 7,
    "eval.rescore_keypoint_thr": 0.1,
    "eval.nms_thr": 0.6,
    "data.det_score_thr": 0.2,
}


def _made_up_metrics(values: dict) -> dict[str, float]:
    """AP/AR in percent, as trials log them."""
    exact = 1.0 if values["eval.flip_mode"] == "exact" else 0.0
    ap = 30.0 - 100.0 * (values["eval.nms_thr"] - 0.6) ** 2 + exact
    metrics = {f"eval/{part}_AP": ap for part in ("body", "foot", "lefthand", "righthand", "hand")}
    metrics.update({"eval/wholebody_AP": ap, "eval/face_AP": ap + 4 * exact, "eval/wholebody_AR": ap + 10.0})
    return {**metrics, "eval/boxes": 100.0, "time/trial_s": 0.5}


def _fit_without_ray(plan, points, samples, seed, *args, **kwargs):
    """Stands in for ``tune_eval._fit``: the given points, then random ones, each a child run opened as a
    trial opens it, scored by :func:`_made_up_metrics`."""
    from orchestrator import tracking
    from orchestrator.evaluation.tune_eval import open_trial_run

    rng = np.random.default_rng(seed)
    configs = list(points) + [BEST_POINT]
    while len(configs) < samples:
        configs.append(
            {
                "eval.flip_mode": str(rng.choice(["shift", "none", "exact"])),
                "eval.blur_kernel": int(rng.choice([3, 5, 7, 9, 11, 13, 15])),
                "eval.rescore_keypoint_thr": float(rng.uniform(0.0, 0.6)),
                "eval.nms_thr": float(rng.uniform(0.75, 1.0)),
                "data.det_score_thr": float(rng.uniform(0.0, 0.7)),
            }
        )
    client = tracking.make_client(plan.tracking_uri)
    results = []
    for i, config in enumerate(configs[:samples]):
        name = f"ev-{i + 1:03d}"
        run_id = open_trial_run(plan, client, f"t{i}", name, config)
        metrics = _made_up_metrics({**plan.base_settings, **config})
        tracking.log_epoch_metrics(run_id, metrics, 0, client=client)
        tracking.end_run(run_id, "FINISHED", client=client)
        results.append({"name": name, "config": config, "metrics": metrics, "run_id": run_id, "error": None})
    return results, {f"t{i}": "TERMINATED" for i in range(len(results))}


def test_report_of_a_tune_eval_best_settings_gain_importances_links(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    import orchestrator.evaluation.tune_eval as tune_eval
    from orchestrator import tracking
    from orchestrator.reports.records import ReportError, child_runs, load_sweep
    from orchestrator.reports.report import write_report

    monkeypatch.setattr(tune_eval, "_fit", _fit_without_ray)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = tune_eval.run_tune_eval(
        checkpoint=str(tiny_checkpoint),
        ann_file=str(ANN),
        image_dir=str(MINI),
        space_path=str(EVAL_SPACE),
        samples=12,
        seed=3,
        tracking_uri=uri,
        storage_path=str(tmp_path / "store"),
        holdout=0.5,
        verbose=0,
        print_fn=lambda _: None,
    )
    # Defaults (nms 0.9, shift): 30 - 9 = 21%; the best point: 30 + 1 = 31%.
    assert outcome.default_score == pytest.approx(21.0) and outcome.best_score == pytest.approx(31.0)
    # --holdout 0.5: the best settings (made-up scores on the tuned half) scored for real on the other half,
    # from the same cache: what fowkal eval gives with them on the held-out half's annotation file.
    from orchestrator.evaluation.eval_command import run_eval

    held_ann = Path(outcome.sweep_dir) / "holdout" / "held_out_images.json"
    assert outcome.holdout["tuned_images"] == 2 and outcome.holdout["held_out_images"] == 2
    sets = [f"{k}={v}" for k, v in BEST_POINT.items()]
    on_held = run_eval(
        ann_file=str(held_ann), image_dir=str(MINI), checkpoint=str(tiny_checkpoint), workers=0,
        progress=False, out=str(tmp_path / "held.json"), overrides=sets, print_fn=lambda _: None,
    )  # fmt: skip
    assert outcome.holdout["held_out/best"]["eval/wholebody_AP"] == on_held["wholebody/AP"]
    summary = Path(outcome.summary_path).read_text()
    assert "Best eval/wholebody_AP: **31.00%**" in summary and "gain **+10.00** points" in summary
    client = tracking.make_client(uri)
    parent = client.get_run(outcome.parent_run_id)
    importances = {k[len("importance/") :]: v for k, v in parent.data.metrics.items() if "importance/" in k}
    assert max(importances, key=importances.get) == "eval.nms_thr"
    assert parent.data.metrics["holdout/held_out/best/eval/wholebody_AP"] == on_held["wholebody/AP"]
    assert parent.data.metrics["holdout/tuned/best/eval/wholebody_AP"] == pytest.approx(31.0)
    assert "Held-out check (--holdout 0.5)" in summary and "| eval/face_AP |" in summary

    for target in (outcome.sweep_id, outcome.parent_run_id, tune_eval.DEFAULT_EXPERIMENT):
        md_path, html_path = write_report(
            target, tracking_uri=uri, out_dir=tmp_path / "report", print_fn=lambda _: None
        )
        markdown = md_path.read_text()
        assert markdown.startswith(f"# Evaluation-settings sweep {outcome.sweep_id}")
    # Paths as the sweep records them: absolute, symlinks resolved (../shared may be a link).
    assert str(tiny_checkpoint.resolve()) in markdown and str(ANN.resolve()) in markdown
    # The best settings beside the defaults, and the line that applies them.
    assert "| `eval.nms_thr` | 0.9 | 0.6 | changed | sampled |" in markdown
    assert "| `eval.flip_mode` | shift | exact | changed | sampled |" in markdown
    assert "| `eval.blur_kernel` | 11 | 7 | changed | sampled |" in markdown
    assert f"fowkal eval --checkpoint {tiny_checkpoint}" in markdown and "--set eval.nms_thr=0.6" in markdown
    # The gain, best trial minus the defaults' trial, whole-body and per part, in points.
    assert "| Whole-body AP (the sweep's metric) | 21.00 | 31.00 | +10.00 |" in markdown
    assert "| Face AP | 21.00 | 35.00 | +14.00 |" in markdown
    assert "| Whole-body AR | 31.00 | 41.00 | +10.00 |" in markdown
    assert "gain **+10.00** points" in markdown
    # The importances the sweep computed, most important first.
    section = markdown.split("## Parameter importances", 1)[1].split("## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| eval.") or line.startswith("| data.")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(
        dict(sorted(importances.items(), key=lambda i: -i[1]))
    )
    assert rows[0].startswith("| eval.nms_thr |")
    # Every trial is listed with a link to its run; the first one is marked as the defaults.
    children = child_runs(client, parent.info.experiment_id, outcome.parent_run_id)
    assert len(children) == 12
    for child in children:
        assert tracking.run_url(
            tracking.absolute_tracking_uri(uri), parent.info.experiment_id, child.info.run_id
        ) in (markdown)
    assert "| ev-001 (defaults) | FINISHED | 21.00 | 100 |" in markdown
    page = html_path.read_text()
    assert "<h2>Gain over the defaults</h2>" in page and "data:image/png;base64," in page
    # The CLI takes the sweep's name; a trial is not a parent.
    from orchestrator.cli import main

    capsys.readouterr()
    assert main(["report", outcome.sweep_id, "--tracking-uri", uri, "--out", str(tmp_path / "cli")]) == 0
    assert "Gain over the defaults" in capsys.readouterr().out
    with pytest.raises(ReportError, match="tune-eval"):
        load_sweep(client, children[0].info.run_id)


def test_eval_trial_status_callback_ends_children_by_the_sweeps_rules(tmp_path):
    """Without Ray: trials as Tune hands them to the callback at the end of a sweep. A scored trial's run
    ends FINISHED, an unscored one KILLED, an errored one FAILED, and a FAILED run stays FAILED."""
    from types import SimpleNamespace

    from orchestrator import tracking
    from orchestrator.evaluation.tune_eval import (
        EvalSweepPlan,
        EvalTrialStatusCallback,
        base_settings,
        defaults_point,
        load_eval_space,
        open_trial_run,
        reconcile_eval_runs,
    )

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.make_client(uri)
    experiment_id = tracking.get_or_create_experiment(client, "status")
    parent = tracking.start_run(client, experiment_id, "sweep")
    space = load_eval_space(EVAL_SPACE)
    plan = EvalSweepPlan(
        "sweep-1", str(tmp_path), str(tmp_path), str(ANN), base_settings(config_from_dict({})), True, 8,
        uri, experiment_id, parent, space,
    )  # fmt: skip
    point = defaults_point(space, plan.base_settings, EVAL_SPACE)
    runs = {t: open_trial_run(plan, client, t, f"ev-{t}", point) for t in ("t1", "t2", "t3", "t4", "t5")}
    tracking.end_run(runs["t4"], "FAILED", client=client, error="decoding failed")

    def trial(trial_id, status, result):
        return SimpleNamespace(trial_id=trial_id, status=status, last_result=result, config={})

    scored = {plan.metric: 0.1}
    trials = [
        trial("t1", "TERMINATED", scored),
        trial("t2", "TERMINATED", {}),
        trial("t3", "ERROR", {}),
        trial("t4", "TERMINATED", scored),
        trial("t6", "PENDING", None),  # never started: no run
    ]
    EvalTrialStatusCallback(plan).on_experiment_end(trials)
    status = {t: client.get_run(r).info.status for t, r in runs.items()}
    assert status == {"t1": "FINISHED", "t2": "KILLED", "t3": "FAILED", "t4": "FAILED", "t5": "RUNNING"}
    # t5 opened its run after Tune's last saved state, which the resumed sweep restored without it: its run
    # is nobody's, ended KILLED and deleted; the sweep keeps one child per trial.
    statuses = reconcile_eval_runs(plan, client, {t.trial_id: t.status for t in trials})
    assert "ev-t5" not in statuses and set(statuses) == {"ev-t1", "ev-t2", "ev-t3", "ev-t4"}
    lost = client.get_run(runs["t5"])
    assert lost.info.status == "KILLED" and lost.info.lifecycle_stage == "deleted"
    # Without a readable Tune state, what no trial settled is settled at the end: unscored, KILLED, kept.
    t7 = open_trial_run(plan, client, "t7", "ev-t7", point)
    statuses = reconcile_eval_runs(plan, client, {})
    assert statuses["ev-t7"] == "KILLED" and client.get_run(t7).info.lifecycle_stage == "active"


def test_a_trial_logs_ap_in_percent_as_fowkal_eval(tmp_path, monkeypatch):
    """xtcocotools gives fractions; a trial's eval/* metrics are percent (trainer.evaluation.metric_units),
    -1 kept."""
    import orchestrator.evaluation.tune_eval_trial as trial_side
    from orchestrator.evaluation.tune_eval import (
        EvalSweepPlan,
        base_settings,
        defaults_point,
        evaluate_trial,
        load_eval_space,
    )

    class FakeCache:
        def evaluate(self, settings, det_score_thr, evaluator, flip_test, batch_size, **kwargs):
            return {"wholebody/AP": 0.0778, "hand/AR": 0.5, "face/AP75": -1.0}, 59

    monkeypatch.setattr(trial_side, "_cache", lambda path: FakeCache())
    space = load_eval_space(EVAL_SPACE)
    settings = base_settings(config_from_dict({}))
    plan = EvalSweepPlan("s", str(tmp_path), str(tmp_path), str(ANN), settings, True, 8, "", "", "", space)
    metrics, boxes = evaluate_trial(plan, defaults_point(space, settings, EVAL_SPACE))
    assert boxes == 59
    assert metrics == {"eval/wholebody_AP": pytest.approx(7.78), "eval/hand_AR": 50.0, "eval/face_AP75": -1.0}
