"""`fowkal train` end to end: Ray Train workers, MLflow tracking, resume, and `ray job submit` to a cluster.

Sizes come from configs/smoke.yaml made smaller with --set overrides; the numbers each test relies on are
stated next to it. The job-submit test runs first, so its cluster and the module's local Ray are never up
at the same time.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from orchestrator import tracking

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def smoke_config_is_there():
    """Every test here runs configs/smoke.yaml: without it they fail (a skip would hide them)."""
    assert SMOKE.is_file(), f"{SMOKE} is missing: the end-to-end tests of {Path(__file__).name} run it"


def _overrides(tmp: Path, synth_dir: Path, **values) -> list[str]:
    """--set overrides keeping every output under ``tmp`` (and synthetic data in ``synth_dir``)."""
    base = {
        "output_dir": str(tmp / "out"),
        "data.synthetic_dir": str(synth_dir),
    }
    base.update(values)
    return [f"{key}={value}" for key, value in base.items()]


def test_local_ray_size_and_stable_run_name(tmp_path, monkeypatch):
    from orchestrator.runs.ray_utils import MIN_LOCAL_LOGICAL_CPUS, local_logical_cpus
    from orchestrator.runs.train import stable_run_name
    from trainer.config import load_config

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert local_logical_cpus() == MIN_LOCAL_LOGICAL_CPUS == 4  # 2 workers + a trial function fit on 2 cores
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert local_logical_cpus() == 16
    assert local_logical_cpus(3) == 3
    with pytest.raises(ValueError, match="num_cpus"):
        local_logical_cpus(0)
    # Same config -> same Ray run name (so re-running resumes); any training change -> another name.
    first = stable_run_name(load_config(SMOKE, ["epochs=3"]))
    assert first == stable_run_name(load_config(SMOKE, ["epochs=3", "max_failures=2"]))
    assert first.startswith("smoke-fowkal-")
    assert first != stable_run_name(load_config(SMOKE, ["epochs=4"]))
    assert first != stable_run_name(load_config(SMOKE, ["epochs=3", "loss.variant=mse"]))


def test_unevaluated_epochs_do_not_make_ray_log_a_missing_score_error():
    """Ray Train ranks a checkpoint without the score metric (an epoch between evaluations) -inf and logs an
    ERROR naming the key; the callback build_torch_trainer adds drops that one message where the controller
    unpickles it, and nothing else."""
    import logging
    import pickle

    from orchestrator.runs.launch import RAY_CHECKPOINT_LOGGER, QuietUnscoredCheckpoints

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    ray_logger = logging.getLogger(RAY_CHECKPOINT_LOGGER)
    kept, before = Kept(), list(ray_logger.filters)
    ray_logger.addHandler(kept)  # Ray's loggers do not propagate to the root logger
    try:
        missing = "Result dict has no key: val/wholebody_AP. checkpoint_score_attr must be set to a key"
        other = "Result dict has no key: val/body_AP. checkpoint_score_attr must be set to a key"
        ray_logger.error(missing)
        assert kept.messages == [missing]  # Ray's own behaviour, unfiltered
        for _ in range(2):  # unpickled twice (a restarted controller): one filter
            pickle.loads(pickle.dumps(QuietUnscoredCheckpoints("val/wholebody_AP")))
        assert len(ray_logger.filters) == len(before) + 1
        ray_logger.error(missing)
        ray_logger.error(other)
        assert kept.messages == [missing, other]
    finally:
        ray_logger.removeHandler(kept)
        ray_logger.filters[:] = before


# ----------------------------------------------------------------------------------------------------------
# ray job submit against a local `ray start --head` cluster with token authentication


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return 0  # not listening yet


def _stop_process_session(proc: subprocess.Popen, marker: str) -> None:
    """Stop the `ray start --block` we launched and every process of its session, by pid.

    `ray stop` is not used: it stops *every* Ray process on the machine, including other users' clusters.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.time() + 15
    while True:
        leftovers = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                in_session = os.getsid(pid) == proc.pid
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, ProcessLookupError):
                continue
            if in_session or marker in cmdline:
                leftovers.append(pid)
        if not leftovers:
            return
        sig = signal.SIGTERM if time.time() < deadline else signal.SIGKILL
        for pid in leftovers:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            return
        time.sleep(1)


