"""Defects the faults bench (bench/faults.py) found in sweeps, as fast regression tests."""

from __future__ import annotations


def test_tpe_ignores_results_without_the_validation_metric():
    """`fowkal tune` over a validation metric with eval_interval > 1: the non-evaluation epochs report no
    val/ metric; Ray's OptunaSearch raised KeyError on the first of them and ended the whole sweep."""
    from orchestrator.sweep import EvaluationEpochOptunaSearch

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
    from orchestrator.sweep import TRIAL_RESTARTS_CAP, trial_restarts

    assert trial_restarts(0) == 0 and trial_restarts(2) == 2
    assert trial_restarts(-1) == TRIAL_RESTARTS_CAP > 0  # a failed trial's instant re-failure must end


def test_a_trial_whose_training_failed_is_not_trained_again_by_a_restart():
    """Tune restarts a trial whose actor died; a trial whose training failed is recorded in the sweep's
    ledger and its restart fails at once with the first error (Ray Train had already retried it)."""
    from orchestrator.trial import ControllerLedger

    ledger = ControllerLedger()
    assert ledger.failure("t1") is None
    ledger.mark_failed("t1", "FloatingPointError: non-finite training loss nan at epoch 1")
    assert ledger.failure("t1").startswith("FloatingPointError") and ledger.failure("t2") is None
