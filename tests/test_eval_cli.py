"""`fowkal eval`: numbers against the trainer's evaluator on the same predictions, MLflow logging, errors.

The model is an untrained ``hrnet_w18_small`` at a 32x32 input (8x8 heatmaps) saved in the training loop's
checkpoint format (``model`` state dict + ``config`` + ``epoch``), so inference over the mini data set's 118
detections takes seconds. Its AP is 0, so the non-trivial AP check scores a results file made here from the
ground truth with noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import ANN, DET, MINI, needs_mini

from orchestrator.cli import main
from trainer.checkpoint import CheckpointMismatchError, EvalError, load_checkpoint_model
from trainer.config import config_from_dict, config_to_dict
from trainer.datasets.keypoints import ANNOTATION_KEYPOINT_FIELDS
from trainer.evaluation.model_eval import select_device

pytestmark = needs_mini

TINY_CONFIG = {
    "name": "tiny",
    "model": {"backbone": "hrnet_w18_small"},
    "loss": {"variant": "mse"},
    "data": {
        "pipeline": {"input_size": [32, 32], "heatmap_size": [8, 8]},
        "loader_workers": 0,
        "val_batch_size": 64,
    },
}


def _tiny_model(seed: int = 0, num_keypoints: int = 133):
    from trainer.topdown.model import build_pose_model

    torch.manual_seed(seed)
    return build_pose_model("hrnet_w18_small", num_keypoints, with_kaf=False)


def _save_checkpoint(path: Path, model, config: dict | None, epoch: int = 3) -> Path:
    """The training loop's checkpoint keys that evaluation reads (``model``, ``config``, ``epoch``)."""
    state = {"model": model.state_dict(), "epoch": epoch, "best_ap": 0.0}
    if config is not None:
        state["config"] = config_to_dict(config_from_dict(config))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return _save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", _tiny_model(), TINY_CONFIG)


def _independent_results(checkpoint: Path, det_file, flip_test: bool, flip_mode: str = "shift") -> list[dict]:
    """The paper's protocol written out here with the trainer's pieces: model, dataset, flip+DARK, NMS."""
    from torch.utils.data import DataLoader

    from trainer.evaluation.wholebody import detections_to_results
    from trainer.topdown.data import WholeBodyTopDownDataset
    from trainer.topdown.inference import predict_keypoints

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = _tiny_model(seed=123)
    model.load_state_dict(state["model"])
    cfg = config_from_dict(state["config"])
    dataset = WholeBodyTopDownDataset(ANN, MINI, config=cfg.data.pipeline, train=False, det_file=det_file)
    loader = DataLoader(dataset, batch_size=16)
    pred = predict_keypoints(model, loader, torch.device("cpu"), flip_test=flip_test, flip_mode=flip_mode)
    return detections_to_results(
        pred["image_ids"], pred["keypoints"], pred["keypoint_scores"], pred["box_scores"], pred["areas"]
    )


def _table_row(text: str, label: str) -> list[float]:
    line = next(line for line in text.splitlines() if line.startswith(label + " "))
    return [float(v) for v in line.split()[-4:]]


