"""A user's error ends a command with one line, `fowkal <command>: <message>`, and exit status 2; a traceback
only for a bug or with FOWKAL_DEBUG=1 (issue #22, item 5). Errors that Ray brings back wrapped are named the
same way. The commands run in this process through `orchestrator.cli.main`; none of them gets as far as Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator import tracking
from orchestrator.cli import main
from orchestrator.user_errors import report_error
from trainer.config import config_from_dict, config_to_dict
from trainer.datasets.synth import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
TINY_CONFIG = {
    "name": "tiny",
    "model": {"backbone": "hrnet_w18_small"},
    "loss": {"variant": "mse"},
    "data": {"pipeline": {"input_size": [32, 32], "heatmap_size": [8, 8]}, "val_batch_size": 4},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 2-image synthetic set whose second image is not an image, an untrained tiny checkpoint, and an
    MLflow store with one (empty) experiment."""
    from trainer.topdown.model import build_pose_model

    root = tmp_path_factory.mktemp("user_errors")
    ann = write_synthetic_dataset(root / "data", num_images=2, seed=0)
    images = sorted((root / "data" / "images").iterdir())
    images[1].write_bytes(b"this is not an image\n" * 50)
    torch.manual_seed(0)
    model = build_pose_model("hrnet_w18_small", 133, with_kaf=False)
    checkpoint = root / "best.pt"
    state = {"model": model.state_dict(), "epoch": 1, "best_ap": 0.0}
    state["config"] = config_to_dict(config_from_dict(TINY_CONFIG))
    torch.save(state, checkpoint)
    store = f"sqlite:///{root / 'mlflow.db'}"
    tracking.get_or_create_experiment(tracking.make_client(store), "fowkal-train")
    return {
        "root": root,
        "ann": Path(ann),
        "images": root / "data" / "images",
        "bad_image": images[1],
        "checkpoint": checkpoint,
        "store": store,
    }


def _cases(inputs) -> dict[str, tuple[list[str], str, str]]:
    """name -> (command line, its command, what the line must name)."""
    out = inputs["root"] / "out"
    eval_checkpoint = ["eval", "--checkpoint", str(inputs["checkpoint"]), "--gpus", "0", "--no-progress"]
    return {
        "bad config key": (
            ["train", "--config", str(SMOKE), "--set", "los.gamma=1"],
            "train",
            "'los.gamma'",
        ),
        "missing annotation file": (
            [
                *eval_checkpoint,
                "--ann",
                str(inputs["root"] / "nowhere.json"),
                "--images",
                str(inputs["images"]),
            ],
            "eval",
            "nowhere.json",
        ),
        "non-image image file": (
            # one DataLoader worker: its error comes back re-raised with the worker's traceback as its text
            [
                *eval_checkpoint,
                "--workers",
                "1",
                "--ann",
                str(inputs["ann"]),
                "--images",
                str(inputs["images"]),
            ],
            "eval",
            inputs["bad_image"].name,
        ),
        "unknown run name": (
            [
                "eval",
                "--run",
                "no-such-run",
                "--tracking-uri",
                inputs["store"],
                "--ann",
                str(inputs["ann"]),
                "--images",
                str(inputs["images"]),
            ],
            "eval",
            "'no-such-run'",
        ),
        "bad storage URI": (
            [
                "train",
                "--config",
                str(SMOKE),
                "--set",
                f"output_dir={out}",
                "--tracking-uri",
                inputs["store"],
                "--storage-path",
                "nosuch://bucket/prefix",
            ],
            "train",
            "nosuch://bucket/prefix",
        ),
        "missing store to read": (
            ["report", "fowkal-ablate", "--tracking-uri", f"sqlite:///{inputs['root'] / 'none.db'}"],
            "report",
            "none.db",
        ),
    }


CASES = [
    "bad config key",
    "missing annotation file",
    "non-image image file",
    "unknown run name",
    "bad storage URI",
    "missing store to read",
]


@pytest.mark.parametrize("case", CASES)
def test_a_user_error_is_one_line_and_exit_2(case, inputs, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # eval's default results file, if it got that far
    monkeypatch.delenv("FOWKAL_DEBUG", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv, command, named = _cases(inputs)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fowkal {command}: "), err
    assert named in lines[0]
    assert "Traceback" not in err

    monkeypatch.setenv("FOWKAL_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == lines[0]


def test_a_user_error_from_a_ray_worker_is_named(capsys):
    """Ray Train's WorkerGroupError (a worker's exception wrapped with its traceback text) and Ray's
    RayTaskError (a task's, as ``cause``): the line is the worker's own message."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from trainer.datasets.annotations import DatasetError

    original = DatasetError("image file unreadable: /data/x.jpg (image_id=7, ann_id=9)")
    wrapped = UserExceptionWithTraceback(original, "Traceback (most recent call last):\n  ...\nDatasetError")
    failed = WorkerGroupError("worker 0 failed", {0: wrapped})
    assert report_error("train", failed) == 2
    task_error = RayTaskError("train_fn", "Traceback (most recent call last):\n ...", original)
    assert report_error("ablate", task_error) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"fowkal train: {original}",
        f"fowkal ablate: {original}",
    ]


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    import orchestrator.runs.train

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(orchestrator.runs.train, "run_training", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "--config", str(SMOKE)])
    assert "fowkal train" not in capsys.readouterr().err


def test_a_run_checkpoint_download_is_one_line_of_ours(inputs, tmp_path, capfd):
    """`fowkal eval --run` downloads the run's best_checkpoint and config.yaml: one line of ours, none of
    MLflow's "Downloading artifacts" bars (it drew one per download)."""
    from orchestrator.evaluation.run_lookup import download_run_checkpoint

    client = tracking.make_client(inputs["store"])
    experiment = tracking.get_or_create_experiment(client, "fowkal-train")
    run_id = tracking.start_run(client, experiment, "tiny-run")
    tracking.log_config_yaml(run_id, config_to_dict(config_from_dict(TINY_CONFIG)), client=client)
    checkpoint_dir = tmp_path / "ray_checkpoint"
    checkpoint_dir.mkdir()
    (checkpoint_dir / "checkpoint.pt").write_bytes(inputs["checkpoint"].read_bytes())
    tracking.log_artifact_path(run_id, checkpoint_dir, client=client, artifact_path="best_checkpoint")
    capfd.readouterr()
    printed: list[str] = []
    loaded = download_run_checkpoint(
        client, run_id, inputs["store"], tmp_path / "dl", print_fn=printed.append
    )
    assert loaded.epoch == 1
    assert printed == [
        f"downloading best_checkpoint and config.yaml of MLflow run {run_id} from {inputs['store']}"
    ]
    captured = capfd.readouterr()
    assert "Downloading artifacts" not in captured.out + captured.err
