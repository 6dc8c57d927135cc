"""MLflow helpers: URI precedence, real end statuses, params/metrics/artifacts, resume key, the KAF plot."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from orchestrator import tracking
from trainer.topdown.kaf_plot import plot_kaf_history


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating the schema takes seconds), and an experiment in it."""
    out = tmp_path_factory.mktemp("mlflow_store")
    uri = tracking.resolve_tracking_uri(f"sqlite:///{out / 'mlflow.db'}", out)
    client = tracking.make_client(uri)
    experiment_id = tracking.get_or_create_experiment(client, "test-tracking")
    return uri, client, experiment_id


def _fresh_client(uri):
    # Read back through a new client so nothing cached in the writer can make a test pass.
    return tracking.make_client(uri)


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri("sqlite:////x/cli.db", tmp_path) == "sqlite:////x/cli.db"
    assert tracking.resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    relative = Path("rel_out_dir")
    monkeypatch.chdir(tmp_path)
    uri = tracking.resolve_tracking_uri(None, relative)
    expected_db = (tmp_path / "rel_out_dir" / "mlflow.db").resolve()
    assert uri == f"sqlite:///{expected_db}"
    assert expected_db.parent.is_dir()
    assert tracking.sqlite_path(uri) == expected_db
    # The artifact root sits beside the database, not in the current directory.
    assert tracking.default_artifact_location(uri) == (expected_db.parent / "mlartifacts").as_uri()
    assert tracking.default_artifact_location("http://127.0.0.1:5000") is None


def test_resolve_tracking_uri_empty_output_dir_is_an_error(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="output_dir"):
        tracking.resolve_tracking_uri(None, "")


@pytest.mark.parametrize("status", ["FINISHED", "FAILED", "KILLED"])
def test_end_run_sets_the_real_status(store, status):
    uri, client, experiment_id = store
    run_id = tracking.start_run(client, experiment_id, f"status-{status.lower()}")
    assert _fresh_client(uri).get_run(run_id).info.status == "RUNNING"
    error = RuntimeError("loss became NaN at epoch 3") if status == "FAILED" else None
    tracking.end_run(run_id, status, client=client, error=error)
    run = _fresh_client(uri).get_run(run_id)
    assert run.info.status == status
    assert run.info.end_time is not None
    if status == "FAILED":
        assert "loss became NaN at epoch 3" in run.data.tags[tracking.TAG_ERROR]
        names = {f.path for f in client.list_artifacts(run_id)}
        assert "error.txt" in names


def test_error_tag_carries_the_exception_type_and_message(store):
    uri, client, experiment_id = store
    run_id = tracking.start_run(client, experiment_id, "error-tag")
    try:
        try:
            raise FloatingPointError("non-finite training loss nan at epoch 1, iteration 2/13")
        except FloatingPointError as inner:
            raise RuntimeError("Training failed") from inner
    except RuntimeError as err:
        tracking.end_run(run_id, "FAILED", client=client, error=err)
    tag = _fresh_client(uri).get_run(run_id).data.tags[tracking.TAG_ERROR]
    assert tag == "FloatingPointError: non-finite training loss nan at epoch 1, iteration 2/13"
    # A traceback handed over as text (Ray's way) is summarised by its exception line, not "Traceback".
    text = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\nValueError: bad box\n'
    assert tracking.error_summary(text) == "ValueError: bad box"
    assert tracking.error_summary("trial failed (reconciled)") == "trial failed (reconciled)"

    class WorkerGroupError(RuntimeError):  # Ray Train's: a generic first line, the workers' errors inside
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors:\n[Rank 0 Error Snippet]: ...")
            self.worker_failures = failures

    failures = {0: ValueError("the training set has 481 samples, fewer than batch_size (1000)")}
    summary = tracking.error_summary(WorkerGroupError(failures))
    assert summary == "ValueError: the training set has 481 samples, fewer than batch_size (1000)"
    quoted = RuntimeError("Training failed:\n  File 'x.py'\nFloatingPointError: non-finite training loss nan")
    assert tracking.error_summary(quoted) == "FloatingPointError: non-finite training loss nan"


def test_end_run_rejects_unknown_status(store):
    _, client, experiment_id = store
    run_id = tracking.start_run(client, experiment_id, "bad-status")
    with pytest.raises(ValueError, match="DONE"):
        tracking.end_run(run_id, "DONE", client=client)
    tracking.end_run(run_id, "KILLED", client=client)


def test_params_tags_and_epoch_metrics_are_logged(store):
    uri, client, experiment_id = store
    params = {"model.backbone": "hrnet_w18_small", "optim.lr": 0.001, "data.input_size": [192, 256]}
    tags = tracking.build_run_tags(
        loss_variant="fowkal", dataset_kind="synthetic", commit="abc123", seed=None
    )
    assert tracking.TAG_SEED not in tags  # None values are left out
    run_id = tracking.start_run(client, experiment_id, "params-run", params=params, tags=tags)
    logged = tracking.log_epoch_metrics(
        run_id,
        {"train/loss": 0.5, "val/wholebody_AP": np.float32(0.25), "epoch": 1, "note": "text", "flag": True},
        step=1,
        client=client,
    )
    assert set(logged) == {"train/loss", "val/wholebody_AP"}  # the epoch is the step, not a metric
    tracking.log_epoch_metrics(run_id, {"train/loss": 0.25}, step=2, client=client)
    tracking.end_run(run_id, "FINISHED", client=client)

    reader = _fresh_client(uri)
    run = reader.get_run(run_id)
    assert run.info.run_name == "params-run"
    assert run.data.params == {
        "model.backbone": "hrnet_w18_small",
        "optim.lr": "0.001",
        "data.input_size": "[192, 256]",
    }
    assert run.data.tags[tracking.TAG_LOSS_VARIANT] == "fowkal"
    assert run.data.tags[tracking.TAG_DATASET] == "synthetic"
    assert run.data.tags[tracking.TAG_GIT_COMMIT] == "abc123"
    history = reader.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.25)]
    assert "epoch" not in run.data.metrics and tracking.last_epoch(reader, run_id) == 2
    assert reader.get_metric_history(run_id, "val/wholebody_AP")[0].value == pytest.approx(0.25)


