"""A sweep on Ray Tune (``orchestrator.sweep.run_sweep`` decides what runs, this module runs it): the
Tuner, new or restored from its experiment directory (local or at a storage URI), its TuneConfig (Optuna TPE
+ ASHA for ``tune``, the arm x seed grid without early stopping for ``ablate``), Tune's restarts of a trial
whose actor died, and the trials' statuses read back from the experiment state."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ray.tune.search.optuna import OptunaSearch

from orchestrator.progress import SweepProgress
from orchestrator.resources import TRIAL_CPUS, derive_max_concurrent
from orchestrator.sweep_settings import SweepSettings
from orchestrator.train import is_storage_uri
from orchestrator.trial import ControllerLedger, SweepPlan, run_trial, tune_trial_dirname, tune_trial_name
from orchestrator.trial_status import MlflowTrialStatusCallback, trial_id_from_path, trial_statuses_from_state
from trainer.config import config_from_dict

logger = logging.getLogger(__name__)


def fit_sweep(
    plan: SweepPlan,
    settings: SweepSettings,
    status_callback: MlflowTrialStatusCallback,
    seed_values: list[int],
    callbacks: list | None,
    print_fn,
) -> tuple[int, dict[str, str]]:
    """Start Ray, build (or restore) the Tuner, run it; returns (max concurrent, trial id -> Tune status)."""
    # Trials and Train workers keep the driver's working directory (paths are absolute anyway); the classic
    # reporter is the one that takes our metric columns (Ray's newer output ignores progress_reporter).
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Results of non-evaluation epochs lack the val/ metrics by design (ASHA skips them).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    from ray import tune
    from ray.tune import Tuner

    from orchestrator.ray_utils import init_ray, tune_signal_handlers

    # The workers' output stays in each trial's train.log: the console shows the sweep's table.
    resources = init_ray(settings.address, num_cpus=settings.num_cpus, log_to_driver=False)
    base = config_from_dict(plan.base_config)
    concurrent = derive_max_concurrent(
        resources,
        num_workers=base.num_workers,
        gpus_per_trial=plan.gpus_per_trial,
        requested=settings.max_concurrent,
    )
    print_fn(
        f"cluster: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU -> up to {concurrent} "
        f"concurrent trial(s) ({base.num_workers} worker(s) + {TRIAL_CPUS:g} CPU each)"
    )
    import ray

    # Held until the sweep ends (a named actor is kept alive by its owner's handle).
    ledger = (
        ray.remote(ControllerLedger)
        .options(name=plan.ledger_name, num_cpus=0, max_concurrency=8, get_if_exists=True)
        .remote()
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"cpu": TRIAL_CPUS})

    total_trials = len(plan.arms) * len(seed_values) if plan.kind == "ablate" else settings.samples
    reporter = SweepProgress(
        plan, epochs=base.epochs, concurrency=concurrent, print_fn=print_fn, total_trials=total_trials
    )
    print_fn(f"each trial's worker output: {Path(plan.sweep_dir) / 'trials' / '<trial>' / 'train.log'}")
    run_config = tune.RunConfig(
        name="tune",
        storage_path=plan.storage_root,
        callbacks=[status_callback, *(callbacks or [])],
        progress_reporter=reporter if settings.verbose else None,
        verbose=1 if settings.verbose else 0,
        # A trial whose actor dies (its node went away) is started again, as many times as the config's
        # max_failures: its Train run continues from its checkpoint in storage. A trial whose training
        # failed is not trained again by Tune (Ray Train has already retried it: see trial.run_trial).
        failure_config=tune.FailureConfig(max_failures=trial_restarts(base.max_failures)),
    )

    if settings.resume:
        print_fn(
            f"resuming sweep {plan.sweep_id!r} from {plan.tune_dir} (with the trial count it started with)"
        )
        tuner = Tuner.restore(
            plan.tune_dir,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=settings.restart_errored,
        )
    else:
        tune_config = tune_config_for(plan, settings, concurrent)
        tuner = Tuner(
            trainable,
            tune_config=tune_config,
            param_space=param_space(plan, seed_values),
            run_config=run_config,
        )
    with tune_signal_handlers():
        grid = tuner.fit()
    ray.kill(ledger)
    statuses = {}
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or trial_id_from_path(result.path)
        statuses[str(trial_id)] = "ERROR" if result.error is not None else "TERMINATED"
    # The experiment state is the authority on trials that never reported (PENDING or errored early).
    statuses.update(tune_state_statuses(plan.tune_dir))
    return concurrent, statuses


# Tune's restarts of a trial whose actor died, when the config says max_failures: -1 (retry forever): finite,
# because a restarted trial whose training had failed fails again at once (trial.run_trial) and Tune would
# restart it without end.
TRIAL_RESTARTS_CAP = 10


def trial_restarts(max_failures: int) -> int:
    """Tune's ``FailureConfig.max_failures`` for trials of a config with ``max_failures``."""
    return TRIAL_RESTARTS_CAP if max_failures < 0 else max_failures