def _assert_same_results(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a["image_id"] == e["image_id"]
        assert a["score"] == pytest.approx(e["score"], abs=1e-6)
        for field, _ in ANNOTATION_KEYPOINT_FIELDS:
            np.testing.assert_allclose(a[field], e[field], atol=1e-3)


def test_eval_with_detections_end_to_end(tiny_checkpoint, tmp_path, capsys):
    from trainer.evaluation.wholebody import evaluate_wholebody

    out = tmp_path / "results.json"
    code = main(
        ["eval", "--checkpoint", str(tiny_checkpoint), "--ann", str(ANN), "--images", str(MINI)]
        + ["--det-file", str(DET), "--out", str(out), "--workers", "0", "--batch", "32", "--no-progress"]
    )
    printed = capsys.readouterr().out
    assert code == 0
    written = json.loads(out.read_text())
    expected = _independent_results(tiny_checkpoint, DET, flip_test=True)
    # 118 detections -> OKS-NMS keeps at most 118; every result is in the result format of the images.
    assert 0 < len(expected) <= 118
    image_ids = {image["id"] for image in json.loads(ANN.read_text())["images"]}
    assert {r["image_id"] for r in written} <= image_ids
    assert set(written[0]) == {"image_id", "category_id", "score"} | {
        f for f, _ in ANNOTATION_KEYPOINT_FIELDS
    }
    _assert_same_results(written, expected)
    # The printed table holds evaluate_wholebody's numbers of the same predictions, in percent.
    metrics = evaluate_wholebody(ANN, expected)
    assert "AP/AR in %" in printed
    for label, part in (("whole-body", "wholebody"), ("body", "body"), ("foot", "foot"), ("hand", "hand")):
        values = _table_row(printed, label)
        for value, stat in zip(values, ("AP", "AP50", "AP75", "AR"), strict=True):
            assert value == pytest.approx(100 * max(metrics[f"{part}/{stat}"], 0.0), abs=5e-3)
    assert "118" in printed and "flip test" in printed and "config stored in the checkpoint" in printed


def test_eval_gt_boxes_without_flip(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "gt.json"
    args = ["eval", "--checkpoint", str(tiny_checkpoint), "--ann", str(ANN), "--images", str(MINI)]
    assert main(args + ["--out", str(out), "--workers", "0", "--no-flip", "--no-progress"]) == 0
    written = json.loads(out.read_text())
    _assert_same_results(written, _independent_results(tiny_checkpoint, None, flip_test=False))
    # Without --no-flip the predictions change (the flip test averages two different forward passes).
    flipped = _independent_results(tiny_checkpoint, None, flip_test=True)
    assert not np.allclose(written[0]["keypoints"], flipped[0]["keypoints"], atol=1e-3)
    annotations = json.loads(ANN.read_text())["annotations"]
    assert len(written) <= len(annotations) == 14
    assert "ground-truth boxes" in capsys.readouterr().out


def _noisy_gt_results(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    results = []
    for ann in json.loads(ANN.read_text())["annotations"]:
        result = {"image_id": ann["image_id"], "category_id": 1, "score": float(rng.uniform(0.5, 1.0))}
        for field, count in ANNOTATION_KEYPOINT_FIELDS:
            values = np.asarray(ann[field], dtype=np.float64).reshape(count, 3)
            values[:, :2] += rng.normal(0.0, 2.0, size=(count, 2))
            values[:, 2] = 1.0
            result[field] = values.reshape(-1).tolist()
        results.append(result)
    return results


def test_eval_results_file_numbers_equal_evaluate_wholebody(tmp_path, capsys):
    from trainer.evaluation.wholebody import evaluate_wholebody

    results = _noisy_gt_results()
    path = tmp_path / "noisy.json"
    path.write_text(json.dumps(results))
    assert main(["eval", "--results", str(path), "--ann", str(ANN)]) == 0
    printed = capsys.readouterr().out
    expected = evaluate_wholebody(ANN, results)
    assert expected["wholebody/AP"] > 0.1  # a non-trivial number to compare
    for label, part in (("whole-body", "wholebody"), ("body", "body"), ("face", "face"), ("hand", "hand")):
        ap, ap50, ap75, ar = _table_row(printed, label)
        assert ap == pytest.approx(100 * max(expected[f"{part}/AP"], 0), abs=5e-3)  # percent, 2 decimals
        assert ar == pytest.approx(100 * max(expected[f"{part}/AR"], 0), abs=5e-3)


def test_results_file_with_unknown_image_ids_is_named(tmp_path, capsys):
    results = _noisy_gt_results()
    results[0]["image_id"] = 987654321
    path = tmp_path / "bad_ids.json"
    path.write_text(json.dumps(results))
    assert main(["eval", "--results", str(path), "--ann", str(ANN)]) == 2
    err = capsys.readouterr().err
    assert "987654321" in err and str(path) in err and "not in" in err


def test_missing_image_directory_and_checkpoint_are_named(tiny_checkpoint, tmp_path, capsys):
    missing_dir = tmp_path / "no_images_here"
    args = ["eval", "--checkpoint", str(tiny_checkpoint), "--ann", str(ANN), "--images", str(missing_dir)]
    assert main(args + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(missing_dir) in err and "--images" in err and "does not exist" in err

    missing_ckpt = tmp_path / "nope.pt"
    args = ["eval", "--checkpoint", str(missing_ckpt), "--ann", str(ANN), "--images", str(MINI)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(missing_ckpt) in err and "does not exist" in err


def test_checkpoint_of_another_architecture_or_keypoint_count(tmp_path, capsys):
    # hrnet_w18_small weights with a config that says hrnet_w32: shapes differ from the first stem conv on.
    other_arch = _save_checkpoint(
        tmp_path / "arch.pt", _tiny_model(), {**TINY_CONFIG, "model": {"backbone": "hrnet_w32"}}
    )
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint_model(other_arch)
    message = str(info.value)
    assert str(other_arch) in message and "hrnet_w32" in message and "shape mismatches" in message
    assert "checkpoint (" in message and "vs model (" in message

    # A 17-keypoint model's head: the message names the head and both shapes.
    seventeen = _save_checkpoint(tmp_path / "k17.pt", _tiny_model(num_keypoints=17), TINY_CONFIG)
    args = ["eval", "--checkpoint", str(seventeen), "--ann", str(ANN), "--images", str(MINI)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(seventeen) in err and "heatmap_head.weight: checkpoint (17, " in err and "model (133, " in err


def test_config_from_yaml_beside_a_checkpoint_without_config(tmp_path):
    import yaml

    checkpoint = _save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", _tiny_model(), None)
    with pytest.raises(EvalError, match="holds no config"):
        load_checkpoint_model(checkpoint)
    config_file = tmp_path / "run" / "config.yaml"  # <output_dir>/config.yaml, the parent of checkpoints/
    config_file.write_text(yaml.safe_dump(TINY_CONFIG))
    loaded = load_checkpoint_model(checkpoint)
    assert str(config_file) in loaded.config_source
    assert loaded.config.data.pipeline.input_size == (32, 32)
    assert loaded.epoch == 3
    # A plain run's checkpoints directory: best.pt is taken.
    assert load_checkpoint_model(checkpoint.parent).checkpoint_path == checkpoint


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpus_without_cuda_is_an_error():
    assert select_device(0)[0].type == "cpu"
    with pytest.raises(EvalError, match="--gpus 2"):
        select_device(2)


# ---------------------------------------------------------------------------------------------- MLflow


def _mlflow_run(tmp_path: Path, checkpoint_state_config: bool, with_checkpoint: bool = True):
    """A run with ``config.yaml`` and ``best_checkpoint/checkpoint.pt`` (as orchestrator/runs/train.py
    logs)."""
    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.make_client(uri)
    experiment = tracking.get_or_create_experiment(client, "eval-test")
    run_id = tracking.start_run(client, experiment, "tiny-run")
    tracking.log_config_yaml(run_id, config_to_dict(config_from_dict(TINY_CONFIG)), client=client)
    if with_checkpoint:
        ray_checkpoint_dir = tmp_path / "ray_ckpt"
        _save_checkpoint(
            ray_checkpoint_dir / "checkpoint.pt",
            _tiny_model(),
            TINY_CONFIG if checkpoint_state_config else None,
            epoch=7,
        )
        tracking.log_artifact_path(run_id, ray_checkpoint_dir, client=client, artifact_path="best_checkpoint")
    tracking.end_run(run_id, "FINISHED", client=client)
    return uri, client, run_id


def test_eval_run_logs_metrics_and_results_to_mlflow(tmp_path, capsys):
    from trainer.evaluation.wholebody import evaluate_wholebody

    uri, client, run_id = _mlflow_run(tmp_path, checkpoint_state_config=False)
    out = tmp_path / "run_results.json"
    args = ["eval", "--run", run_id, "--tracking-uri", uri, "--ann", str(ANN), "--images", str(MINI)]
    assert main(args + ["--out", str(out), "--workers", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"artifact config.yaml of MLflow run {run_id}" in printed  # the checkpoint had no config

    written = json.loads(out.read_text())
    expected = evaluate_wholebody(ANN, written)
    run = client.get_run(run_id)
    for key in ("wholebody/AP", "wholebody/AR", "body/AP", "foot/AP", "face/AP", "hand/AP", "lefthand/AP50"):
        name = "eval/" + key.replace("/", "_")
        assert run.data.metrics[name] == pytest.approx(100 * expected[key])  # percent
    history = client.get_metric_history(run_id, "eval/wholebody_AP")
    assert [m.step for m in history] == [7]  # the checkpoint's epoch
    artifacts = [a.path for a in client.list_artifacts(run_id, "eval")]
    assert artifacts == [f"eval/{out.name}"]
    downloaded = client.download_artifacts(run_id, f"eval/{out.name}", str(tmp_path / "dl"))
    assert json.loads(Path(downloaded).read_text()) == written
    assert run.data.tags["eval.boxes"] == "ground-truth boxes"


def test_eval_run_errors_name_the_run(tmp_path, capsys, monkeypatch):
    uri, _, run_id = _mlflow_run(tmp_path, checkpoint_state_config=True, with_checkpoint=False)
    base = ["eval", "--ann", str(ANN), "--images", str(MINI), "--tracking-uri", uri]
    assert main(base + ["--run", "0123456789abcdef0123456789abcdef"]) == 2
    err = capsys.readouterr().err
    assert "0123456789abcdef0123456789abcdef" in err and "not found" in err and uri in err
    assert main(base + ["--run", run_id]) == 2
    err = capsys.readouterr().err
    assert run_id in err and "best_checkpoint" in err and "config.yaml" in err
    # No URI anywhere and no embedded-default store in the current directory: the error says what to pass.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--ann", str(ANN), "--images", str(MINI), "--run", run_id]) == 2
    err = capsys.readouterr().err
    assert "--tracking-uri" in err and "runs/smoke/mlflow.db" in err


def test_runs_are_found_by_id_name_experiment_or_sweep(tmp_path):
    from orchestrator import tracking
    from orchestrator.evaluation.eval_command import get_run

    uri = f"sqlite:///{tmp_path / 'names.db'}"
    client = tracking.make_client(uri)
    ids = {}
    for experiment, sweep in (("fowkal-ablate", "demo-1"), ("fowkal-ablate", "demo-2"), ("other", "x")):
        experiment_id = tracking.get_or_create_experiment(client, experiment)
        tags = tracking.build_run_tags(sweep_id=sweep)
        ids[sweep] = tracking.start_run(client, experiment_id, "a-mse-s0", tags=tags)
    tracking.start_run(client, tracking.get_or_create_experiment(client, "other"), "f-fowkal-s0")

    assert get_run(client, ids["demo-1"], uri).info.run_id == ids["demo-1"]
    assert get_run(client, "f-fowkal-s0", uri).info.run_name == "f-fowkal-s0"
    assert get_run(client, "a-mse-s0", uri, experiment="other").info.run_id == ids["x"]
    assert get_run(client, "demo-2/a-mse-s0", uri).info.run_id == ids["demo-2"]
    with pytest.raises(EvalError, match="matches 3 runs") as info:
        get_run(client, "a-mse-s0", uri)
    assert all(run_id in str(info.value) for run_id in ids.values())
    with pytest.raises(EvalError, match="neither a run id"):
        get_run(client, "z-none-s0", uri)
    with pytest.raises(EvalError, match="no such MLflow experiment"):
        get_run(client, "a-mse-s0", uri, experiment="nope")


def test_eval_flip_mode_exact_is_the_codecs_exact_flip(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "exact.json"
    argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--ann", str(ANN), "--images", str(MINI)]
    argv += ["--out", str(out), "--workers", "0", "--no-progress", "--flip-mode", "exact"]
    assert main(argv) == 0
    written = json.loads(out.read_text())
    _assert_same_results(written, _independent_results(tiny_checkpoint, None, True, flip_mode="exact"))
    shifted = _independent_results(tiny_checkpoint, None, True, flip_mode="shift")
    moved = [
        abs(a - b)
        for r, e in zip(written, shifted, strict=True)
        for a, b in zip(r["keypoints"], e["keypoints"], strict=True)
    ]
    assert max(moved) > 1e-3  # the mode reached the decoder: not the default shift
    with pytest.raises(SystemExit):
        main([*argv[:-1], "diagonal"])  # argparse names the allowed choices
    assert "invalid choice: 'diagonal'" in capsys.readouterr().err