def test_log_epoch_metrics_rejects_a_bad_step(store):
    _, client, experiment_id = store
    run_id = tracking.start_run(client, experiment_id, "bad-step")
    with pytest.raises(ValueError, match="step"):
        tracking.log_epoch_metrics(run_id, {"train/loss": 1.0}, step=-1, client=client)
    tracking.end_run(run_id, "KILLED", client=client)


def test_parent_and_child_runs_open_at_once(store):
    uri, client, experiment_id = store
    sweep_tags = tracking.build_run_tags(sweep_id="s1")
    parent = tracking.start_run(client, experiment_id, "sweep-parent", tags=sweep_tags)
    children = [
        tracking.start_run(
            client,
            experiment_id,
            f"tpe-{i:03d}",
            tags=tracking.build_run_tags(parent_run_id=parent, sweep_id="s1", arm="fowkal", seed=i),
        )
        for i in range(2)
    ]
    tracking.end_run(children[0], "KILLED", client=client)  # e.g. stopped by ASHA
    tracking.end_run(children[1], "FINISHED", client=client)
    tracking.end_run(parent, "FINISHED", client=client)
    reader = _fresh_client(uri)
    for i, child in enumerate(children):
        run = reader.get_run(child)
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["seed"] == str(i)
    assert [reader.get_run(c).info.status for c in children] == ["KILLED", "FINISHED"]


def test_resume_key_reopens_the_same_run(store):
    uri, client, experiment_id = store
    first = tracking.start_run(client, experiment_id, "resumable", params={"a": 1}, resume_key="key-1")
    tracking.log_epoch_metrics(first, {"epoch": 1}, step=1, client=client)
    tracking.end_run(first, "KILLED", client=client)
    second = tracking.start_run(client, experiment_id, "resumable", params={"a": 1}, resume_key="key-1")
    assert second == first
    assert _fresh_client(uri).get_run(first).info.status == "RUNNING"
    other = tracking.start_run(client, experiment_id, "resumable", resume_key="key-2")
    assert other != first
    tracking.end_run(first, "FINISHED", client=client)
    tracking.end_run(other, "FINISHED", client=client)
    assert _fresh_client(uri).get_run(first).info.status == "FINISHED"


def test_config_yaml_and_directory_artifacts(store, tmp_path):
    import yaml

    uri, client, experiment_id = store
    run_id = tracking.start_run(client, experiment_id, "artifacts")
    config = {"model": {"backbone": "hrnet_w32"}, "loss": {"variant": "fowkal", "tau": 0.5}}
    tracking.log_config_yaml(run_id, config, client=client)
    ckpt = tmp_path / "checkpoint_000003"
    ckpt.mkdir()
    (ckpt / "state.pt").write_bytes(b"\x00\x01\x02")
    tracking.log_artifact_path(run_id, ckpt, client=client, artifact_path="best_checkpoint")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        tracking.log_artifact_path(run_id, tmp_path / "missing_dir", client=client)
    tracking.end_run(run_id, "FINISHED", client=client)

    reader = _fresh_client(uri)
    downloaded = Path(reader.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl")))
    assert yaml.safe_load(downloaded.read_text()) == config
    assert [f.path for f in reader.list_artifacts(run_id, "best_checkpoint")] == ["best_checkpoint/state.pt"]
    # Artifacts of a SQLite store live beside the database, not in the current directory.
    artifact_uri = reader.get_run(run_id).info.artifact_uri
    assert artifact_uri.startswith(tracking.default_artifact_location(uri))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_kaf_history_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    history = rng.uniform(0.0, 1.0, size=(5, 133))
    out = plot_kaf_history(history, tmp_path / "plots" / "kaf.png")
    assert out == tmp_path / "plots" / "kaf.png"
    width, height = _png_size(out)
    assert width > 400 and height > 400
    # A single epoch (1-D input) is accepted too.
    one = plot_kaf_history(history[0], tmp_path / "kaf1.png")
    assert one.stat().st_size > 0


def test_plot_kaf_history_rejects_a_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match=r"\[num_epochs, 133\]"):
        plot_kaf_history(np.zeros((4, 17)), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="epochs"):
        plot_kaf_history(np.zeros((4, 133)), tmp_path / "bad.png", epochs=[1, 2])


def test_store_to_read_precedence_and_embedded_default(tmp_path, monkeypatch):
    """report, eval --run, show --run: flag, MLFLOW_TRACKING_URI, then runs/smoke/mlflow.db if present."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_store_to_read("http://127.0.0.1:6000") == "http://127.0.0.1:6000"
    assert tracking.resolve_store_to_read(None) == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(FileNotFoundError, match=r"runs/smoke/mlflow\.db.*--tracking-uri"):
        tracking.resolve_store_to_read(None)
    missing = tmp_path / "elsewhere.db"
    with pytest.raises(FileNotFoundError, match="elsewhere.db"):
        tracking.resolve_store_to_read(f"sqlite:///{missing}")
    assert not missing.exists()  # reading never creates a store
    (tmp_path / "runs" / "smoke").mkdir(parents=True)
    (tmp_path / "runs" / "smoke" / "mlflow.db").write_bytes(b"")
    assert tracking.resolve_store_to_read("") == tracking.EMBEDDED_DEFAULT_STORE
