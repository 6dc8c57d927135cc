"""``fowkal tune-eval`` for KAPAO: the candidate cache against ``fowkal eval`` (``evaluate_model``) at the
same settings, result by result and metric by metric (TTA modes, fusion on and off); the cache-depth
warning; the ``eval.tta`` setting; ``--holdout`` checks; and (slow) a sweep end to end through Ray with
``--holdout 0.5``.

The model is a random-initialised KAPAO-S (K = 17) at input 128 on 4 synthetic val images, its head biased so
that every anchor is a confident object (anchor 0 of every layer a pose object, the others keypoint objects of
mixed classes): hundreds of candidates per image, NMS and fusion with work to do.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from trainer.checkpoint import load_checkpoint_model
from trainer.config import ConfigError, config_from_dict, config_to_dict
from trainer.datasets.sources import resolve_datasets
from trainer.evaluation.metric_units import metrics_to_percent
from trainer.evaluation.model_eval import apply_eval_settings, evaluate_model
from trainer.families import get_family

REPO = Path(__file__).resolve().parents[1]
KAPAO_SPACE = REPO / "search_spaces" / "kapao_eval_space.yaml"


def _config(root: Path) -> dict:
    return {
        "name": "tiny-kapao-te",
        "family": "kapao",
        "output_dir": str(root / "run"),
        "data": {
            "kind": "synthetic",
            "synthetic_dir": str(root / "synthetic"),
            "synthetic_train_images": 2,
            "synthetic_val_images": 4,
            "loader_workers": 0,
            "val_batch_size": 2,
            "input_size": 128,
        },
        "model": {"size": "s", "keypoints": "body"},  # K = 17: a smaller head, the same code
    }


@pytest.fixture(scope="module")
def kapao_setup(tmp_path_factory):
    """``(checkpoint, val annotation file, val image directory)``."""
    root = tmp_path_factory.mktemp("kapao_te")
    values = _config(root)
    cfg = config_from_dict(values)
    torch.manual_seed(0)
    model = get_family("kapao").build_model(cfg, pretrained=False)
    with torch.no_grad():
        for conv in model.head.convs:
            bias = conv.bias.view(3, -1)
            bias[:, 4] += 10.0  # every anchor an object
            bias[0, 5] += 20.0  # anchor 0: a pose object
            bias[1:, 6:23] += torch.linspace(0.0, 3.0, 17)  # the others: keypoint objects, mixed classes
    path = root / "best.pt"
    torch.save({"model": model.state_dict(), "epoch": 1, "config": config_to_dict(cfg)}, path)
    paths = resolve_datasets(cfg.data)
    return path, paths["val_ann"], paths["val_images"]


@pytest.fixture(scope="module")
def candidate_cache(kapao_setup, tmp_path_factory):
    from trainer.kapao.candidate_cache import build_candidate_cache

    checkpoint, ann, images = kapao_setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests that compare with it: the network's floats depend on the threads
    try:
        return build_candidate_cache(
            load_checkpoint_model(checkpoint),
            ann,
            images,
            tmp_path_factory.mktemp("candidates"),
            modes=("none", "flip", "scales"),
            pose_floor=0.001,
            keypoint_floor=0.05,
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)


def _cached_results(cache, settings):
    from trainer.kapao.family import KAPAO, predictions_from_poses

    ids, poses, short = cache.poses(settings)
    return KAPAO.results(predictions_from_poses(ids, poses), None), short


# The defaults; fusion off; each TTA mode; the other thresholds moved (fusion reaching far, unfused scores 0).
SETTINGS = [
    {},
    {"eval.fusion": False},
    {"eval.tta": "flip"},
    {"eval.tta": "scales", "eval.tau_fd": 100.0, "eval.tau_fc": 0.05, "eval.unfused_score": "zero"},
    {"eval.tau_cp": 0.3, "eval.tau_bp": 0.4, "eval.tau_ck": 0.5, "eval.tau_bk": 0.1, "eval.tau_fd": 90.0},
]


def test_cached_trials_equal_evaluate_model(kapao_setup, candidate_cache, tmp_path, one_torch_thread):
    """A trial on the cached candidates is ``fowkal eval`` at the same settings, bit for bit: every result
    (image, score, keypoint) and every metric, through the trial function the sweep runs."""
    from orchestrator.evaluation.tune_eval import (
        EvalSweepPlan,
        base_settings,
        defaults_point,
        evaluate_trial,
        load_eval_space,
    )

    checkpoint, ann, images = kapao_setup
    loaded = load_checkpoint_model(checkpoint)
    space = load_eval_space(KAPAO_SPACE)
    base = base_settings(loaded.config)
    plan = EvalSweepPlan(
        "s", str(tmp_path), str(candidate_cache.path), str(ann), base, False, 2, "", "", "", space,
        family="kapao", unit_name="images",
    )  # fmt: skip
    for overrides in SETTINGS:
        configured = dataclasses.replace(loaded, config=apply_eval_settings(loaded.config, overrides))
        outcome = evaluate_model(configured, ann, images, gpus=0, progress=False, workers=0)
        assert outcome.results, "the biased model must give poses"
        results, short = _cached_results(candidate_cache, configured.config.eval)
        assert short == 0
        assert results == outcome.results, overrides

        metrics, images_scored = evaluate_trial(
            plan, {**defaults_point(space, base, KAPAO_SPACE), **overrides}
        )
        expected = {f"eval/{k.replace('/', '_')}": v for k, v in metrics_to_percent(outcome.metrics).items()}
        assert images_scored == 4 and metrics.pop("eval/cache_short_images") == 0.0
        assert metrics == expected, overrides


def test_fusion_and_tta_change_the_poses(candidate_cache, one_torch_thread):
    """The settings the space sweeps act: fusion moves keypoints, each TTA mode adds its passes' candidates
    (flip: twice the pose candidates of none, scales: more again, at 0.8 and 1.2)."""
    from trainer.kapao.postprocess import KapaoEvalConfig

    fused, _ = _cached_results(candidate_cache, KapaoEvalConfig(tau_fd=500.0, tau_fc=0.01))
    plain, _ = _cached_results(candidate_cache, KapaoEvalConfig(tau_fd=500.0, tau_fc=0.01, fusion=False))
    assert len(fused) == len(plain) and fused != plain
    counts = {m: int(candidate_cache.mode(m).pose_offsets[-1]) for m in ("none", "flip", "scales")}
    assert counts["flip"] == 2 * counts["none"] and counts["scales"] > counts["flip"]
    with pytest.raises(ValueError, match=r"eval\.tau_ck 0\.01 is below the 0\.05"):
        candidate_cache.poses(KapaoEvalConfig(tau_ck=0.01))


def test_a_shallow_cache_says_so(kapao_setup, tmp_path, one_torch_thread):
    """A cache of 5 pose candidates per image cannot give the evaluator's 20 poses: every image is counted
    short at the low tau_cp; at a tau_cp above every candidate's score nothing was cut and none is."""
    from trainer.kapao.candidate_cache import build_candidate_cache
    from trainer.kapao.postprocess import KapaoEvalConfig

    checkpoint, ann, images = kapao_setup
    shallow = build_candidate_cache(
        load_checkpoint_model(checkpoint), ann, images, tmp_path, pose_depth=5, progress=False
    )
    assert int(shallow.mode("none").pose_offsets[-1]) == 4 * 5
    _, short = _cached_results(shallow, KapaoEvalConfig())
    assert short == 4
    _, short = _cached_results(shallow, KapaoEvalConfig(tau_cp=0.999999))
    assert short == 0


