"""`fowkal tune` / `fowkal ablate`: Ray Tune trials launching Ray Train runs, tracked in MLflow.

Sizes: configs/smoke.yaml shrunk with --set overrides (8 synthetic training images, 64x64 input, 3 epochs,
evaluation every epoch), so a trial trains in seconds and most of a test's time is Ray's own start-up.
The sweeps optimise ``train/loss`` (mode min) over AWing's omega with the first points fixed (14, 30, 5):
on such tiny runs every AP is 0, which would leave ASHA nothing to compare, while the training loss
scales with omega. Trials run one at a time (``max_concurrent=1``) so that ASHA's decisions follow the
trial order, which the test replays with its own implementation of the ASHA rule.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from run_checks import input_contexts

from orchestrator import tracking

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
ABLATION_ARMS = REPO / "search_spaces" / "ablation_paper.yaml"
LOSS_SPACE = REPO / "search_spaces" / "fowkal_loss.yaml"
VENV_BIN = Path(sys.executable).parent
EPOCHS = 3


@pytest.fixture(autouse=True)
def smoke_config_is_there():
    """Every test here runs configs/smoke.yaml: without it they fail (a skip would hide them)."""
    assert SMOKE.is_file(), f"{SMOKE} is missing: the end-to-end tests of {Path(__file__).name} run it"


TINY = {
    "epochs": EPOCHS,
    "eval_interval": 1,
    "batch_size": 4,
    "data.synthetic_train_images": 8,
    "data.synthetic_val_images": 4,
    "data.loader_workers": 0,
    "flip_test": "false",
    "data.pipeline.input_size": "[64,64]",
    "data.pipeline.heatmap_size": "[16,16]",
}
OMEGA_SPACE = """\
metric: train/loss
mode: min
parameters:
  loss.variant: fowkal
  loss.omega: {distribution: uniform, low: 5.0, high: 30.0, paper: 14.0}
points_to_evaluate:
  - {loss.omega: 30.0}
  - {loss.omega: 5.0}
