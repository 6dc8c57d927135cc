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