def test_tta_is_an_eval_setting_named_when_wrong(tmp_path):
    cfg = config_from_dict({**_config(tmp_path), "eval": {"tta": "scales"}})
    assert cfg.eval.tta == "scales"
    with pytest.raises(ConfigError, match=r"eval\.tta"):
        config_from_dict({**_config(tmp_path), "eval": {"tta": "mirror"}})


def test_bad_holdout_and_a_space_of_the_other_family_fail_before_ray(
    kapao_setup, tmp_path, monkeypatch, capsys
):
    import ray

    import orchestrator.runs.ray_utils

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started although the inputs are invalid")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(orchestrator.runs.ray_utils, "init_ray", no_ray)
    checkpoint, ann, images = kapao_setup
    base = ["tune-eval", "--checkpoint", str(checkpoint), "--ann", str(ann), "--images", str(images)]
    base += [
        "--samples",
        "2",
        "--storage-path",
        str(tmp_path),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/m.db",
    ]
    for value in ("0", "1", "1.5", "-0.2", "nan"):
        assert main(base + ["--space", str(KAPAO_SPACE), "--holdout", value]) == 2
        assert "--holdout" in capsys.readouterr().err
    assert main(base + ["--space", str(REPO / "search_spaces" / "eval_space.yaml")]) == 2
    err = capsys.readouterr().err
    assert "topdown_heatmap" in err and "kapao" in err


def test_holdout_split_is_deterministic_and_disjoint():
    from orchestrator.evaluation.tune_eval_holdout import split_ids

    ids = list(range(1, 101))
    tuned, held = split_ids(ids, 0.5, seed=3)
    assert split_ids(list(reversed(ids)), 0.5, seed=3) == (tuned, held)
    assert len(held) == 50 and set(tuned) | set(held) == set(ids) and not set(tuned) & set(held)
    assert split_ids(ids, 0.5, seed=4) != (tuned, held)
    assert len(split_ids(ids, 0.25, seed=3)[1]) == 25