"""


def _overrides(out: Path, synth_dir: Path, **values) -> list[str]:
    merged = {"output_dir": str(out), "data.synthetic_dir": str(synth_dir), **TINY, **values}
    return [f"{key}={value}" for key, value in merged.items()]


def _config(out: Path, synth_dir: Path, **values):
    from trainer.config import load_config

    return load_config(SMOKE, _overrides(out, synth_dir, **values))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def omega_space(tmp_path_factory):
    path = tmp_path_factory.mktemp("space") / "omega.yaml"
    path.write_text(OMEGA_SPACE)
    return path


@pytest.fixture(scope="module", autouse=True)
def _shutdown_ray_at_end():
    yield
    from orchestrator.runs.ray_utils import shutdown_ray

    shutdown_ray()


def _children(client, parent_id: str) -> list:
    from orchestrator.reports.report import child_runs

    parent = client.get_run(parent_id)
    return child_runs(client, parent.info.experiment_id, parent_id)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _assert_no_live_placement_groups():
    import ray

    states = [pg["state"] for pg in ray.util.placement_group_table().values()]
    assert states, "the sweep created no placement group at all?"
    assert all(state == "REMOVED" for state in states), states


# ----------------------------------------------------------------------------------------------------------
# Before Ray: validation and the pure helpers


def test_bad_inputs_fail_before_ray_starts(tmp_path, monkeypatch, capsys, synth_dir):
    import ray

    import orchestrator.runs.ray_utils
    from orchestrator.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started although the inputs are invalid")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(orchestrator.runs.ray_utils, "init_ray", no_ray)
    out = tmp_path / "out"
    sets = [arg for override in _overrides(out, synth_dir) for arg in ("--set", override)]
    cases = {
        "bounds.yaml": (
            "parameters:\n  loss.tau: {distribution: loguniform, low: 1.0, high: 0.1}\n",
            ["loss.tau", "low (1.0) must be < high (0.1)"],
        ),
        "unknown.yaml": (
            "parameters:\n  loss.tua: {distribution: uniform, low: 0.1, high: 0.2}\n",
            ["loss.tua", "did you mean loss.tau"],
        ),
        "distribution.yaml": (
            "parameters:\n  loss.tau: {distribution: normal, low: 0.1, high: 0.2}\n",
            ["loss.tau", "unknown distribution"],
        ),
    }
    for name, (text, expected) in cases.items():
        space = tmp_path / name
        space.write_text(text)
        code = main(["tune", "--config", str(SMOKE), "--space", str(space), "--samples", "2", *sets])
        err = capsys.readouterr().err
        assert code == 2, err
        assert str(space) in err, err
        for fragment in expected:
            assert fragment in err, err

    arms = tmp_path / "arms.yaml"
    arms.write_text(
        "arms:\n  - {key: a, name: mse, label: A, table: '2', overrides: {loss.variant: msee}, "
        "paper: {wholebody_AP: 58.2}}\n"
    )
    assert main(["ablate", "--config", str(SMOKE), "--arms", str(arms), *sets]) == 2
    err = capsys.readouterr().err
    assert str(arms) in err and "msee" in err

    # Settings that cannot work are refused before Ray too.
    code = main(["tune", "--config", str(SMOKE), "--space", str(LOSS_SPACE), "--grace-period", "3", *sets])
    assert code == 2 and "--grace-period" in capsys.readouterr().err
    code = main(["ablate", "--config", str(SMOKE), "--arms", str(ABLATION_ARMS), "--resume", *sets])
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (out / "sweeps").exists()


def test_trial_configs_names_statuses_and_concurrency(tmp_path, synth_dir):
    from orchestrator.runs.resources import derive_max_concurrent
    from orchestrator.sweeps.ablation_arms import load_ablation_arms
    from orchestrator.sweeps.settings import SweepError
    from orchestrator.sweeps.space import load_search_space
    from orchestrator.sweeps.trial import SweepPlan, trial_run_name, trial_train_config
    from orchestrator.sweeps.trial_status import trial_end_status
    from trainer.config import config_to_dict

    base = _config(tmp_path / "out", synth_dir)
    common = dict(
        sweep_dir=str(tmp_path / "sweep"),
        base_config=config_to_dict(base),
        tracking_uri="",
        experiment_id="",
        parent_run_id="",
        metric="val/wholebody_AP",
        mode="max",
    )
    arms = {arm.key: arm for arm in load_ablation_arms(ABLATION_ARMS)}
    ablate = SweepPlan(kind="ablate", sweep_id="abl", arms=arms, **common)
    assert trial_run_name(ablate, {"arm": "f", "seed": 2}) == "f-fowkal-s2"
    cfg = trial_train_config(ablate, {"arm": "b", "seed": 3}, "awing-s3")
    assert (cfg.loss.variant, cfg.seed) == ("awing", 3)
    assert cfg.output_dir == str(tmp_path / "sweep" / "trials" / "awing-s3")
    assert (cfg.epochs, cfg.batch_size, cfg.data.pipeline.input_size) == (EPOCHS, 4, (64, 64))

    tune = SweepPlan(kind="tune", sweep_id="tpe", space=load_search_space(LOSS_SPACE), **common)
    assert trial_run_name(tune, {}, "17_loss.tau=0.01,loss.gamma=0.02") == "tpe-017"
    sampled = {**tune.space.paper_point(), "loss.tau": 0.05}
    cfg = trial_train_config(tune, sampled, "tpe-001")
    assert (cfg.loss.variant, cfg.loss.tau, cfg.loss.gamma) == ("fowkal", 0.05, 0.01)

    # FINISHED only when the last result reached the config's epochs; the scheduler's early stops: KILLED.
    assert trial_end_status(ablate, {"arm": "a", "seed": 0}, {"epoch": EPOCHS}, errored=False) == "FINISHED"
    assert trial_end_status(ablate, {"arm": "a", "seed": 0}, {"epoch": 1}, errored=False) == "KILLED"
    assert trial_end_status(ablate, {"arm": "a", "seed": 0}, {}, errored=False) == "KILLED"
    assert trial_end_status(ablate, {"arm": "a", "seed": 0}, {"epoch": EPOCHS}, errored=True) == "FAILED"

    # A trial: 0.5 CPU for the trial function + 1 CPU per worker (+ its GPUs).
    assert derive_max_concurrent({"CPU": 4.0}, num_workers=1, gpus_per_trial=0) == 2  # 4 // 1.5
    assert derive_max_concurrent({"CPU": 4.0}, num_workers=1, gpus_per_trial=0, requested=1) == 1
    assert derive_max_concurrent({"CPU": 4.0}, num_workers=1, gpus_per_trial=0, requested=9) == 2
    assert derive_max_concurrent({"CPU": 4.0}, num_workers=2, gpus_per_trial=0) == 1  # 4 // 2.5
    assert derive_max_concurrent({"CPU": 64.0, "GPU": 8.0}, num_workers=2, gpus_per_trial=2) == 4
    assert derive_max_concurrent({"CPU": 64.0, "GPU": 8.0}, num_workers=1, gpus_per_trial=0.5) == 16
    with pytest.raises(SweepError, match="one trial needs 2.5 CPU"):
        derive_max_concurrent({"CPU": 2.0}, num_workers=2, gpus_per_trial=0)
    with pytest.raises(SweepError, match="GPU"):
        derive_max_concurrent({"CPU": 8.0}, num_workers=1, gpus_per_trial=1)
    with pytest.raises(SweepError, match="--max-concurrent"):
        derive_max_concurrent({"CPU": 8.0}, num_workers=1, gpus_per_trial=0, requested=0)


def test_one_settings_object_from_the_cli_and_the_sweep_identity(synth_dir, tmp_path):
    from orchestrator.cli import build_parser, sweep_settings_from_args
    from orchestrator.sweeps.settings import SweepSettings
    from orchestrator.sweeps.sweep import sweep_name_for

    args = build_parser().parse_args(["tune", "--config", str(SMOKE), "--space", str(LOSS_SPACE)])
    settings = sweep_settings_from_args(args)
    defaults = SweepSettings(kind="tune", space_path=str(LOSS_SPACE), experiment_name="fowkal-tune")
    assert settings == defaults  # every flag's default is the dataclass field's
    args = build_parser().parse_args(["ablate", "--config", str(SMOKE), "--arms", str(ABLATION_ARMS)])
    assert sweep_settings_from_args(args).seeds == SweepSettings.seeds
    help_text = build_parser()._subparsers._group_actions[0].choices["tune"].format_help()
    assert "(default: 20)" in help_text and "(default: 0)" in help_text

    # The name --resume finds depends on what defines the experiment, not on the trial budget.
    base = _config(tmp_path / "out", synth_dir)
    text = LOSS_SPACE.read_text()
    name = sweep_name_for("tune", base, text, settings.identity())
    assert name == sweep_name_for("tune", base, text, settings.replace(samples=99).identity())
    assert name == sweep_name_for("tune", base, text, settings.replace(max_concurrent=3).identity())
    assert name != sweep_name_for("tune", base, text, settings.replace(search_seed=1).identity())
    assert name != sweep_name_for("tune", base, text + "\n# edited", settings.identity())
    ablate = SweepSettings(kind="ablate", arms_path=str(ABLATION_ARMS))
    arms_text = ABLATION_ARMS.read_text()
    assert sweep_name_for("ablate", base, arms_text, ablate.identity()) != sweep_name_for(
        "ablate", base, arms_text, ablate.replace(seeds=3).identity()
    )
    with pytest.raises(TypeError, match="sampels"):
        settings.replace(sampels=3)


# ----------------------------------------------------------------------------------------------------------
# End to end (slow: Ray and several Ray Train runs)


def _asha_stop_epochs(losses_in_trial_order: list[list[float]], grace: int, factor: int, max_t: int):
    """Our own ASHA (asynchronous successive halving, Li et al. 2020) for trials run one after the other.

    Rungs at grace * factor^k < max_t. At the first result at or past a rung, a trial stops if its value is
    worse than the (1 - 1/factor) quantile of the values recorded at that rung so far (mode min: lower is
    better, so the comparison is on -loss). Returns, per trial, the epoch it is stopped at (or None).
    """
    rungs = []
    milestone = grace
    while milestone < max_t:
        rungs.append(milestone)
        milestone *= factor
    recorded: dict[int, list[float]] = {rung: [] for rung in rungs}
    stops = []
    for losses in losses_in_trial_order:
        done_rungs: set[int] = set()
        stop = None
        for epoch, loss in enumerate(losses, start=1):
            reward = -loss
            for rung in sorted(rungs, reverse=True):
                if epoch < rung or rung in done_rungs:
                    continue
                values = recorded[rung]
                cutoff = float(np.percentile(values, (1 - 1 / factor) * 100)) if values else None
                recorded[rung].append(reward)
                done_rungs.add(rung)
                if cutoff is not None and reward < cutoff:
                    stop = epoch
                break
            if stop is not None:
                break
        stops.append(stop)
    return stops


def test_trial_statuses_come_from_the_newest_session_state_even_if_an_older_file_is_touched_later(tmp_path):
    from orchestrator.sweeps.trial_status import trial_statuses_from_state

    def write_state(name: str, statuses: dict[str, str]) -> Path:
        trials = [[json.dumps({"trial_id": tid, "status": status}), {}] for tid, status in statuses.items()]
        path = tmp_path / name
        path.write_text(json.dumps({"trial_data": trials}))
        return path

    old = write_state("experiment_state-2026-11-22_02-23-56.json", {"a": "TERMINATED", "b": "RUNNING"})
    new = write_state(
        "experiment_state-2026-11-22_02-24-47.json", {"a": "TERMINATED", "b": "TERMINATED", "c": "TERMINATED"}
    )
    # What a resumed sweep left behind: the first session's file rewritten after the second one's.
    os.utime(new, (1_000_000_000, 1_000_000_000))
    os.utime(old, (1_000_000_100, 1_000_000_100))
    assert trial_statuses_from_state(str(tmp_path)) == {
        "a": "TERMINATED",
        "b": "TERMINATED",
        "c": "TERMINATED",
    }


def test_a_child_run_whose_trial_the_resumed_tune_state_lacks_is_deleted_and_the_others_ended(tmp_path):
    """A driver killed after a trial opened its child run but before Tune saved a state holding that trial:
    the resumed sweep draws the sample again as a new trial, so the old run belongs to no trial."""
    from types import SimpleNamespace

    from orchestrator.sweeps.trial_status import LOST_RUN_REASON, reconcile_child_runs

    client = tracking.make_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("sweeps")
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id

    def child(trial_id: str) -> str:
        tags = {tracking.TAG_PARENT_RUN_ID: parent, tracking.TAG_TRIAL_ID: trial_id}
        run_id = client.create_run(experiment_id, run_name=trial_id, tags=tags).info.run_id
        client.log_param(run_id, "epochs", "3")
        return run_id

    done, running, lost = child("t1"), child("t2"), child("t3")
    client.log_metric(done, tracking.EPOCH_METRIC, 3, step=3)
    client.set_terminated(done, "FINISHED")
    client.log_metric(running, tracking.EPOCH_METRIC, 3, step=3)
    plan = SimpleNamespace(experiment_id=experiment_id, parent_run_id=parent, base_config={"epochs": 3})
    deleted = reconcile_child_runs(plan, client, {"t1": "TERMINATED", "t2": "TERMINATED", "t4": "TERMINATED"})

    assert deleted == [lost]
    gone = client.get_run(lost)
    assert gone.info.lifecycle_stage == "deleted" and gone.info.status == "KILLED"
    assert gone.data.tags[tracking.TAG_END_REASON] == LOST_RUN_REASON
    assert client.get_run(running).info.status == "FINISHED"  # its trial is TERMINATED with every epoch
    assert client.get_run(done).info.status == "FINISHED"
    visible = client.search_runs([experiment_id], f"tags.`{tracking.TAG_PARENT_RUN_ID}` = '{parent}'")
    assert sorted(r.info.run_id for r in visible) == sorted([done, running])
    # Without a readable Tune state nothing is deleted: an unknown trial is only ended.
    orphan = child("t5")
    assert reconcile_child_runs(plan, client, {}) == []
    assert client.get_run(orphan).info.lifecycle_stage == "active"
    assert client.get_run(orphan).info.status == "KILLED"


@pytest.mark.slow
def test_tpe_asha_sweep_stops_trials_and_releases_resources(tmp_path, synth_dir, omega_space):
    import yaml

    from orchestrator.sweeps.sweep import run_sweep
    from trainer.config import load_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(
        "tune",
        _config(tmp_path / "out", synth_dir),
        space_path=omega_space,
        samples=4,
        max_concurrent=1,
        grace_period=1,
        reduction_factor=2,
        tracking_uri=uri,
        verbose=0,
        print_fn=lambda _: None,
    )
    assert outcome.max_concurrent == 1
    assert len(outcome.trial_statuses) == 4
    assert set(outcome.trial_statuses.values()) == {"TERMINATED"}  # none pending, none errored

    client = tracking.make_client(uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = sorted(_children(client, outcome.parent_run_id), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in children] == ["tpe-001", "tpe-002", "tpe-003", "tpe-004"]
    assert len({r.data.tags["fowkal.trial_id"] for r in children}) == 4
    for run in children:
        assert run.data.tags[tracking.TAG_PARENT_RUN_ID] == outcome.parent_run_id
        assert run.data.tags[tracking.TAG_SWEEP_ID] == outcome.sweep_id
    omegas = [float(r.data.params["loss.omega"]) for r in children]
    assert omegas[:3] == [14.0, 30.0, 5.0]  # the paper's value first, then the file's points

    # ASHA's decisions, replayed from the logged losses: the stopped trials are the KILLED runs.
    losses = [[value for _, value in _history(client, r.info.run_id, "train/loss")] for r in children]
    expected_stops = _asha_stop_epochs(losses, grace=1, factor=2, max_t=EPOCHS)
    assert any(stop is not None for stop in expected_stops), expected_stops
    for run, stop in zip(children, expected_stops, strict=True):
        epochs_logged = [step for step, _ in _history(client, run.info.run_id, tracking.EPOCH_METRIC)]
        if stop is None:
            assert run.info.status == "FINISHED", run.info.run_name
            assert epochs_logged == list(range(1, EPOCHS + 1))
            # ASHA's own stop at max_t would have killed the trial before it logged its outputs.
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {tracking.BEST_CHECKPOINT_ARTIFACT, tracking.LAST_CHECKPOINT_ARTIFACT} <= artifacts, (
                artifacts
            )
            assert "latency/total_ms_b1" in run.data.metrics, sorted(run.data.metrics)
        else:
            assert run.info.status == "KILLED", run.info.run_name
            assert run.data.tags["fowkal.end_reason"] == "stopped early by the scheduler"
            assert stop in epochs_logged and max(epochs_logged) < EPOCHS
    # Stopped trials released their workers: no placement group is left reserved.
    _assert_no_live_placement_groups()

    # The best config: the finished trial with the lowest training loss, loadable by `fowkal train`.
    finished = [(min(l), r) for l, r in zip(losses, children, strict=True) if r.info.status == "FINISHED"]
    best_run = min(finished, key=lambda item: item[0])[1]
    best = load_config(outcome.best_config_path)
    assert best.loss.omega == pytest.approx(float(best_run.data.params["loss.omega"]))
    assert (best.epochs, best.loss.variant) == (EPOCHS, "fowkal")
    assert yaml.safe_load(Path(outcome.best_config_path).read_text())["loss"]["omega"] == best.loss.omega
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"summary.md", "importances.png", "parallel_coordinates.png", "best_config.yaml"} <= artifacts
    logged_best = client.get_run(outcome.parent_run_id).data.metrics["best/train/loss"]
    assert logged_best == pytest.approx(min(item[0] for item in finished))


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc), to stop the local Ray a killed driver leaves behind."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_or_duplicating(tmp_path, synth_dir, omega_space):
    from orchestrator.sweeps.sweep import run_sweep
    from orchestrator.sweeps.trial_status import trial_statuses_from_state

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    name = "resume-sweep"
    sets = [arg for override in _overrides(out, synth_dir) for arg in ("--set", override)]
    command = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "tune",
        "--config",
        str(SMOKE),
        "--space",
        str(omega_space),
        "--samples",
        "4",
        "--max-concurrent",
        "1",
        "--tracking-uri",
        uri,
        "--name",
        name,
        "--quiet",
        *sets,
    ]
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    tune_dir = out / "sweeps" / name / "tune"
    deadline = time.monotonic() + 600
    try:
        # Kill the driver once Tune's saved experiment state holds two finished trials (what a restore
        # can rely on): the next trial is then running or about to start.
        while True:
            statuses = trial_statuses_from_state(str(tune_dir)) if tune_dir.is_dir() else {}
            if sum(s == "TERMINATED" for s in statuses.values()) >= 2:
                break
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "two trials did not finish within 10 minutes"
            time.sleep(1.0)
    finally:
        leftovers = _descendants(driver.pid)
        driver.kill()
        driver.wait(timeout=60)
        for pid in leftovers:  # the local Ray this driver started (gcs, raylet, workers) outlives it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
    finished_before = {tid for tid, s in statuses.items() if s == "TERMINATED"}

    client = tracking.make_client(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("fowkal-tune").experiment_id],
        filter_string=f"tags.`{tracking.TAG_SWEEP_ID}` = '{name}'",
    )
    parents = [r for r in runs if tracking.TAG_PARENT_RUN_ID not in r.data.tags]
    assert len(parents) == 1
    parent_id = parents[0].info.run_id
    before = {r.data.tags["fowkal.trial_id"]: r for r in _children(client, parent_id)}
    assert finished_before <= set(before)

    outcome = run_sweep(
        "tune",
        _config(out, synth_dir),
        space_path=omega_space,
        samples=4,
        max_concurrent=1,
        resume=True,
        name=name,
        tracking_uri=uri,
        verbose=0,
        print_fn=lambda _: None,
    )
    assert outcome.parent_run_id == parent_id  # the same parent run, reopened
    assert client.get_run(parent_id).info.status == "FINISHED"
    after = _children(client, parent_id)
    trial_ids = [r.data.tags["fowkal.trial_id"] for r in after]
    assert len(after) == 4 and len(set(trial_ids)) == 4  # exactly one child run per trial
    assert set(outcome.trial_statuses) == set(trial_ids)
    assert set(outcome.trial_statuses.values()) == {"TERMINATED"}
    assert all(r.info.status in ("FINISHED", "KILLED") for r in after)
    by_id = {r.data.tags["fowkal.trial_id"]: r for r in after}
    for trial_id in finished_before:
        # Not run again: the same run, ended as before, each epoch logged once.
        run = by_id[trial_id]
        assert run.info.run_id == before[trial_id].info.run_id
        assert run.info.status == before[trial_id].info.status
        steps = [step for step, _ in _history(client, run.info.run_id, tracking.EPOCH_METRIC)]
        assert steps == sorted(set(steps)) == list(range(1, len(steps) + 1))
    _assert_no_live_placement_groups()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts), stopped after the test."""
    port = _free_port()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    command = [
        str(VENV_BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "server_artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 180
    try:
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if opener.open(f"{url}/health", timeout=5).status == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(1.0)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_ablation_against_a_remote_mlflow_server_and_its_report(tmp_path, synth_dir, mlflow_server):
    from orchestrator.reports.report import write_report
    from orchestrator.sweeps.sweep import run_sweep

    arms = tmp_path / "arms.yaml"
    arms.write_text(
        "arms:\n"
        "  - {key: a, name: mse, label: (a) MSE, table: '2', overrides: {loss.variant: mse},\n"
        "     paper: {wholebody_AP: 58.2, wholebody_AR: 67.1, body_AP: 69.4}}\n"
        "  - {key: f, name: fowkal, label: (f) FoWKAL, table: '2', overrides: {loss.variant: fowkal},\n"
        "     paper: {wholebody_AP: 61.6, body_AP: 72.7}}\n"
    )
    outcome = run_sweep(
        "ablate",
        _config(tmp_path / "out", synth_dir, epochs=2),
        arms_path=arms,
        seeds=2,
        tracking_uri=mlflow_server,
        verbose=0,
        print_fn=lambda _: None,
    )
    client = tracking.make_client(mlflow_server)
    children = {r.info.run_name: r for r in _children(client, outcome.parent_run_id)}
    assert sorted(children) == ["a-mse-s0", "a-mse-s1", "f-fowkal-s0", "f-fowkal-s1"]
    for name, run in children.items():
        arm, seed = name.split("-", 1)[1].split("-s")
        assert run.info.status == "FINISHED"
        assert run.data.tags[tracking.TAG_ARM] == arm
        assert run.data.tags[tracking.TAG_SEED] == seed
        assert run.data.tags[tracking.TAG_SWEEP_ID] == outcome.sweep_id
        assert run.data.params["loss.variant"] == arm and run.data.params["seed"] == seed
        # Every trial is a complete run: epochs as steps, the best epoch's metrics, both checkpoints, the
        # config, and the KAF history and figure of the KAL family.
        assert "epoch" not in run.data.metrics and tracking.last_epoch(client, run.info.run_id) == 2
        assert {"best/val/wholebody_AP", "best/val/hand_AP", "best/epoch"} <= set(run.data.metrics)
        best_ap = max(m.value for m in client.get_metric_history(run.info.run_id, "val/wholebody_AP"))
        assert run.data.metrics["best/val/wholebody_AP"] == pytest.approx(best_ap)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "best_checkpoint", "last_checkpoint"} <= artifacts, artifacts
        assert ({"kaf_history.npy", "kaf_history.png"} <= artifacts) == (arm == "fowkal"), artifacts
        assert input_contexts(run) == {"training", "validation"}
        assert all(len(d.dataset.digest) == 16 for d in run.inputs.dataset_inputs)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    # The parent summarises: per-arm means at a glance, a few key parameters, and a description.
    assert {"a-mse/wholebody_AP", "f-fowkal/wholebody_AP", "f-fowkal/hand_AP"} <= set(parent.data.metrics)
    assert len([k for k in parent.data.params if k.startswith("base.")]) <= 10
    assert "hrnet_w18_small" in parent.data.tags[tracking.TAG_DESCRIPTION]
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"ablation.md", "ablation.png", "summary.md", "arms.json", "base_config.yaml"} <= artifacts

    md_path, html_path = write_report(
        "fowkal-ablate", tracking_uri=mlflow_server, out_dir=tmp_path / "report", print_fn=lambda _: None
    )
    text = md_path.read_text()
    for arm, paper_ap in (("mse", 58.2), ("fowkal", 61.6)):
        key = {"mse": "a", "fowkal": "f"}[arm]
        values = [children[f"{key}-{arm}-s{s}"].data.metrics["best/val/wholebody_AP"] for s in (0, 1)]  # %
        cell = f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} ({paper_ap})"
        assert cell in text, text
    assert "data:image/png;base64," in html_path.read_text()
    json.loads(json.dumps(outcome.run_statuses))  # plain data


