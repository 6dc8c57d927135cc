"""Bad inputs fail before Ray or MLflow start and leave nothing behind; sweeps exit with what happened."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from shared_data import MINI, needs_mini

from orchestrator import tracking
from orchestrator.cli import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
ARMS = REPO / "search_spaces" / "ablation_paper.yaml"


@pytest.fixture
def no_ray_no_mlflow(monkeypatch):
    """Fail the test if Ray or an MLflow client were started."""
    import ray

    import orchestrator.runs.ray_utils

    def refuse(*args, **kwargs):
        raise AssertionError("started although the inputs are invalid")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(orchestrator.runs.ray_utils, "init_ray", refuse)
    monkeypatch.setattr(tracking, "make_client", refuse)


def _real_data_sets(tmp_path: Path, ann_file: Path) -> list[str]:
    sets = {
        "output_dir": str(tmp_path / "out"),
        "data.kind": "coco_wholebody",
        "data.cache_dir": str(tmp_path / "cache"),
        "data.train_ann_file": str(ann_file),
        "data.train_image_root": str(MINI),
        "data.val_ann_file": str(MINI / "test_coco_wholebody.json"),
        "data.val_image_root": str(MINI),
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


@needs_mini
def test_missing_annotation_file_fails_fast_naming_key_and_file(tmp_path, capsys, no_ray_no_mlflow):
    missing = tmp_path / "nowhere" / "train.json"
    code = main(["train", "--config", str(SMOKE), *_real_data_sets(tmp_path, missing)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "data.train_ann_file" in err and str(missing) in err
    assert not (tmp_path / "out").exists()  # no mlflow.db, ray_results, checkpoints


@needs_mini
def test_malformed_annotation_names_file_annotation_and_field(tmp_path, capsys, no_ray_no_mlflow):
    data = json.loads((MINI / "test_coco_wholebody.json").read_text())
    bad = data["annotations"][1]
    bad["face_kpts"] = [1.0] * 180  # 60 points instead of 68
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    for command in (["train"], ["ablate", "--arms", str(ARMS)]):
        code = main([*command, "--config", str(SMOKE), *_real_data_sets(tmp_path, broken)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert str(broken) in err and "face_kpts" in err and str(bad["id"]) in err, err
        assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npy"))


def test_missing_pretrained_weights_fail_before_any_start(tmp_path, capsys, no_ray_no_mlflow):
    sets = ["--set", f"output_dir={tmp_path / 'out'}", "--set", f"model.pretrained_path={tmp_path / 'w.pth'}"]
    assert main(["train", "--config", str(SMOKE), *sets]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained_path" in err and "w.pth" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# Sweep outcomes -> exit codes (the Tune run itself replaced: what matters is what the engine makes of it)


def _fake_fit(statuses: dict[str, str]):
    def fit(plan, settings, status_callback, seed_values, callbacks, print_fn):
        return 1, dict(statuses)

    return fit


@pytest.mark.parametrize(
    ("statuses", "code", "parent_status"),
    [
        ({"t1": "ERROR", "t2": "ERROR"}, 1, "FAILED"),
        ({"t1": "TERMINATED", "t2": "RUNNING"}, 130, "KILLED"),
        ({"t1": "TERMINATED", "t2": "ERROR"}, 0, "FINISHED"),
    ],
)
def test_sweep_exit_code_and_parent_status(tmp_path, monkeypatch, capsys, statuses, code, parent_status):
    from orchestrator.sweeps import sweep

    monkeypatch.setattr(sweep, "_fit", _fake_fit(statuses))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    arms = tmp_path / "arms.yaml"
    arms.write_text(
        "arms:\n"
        "  - {key: a, name: mse, label: (a) MSE, table: '2', overrides: {loss.variant: mse},"
        " paper: {wholebody_AP: 58.2}}\n"
    )
    synth = tmp_path / "synth"
    sets = ["--set", f"output_dir={tmp_path / 'out'}", "--set", f"data.synthetic_dir={synth}"]
    argv = ["ablate", "--config", str(SMOKE), "--arms", str(arms), "--tracking-uri", uri, "--quiet", *sets]
    assert main([*argv, "--name", "outcome"]) == code
    captured = capsys.readouterr()
    client = tracking.make_client(uri)
    experiment = client.get_experiment_by_name("fowkal-ablate")
    (parent,) = client.search_runs([experiment.experiment_id])
    assert parent.info.status == parent_status
    failed = sum(s == "ERROR" for s in statuses.values())
    if failed:
        assert parent.data.tags[tracking.TAG_FAILED_TRIALS] == f"{failed} of {len(statuses)}"
        assert f"{failed} of {len(statuses)} trial(s) failed" in captured.out
    if code == 1:
        assert "all 2 trial(s) failed" in parent.data.tags[tracking.TAG_ERROR]
    if code == 130:
        assert "--resume" in captured.err
    shutil.rmtree(synth, ignore_errors=True)