@pytest.mark.slow
def test_kapao_tune_eval_end_to_end_with_holdout(kapao_setup, tmp_path, capsys, one_torch_thread):
    """``fowkal tune-eval --checkpoint ... --space search_spaces/kapao_eval_space.yaml --samples 4 --holdout
    0.5`` through Ray: every trial finished, the first one is the defaults and equals ``fowkal eval`` on the
    tuned half, the summary gives the gain per part, the importances (or why there are none) and both halves'
    scores, and the parent run logs the held-out check."""
    from orchestrator import tracking
    from orchestrator.evaluation.tune_eval_holdout import HELD_OUT_FILE, TUNED_FILE
    from orchestrator.reports.records import TAG_TUNE_EVAL, child_runs
    from orchestrator.runs.ray_utils import shutdown_ray

    checkpoint, ann, images = kapao_setup
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["tune-eval", "--checkpoint", str(checkpoint), "--ann", str(ann), "--images", str(images)]
    args += ["--space", str(KAPAO_SPACE), "--samples", "4", "--seed", "1", "--holdout", "0.5", "--quiet"]
    args += ["--storage-path", str(tmp_path / "store"), "--tracking-uri", uri, "--max-concurrent", "2"]
    try:
        assert main(args) == 0
    finally:
        shutdown_ray()
    client = tracking.make_client(uri)
    experiment = client.get_experiment_by_name("fowkal-tune-eval")
    parents = client.search_runs([experiment.experiment_id], f"tags.`{TAG_TUNE_EVAL}` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = child_runs(client, experiment.experiment_id, parent.info.run_id)
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    first = next(c for c in children if c.info.run_name == "ev-001")
    assert first.data.params["eval.tau_cp"] == "0.001" and first.data.params["eval.tta"] == "none"
    assert first.data.metrics["eval/images"] == 2.0 and first.data.metrics["eval/cache_short_images"] == 0.0
    # The defaults' trial is fowkal eval on the tuned half (its annotation file), to the bit.
    sweep_dir = Path(parent.data.tags[tracking.TAG_SWEEP_DIR])
    tuned_ann, held_ann = sweep_dir / "holdout" / TUNED_FILE, sweep_dir / "holdout" / HELD_OUT_FILE
    assert {i["id"] for i in json.loads(tuned_ann.read_text())["images"]}.isdisjoint(
        {i["id"] for i in json.loads(held_ann.read_text())["images"]}
    )
    loaded = load_checkpoint_model(checkpoint)
    on_tuned = evaluate_model(loaded, tuned_ann, images, gpus=0, progress=False, workers=0)
    assert first.data.metrics["eval/wholebody_AP"] == metrics_to_percent(on_tuned.metrics)["wholebody/AP"]
    # The held-out check: the parent logs both halves; the defaults on the held-out half are fowkal eval's.
    on_held = evaluate_model(loaded, held_ann, images, gpus=0, progress=False, workers=0)
    metrics = parent.data.metrics
    held_default = metrics["holdout/held_out/defaults/eval/wholebody_AP"]
    assert held_default == metrics_to_percent(on_held.metrics)["wholebody/AP"]
    for key in ("tuned/best", "held_out/best", "tuned/defaults"):
        assert f"holdout/{key}/eval/wholebody_AP" in metrics
    assert metrics["holdout/tuned_images"] == 2.0 and metrics["holdout/held_out_images"] == 2.0
    assert metrics["holdout/tuned/best/eval/wholebody_AP"] == metrics["best/eval/wholebody_AP"]
    summary = (sweep_dir / "summary.md").read_text()
    assert "Gain over the defaults per part" in summary and "| eval/face_AP |" in summary
    assert "Held-out check (--holdout 0.5)" in summary
    assert "Parameter importances" in summary
    importances = [k for k in metrics if k.startswith("importance/")]
    assert importances or "(fewer than two scored trials, or nothing varied)" in summary
    # The report's settings table lists the KAPAO family's settings, the fixed ones too (not the top-down
    # family's): max_poses is in no space, and flip_mode is a top-down setting.
    from orchestrator.reports.records import load_sweep
    from orchestrator.reports.tune_eval_tables import tune_eval_settings_table

    record = load_sweep(client, parent.info.run_id)
    best = max(record.children, key=lambda c: c.metrics.get("eval/wholebody_AP", -1.0))
    _, rows = tune_eval_settings_table(record, best)
    settings = {row[0]: row[1:] for row in rows}
    assert settings["`eval.max_poses`"] == ["20", "20", "same", "fixed"], settings
    assert settings["`eval.tau_cp`"][3] == "sampled" and "`eval.flip_mode`" not in settings