def tune_state_statuses(tune_dir: str) -> dict[str, str]:
    """``trial_statuses_from_state`` of a local Tune experiment directory or of one at a storage URI (its
    ``experiment_state-*.json`` files read through pyarrow into a temporary directory)."""
    if not is_storage_uri(tune_dir):
        return trial_statuses_from_state(tune_dir)
    import tempfile

    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(tune_dir)
        infos = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        with tempfile.TemporaryDirectory(prefix="fowkal_tune_state_") as tmp:
            for info in infos:
                if info.base_name.startswith("experiment_state-") and info.base_name.endswith(".json"):
                    with filesystem.open_input_stream(info.path) as stream:
                        (Path(tmp) / info.base_name).write_bytes(stream.read())
            return trial_statuses_from_state(tmp)
    except OSError as err:
        logger.warning("could not read the Tune experiment state in %s: %s", tune_dir, err)
        return {}


def tune_config_for(plan: SweepPlan, settings: SweepSettings, concurrent: int):
    import functools

    from ray.tune import TuneConfig
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    name_creator = functools.partial(tune_trial_name, plan)
    dirname_creator = functools.partial(tune_trial_dirname, plan)
    if plan.kind == "ablate":
        return TuneConfig(
            metric=plan.metric,
            mode=plan.mode,
            scheduler=FIFOScheduler(),  # every arm x seed runs to the end: no early stopping
            num_samples=1,
            max_concurrent_trials=concurrent,
            trial_name_creator=name_creator,
            trial_dirname_creator=dirname_creator,
        )
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    searcher = EvaluationEpochOptunaSearch(
        space=plan.space.optuna_define_by_run,
        metric=plan.metric,
        mode=plan.mode,
        points_to_evaluate=plan.space.points_to_evaluate() or None,
        sampler=optuna.samplers.TPESampler(seed=settings.search_seed),
    )
    epochs = int(plan.base_config["epochs"])
    return TuneConfig(
        metric=plan.metric,
        mode=plan.mode,
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrent),
        # time_attr epoch: rungs are in epochs; results without the metric (non-eval epochs) are skipped.
        scheduler=ASHAScheduler(
            time_attr="epoch",
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
            max_t=epochs,
        ),
        num_samples=settings.samples,
        max_concurrent_trials=concurrent,
        trial_name_creator=name_creator,
        trial_dirname_creator=dirname_creator,
    )


class EvaluationEpochOptunaSearch(OptunaSearch):
    """Optuna TPE that hears only the results holding the metric: a validation metric is reported at the
    evaluation epochs alone (``eval_interval``), and OptunaSearch fails on the others with a KeyError that
    ends the whole sweep (ASHA skips them by itself)."""

    def on_trial_result(self, trial_id: str, result: dict):
        if isinstance(self.metric, str) and self.metric not in result:
            return
        super().on_trial_result(trial_id, result)


def param_space(plan: SweepPlan, seed_values: list[int]) -> dict:
    from ray import tune

    if plan.kind == "ablate":
        return {"arm": tune.grid_search(list(plan.arms)), "seed": tune.grid_search(seed_values)}
    return {}  # OptunaSearch's define-by-run function is the space
