"""Cluster reality on this machine: an S3 server (moto) shared by two Ray nodes, and a PostgreSQL-backed
`mlflow server` whose artifacts live in that S3.

- A two-arm ablation against `mlflow server` (PostgreSQL backend store, ``--artifacts-destination
  s3://...``): parent and children FINISHED, one value per epoch, the artifacts as objects in the bucket.
- `fowkal train --storage-path s3://bucket/prefix` with two workers on two Ray nodes
  (``ray.cluster_utils.Cluster``, one CPU each, so the workers must land on different nodes), interrupted
  after epoch 1 and re-run: it resumes from its checkpoint in S3, every epoch once in MLflow.

Sizes: 2 epochs (3 for the resume) of 8 synthetic 64x64 images, batch 4.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import ray
from services import MlflowServer, MotoS3, Postgres, free_port

from orchestrator import tracking

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
BUCKET = "fowkal"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MotoS3.available() is not None, reason=str(MotoS3.available())),
]


def _tiny(tmp: Path, **values) -> list[str]:
    base = {
        "output_dir": str(tmp / "out"),
        "data.synthetic_dir": str(tmp / "synthetic"),
        "epochs": 2,
        "eval_interval": 2,
        "num_workers": 1,
        "batch_size": 4,
        "data.synthetic_train_images": 8,
        "data.synthetic_val_images": 2,
        "data.loader_workers": 0,
        "data.pipeline.input_size": "[64,64]",
        "data.pipeline.heatmap_size": "[16,16]",
    }
    base.update(values)
    return [f"{key}={value}" for key, value in base.items()]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    server.start()
    server.create_bucket(BUCKET)
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)  # before any Ray node starts: its processes inherit it
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.mark.skipif(Postgres.available() is not None, reason=str(Postgres.available()))
def test_ablation_against_a_postgresql_mlflow_server_with_artifacts_in_s3(s3, tmp_path):
    from orchestrator.sweeps.sweep import run_sweep
    from trainer.config import load_config

    postgres = Postgres()
    postgres.start()
    server = MlflowServer(tmp_path, postgres.uri, f"s3://{BUCKET}/mlartifacts", env=s3.env)
    try:
        server.start()
        arms = tmp_path / "arms.yaml"
        arms.write_text(
            "arms:\n"
            "  - {key: a, name: mse, label: (a) MSE, table: '2', overrides: {loss.variant: mse},\n"
            "     paper: {wholebody_AP: 58.2}}\n"
            "  - {key: f, name: fowkal, label: (f) FoWKAL, table: '2', overrides: {loss.variant: fowkal},\n"
            "     paper: {wholebody_AP: 61.6}}\n"
        )
        config = load_config(SMOKE, _tiny(tmp_path))
        outcome = run_sweep(
            "ablate",
            config,
            arms_path=str(arms),
            seeds=1,
            tracking_uri=server.uri,
            verbose=0,
            print_fn=lambda _: None,
        )
        client = tracking.make_client(server.uri)
        parent = client.get_run(outcome.parent_run_id)
        assert parent.info.status == "FINISHED"
        children = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{tracking.TAG_PARENT_RUN_ID}` = '{outcome.parent_run_id}'",
        )
        assert len(children) == 2
        keys = s3.keys(BUCKET, "mlartifacts/")
        for child in children:
            run_id = child.info.run_id
            assert child.info.status == "FINISHED"
            for metric in ("train/loss", "time/epoch_s"):
                assert sorted(m.step for m in client.get_metric_history(run_id, metric)) == [1, 2]
            assert [m.step for m in client.get_metric_history(run_id, "val/wholebody_AP")] == [2]
            names = {a.path for a in client.list_artifacts(run_id)}
            assert {tracking.CONFIG_ARTIFACT, tracking.BEST_CHECKPOINT_ARTIFACT} <= names
            # The artifacts are objects in the bucket, under the run's id.
            assert any(run_id in key and key.endswith("/config.yaml") for key in keys)
            assert any(run_id in key and key.endswith("checkpoint.pt") for key in keys)
        assert any(outcome.parent_run_id in key for key in keys)
    finally:
        server.stop()
        postgres.stop()


def test_two_workers_on_two_nodes_with_s3_storage_resume_from_s3(s3, tmp_path):
    from ray.cluster_utils import Cluster
    from ray.train import UserCallback

    from orchestrator.runs.ray_utils import init_ray, shutdown_ray
    from orchestrator.runs.train import TrainingInterrupted, run_training
    from trainer.config import load_config

    class InterruptAfterEpoch(UserCallback):  # pickled by value into the Ray Train controller
        def __init__(self, epoch: int, pid: int, nodes_file: str):
            self.epoch, self.pid, self.nodes_file = epoch, pid, nodes_file

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("epoch") == self.epoch:
                # Where the live workers run, asked from inside this cluster (the controller's own session;
                # the test process may still hold an earlier session's state-API address).
                from ray.util.state import list_actors

                alive = list_actors(
                    filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], limit=100
                )
                Path(self.nodes_file).write_text("\n".join(sorted({a.node_id for a in alive})))
                os.kill(self.pid, signal.SIGINT)

    epochs = 3
    cfg = load_config(SMOKE, _tiny(tmp_path, epochs=epochs, eval_interval=epochs, num_workers=2))
    storage = f"s3://{BUCKET}/ray"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    quiet = {"print_fn": lambda *_: None}
    shutdown_ray()  # an earlier test's local Ray (and its loopback-only mode) must not be what we join
    # One CPU per node and one per worker: the two workers cannot share a node. The dashboard serves the
    # state API that tells where they ran.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
        },
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        init_ray(address=cluster.address)
        with pytest.raises(TrainingInterrupted) as interrupted:
            run_training(
                cfg,
                tracking_uri=uri,
                storage_path=storage,
                callbacks=[InterruptAfterEpoch(1, os.getpid(), str(tmp_path / "worker_nodes.txt"))],
                **quiet,
            )
        run_id = interrupted.value.run_id
        client = tracking.make_client(uri)
        stopped_at = tracking_last_step(client, run_id)
        assert 1 <= stopped_at < epochs, "nothing left to resume"
        outcome = run_training(cfg, tracking_uri=uri, storage_path=storage, **quiet)

        # One CPU per node and per worker: two live 1-CPU nodes place the two workers on different nodes.
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 2 and all(n["Resources"].get("CPU") == 1 for n in alive)
        worker_nodes = (tmp_path / "worker_nodes.txt").read_text().split()
        assert sorted(worker_nodes) == sorted(n["NodeID"] for n in alive), worker_nodes
    finally:
        shutdown_ray()
        cluster.shutdown()

    assert outcome.run_id == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(
        range(1, epochs + 1)
    )
    assert outcome.storage_path == storage
    keys = s3.keys(BUCKET, f"ray/{outcome.ray_run_name}/")
    assert any(key.endswith("checkpoint.pt") for key in keys), keys
    assert not (Path(cfg.output_dir) / "ray_results").exists()  # nothing of the run on a node's disk


def tracking_last_step(client, run_id: str) -> int:
    return int(max(m.step for m in client.get_metric_history(run_id, "train/loss")))


def test_bad_storage_uri_is_an_error_before_ray(s3, tmp_path):
    from orchestrator.runs.ray_utils import shutdown_ray
    from orchestrator.sweeps.sweep import SweepError, run_sweep
    from trainer.config import load_config

    shutdown_ray()
    arms = _two_arms(tmp_path)
    config = load_config(SMOKE, _tiny(tmp_path))
    for storage, expected in (
        ("nosuchscheme://bucket/prefix", "not a filesystem URI"),
        ("s3://no-such-bucket-here/prefix", "no bucket 'no-such-bucket-here'"),
    ):
        with pytest.raises(SweepError, match="--storage-path") as failed:
            run_sweep(
                "ablate",
                config,
                arms_path=str(arms),
                storage_path=storage,
                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                verbose=0,
                print_fn=lambda _: None,
            )
        assert expected in str(failed.value) and storage in str(failed.value)
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists()  # nothing created


def _two_arms(tmp: Path) -> Path:
    arms = tmp / "arms.yaml"
    arms.write_text(
        "arms:\n"
        "  - {key: a, name: mse, label: (a) MSE, table: '2', overrides: {loss.variant: mse},\n"
        "     paper: {wholebody_AP: 58.2}}\n"
        "  - {key: f, name: fowkal, label: (f) FoWKAL, table: '2', overrides: {loss.variant: fowkal},\n"
        "     paper: {wholebody_AP: 61.6}}\n"
    )
    return arms


def test_two_trial_ablation_on_two_nodes_in_s3_survives_node_removal(s3, tmp_path):
    """Two trials across a 2-CPU head and a 1-CPU worker node (3 CPU: both trials at once, so the worker node
    holds a part of a running trial: a Train worker or trial actors). The worker node is removed once both
    trials have an epoch in MLflow and neither is at its last; the trial it hit restarts on the head from its
    checkpoint in S3 (Ray Train's retry of the worker group, or Tune's restart of a trial whose actor died)
    and finishes."""
    import threading
    import time

    from ray import tune
    from ray.cluster_utils import Cluster

    from orchestrator.runs.ray_utils import init_ray, shutdown_ray
    from orchestrator.sweeps.sweep import run_sweep
    from trainer.config import load_config

    epochs = 4
    cfg = load_config(SMOKE, _tiny(tmp_path, epochs=epochs, eval_interval=epochs, max_failures=2))
    arms = _two_arms(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = f"s3://{BUCKET}/sweeps"

    class Recoveries(tune.Callback):
        def __init__(self):
            self.trials: list[str] = []

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.trials.append(trial.trial_id)

    recoveries = Recoveries()
    shutdown_ray()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
        },
    )
    worker_node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    removed = threading.Event()
    stop = threading.Event()

    def remove_when_both_trials_train():
        # Both trials between their first and their last epoch: every CPU of the cluster is held by them, so
        # the worker node holds a part of a running trial.
        client = tracking.make_client(uri)
        while not stop.is_set():
            try:
                experiment = client.get_experiment_by_name("fowkal-ablate")
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
                trials = [r for r in runs if tracking.TAG_TRIAL_ID in r.data.tags]
                reached = [
                    max((m.step for m in client.get_metric_history(r.info.run_id, "train/loss")), default=0)
                    for r in trials
                ]
            except Exception:
                reached = []
            if len(reached) == 2 and all(1 <= step < epochs for step in reached):
                cluster.remove_node(worker_node, allow_graceful=False)
                removed.set()
                return
            time.sleep(0.3)

    remover = threading.Thread(target=remove_when_both_trials_train, daemon=True)
    try:
        init_ray(address=cluster.address)
        remover.start()
        run = {
            "arms_path": str(arms),
            "seeds": 1,
            "tracking_uri": uri,
            "storage_path": storage,
            "verbose": 0,
            "print_fn": lambda _: None,
        }
        outcome = run_sweep("ablate", cfg, callbacks=[recoveries], **run)
        assert removed.is_set(), "the worker node was never removed"
        assert len([n for n in ray.nodes() if n["Alive"]]) == 1
        # The same command again: restored from the Tune state in S3, nothing trains again.
        again = run_sweep("ablate", cfg, **run)
    finally:
        stop.set()
        shutdown_ray()
        cluster.shutdown()

    assert sorted(outcome.trial_statuses.values()) == ["TERMINATED", "TERMINATED"], outcome.trial_statuses
    assert sorted(outcome.run_statuses.values()) == ["FINISHED", "FINISHED"], outcome.run_statuses
    assert again.parent_run_id == outcome.parent_run_id and again.trial_statuses == outcome.trial_statuses
    client = tracking.make_client(uri)
    children = client.search_runs(
        [client.get_experiment_by_name("fowkal-ablate").experiment_id],
        filter_string=f"tags.`{tracking.TAG_PARENT_RUN_ID}` = '{outcome.parent_run_id}'",
    )
    assert len(children) == 2
    hit = []
    for child in children:
        run_id = child.info.run_id
        assert child.info.status == "FINISHED"
        # Every epoch once: the trial that lost its node continued after its checkpoint, it did not redo it.
        for metric in ("train/loss", "time/epoch_s"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, metric))
            assert steps == list(range(1, epochs + 1)), (metric, steps)
        assert [m.step for m in client.get_metric_history(run_id, "val/wholebody_AP")] == [epochs]
        assert tracking.BEST_CHECKPOINT_ARTIFACT in {a.path for a in client.list_artifacts(run_id)}
        trial_id = child.data.tags[tracking.TAG_TRIAL_ID]
        if tracking.TAG_LAST_WORKER_ERROR in child.data.tags or trial_id in recoveries.trials:
            hit.append(child.info.run_name)
        # The trial's Ray Train run (its checkpoints) is in the bucket, under the sweep's prefix.
        train_storage = child.data.tags[tracking.TAG_STORAGE_PATH]
        assert train_storage == f"{storage}/{outcome.sweep_id}/train"
        keys = s3.keys(BUCKET, f"sweeps/{outcome.sweep_id}/train/{trial_id}/")
        assert any(key.endswith("checkpoint.pt") for key in keys), keys
    assert hit, "the node removal hit no trial (no worker error, no Tune restart)"
    print(f"node removal hit {hit}; Tune restarted {recoveries.trials}")
    # fowkal eval --run SWEEP/NAME of the trial that lost its node: its best checkpoint, back from the store.
    from orchestrator.evaluation.eval_command import download_run_checkpoint

    loaded = download_run_checkpoint(client, f"{outcome.sweep_id}/{hit[0]}", uri, tmp_path / "eval")
    assert loaded.epoch == epochs and loaded.config.loss.variant in ("mse", "fowkal")
    assert s3.keys(BUCKET, f"sweeps/{outcome.sweep_id}/tune/tuner.pkl")
    # Nothing of the trials' storage on this machine: only their logs and the reports.
    sweep_dir = Path(outcome.sweep_dir)
    assert sweep_dir.is_dir() and (sweep_dir / "summary.md").is_file()
    assert not (sweep_dir / "train").exists() and not (sweep_dir / "tune").exists()
    assert not list(Path(cfg.output_dir).rglob("checkpoint.pt"))
    assert not (Path(cfg.output_dir) / "ray_results").exists()


def test_a_sweeps_tune_state_and_train_runs_go_to_the_storage_uri():
    from orchestrator.runs.train import storage_join
    from orchestrator.sweeps.trial import SweepPlan

    common = {
        "kind": "ablate",
        "sweep_id": "s-ablate-1234abcd",
        "sweep_dir": "/local/out/sweeps/s-ablate-1234abcd",
        "base_config": {"name": "s", "output_dir": "/local/out"},
        "tracking_uri": "sqlite:///x.db",
        "experiment_id": "1",
        "parent_run_id": "p",
        "metric": "val/wholebody_AP",
        "mode": "max",
    }
    remote = SweepPlan(**common, storage_dir="s3://bucket/prefix/s-ablate-1234abcd")
    assert remote.tune_dir == "s3://bucket/prefix/s-ablate-1234abcd/tune"
    assert remote.train_storage == "s3://bucket/prefix/s-ablate-1234abcd/train"
    local = SweepPlan(**common)
    assert local.tune_dir == "/local/out/sweeps/s-ablate-1234abcd/tune"
    assert local.train_storage == "/local/out/sweeps/s-ablate-1234abcd/train"
    assert storage_join("s3://b/p/", "x", "y") == "s3://b/p/x/y" and storage_join("/a", "x") == "/a/x"