def test_a_finished_trial_stays_finished_when_tune_ends_it_on_resume(tmp_path, synth_dir, monkeypatch):
    """Resume after a driver kill: a trial whose Train run had finished reports its final metrics, and Tune
    may end the trial function right there with SystemExit(0); that is no failure of the trial."""
    import ray.tune

    from orchestrator.sweeps import trial
    from orchestrator.sweeps.ablation_arms import load_ablation_arms
    from trainer.config import config_to_dict

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.make_client(uri)
    experiment_id = tracking.get_or_create_experiment(client, "resume-exit")
    plan = trial.SweepPlan(
        kind="ablate",
        sweep_id="abl",
        sweep_dir=str(tmp_path / "sweep"),
        base_config=config_to_dict(_config(tmp_path / "out", synth_dir)),
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id="",
        metric="val/wholebody_AP",
        mode="max",
        arms={arm.key: arm for arm in load_ablation_arms(ABLATION_ARMS)},
    )

    class Context:
        def get_trial_id(self):
            return "t0001"

        def get_trial_name(self):
            return "a-mse-s0"

    class FinishedTrainer:
        def fit(self):
            return type("Result", (), {"metrics": {"epoch": EPOCHS, "val/wholebody_AP": 0.1}})()

    def tune_ends_the_function(metrics):
        raise SystemExit(0)

    monkeypatch.setattr(ray.tune, "get_context", lambda: Context())
    monkeypatch.setattr(ray.tune, "report", tune_ends_the_function)
    monkeypatch.setattr(trial, "build_torch_trainer", lambda *a, **k: FinishedTrainer())
    monkeypatch.setattr(trial, "_tune_iterations", lambda: 0)
    import ray.tune.integration.ray_train as tune_train

    monkeypatch.setattr(tune_train, "TuneReportCallback", lambda: None)  # needs a live Tune session
    with pytest.raises(SystemExit):
        trial.run_trial({"arm": "a", "seed": 0}, plan)
    run_id = tracking.find_run_by_resume_key(client, experiment_id, trial.trial_resume_key("abl", "t0001"))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED", run.data.tags.get(tracking.TAG_ERROR)
