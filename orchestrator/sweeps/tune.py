"""A sweep on Ray Tune (``orchestrator.sweeps.sweep.run_sweep`` decides what runs, this module runs it): what
the
sweep kind chooses of the one Tuner set-up (``orchestrator.sweeps.tuner``): Optuna TPE + ASHA for ``tune``,
the arm x
seed grid without early stopping for ``ablate``, a restored Tuner on resume; the concurrency its trials' Ray
Train workers allow, the controller ledger, the progress table, and Tune's restarts of a trial whose actor
died.
"""

from __future__ import annotations

import functools
from pathlib import Path

from orchestrator.runs.resources import TRIAL_CPUS
from orchestrator.sweeps.progress import SweepProgress
from orchestrator.sweeps.settings import SweepSettings
from orchestrator.sweeps.trial import SweepPlan, run_trial, tune_trial_dirname, tune_trial_name
from orchestrator.sweeps.trial_ledger import controller_ledger
from orchestrator.sweeps.trial_status import MlflowTrialStatusCallback
from orchestrator.sweeps.tuner import (  # noqa: F401 (re-exported: sweep.py and tests import them from here)
    AshaStopping,
    EvaluationEpochOptunaSearch,
    TpeSearch,
    TunerSpec,
    fit_tuner,
    start_tune_cluster,
    tune_state_statuses,
)
from trainer.config import config_from_dict


def fit_sweep(
    plan: SweepPlan,
    settings: SweepSettings,
    status_callback: MlflowTrialStatusCallback,
    seed_values: list[int],
    callbacks: list | None,
    print_fn,
) -> tuple[int, dict[str, str]]:
    """Start Ray, build (or restore) the Tuner, run it; returns (max concurrent, trial id -> Tune status)."""
    base = config_from_dict(plan.base_config)
    resources, concurrent = start_tune_cluster(
        settings.address,
        settings.num_cpus,
        trial_cpus=TRIAL_CPUS,
        num_workers=base.num_workers,
        gpus_per_trial=plan.gpus_per_trial,
        requested=settings.max_concurrent,
    )
    print_fn(
        f"cluster: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU -> up to {concurrent} "
        f"concurrent trial(s) ({base.num_workers} worker(s) + {TRIAL_CPUS:g} CPU each)"
    )
    total_trials = plan.sweep_kind.total_trials(plan, settings, seed_values)
    reporter = SweepProgress(
        plan, epochs=base.epochs, concurrency=concurrent, print_fn=print_fn, total_trials=total_trials
    )
    spec = tuner_spec(
        plan,
        settings,
        seed_values,
        callbacks=[status_callback, *(callbacks or [])],
        progress_reporter=reporter,
        # A trial whose actor dies (its node went away) is started again, as many times as the config's
        # max_failures: its Train run continues from its checkpoint in storage. A trial whose training
        # failed is not trained again by Tune (Ray Train has already retried it: see trial.run_trial).
        max_failures=trial_restarts(base.max_failures),
    )
    with controller_ledger(plan):
        print_fn(f"each trial's worker output: {Path(plan.sweep_dir) / 'trials' / '<trial>' / 'train.log'}")
        if settings.resume:
            print_fn(
                f"resuming sweep {plan.sweep_id!r} from {plan.tune_dir} "
                "(with the trial count it started with)"
            )
        _, statuses = fit_tuner(spec, concurrent)
    return concurrent, statuses


def tuner_spec(
    plan: SweepPlan,
    settings: SweepSettings,
    seed_values: list[int],
    *,
    callbacks: list | None = None,
    progress_reporter=None,
    max_failures: int = 0,
) -> TunerSpec:
    """The sweep kind's choices: the arm x seed grid without early stopping (``ablate``), or Optuna TPE +
    ASHA over the space (``tune``); a resumed sweep restores its Tuner."""
    spec = TunerSpec(
        trial=run_trial,
        plan=plan,
        trial_cpus=TRIAL_CPUS,
        metric=plan.metric,
        mode=plan.mode,
        num_samples=settings.samples,
        storage_path=plan.storage_root,
        tune_dir=plan.tune_dir,
        trial_name=functools.partial(tune_trial_name, plan),
        trial_dirname=functools.partial(tune_trial_dirname, plan),
        callbacks=list(callbacks or []),
        progress_reporter=progress_reporter,
        verbose=bool(settings.verbose),
        max_failures=max_failures,
        restore=bool(settings.resume),
        restart_errored=bool(settings.restart_errored),
    )
    spec.param_space = plan.sweep_kind.param_space(plan, seed_values)
    if not plan.sweep_kind.early_stopping:  # the ablation grid: every arm x seed once
        spec.num_samples = 1
        return spec
    spec.search = TpeSearch(
        define_by_run=plan.space.optuna_define_by_run,
        points=plan.space.points_to_evaluate() or None,
        seed=settings.search_seed,
    )
    spec.stopping = AshaStopping(
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
        max_t=int(plan.base_config["epochs"]),
    )
    return spec


# Tune's restarts of a trial whose actor died, when the config says max_failures: -1 (retry forever): finite,
# because a restarted trial whose training had failed fails again at once (trial.run_trial) and Tune would
# restart it without end.
TRIAL_RESTARTS_CAP = 10


def trial_restarts(max_failures: int) -> int:
    """Tune's ``FailureConfig.max_failures`` for trials of a config with ``max_failures``."""
    return TRIAL_RESTARTS_CAP if max_failures < 0 else max_failures
