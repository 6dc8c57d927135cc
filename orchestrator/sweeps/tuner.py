"""The one Ray Tune set-up of ``fowkal tune`` / ``fowkal ablate`` (``sweep_tune.fit_sweep``) and ``fowkal
tune-eval`` (``tune_eval._fit``): Ray started or joined and the concurrency the cluster allows
(:func:`start_tune_cluster`), then the Tuner, new or restored, with its searcher and scheduler (Optuna TPE
from given points, ASHA early stopping, or a grid run to the end), its run config and the trials' statuses
read back (:func:`fit_tuner`). What a sweep kind chooses is a :class:`TunerSpec`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from orchestrator.runs.resources import derive_max_concurrent
from orchestrator.runs.storage import is_storage_uri
from orchestrator.sweeps.trial_status import trial_id_from_path, trial_statuses_from_state

logger = logging.getLogger(__name__)

TUNE_EXPERIMENT = "tune"  # Tune's experiment directory under the sweep's storage: <storage>/tune


def start_tune_cluster(
    address: str | None,
    num_cpus: int | None,
    *,
    trial_cpus: float,
    num_workers: int = 0,
    gpus_per_trial: float = 0.0,
    requested: int | None = None,
) -> tuple[dict, int]:
    """Start or join Ray for Tune; returns (the cluster's resources, how many trials run at once).

    A trial holds ``trial_cpus`` and places ``num_workers`` Ray Train workers and ``gpus_per_trial`` GPUs
    (``resources.derive_max_concurrent``, capped by ``requested``: ``--max-concurrent``; ``SweepError`` when
    not even one trial fits).
    """
    # Trials and Train workers keep the driver's working directory (paths are absolute anyway); the classic
    # reporter is the one that takes our metric columns (Ray's newer output ignores progress_reporter).
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Results of a training trial's non-evaluation epochs lack the val/ metrics by design (ASHA skips them).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    from orchestrator.runs.ray_utils import init_ray

    # The workers' output stays in each trial's own log: the console shows the sweep's table.
    resources = init_ray(address, num_cpus=num_cpus, log_to_driver=False)
    concurrent = derive_max_concurrent(
        resources,
        num_workers=num_workers,
        gpus_per_trial=gpus_per_trial,
        requested=requested,
        trial_cpus=trial_cpus,
    )
    return resources, concurrent


@dataclass(frozen=True)
class TpeSearch:
    """Optuna TPE over a search space (its define-by-run function), the given points first."""

    define_by_run: Callable
    points: list[dict] | None
    seed: int


@dataclass(frozen=True)
class AshaStopping:
    """ASHA early stopping with rungs in epochs (results without the metric are skipped)."""

    grace_period: int
    reduction_factor: float
    max_t: int


@dataclass
class TunerSpec:
    """What a sweep kind chooses of its Tuner.

    The trial function gets ``plan`` bound (``tune.with_parameters``) and holds ``trial_cpus``; the searcher
    is ``search`` (None: the grid of ``param_space``), the scheduler ``stopping`` (None: every trial runs to
    its end). With ``restore`` the experiment in ``tune_dir`` continues instead (its unfinished trials;
    errored ones again with ``restart_errored``).
    """

    trial: Callable
    plan: Any
    trial_cpus: float
    metric: str
    mode: str
    num_samples: int
    storage_path: str  # the experiment is <storage_path>/tune (TUNE_EXPERIMENT)
    tune_dir: str  # that directory, spelt as the plan spells it (a local path or a storage URI)
    trial_name: Callable
    trial_dirname: Callable
    search: TpeSearch | None = None
    stopping: AshaStopping | None = None
    param_space: dict = field(default_factory=dict)
    # A trial's actor runs the next trial (Tune's default for function trainables): no process start and
    # imports per trial. A trial whose function has not returned 2 s after it ended gets a new actor.
    reuse_actors: bool = True
    callbacks: list = field(default_factory=list)
    progress_reporter: Any = None
    verbose: bool = True
    max_failures: int = 0  # Tune's restarts of a trial whose actor died
    restore: bool = False
    restart_errored: bool = False


def fit_tuner(spec: TunerSpec, concurrent: int):
    """Build the Tuner of ``spec`` (new or restored), run it with up to ``concurrent`` trials at once;
    returns (Tune's result grid, trial id -> ``TERMINATED`` / ``ERROR`` / the experiment state's status)."""
    from ray import tune

    from orchestrator.runs.ray_utils import tune_signal_handlers

    trainable = tune.with_parameters(spec.trial, plan=spec.plan)
    trainable = tune.with_resources(trainable, {"cpu": spec.trial_cpus})
    if spec.restore:
        # The run config (callbacks, reporter, failure config) is the one the experiment was started with.
        tuner = tune.Tuner.restore(
            spec.tune_dir,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=spec.restart_errored,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune_config_of(spec, concurrent),
            param_space=spec.param_space,
            run_config=tune.RunConfig(
                name=TUNE_EXPERIMENT,
                storage_path=spec.storage_path,
                callbacks=list(spec.callbacks),
                progress_reporter=spec.progress_reporter if spec.verbose else None,
                verbose=1 if spec.verbose else 0,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            ),
        )
    with tune_signal_handlers():
        grid = tuner.fit()
    statuses = {}
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or trial_id_from_path(result.path)
        statuses[str(trial_id)] = "ERROR" if result.error is not None else "TERMINATED"
    # The experiment state is the authority on trials that never reported (PENDING or errored early).
    statuses.update(tune_state_statuses(spec.tune_dir))
    return grid, statuses


def tune_config_of(spec: TunerSpec, concurrent: int):
    """The ``TuneConfig``: the searcher (TPE behind a concurrency limit, or none: the grid) and the scheduler
    (ASHA, or FIFO: no early stopping)."""
    from ray.tune import TuneConfig
    from ray.tune.schedulers import FIFOScheduler

    search_alg = None
    if spec.search is not None:
        import optuna
        from ray.tune.search import ConcurrencyLimiter

        searcher = EvaluationEpochOptunaSearch(
            space=spec.search.define_by_run,
            metric=spec.metric,
            mode=spec.mode,
            points_to_evaluate=spec.search.points,
            sampler=optuna.samplers.TPESampler(seed=spec.search.seed),
        )
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=concurrent)
    scheduler = FIFOScheduler()
    if spec.stopping is not None:
        # time_attr epoch: rungs are in epochs; results without the metric (non-eval epochs) are skipped.
        scheduler = LastEpochFinishesASHA(
            time_attr="epoch",
            grace_period=spec.stopping.grace_period,
            reduction_factor=spec.stopping.reduction_factor,
            max_t=spec.stopping.max_t,
        )
    return TuneConfig(
        metric=spec.metric,
        mode=spec.mode,
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=spec.num_samples,
        max_concurrent_trials=concurrent,
        reuse_actors=spec.reuse_actors,
        trial_name_creator=spec.trial_name,
        trial_dirname_creator=spec.trial_dirname,
    )


class LastEpochFinishesASHA(ASHAScheduler):
    """ASHA that lets a trial at its last epoch (``max_t``) end by itself. ASHA stops a trial once it reaches
    ``max_t`` (or a rung placed there): Tune would then kill the trial's actor while the trial function has
    still to log the run's outputs (checkpoints, latency) and end it FINISHED."""

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE  # the training loop ends there anyway
        return decision


class EvaluationEpochOptunaSearch(OptunaSearch):
    """Optuna TPE that hears only the results holding the metric: a validation metric is reported at the
    evaluation epochs alone (``eval_interval``), and OptunaSearch fails on the others with a KeyError that
    ends the whole sweep (ASHA skips them by itself). A tune-eval trial's one result always holds it."""

    def on_trial_result(self, trial_id: str, result: dict):
        if isinstance(self.metric, str) and self.metric not in result:
            return
        super().on_trial_result(trial_id, result)


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


__all__ = [
    "TUNE_EXPERIMENT",
    "AshaStopping",
    "EvaluationEpochOptunaSearch",
    "LastEpochFinishesASHA",
    "TpeSearch",
    "TunerSpec",
    "fit_tuner",
    "start_tune_cluster",
    "tune_config_of",
    "tune_state_statuses",
]
