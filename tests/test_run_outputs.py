"""A run's outputs in MLflow (orchestrator/runs/outputs.py): the data set inputs survive a concurrent trial.

Trials of one sweep log the same data sets at about the same time; the store creates a data set once per
experiment (unique on experiment, name, digest), so a trial that loses that race gets an error from
``log_inputs``. Here the race is injected: a real SQLite store, and a client whose first ``log_inputs`` call
fails as the loser's does (after another run has created the data set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from run_checks import input_contexts

from orchestrator import tracking
from orchestrator.runs.outputs import DATASET_INPUT_ATTEMPTS, log_run_outputs
from trainer.config import load_config
from trainer.loop import resolve_datasets

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


@dataclass
class NoCheckpoints:  # what log_run_outputs reads of a Ray Train Result, for a run that saved none
    best_checkpoints: list = field(default_factory=list)
    checkpoint: None = None


class LosesTheRace:
    """A real MlflowClient whose first ``failures`` log_inputs calls fail as a trial that lost the race."""

    def __init__(self, client, failures: int, rival_run: str):
        self._client, self.failures, self.rival_run, self.calls = client, failures, rival_run, 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def log_inputs(self, run_id, datasets=None, models=None):
        self.calls += 1
        if self.calls <= self.failures:
            self._client.log_inputs(self.rival_run, datasets=datasets)  # the rival creates the data sets
            raise MlflowException("UNIQUE constraint failed: datasets.experiment_id, datasets.name")
        return self._client.log_inputs(run_id, datasets=datasets, models=models)


def _contexts(client, run_id: str) -> set[str]:
    return input_contexts(client.get_run(run_id))


def _setup(tmp_path: Path):
    cfg = load_config(
        SMOKE,
        [
            f"data.synthetic_dir={tmp_path / 'synthetic'}",
            "data.synthetic_train_images=2",
            "data.synthetic_val_images=2",
            "loss.variant=mse",
        ],
    )
    resolve_datasets(cfg.data)
    client = tracking.make_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = tracking.get_or_create_experiment(client, "outputs")
    rival = tracking.start_run(client, experiment_id, "rival")
    run_id = tracking.start_run(client, experiment_id, "trial")
    return cfg, client, rival, run_id


def test_a_trial_that_loses_the_data_set_race_still_gets_its_inputs(tmp_path):
    cfg, client, rival, run_id = _setup(tmp_path)
    racing = LosesTheRace(client, failures=1, rival_run=rival)
    printed: list[str] = []
    log_run_outputs(racing, run_id, cfg, NoCheckpoints(), print_fn=printed.append)
    assert racing.calls == 2 and printed == []
    assert _contexts(client, run_id) == {"training", "validation"}
    assert _contexts(client, rival) == {"training", "validation"}  # the same data sets, created once
    digests = {d.dataset.digest for d in client.get_run(run_id).inputs.dataset_inputs}
    assert digests == {d.dataset.digest for d in client.get_run(rival).inputs.dataset_inputs}


def test_inputs_that_cannot_be_logged_cost_the_run_nothing_else(tmp_path):
    cfg, client, rival, run_id = _setup(tmp_path)
    racing = LosesTheRace(client, failures=DATASET_INPUT_ATTEMPTS, rival_run=rival)
    printed: list[str] = []
    outputs = log_run_outputs(racing, run_id, cfg, NoCheckpoints(), print_fn=printed.append)
    assert racing.calls == DATASET_INPUT_ATTEMPTS
    assert len(printed) == 1 and "could not log the data set inputs" in printed[0] and "UNIQUE" in printed[0]
    assert outputs.artifacts == [tracking.CONFIG_ARTIFACT] and _contexts(client, run_id) == set()
