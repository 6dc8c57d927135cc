"""Sweeps under faults: what the faults bench (bench/faults.py) found, as regression tests, and a trial whose
actor dies (its node gone) against one whose training failed (slow: one sweep of two tiny trials, ~90 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def test_tpe_ignores_results_without_the_validation_metric():
    """`fowkal tune` over a validation metric with eval_interval > 1: the non-evaluation epochs report no
    val/ metric; Ray's OptunaSearch raised KeyError on the first of them and ended the whole sweep."""
    from orchestrator.sweeps.sweep import EvaluationEpochOptunaSearch

    searcher = EvaluationEpochOptunaSearch(
        space=lambda trial: {"loss.omega": trial.suggest_float("loss.omega", 5.0, 30.0)},
        metric="val/wholebody_AP",
        mode="max",
    )
    config = searcher.suggest("t1")
    assert 5.0 <= config["loss.omega"] <= 30.0
    searcher.on_trial_result("t1", {"epoch": 1, "train/loss": 0.5, "training_iteration": 1})  # no KeyError
    searcher.on_trial_result("t1", {"epoch": 2, "val/wholebody_AP": 0.1, "training_iteration": 2})
    searcher.on_trial_complete("t1", {"epoch": 2, "val/wholebody_AP": 0.1, "training_iteration": 2})
    [trial] = searcher._ot_study.trials
    assert trial.value == 0.1 and trial.intermediate_values == {2: 0.1}


def test_tune_restarts_a_trial_within_the_configs_budget_and_never_forever():
    from orchestrator.sweeps.sweep import TRIAL_RESTARTS_CAP, trial_restarts

    assert trial_restarts(0) == 0 and trial_restarts(2) == 2
    assert trial_restarts(-1) == TRIAL_RESTARTS_CAP > 0  # a failed trial's instant re-failure must end


def test_a_trial_whose_training_failed_is_not_trained_again_by_a_restart():
    """Tune restarts a trial whose actor died; a trial whose training failed is recorded in the sweep's
    ledger and its restart fails at once with the first error (Ray Train had already retried it)."""
    from orchestrator.sweeps.trial import ControllerLedger

    ledger = ControllerLedger()
    assert ledger.failure("t1") is None
    ledger.mark_failed("t1", "FloatingPointError: non-finite training loss nan at epoch 1")
    assert ledger.failure("t1").startswith("FloatingPointError") and ledger.failure("t2") is None


@pytest.mark.slow
def test_a_trial_whose_actor_dies_resumes_and_a_diverged_trial_is_not_trained_again(tmp_path):
    """One sweep, trials one at a time, max_failures=1: the actor of trial a (Tune's function trainable, the
    driver of its Ray Train run) is SIGKILLed after epoch 1: Tune restarts it and its Train run continues
    from the checkpoint (every epoch once, FINISHED). Trial f diverges (optim.lr=1e30): Ray Train retries it
    once, then Tune's restart fails at once with the first error instead of training a third time."""
    import os
    import threading
    import time

    import psutil
    from ray import tune

    from orchestrator import tracking
    from orchestrator.runs.ray_utils import shutdown_ray
    from orchestrator.sweeps.sweep import run_sweep
    from trainer.config import load_config

    # Each epoch here is a fraction of a second plus a Train poll (0.5 s on a local Ray): 8 epochs leave the
    # killer, which sees epochs through MLflow, a window of seconds between trial a's first and last epoch.
    epochs = 8
    sets = {
        "output_dir": tmp_path / "out",
        "data.synthetic_dir": tmp_path / "synthetic",
        "epochs": epochs,
        "eval_interval": epochs,
        "num_workers": 1,
        "batch_size": 4,
        "data.synthetic_train_images": 8,
        "data.synthetic_val_images": 2,
        "data.loader_workers": 0,
        "data.pipeline.input_size": "[64,64]",
        "data.pipeline.heatmap_size": "[16,16]",
        "max_failures": 1,
    }
    cfg = load_config(SMOKE, [f"{key}={value}" for key, value in sets.items()])
    arms = tmp_path / "arms.yaml"
    arms.write_text(
        "arms:\n"
        "  - {key: a, name: mse, label: (a) MSE, overrides: {loss.variant: mse}}\n"
        "  - {key: f, name: fowkal, label: (f) FoWKAL,\n"
        "     overrides: {loss.variant: fowkal, optim.lr: 1.0e+30}}\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    class Recoveries(tune.Callback):
        def __init__(self):
            self.trials: list[str] = []

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.trials.append(str(trial))

    recoveries = Recoveries()
    killed: list[int] = []

    def kill_trial_actor_of_a():
        client = tracking.make_client(uri)
        while not killed:
            try:
                experiment = client.get_experiment_by_name("fowkal-ablate")
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
                [run] = [r for r in runs if r.info.run_name == "a-mse-s0"] or [None]
                reached = (
                    [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] if run else []
                )
            except Exception:
                reached = []
            if reached and max(reached) < epochs:
                # Only this test's local Ray (its raylet is a child of this process): the one running trial.
                for proc in psutil.Process(os.getpid()).children(recursive=True):
                    try:
                        title = " ".join(proc.cmdline())
                    except psutil.Error:
                        continue
                    if "ImplicitFunc" in title:
                        proc.kill()
                        killed.append(proc.pid)
                        break
            time.sleep(0.3)

    shutdown_ray()
    threading.Thread(target=kill_trial_actor_of_a, daemon=True).start()
    try:
        outcome = run_sweep(
            "ablate",
            cfg,
            arms_path=str(arms),
            tracking_uri=uri,
            num_cpus=2,  # 1.5 CPU a trial: one at a time
            callbacks=[recoveries],
            verbose=0,
            print_fn=lambda _: None,
        )
    finally:
        killed.append(-1)  # stops the thread if it never fired
        shutdown_ray()
    assert killed[0] > 0, "trial a's actor was never killed"
    assert outcome.run_statuses == {"a-mse-s0": "FINISHED", "f-fowkal-s0": "FAILED"}
    assert sorted(recoveries.trials) == ["a-mse-s0", "f-fowkal-s0"]  # Tune restarted each once
    client = tracking.make_client(uri)
    runs = {
        r.info.run_name: r
        for r in client.search_runs([client.get_experiment_by_name("fowkal-ablate").experiment_id])
    }
    steps = sorted(m.step for m in client.get_metric_history(runs["a-mse-s0"].info.run_id, "train/loss"))
    assert steps == list(range(1, epochs + 1)), steps  # continued from its checkpoint: no epoch twice
    error = runs["f-fowkal-s0"].data.tags[tracking.TAG_ERROR]
    assert error.startswith("FloatingPointError: non-finite training loss"), error
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[tracking.TAG_FAILED_TRIALS] == "1 of 2"
    # Tune's restart of f did not train: its last error is the refusal, naming the first error.
    [error_file] = (Path(outcome.sweep_dir) / "tune").glob("f-fowkal-s0_*/error.txt")
    assert "failed earlier in this sweep; not run again" in error_file.read_text()