def test_ray_job_submit_runs_fowkal_train(tmp_path):
    """`ray job submit --working-dir . -- fowkal train --config configs/smoke.yaml` on a token-auth cluster.

    Tiny sizes (2 epochs of 16 images, 1 worker): the point is the submission path, not learning.
    """
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    # Ray >= 2.52 token authentication: the cluster, the CLI and the job's driver all read these.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
    temp_dir = tempfile.mkdtemp(
        prefix="fkray", dir="/tmp"
    )  # short: Ray's unix socket paths must fit 107 chars
    dashboard_port = _free_port()
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard_port,
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
    }
    start_cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=4",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    log_path = tmp_path / "ray_start.log"
    with open(log_path, "w") as log:
        cluster = subprocess.Popen(
            start_cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path
        )
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 120
        while _http_status(f"{dashboard}/api/version", token) != 200:
            assert cluster.poll() is None, f"ray start exited: {log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"the dashboard did not come up: {log_path.read_text()[-3000:]}"
            time.sleep(1)
        # Token auth is really on: the jobs API refuses a request without the token.
        assert _http_status(f"{dashboard}/api/jobs/", None) in (401, 403)

        db = tmp_path / "mlflow.db"
        submit = [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            dashboard,
            "--working-dir",
            ".",
            "--",
            "fowkal",
            "train",
            "--config",
            "configs/smoke.yaml",
            *(
                arg
                for override in _overrides(
                    tmp_path,
                    tmp_path / "synth",
                    epochs=2,
                    num_workers=1,
                    batch_size=8,
                    eval_interval=2,
                    **{"data.synthetic_train_images": 16, "data.synthetic_val_images": 4},
                )
                for arg in ("--set", override)
            ),
            "--tracking-uri",
            f"sqlite:///{db}",
            "--storage-path",
            str(tmp_path / "ray_results"),
        ]
        done = subprocess.run(submit, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-5000:]
        assert "succeeded" in output
        # The full command (the venv's mlflow) and the deep link to the runs table.
        assert "/mlflow ui --backend-store-uri" in output and "MLflow UI: " in output
        assert "#/experiments/" in output and "/runs?workflowType=machine_learning" in output

        client = tracking.make_client(f"sqlite:///{db}")
        experiment = client.get_experiment_by_name("fowkal-train")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, tracking.EPOCH_METRIC)) == [
            1,
            2,
        ]
        assert run.data.params["model.backbone"] == "hrnet_w18_small"
    finally:
        _stop_process_session(cluster, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------
# run_training on a local Ray started in this process


@pytest.fixture(scope="module")
def local_ray():
    from orchestrator.runs.ray_utils import init_ray, shutdown_ray

    init_ray(num_cpus=4)
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    """Synthetic data shared by the module's runs (generated on first use by the training loop)."""
    return tmp_path_factory.mktemp("synthetic")


def _load_checkpoints(run_dir: Path) -> dict[int, Path]:
    """epoch -> checkpoint.pt of the Ray checkpoint directories under ``run_dir``.

    A directory whose upload the abort cut short is unreadable and skipped (Ray never registered it).
    """
    found = {}
    for path in sorted(run_dir.glob("checkpoint_*/checkpoint.pt")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError:
            continue
        found[int(state["epoch"])] = path
    return found


def _untrained_scores(cfg) -> dict[str, float]:
    """COCO-WholeBody scores of a freshly initialised model on the run's validation set (flip test, DARK)."""
    from torch.utils.data import DataLoader

    from trainer.evaluation.wholebody import evaluate_wholebody
    from trainer.loop import resolve_datasets
    from trainer.topdown.data import WholeBodyTopDownDataset
    from trainer.topdown.inference import predict_keypoints, results_from_predictions
    from trainer.topdown.losses import HeatmapLoss
    from trainer.topdown.model import build_pose_model

    torch.manual_seed(cfg.seed)
    paths = resolve_datasets(cfg.data)
    val_set = WholeBodyTopDownDataset(
        paths["val_ann"], paths["val_images"], config=cfg.data.pipeline, train=False
    )
    with_kaf = HeatmapLoss(cfg.loss).needs_kaf
    model = build_pose_model(cfg.model.backbone, with_kaf=with_kaf)
    loader = DataLoader(val_set, batch_size=cfg.data.val_batch_size)
    predictions = predict_keypoints(model, loader, torch.device("cpu"), flip_test=cfg.flip_test)
    results = results_from_predictions(predictions)
    return {key: float(value) for key, value in evaluate_wholebody(paths["val_ann"], results).items()}


def test_failed_training_ends_the_mlflow_run_failed(local_ray, tmp_path, synth_dir):
    from orchestrator.runs.train import run_training
    from trainer.config import load_config

    # A failure inside the workers (the input files are fine, so the checks before Ray pass): a batch larger
    # than the training set.
    cfg = load_config(SMOKE, _overrides(tmp_path, synth_dir, epochs=1, batch_size=1000))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(Exception, match="fewer than batch_size"):
        run_training(
            cfg, tracking_uri=uri, storage_path=str(tmp_path / "ray_results"), print_fn=lambda *_: None
        )
    client = tracking.make_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("fowkal-train").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "fewer than batch_size" in runs[0].data.tags[tracking.TAG_ERROR]


def test_interrupted_run_is_killed_and_resumes_at_the_next_epoch(local_ray, tmp_path, synth_dir):
    """Ctrl-C after epoch k: MLflow run KILLED; re-running the same config resumes at k + 1, same MLflow run.

    The interrupt is a real SIGINT to this (driver) process, sent by a Ray Train callback once epoch 1 is
    reported; the graceful abort takes a few seconds, so the workers may finish another epoch or two first:
    k is read back from MLflow (the last epoch Ray registered). 1 worker, 5 epochs of 16 synthetic images
    (several people per image) with batch 8.
    """
    from ray.train import UserCallback

    from orchestrator.runs.train import TrainingInterrupted, run_training
    from trainer.config import load_config
    from trainer.loop import resolve_datasets, train_loop_per_worker
    from trainer.topdown.data import WholeBodyTopDownDataset

    class InterruptAfterEpoch(UserCallback):  # defined here: pickled by value into the Ray Train controller
        def __init__(self, epoch: int, pid: int):
            self.epoch, self.pid = epoch, pid

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("epoch") == self.epoch:
                os.kill(self.pid, signal.SIGINT)

    epochs, images, batch = 5, 16, 8
    cfg = load_config(
        SMOKE,
        _overrides(
            tmp_path,
            synth_dir,
            epochs=epochs,
            num_workers=1,
            batch_size=batch,
            eval_interval=epochs,
            **{"data.synthetic_train_images": images, "data.synthetic_val_images": 4},
        ),
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray_results"
    quiet = {"print_fn": lambda *_: None}
    paths = resolve_datasets(cfg.data)
    train_set = WholeBodyTopDownDataset(paths["train_ann"], paths["train_images"], config=cfg.data.pipeline)
    steps_per_epoch = len(train_set) // batch  # one worker, drop_last

    handler_before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under `nohup ... &`
    with pytest.raises(TrainingInterrupted) as interrupted:
        run_training(
            cfg,
            tracking_uri=uri,
            storage_path=str(storage),
            callbacks=[InterruptAfterEpoch(1, os.getpid())],
            **quiet,
        )
    run_id = interrupted.value.run_id
    client = tracking.make_client(uri)
    assert client.get_run(run_id).info.status == "KILLED"
    # The handler is restored: SIGINT is what it was before the run, not Ray's abort of a finished run.
    assert signal.getsignal(signal.SIGINT) is handler_before

    last_epoch = int(max(m.step for m in client.get_metric_history(run_id, tracking.EPOCH_METRIC)))
    assert 1 <= last_epoch < epochs, "the run finished before the interrupt took effect: nothing to resume"
    (run_dir,) = [p for p in storage.iterdir() if p.is_dir()]
    stopped = _load_checkpoints(run_dir)
    assert last_epoch in stopped
    stopped_state = torch.load(stopped[last_epoch], map_location="cpu", weights_only=True)
    assert stopped_state["optimizer"]["state"][0]["step"] == last_epoch * steps_per_epoch

    # Reference for what the resumed run must compute: the plain (no Ray) loop resuming from the same file.
    reference_dir = tmp_path / "reference"
    (reference_dir / "checkpoints").mkdir(parents=True)
    shutil.copyfile(stopped[last_epoch], reference_dir / "checkpoints" / "latest.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker (OMP_NUM_THREADS=1 for a 1-CPU actor)
    try:
        reference_cfg = load_config(
            SMOKE,
            _overrides(
                reference_dir,
                synth_dir,
                epochs=epochs,
                num_workers=1,
                batch_size=batch,
                eval_interval=epochs,
                output_dir=str(reference_dir),
                **{"data.synthetic_train_images": images, "data.synthetic_val_images": 4},
            ),
        )
        train_loop_per_worker(reference_cfg)
    finally:
        torch.set_num_threads(threads)
    reference = torch.load(reference_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)

    outcome = run_training(cfg, tracking_uri=uri, storage_path=str(storage), **quiet)
    assert outcome.run_id == run_id  # the same MLflow run continues
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    epoch_steps = sorted(m.step for m in client.get_metric_history(run_id, tracking.EPOCH_METRIC))
    assert epoch_steps == list(range(1, epochs + 1))  # 1..k before the interrupt, k+1.. after; no repeats
    resumed = torch.load(_load_checkpoints(run_dir)[epochs], map_location="cpu", weights_only=True)
    assert resumed["epoch"] == epochs
    # Adam's step counter continued from the stopped run: it did not restart at 0.
    assert resumed["optimizer"]["state"][0]["step"] == epochs * steps_per_epoch
    assert resumed["scheduler"]["last_epoch"] == epochs * steps_per_epoch
    # And the optimiser moments and weights are what continuing from the checkpoint gives.
    for index, state in reference["optimizer"]["state"].items():
        got = resumed["optimizer"]["state"][index]
        torch.testing.assert_close(got["exp_avg"], state["exp_avg"], rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(got["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-3, atol=1e-10)
    for key, value in reference["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed["model"][key], value, rtol=1e-3, atol=1e-5)


# The end-to-end run: configs/smoke.yaml with 2 workers x batch 16 on 64 synthetic training images (several
# people each), 60 epochs, evaluated at the end on 8 other synthetic images. Measured on 2 shared CPU cores
# (2026-11-22), two runs: 2.7-2.9 minutes; whole-body AP 0.000 untrained -> 0.0126 / 0.0092 trained (body AP
# 0.000 -> 0.226 / 0.239). Whole-body AP needs all 133 keypoints right, so it is the last to rise: after 30
# epochs it was still 0.0008 while body AP was 0.068; the smoke config's own 6 epochs leave it at 0.
SMOKE_EPOCHS = 60
SMOKE_OVERRIDES = {
    "num_workers": 2,
    "batch_size": 16,
    "data.synthetic_train_images": 64,
    "data.synthetic_val_images": 8,
}


@pytest.mark.slow
def test_smoke_config_trains_under_ray_train_with_two_workers(local_ray, tmp_path, synth_dir, capfd):
    import yaml

    from orchestrator.runs.train import run_training
    from trainer.config import config_to_dict, flatten_config, load_config

    epochs = SMOKE_EPOCHS
    cfg = load_config(
        SMOKE, _overrides(tmp_path, synth_dir, epochs=epochs, eval_interval=epochs, **SMOKE_OVERRIDES)
    )
    untrained = _untrained_scores(cfg)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines = []
    outcome = run_training(
        cfg, tracking_uri=uri, storage_path=str(tmp_path / "ray_results"), print_fn=lines.append
    )

    trained = outcome.metrics
    print(
        f"whole-body AP: untrained {untrained['wholebody/AP']:.4f} -> "
        f"{trained['val/wholebody_AP'] / 100:.4f}; "
        f"body AP {untrained['body/AP']:.4f} -> {trained['val/body_AP'] / 100:.4f}"
    )
    # Untrained: 0.000 for both (random heatmaps). Trained (measured): whole-body 0.0126 / 0.0092, body 0.23.
    assert untrained["wholebody/AP"] < 0.002
    # val/ metrics are percent, evaluate_wholebody's fractions.
    assert trained["val/wholebody_AP"] > 100 * (untrained["wholebody/AP"] + 0.005)
    assert trained["val/body_AP"] > 100 * (untrained["body/AP"] + 0.1)

    client = tracking.make_client(uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    # Params: the flattened config, every entry.
    assert run.data.params == {key: str(value) for key, value in flatten_config(cfg).items()}
    assert run.data.tags[tracking.TAG_LOSS_VARIANT] == cfg.loss.variant
    assert run.data.tags[tracking.TAG_DATASET] == "synthetic"
    # Per-epoch metrics from rank 0, one value per epoch; the last equals the run's final metrics.
    history = client.get_metric_history(outcome.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))
    assert max(history, key=lambda m: m.step).value == pytest.approx(outcome.metrics["train/loss"])
    assert [m.step for m in client.get_metric_history(outcome.run_id, "val/wholebody_AP")] == [epochs]
    for part in ("body", "foot", "face", "hand"):
        assert len(client.get_metric_history(outcome.run_id, f"kaf/{part}_mean")) == epochs
    # Artifacts: the config (loadable back), the best checkpoint, the KAF plot (fowkal is a KAL variant).
    downloaded = Path(client.download_artifacts(outcome.run_id, "config.yaml", str(tmp_path / "dl")))
    assert yaml.safe_load(downloaded.read_text()) == config_to_dict(cfg)
    names = {f.path for f in client.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "best_checkpoint", "kaf_history.png"} <= names
    assert [f.path for f in client.list_artifacts(outcome.run_id, "best_checkpoint")][0].startswith(
        "best_checkpoint/"
    )
    assert any(line.startswith("MLflow UI: ") and "/mlflow ui --backend-store-uri " in line for line in lines)
    assert any(line.startswith("runs table: http://127.0.0.1:5000/#/experiments/") for line in lines)
    assert any(line.startswith("final metrics:") for line in lines)
    # 59 epochs without evaluation, each checkpointed: Ray's controller (whose log reaches this console)
    # ranks them without an error apiece.
    assert "Result dict has no key" not in capfd.readouterr().err
