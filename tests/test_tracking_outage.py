"""`fowkal train` against a real `mlflow server` that dies mid-training and is still down at the end.

The server (SQLite backend, artifacts proxied to a local directory) is killed with SIGKILL by a Ray Train
callback once epoch 1 is reported, so epoch 2's values can only be spooled, and training ends with the
server down: run_training must raise TrackingIncomplete naming the server and what is pending. With the
server back, the same call completes the record (every epoch once, the outputs, FINISHED, the replayed
count) without starting Ray Train again. 1 worker, 2 epochs of 8 synthetic images.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator import tracking

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
MLFLOW = Path(sys.executable).parent / "mlflow"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MLFLOW.is_file(), reason=f"no mlflow command at {MLFLOW}"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 in its own process group (its workers die with it)."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        log = open(self.root / "server.log", "ab")
        self.process = subprocess.Popen(
            [
                str(MLFLOW),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                (self.root / "artifacts").as_uri(),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server not up after {timeout_s} s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    instance = MlflowServer(root, _free_port())
    instance.start()
    yield instance
    instance.kill()


def test_outage_mid_training_and_at_the_end_loses_nothing(server, tmp_path, monkeypatch):
    from ray.train import UserCallback

    import orchestrator.runs.train as train
    from orchestrator.runs.metric_spool import TAG_REPLAYED_VALUES, MetricSpool, spool_path
    from orchestrator.runs.ray_utils import init_ray, shutdown_ray
    from trainer.config import load_config

    # MLflow's client gives up at once when the server is gone (the default retries for minutes); the
    # Ray processes started below inherit it.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setattr(train, "FINISH_WAIT_S", 2.0)

    class KillServerAfterEpoch(UserCallback):  # pickled by value into the Ray Train controller
        def __init__(self, epoch: int, pgid: int):
            self.epoch, self.pgid = epoch, pgid

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("epoch") == self.epoch:
                os.killpg(self.pgid, signal.SIGKILL)

    epochs = 2
    cfg = load_config(
        SMOKE,
        [
            f"output_dir={tmp_path / 'out'}",
            f"data.synthetic_dir={tmp_path / 'synthetic'}",
            f"epochs={epochs}",
            f"eval_interval={epochs}",
            "num_workers=1",
            "batch_size=4",
            "data.synthetic_train_images=8",
            "data.synthetic_val_images=2",
            "data.loader_workers=0",
            "data.pipeline.input_size=[64,64]",
            "data.pipeline.heatmap_size=[16,16]",
        ],
    )
    storage = str(tmp_path / "ray_results")
    lines: list[str] = []
    init_ray(num_cpus=4)
    try:
        with pytest.raises(
            train.TrackingIncomplete, match=r"127\.0\.0\.1.*pending: [1-9]\d* metric value"
        ) as err:
            train.run_training(
                cfg,
                tracking_uri=server.uri,
                storage_path=storage,
                callbacks=[KillServerAfterEpoch(1, server.process.pid)],
                print_fn=lines.append,
            )
    finally:
        shutdown_ray()
    run_id = err.value.run_id
    assert any(server.uri in line and "same command" in line for line in lines)
    spool = MetricSpool(spool_path(cfg.output_dir, run_id))
    assert 2 in {record.step for record in spool.pending()}  # epoch 2 never reached the dead server

    server.start()  # back, same store
    client = tracking.make_client(server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert {m.step for m in client.get_metric_history(run_id, "train/loss")} <= {1}

    def no_training(*args, **kwargs):
        raise AssertionError("the record was completed by training again")

    monkeypatch.setattr("orchestrator.runs.ray_utils.init_ray", no_training)
    monkeypatch.setattr(train, "build_torch_trainer", no_training)
    outcome = train.run_training(cfg, tracking_uri=server.uri, storage_path=storage, print_fn=lines.append)

    assert outcome.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "epoch" not in run.data.metrics  # the epoch is the step
    for key in ("train/loss", "time/epoch_s", "train/loss_body"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2], key
    assert [m.step for m in client.get_metric_history(run_id, "val/wholebody_AP")] == [2]
    epoch_two = next(r for r in MetricSpool(spool.path)._lines() if r.get("step") == 2)
    assert int(run.data.tags[TAG_REPLAYED_VALUES]) >= len(epoch_two["values"])
    names = {f.path for f in client.list_artifacts(run_id)}
    assert {tracking.CONFIG_ARTIFACT, tracking.BEST_CHECKPOINT_ARTIFACT, tracking.KAF_PLOT_ARTIFACT} <= names
    assert not train.finish_marker(spool).exists()
