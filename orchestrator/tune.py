"""``fowkal tune`` and ``fowkal ablate``: Ray Tune trials, each launching a Ray Train run, in MLflow.

Sweeps (Optuna TPE + ASHA over a search space) and ablations (every arm x seed, no early stopping) share one
engine, :func:`run_sweep`:

- Everything that can be wrong with the inputs (config, search space or arms file, every arm and the paper
  point applied to the config, the resume state) is checked before Ray starts.
- Each Tune trial is :func:`run_trial`, a *function* that builds the trial's ``TrainConfig`` (base config +
  sampled values or the arm's overrides + seed), creates or reopens its MLflow child run, and runs a
  ``ray.train.torch.TorchTrainer`` whose ``RunConfig`` callbacks are Tune's ``TuneReportCallback`` (every
  ``ray.train.report`` of the workers becomes a Tune result, so ASHA sees each epoch) and
  ``orchestrator.train.MlflowReportCallback`` (the same metrics into the child run). This is the Train V2
  way of tuning a Train run; handing a Trainer to ``Tuner`` is deprecated.
- A trial holds ``TRIAL_CPUS`` itself and its Ray Train workers take their own placement group, so the
  number of concurrent trials is derived from the cluster (:func:`derive_max_concurrent`): Tune never
  starts more trials than the cluster can also place the workers of, so no trial waits forever.
- When ASHA stops a trial, Tune terminates the trial's actor; the Train controller it created (and with it
  the workers and their placement group) is owned by that actor and goes with it.
- MLflow: one parent run per sweep, found again by its resume key on ``--resume``; one child run per trial,
  keyed by ``<sweep id>/<trial id>`` (Tune keeps trial ids across ``Tuner.restore``), so a resumed sweep never
  duplicates a run. :class:`MlflowTrialStatusCallback` (driver side) ends every child with its real status:
  FINISHED when the trial trained all epochs, KILLED when the scheduler stopped it early, FAILED on an
  error; at the end of the sweep any child still RUNNING gets its Tune trial's status.
- ``--resume`` restores the Tune experiment (``Tuner.restore(resume_unfinished=True)``): finished trials are
  kept, unfinished ones restart under the same trial id and their Ray Train run (stable name per trial)
  continues from its last checkpoint.

Directory layout of a sweep, ``<output_dir>/sweeps/<sweep name>/``: ``tune/`` (the Tune experiment),
``train/`` (Ray Train storage of the trials), ``trials/<run name>/`` (each trial's ``output_dir``), and the
results: ``best_config.yaml``, ``summary.md``, ``importances.png``, ``parallel_coordinates.png`` (sweeps),
``ablation.md``, ``ablation.png`` (ablations).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray.train import UserCallback
from ray.tune import Callback as TuneCallback

from orchestrator import tracking
from orchestrator.search_space import (
    AblationArm,
    SearchSpace,
    SearchSpaceError,
    apply_overrides,
    load_ablation_arms,
    load_search_space,
)
from trainer.config import ConfigError, TrainConfig, config_from_dict, config_to_dict, flatten_config

logger = logging.getLogger(__name__)

SWEEP_KINDS = ("tune", "ablate")
DEFAULT_EXPERIMENTS = {"tune": "fowkal-tune", "ablate": "fowkal-ablate"}
# CPUs the trial function itself holds (it only waits on the Train controller). Fractional so that on a GPU
# cluster the CPUs left over after the workers still fit a trial per GPU.
TRIAL_CPUS = 0.5
# Ray Train's default per worker (ScalingConfig.resources_per_worker) when none is given.
CPUS_PER_WORKER = 1.0
# Checkpoints kept per trial by Ray Train (the latest one is always kept too, for resuming a trial).
TRIAL_CHECKPOINTS_TO_KEEP = 1
ABLATION_METRIC = "val/wholebody_AP"
# Tags (besides tracking.TAG_* ones).
TAG_SWEEP_KIND = "fowkal.sweep_kind"
TAG_SWEEP_DIR = "fowkal.sweep_dir"
TAG_TRIAL_ID = "fowkal.trial_id"
TAG_ARM_KEY = "fowkal.arm_key"
TAG_ARM_LABEL = "fowkal.arm_label"
TAG_METRIC = "fowkal.metric"
TAG_MODE = "fowkal.mode"
TAG_SAMPLED = "fowkal.sampled_params"  # JSON list of the sampled dotted keys (sweeps)
TAG_END_REASON = "fowkal.end_reason"
# Parent-run artifacts the report reads back.
ARMS_ARTIFACT = "arms.json"
SPACE_ARTIFACT = "search_space.json"


class SweepError(ValueError):
    """Invalid sweep or ablation settings (names the flag or file and the value)."""


# ------------------------------------------------------------------------------------------------------------
# The plan every trial receives


@dataclass
class SweepPlan:
    """Everything a trial needs, shipped to it by ``tune.with_parameters`` (plain, picklable data)."""

    kind: str  # "tune" or "ablate"
    sweep_id: str  # = the sweep name; stable across --resume
    sweep_dir: str
    base_config: dict  # config_to_dict of the (path-resolved) base TrainConfig
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str
    mode: str
    gpus_per_trial: float = 0.0
    space: SearchSpace | None = None
    arms: dict[str, AblationArm] = field(default_factory=dict)

    @property
    def tune_dir(self) -> str:
        return str(Path(self.sweep_dir) / "tune")

    @property
    def train_storage(self) -> str:
        return str(Path(self.sweep_dir) / "train")

    @property
    def ledger_name(self) -> str:
        """Name of the sweep's :class:`ControllerLedger` actor."""
        return f"fowkal-ledger-{self.sweep_id}"


def trial_resume_key(sweep_id: str, trial_id: str) -> str:
    """The MLflow resume-key tag of a trial's child run: ``<sweep id>/<trial id>``."""
    return f"{sweep_id}/{trial_id}"


def trial_run_name(plan: SweepPlan, trial_config: dict, experiment_tag: str = "") -> str:
    """Readable child-run name: ``tpe-017`` (the sweep's 17th trial) or ``<arm name>-s<seed>``."""
    if plan.kind == "ablate":
        arm = plan.arms[trial_config["arm"]]
        return f"{arm.name}-s{int(trial_config['seed'])}"
    head = str(experiment_tag).split("_", 1)[0]
    index = int(head) if head.isdigit() else 0
    return f"tpe-{index:03d}"


def _tune_trial_name(plan: SweepPlan, trial) -> str:
    """``TuneConfig(trial_name_creator=...)``: the run name shown in the progress table."""
    return trial_run_name(plan, trial.config, trial.experiment_tag)


def _tune_trial_dirname(plan: SweepPlan, trial) -> str:
    return f"{_tune_trial_name(plan, trial)}_{trial.trial_id}"


def trial_overrides(plan: SweepPlan, trial_config: dict) -> dict[str, Any]:
    """Dotted ``TrainConfig`` overrides of a trial: the sampled values, or the arm's overrides and seed."""
    if plan.kind == "ablate":
        arm = plan.arms[trial_config["arm"]]
        return {**arm.overrides, "seed": int(trial_config["seed"])}
    assert plan.space is not None
    return plan.space.to_overrides(trial_config, ignore_unknown=True)


def trial_train_config(plan: SweepPlan, trial_config: dict, run_name: str) -> TrainConfig:
    """The trial's validated ``TrainConfig``: base + :func:`trial_overrides`, its own ``output_dir``."""
    values = apply_overrides(plan.base_config, trial_overrides(plan, trial_config))
    values["output_dir"] = str(Path(plan.sweep_dir) / "trials" / run_name)
    values["use_gpu"] = plan.gpus_per_trial > 0
    return config_from_dict(values, source=f"trial {run_name} of sweep {plan.sweep_id}")


def _scaling_config(cfg: TrainConfig, gpus_per_trial: float):
    from ray.train import ScalingConfig

    if gpus_per_trial > 0:
        return ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=True,
            resources_per_worker={"CPU": CPUS_PER_WORKER, "GPU": gpus_per_trial / cfg.num_workers},
        )
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=False)


def run_trial(trial_config: dict, plan: SweepPlan) -> None:
    """One Tune trial: build the config, open the MLflow child run, run a TorchTrainer reporting to Tune.

    Called by Tune in the trial's actor (through ``tune.with_parameters(run_trial, plan=...)``). Ends the
    child run as FINISHED or FAILED itself; a trial that Tune stops never gets here again, and the driver's
    :class:`MlflowTrialStatusCallback` ends its run as KILLED.
    """
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.train import MlflowReportCallback
    from trainer.loop import train_loop_per_worker

    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    run_name = context.get_trial_name() or trial_run_name(plan, trial_config)
    cfg = trial_train_config(plan, trial_config, run_name)
    client = tracking.make_client(plan.tracking_uri)
    arm = plan.arms.get(trial_config.get("arm")) if plan.kind == "ablate" else None
    extra = {TAG_TRIAL_ID: trial_id, TAG_SWEEP_KIND: plan.kind}
    if arm is not None:
        extra.update({TAG_ARM_KEY: arm.key, TAG_ARM_LABEL: arm.label})
    run_id = tracking.start_run(
        client,
        plan.experiment_id,
        run_name,
        params=flatten_config(cfg),
        tags=tracking.build_run_tags(
            loss_variant=cfg.loss.variant,
            dataset_kind=cfg.data.kind,
            commit=tracking.git_commit(),
            parent_run_id=plan.parent_run_id,
            arm=arm.name if arm is not None else None,
            seed=cfg.seed,
            sweep_id=plan.sweep_id,
            extra=extra,
        ),
        resume_key=trial_resume_key(plan.sweep_id, trial_id),
    )
    try:
        tracking.log_config_yaml(run_id, config_to_dict(cfg), client=client)
        trainer_ = _torch_trainer(
            train_loop_per_worker,
            config_to_dict(cfg),
            _scaling_config(cfg, plan.gpus_per_trial),
            RunConfig(
                name=trial_id,  # stable: a restored trial continues its Ray Train run from the checkpoint
                storage_path=plan.train_storage,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=TRIAL_CHECKPOINTS_TO_KEEP),
                # Order matters: the controller is registered before Tune sees the first result (and so
                # before the scheduler can stop the trial).
                callbacks=[
                    ControllerRegistrar(plan.ledger_name, trial_id),
                    TuneReportCallback(),
                    MlflowReportCallback(plan.tracking_uri, run_id),
                ],
            ),
        )
        result = trainer_.fit()
        if _tune_iterations() == 0 and result.metrics:
            # The Train run had already finished before a --resume (the driver died between the trial's
            # last epoch and Tune's next state snapshot): nothing new was reported, so hand Tune the final
            # metrics the run recorded.
            ray.tune.report(dict(result.metrics))
    except BaseException as err:
        if _was_aborted(plan, trial_id):
            # The scheduler stopped the trial and the driver aborted its Train run (ending the child run as
            # KILLED): not a failure.
            return
        tracking.end_run(run_id, "FAILED", client=client, error=err)
        raise
    tracking.end_run(run_id, "FINISHED", client=client)


def _torch_trainer(train_fn, train_loop_config: dict, scaling_config, run_config):
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_fn, train_loop_config=train_loop_config, scaling_config=scaling_config, run_config=run_config
    )


def _tune_iterations() -> int | None:
    """Results this trial has passed to Tune so far, or None if Ray's (internal) session cannot tell."""
    try:
        from ray.train._internal.session import get_session

        return int(get_session().iteration)
    except Exception:
        return None


class ControllerLedger:
    """Sweep-wide actor (named :attr:`SweepPlan.ledger_name`, owned by the driver): which Ray Train
    controller runs which trial, so the driver can abort a trial's Train run when the scheduler stops it.

    Why: Tune stops a trial by terminating its actor. The Train controller that actor created dies with it,
    but the workers' placement group is scoped to the *job* (the sweep driver) and stays reserved; Ray
    Train's own cleaner finds dead controllers through the State API, which cannot be relied on (e.g. it
    fails when several Ray instances run on one machine). Aborting the controller first releases the
    workers and their placement group the way Ctrl-C does in ``fowkal train``.
    """

    def __init__(self):
        self._controllers: dict[str, Any] = {}
        self._aborted: set[str] = set()

    def register(self, trial_id: str, controller) -> None:
        self._controllers[trial_id] = controller

    def was_aborted(self, trial_id: str) -> bool:
        return trial_id in self._aborted

    def abort(self, trial_id: str, timeout_s: float = 120.0) -> bool:
        """Abort the trial's Train controller (graceful: workers stopped, placement group removed).

        Returns True if a live controller was aborted, False if there was none or it had already exited.
        """
        import ray

        controller = self._controllers.pop(trial_id, None)
        if controller is None:
            return False
        self._aborted.add(trial_id)
        try:
            ray.get(controller.abort.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            pass  # abort() ends with exit_actor(): the call "fails" once the controller is gone
        except ray.exceptions.GetTimeoutError:
            ray.kill(controller)
        return True


class ControllerRegistrar(UserCallback):
    """Ray Train ``UserCallback`` that registers its controller with the sweep's ledger at the first report.

    Runs on the Train controller; ``ray.get_runtime_context().current_actor`` is the controller itself.
    """

    def __init__(self, ledger_name: str, trial_id: str):
        self.ledger_name = ledger_name
        self.trial_id = trial_id
        self._registered = False

    def after_report(self, run_context, metrics, checkpoint):
        if self._registered:
            return
        try:
            import ray

            ledger = ray.get_actor(self.ledger_name)
            controller = ray.get_runtime_context().current_actor
            ray.get(ledger.register.remote(self.trial_id, controller), timeout=60)
            self._registered = True
        except Exception as err:  # without it only the early stop leaks resources; training goes on
            logger.warning("could not register trial %s with %s: %s", self.trial_id, self.ledger_name, err)

    def after_exception(self, run_context, worker_exceptions):
        pass


def _was_aborted(plan: SweepPlan, trial_id: str) -> bool:
    try:
        import ray

        return bool(ray.get(ray.get_actor(plan.ledger_name).was_aborted.remote(trial_id), timeout=30))
    except Exception:
        return False


def _abort_trial_controller(plan: SweepPlan, trial_id: str) -> None:
    try:
        import ray

        ledger = ray.get_actor(plan.ledger_name)
        ray.get(ledger.abort.remote(trial_id), timeout=180)
    except Exception as err:
        logger.warning("could not abort the Train run of trial %s: %s", trial_id, err)


# ------------------------------------------------------------------------------------------------------------
# Driver side: child-run statuses


def trial_end_status(plan: SweepPlan, trial_config: dict, last_result: dict | None, errored: bool) -> str:
    """MLflow status of a trial that Tune considers done: FAILED, FINISHED (all epochs) or KILLED."""
    if errored:
        return "FAILED"
    epochs = int(apply_overrides(plan.base_config, trial_overrides(plan, trial_config))["epochs"])
    reached = (last_result or {}).get("epoch")
    if isinstance(reached, int | float) and not isinstance(reached, bool) and reached >= epochs:
        return "FINISHED"
    return "KILLED"


class MlflowTrialStatusCallback(TuneCallback):
    """Tune callback on the driver: ends each trial's MLflow child run with the status Tune saw.

    ``on_trial_complete`` covers trials that finished and trials the scheduler stopped (KILLED when the
    last reported epoch is short of the config's epochs), ``on_trial_error`` failed ones, and
    ``on_experiment_end`` reconciles every trial, so no child of a completed sweep stays RUNNING.
    """

    def __init__(self, plan: SweepPlan):
        self.plan = plan
        self._client = None

    def __getstate__(self):  # pickled into the Tune experiment state; a client holds connections
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def _get_client(self):
        if self._client is None:
            self._client = tracking.make_client(self.plan.tracking_uri)
        return self._client

    def _end(self, trial, status: str, reason: str) -> None:
        try:
            client = self._get_client()
            key = trial_resume_key(self.plan.sweep_id, trial.trial_id)
            run_id = tracking.find_run_by_resume_key(client, self.plan.experiment_id, key)
            if run_id is None:
                return  # the trial never started: no run to end
            current = client.get_run(run_id).info.status
            if current == "FAILED" and status != "FAILED":
                return  # the trial function recorded a failure; keep it
            if current == status:
                return  # already ended so (by the trial itself, or earlier by this callback)
            client.set_tag(run_id, TAG_END_REASON, reason)
            error = None
            if status == "FAILED":
                error = _trial_error_text(trial) or "trial failed (see the Ray Tune logs)"
            tracking.end_run(run_id, status, client=client, error=error)
        except Exception as err:  # never let MLflow trouble stop the sweep
            logger.warning("could not end the MLflow run of trial %s: %s", trial, err)

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Called before Tune terminates the trial's actor: abort its Train run first, so the workers and
        # their placement group are released (a finished run's controller is gone already: a no-op).
        _abort_trial_controller(self.plan, trial.trial_id)
        status = trial_end_status(self.plan, trial.config, trial.last_result, errored=False)
        reason = "finished" if status == "FINISHED" else "stopped early by the scheduler"
        self._end(trial, status, reason)

    def on_trial_error(self, iteration, trials, trial, **info):
        _abort_trial_controller(self.plan, trial.trial_id)
        self._end(trial, "FAILED", "error")

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            if trial.status == "ERROR":
                self._end(trial, "FAILED", "error")
            elif trial.status == "TERMINATED":
                status = trial_end_status(self.plan, trial.config, trial.last_result, errored=False)
                self._end(trial, status, "reconciled at the end of the sweep")
            else:  # PENDING / PAUSED / RUNNING at the end: interrupted (e.g. Ctrl-C of the driver)
                self._end(trial, "KILLED", f"sweep ended with the trial {trial.status}")


def _trial_error_text(trial) -> str | None:
    path = getattr(trial, "error_file", None) or getattr(
        getattr(trial, "run_metadata", None), "error_filename", None
    )
    try:
        if path and Path(path).is_file():
            return Path(path).read_text()[-4000:]
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------------------
# Resources


def derive_max_concurrent(
    cluster_resources: dict,
    *,
    num_workers: int,
    gpus_per_trial: float,
    requested: int | None = None,
    trial_cpus: float = TRIAL_CPUS,
) -> int:
    """How many trials can run at once so that every one can also place its Ray Train workers.

    A trial needs ``trial_cpus + num_workers x CPUS_PER_WORKER`` CPUs and ``gpus_per_trial`` GPUs; the result
    is the number of such trials the cluster holds, capped by ``requested`` (``--max-concurrent``).

    Raises:
        SweepError: not even one trial fits, or ``requested`` < 1.
    """
    if requested is not None and requested < 1:
        raise SweepError(f"--max-concurrent must be >= 1, got {requested!r}")
    cpus = float(cluster_resources.get("CPU", 0.0))
    gpus = float(cluster_resources.get("GPU", 0.0))
    cpu_per_trial = trial_cpus + num_workers * CPUS_PER_WORKER
    fits = math.floor(cpus / cpu_per_trial + 1e-9)
    if gpus_per_trial > 0:
        fits = min(fits, math.floor(gpus / gpus_per_trial + 1e-9))
    if fits < 1:
        raise SweepError(
            f"one trial needs {cpu_per_trial:g} CPU ({num_workers} worker(s) x {CPUS_PER_WORKER:g} + "
            f"{trial_cpus:g} for the trial) and {gpus_per_trial:g} GPU, but the cluster has {cpus:g} CPU "
            f"and {gpus:g} GPU: lower num_workers (--set num_workers=1) or --gpus-per-trial"
        )
    return min(fits, requested) if requested is not None else fits


# ------------------------------------------------------------------------------------------------------------
# The engine


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` returns."""

    kind: str
    sweep_id: str
    sweep_dir: str
    tracking_uri: str
    experiment_name: str
    parent_run_id: str
    max_concurrent: int
    trial_statuses: dict[str, str]  # Tune trial id -> Tune status at the end
    run_statuses: dict[str, str]  # child run name -> MLflow status at the end
    best_config_path: str | None = None
    summary_path: str | None = None
    table_markdown: str = ""
    artifacts: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0


def sweep_name_for(kind: str, config: TrainConfig, definition_text: str, extra: dict) -> str:
    """Stable default sweep name ``<config name>-<kind>-<8 hex>``: same inputs, same sweep (resumable)."""
    values = config_to_dict(config)
    values.pop("max_failures", None)
    payload = json.dumps({"config": values, "definition": definition_text, **extra}, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(config.name)) or "sweep"
    return f"{safe}-{kind}-{digest}"


def _check_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise SweepError(f"--name must be letters, digits, '-', '_' or '.', got {name!r}")
    return name


def _validate_trial_configs(plan: SweepPlan, source: str) -> None:
    """Apply the paper point / every arm to the base config now, so a bad combination fails before Ray."""
    if plan.kind == "ablate":
        candidates = [({"arm": key, "seed": int(plan.base_config["seed"])}, key) for key in plan.arms]
    else:
        assert plan.space is not None
        candidates = []
        for i, point in enumerate(plan.space.points_to_evaluate()):
            constants = {
                name: p.value for name, p in plan.space.parameters.items() if p.distribution == "constant"
            }
            candidates.append(({**constants, **point}, f"points_to_evaluate[{i}]"))
    for trial_config, label in candidates:
        try:
            trial_train_config(plan, trial_config, "check")
        except (ConfigError, SearchSpaceError, ValueError) as err:
            raise SweepError(f"{source}: {label} does not give a valid config: {err}") from err


def run_sweep(
    kind: str,
    config: TrainConfig,
    *,
    space_path: str | os.PathLike | None = None,
    arms_path: str | os.PathLike | None = None,
    samples: int = 10,
    seeds: int = 1,
    max_concurrent: int | None = None,
    gpus_per_trial: float | None = None,
    grace_period: int = 1,
    reduction_factor: int = 2,
    search_seed: int = 0,
    resume: bool = False,
    restart_errored: bool = False,
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    name: str | None = None,
    storage_path: str | os.PathLike | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    verbose: int = 1,
    callbacks: list | None = None,
    print_fn=print,
) -> SweepOutcome:
    """Run (or ``resume``) a hyperparameter sweep (``kind="tune"``) or an ablation (``kind="ablate"``).

    Args:
        kind: "tune" (needs ``space_path``) or "ablate" (needs ``arms_path``).
        config: base training config; trials override it.
        samples: Tune trials of a sweep (the search space's points to evaluate come first).
        seeds: seeds per arm of an ablation: ``config.seed``, ``config.seed + 1``, ...
        max_concurrent: cap on concurrent trials; the cluster's resources give the actual number.
        gpus_per_trial: GPUs per trial (spread over ``config.num_workers`` workers); default
            ``config.num_workers`` if ``config.use_gpu`` else 0.
        grace_period, reduction_factor: ASHA's, in epochs (sweeps only).
        search_seed: seed of Optuna's TPE sampler (sweeps only).
        resume: continue the interrupted sweep of the same name.
        restart_errored: with ``resume``, run errored trials again (as new trials and child runs).
        tracking_uri: MLflow store (default as ``fowkal train``: ``sqlite:///<output_dir>/mlflow.db``).
        experiment_name: MLflow experiment (default ``fowkal-tune`` / ``fowkal-ablate``).
        name: sweep name (default :func:`sweep_name_for`).
        storage_path: directory holding ``<name>/`` (default ``<output_dir>/sweeps``); on a multi-node
            cluster it must be shared by all nodes.
        address, num_cpus: Ray cluster address, or logical CPUs of a local Ray (``init_ray``).
        verbose: 0 = no progress table, 1 = Tune's table with the metric columns.
        callbacks: extra ``ray.tune.Callback`` objects (driver side), e.g. for measurements.

    Raises:
        SweepError, SearchSpaceError, ConfigError: bad inputs, before Ray starts.
    """
    from trainer.config import resolve_paths

    start = time.perf_counter()
    if kind not in SWEEP_KINDS:
        raise SweepError(f"kind must be one of {SWEEP_KINDS}, got {kind!r}")
    if kind == "tune" and (not isinstance(samples, int) or samples < 1):
        raise SweepError(f"--samples must be a positive integer, got {samples!r}")
    if kind == "ablate" and (not isinstance(seeds, int) or seeds < 1):
        raise SweepError(f"--seeds must be a positive integer, got {seeds!r}")
    for flag, value in (("--grace-period", grace_period), ("--reduction-factor", reduction_factor)):
        if not isinstance(value, int) or value < 1 or (flag == "--reduction-factor" and value < 2):
            raise SweepError(f"{flag} must be an integer >= {2 if 'reduction' in flag else 1}, got {value!r}")
    if gpus_per_trial is None:
        gpus_per_trial = float(config.num_workers) if config.use_gpu else 0.0
    if not isinstance(gpus_per_trial, int | float) or gpus_per_trial < 0:
        raise SweepError(f"--gpus-per-trial must be >= 0, got {gpus_per_trial!r}")

    # ---- inputs, all before Ray
    space: SearchSpace | None = None
    arms: list[AblationArm] = []
    if kind == "tune":
        if space_path is None:
            raise SweepError("fowkal tune needs --space FILE")
        space = load_search_space(space_path)
        definition_text = Path(space_path).read_text()
        metric, mode = space.metric, space.mode
    else:
        if arms_path is None:
            raise SweepError("fowkal ablate needs --arms FILE")
        arms = load_ablation_arms(arms_path)
        definition_text = Path(arms_path).read_text()
        metric, mode = ABLATION_METRIC, "max"
    if grace_period >= config.epochs and kind == "tune":
        raise SweepError(
            f"--grace-period ({grace_period}) must be below the config's epochs ({config.epochs}): "
            "ASHA would never stop a trial"
        )
    config = resolve_paths(config)  # trial actors and Train workers may run in other directories
    sweep_name = _check_name(name) if name else None
    sweep_name = sweep_name or sweep_name_for(
        kind, config, definition_text, {"search_seed": search_seed, "seeds": seeds, "samples": samples}
    )
    base_storage = Path(storage_path).expanduser() if storage_path else Path(config.output_dir) / "sweeps"
    sweep_dir = (base_storage / sweep_name).resolve()
    tune_dir = sweep_dir / "tune"
    if resume and not (tune_dir / "tuner.pkl").is_file():
        raise SweepError(
            f"--resume: no interrupted sweep {sweep_name!r} in {sweep_dir} (no tune/tuner.pkl); "
            "run without --resume to start it, or pass the --name of the sweep to resume"
        )
    if not resume and tune_dir.exists():
        raise SweepError(
            f"sweep {sweep_name!r} already exists in {sweep_dir}: pass --resume to continue it, "
            "or --name NEW_NAME to start another"
        )
    uri = tracking.resolve_tracking_uri(tracking_uri, config.output_dir)
    experiment_name = experiment_name or DEFAULT_EXPERIMENTS[kind]
    plan = SweepPlan(
        kind=kind,
        sweep_id=sweep_name,
        sweep_dir=str(sweep_dir),
        base_config=config_to_dict(config),
        tracking_uri=uri,
        experiment_id="",
        parent_run_id="",
        metric=metric,
        mode=mode,
        gpus_per_trial=float(gpus_per_trial),
        space=space,
        arms={arm.key: arm for arm in arms},
    )
    _validate_trial_configs(plan, str(space_path or arms_path))
    seed_values = [config.seed + i for i in range(seeds)]

    # ---- MLflow parent run (reopened by its resume key on --resume)
    client = tracking.make_client(uri)
    experiment_id = tracking.get_or_create_experiment(client, experiment_name)
    parent_tags = tracking.build_run_tags(
        loss_variant=config.loss.variant if kind == "tune" else None,
        dataset_kind=config.data.kind,
        commit=tracking.git_commit(),
        sweep_id=sweep_name,
        extra={
            TAG_SWEEP_KIND: kind,
            TAG_SWEEP_DIR: str(sweep_dir),
            TAG_METRIC: metric,
            TAG_MODE: mode,
            "fowkal.definition_file": str(space_path or arms_path),
            **({TAG_SAMPLED: json.dumps(list(space.sampled_names))} if space is not None else {}),
        },
    )
    sweep_params = {f"base.{k}": v for k, v in flatten_config(config).items()}
    if kind == "tune":
        sweep_params.update({"sweep.samples": samples, "sweep.search_seed": search_seed})
    else:
        sweep_params.update({"sweep.seeds": json.dumps(seed_values), "sweep.arms": ",".join(plan.arms)})
    parent_run_id = tracking.start_run(
        client,
        experiment_id,
        sweep_name,
        params=sweep_params,
        tags=parent_tags,
        resume_key=f"sweep:{sweep_name}",
    )
    plan.experiment_id, plan.parent_run_id = experiment_id, parent_run_id
    print_fn(f"MLflow parent run {parent_run_id} ({sweep_name}) in {uri}, experiment {experiment_name!r}")
    try:
        tracking.log_config_yaml(parent_run_id, plan.base_config, client=client, filename="base_config.yaml")
        client.log_text(parent_run_id, definition_text, Path(space_path or arms_path).name)
        if kind == "ablate":
            client.log_text(parent_run_id, json.dumps([asdict(a) for a in arms], indent=1), ARMS_ARTIFACT)
        else:
            client.log_text(parent_run_id, json.dumps(_space_summary(space), indent=1), SPACE_ARTIFACT)
    except Exception as err:
        tracking.end_run(parent_run_id, "FAILED", client=client, error=err)
        raise

    # ---- Ray and Tune
    status_callback = MlflowTrialStatusCallback(plan)
    try:
        outcome = _fit(
            plan,
            status_callback,
            samples=samples,
            seed_values=seed_values,
            max_concurrent=max_concurrent,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
            search_seed=search_seed,
            resume=resume,
            restart_errored=restart_errored,
            address=address,
            num_cpus=num_cpus,
            verbose=verbose,
            callbacks=callbacks,
            print_fn=print_fn,
        )
    except KeyboardInterrupt as err:
        tracking.end_run(parent_run_id, "KILLED", client=client, error="interrupted (resume with --resume)")
        print_fn(f"sweep interrupted; resume it with --resume (sweep {sweep_name!r})")
        raise SweepInterrupted(f"sweep {sweep_name!r} interrupted", parent_run_id) from err
    except BaseException as err:
        tracking.end_run(parent_run_id, "FAILED", client=client, error=err)
        raise
    max_concurrent_used, trial_statuses = outcome

    # ---- results: reconcile, summary, best config, plots, all logged to the parent
    try:
        result = _finish(plan, client, trial_statuses, print_fn)
    except BaseException as err:
        tracking.end_run(parent_run_id, "FAILED", client=client, error=err)
        raise
    interrupted = any(s not in ("TERMINATED", "ERROR") for s in trial_statuses.values())
    tracking.end_run(parent_run_id, "KILLED" if interrupted else "FINISHED", client=client)
    if interrupted:
        print_fn(f"sweep interrupted: continue it with the same command and --resume (sweep {sweep_name!r})")
    print_fn(f"results in {sweep_dir}")
    print_fn(f"report: fowkal report {experiment_name} --tracking-uri {uri}")
    print_fn(f"MLflow UI: {tracking.ui_command(uri)}")
    return SweepOutcome(
        kind=kind,
        sweep_id=sweep_name,
        sweep_dir=str(sweep_dir),
        tracking_uri=uri,
        experiment_name=experiment_name,
        parent_run_id=parent_run_id,
        max_concurrent=max_concurrent_used,
        trial_statuses=trial_statuses,
        run_statuses=result["run_statuses"],
        best_config_path=result.get("best_config_path"),
        summary_path=result.get("summary_path"),
        table_markdown=result.get("table_markdown", ""),
        artifacts=result.get("artifacts", []),
        wall_seconds=time.perf_counter() - start,
    )


class SweepInterrupted(RuntimeError):
    """The sweep was interrupted (Ctrl-C); resume it with ``--resume``."""

    def __init__(self, message: str, parent_run_id: str | None = None):
        super().__init__(message)
        self.parent_run_id = parent_run_id


def _space_summary(space: SearchSpace) -> dict:
    """JSON-able description of the space (for the report's importances: distributions of the params)."""
    params = {}
    for name, p in space.parameters.items():
        params[name] = {
            "distribution": p.distribution,
            "low": p.low,
            "high": p.high,
            "log": p.log or p.distribution == "loguniform",
            "choices": list(p.choices),
            "value": p.value,
        }
    return {"metric": space.metric, "mode": space.mode, "parameters": params}


def _fit(
    plan: SweepPlan,
    status_callback: MlflowTrialStatusCallback,
    *,
    samples: int,
    seed_values: list[int],
    max_concurrent: int | None,
    grace_period: int,
    reduction_factor: int,
    search_seed: int,
    resume: bool,
    restart_errored: bool,
    address: str | None,
    num_cpus: int | None,
    verbose: int,
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
    from ray.tune import CLIReporter, Tuner

    from orchestrator.ray_utils import init_ray

    resources = init_ray(address, num_cpus=num_cpus)
    base = config_from_dict(plan.base_config)
    concurrent = derive_max_concurrent(
        resources, num_workers=base.num_workers, gpus_per_trial=plan.gpus_per_trial, requested=max_concurrent
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

    if plan.kind == "tune":
        parameter_columns = {name: name.split(".")[-1] for name in plan.space.sampled_names}
    else:
        parameter_columns = {"arm": "arm", "seed": "seed"}
    metric_columns = {"epoch": "epoch", "train/loss": "loss", plan.metric: plan.metric.split("/")[-1]}
    reporter = CLIReporter(
        metric_columns=metric_columns,
        parameter_columns=parameter_columns,
        max_report_frequency=30,
        sort_by_metric=False,
    )
    run_config = tune.RunConfig(
        name="tune",
        storage_path=plan.sweep_dir,
        callbacks=[status_callback, *(callbacks or [])],
        progress_reporter=reporter if verbose else None,
        verbose=1 if verbose else 0,
        failure_config=tune.FailureConfig(max_failures=0),
    )

    if resume:
        print_fn(f"resuming sweep {plan.sweep_id!r} from {plan.tune_dir}")
        tuner = Tuner.restore(
            plan.tune_dir,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=restart_errored,
        )
    else:
        tune_config = _tune_config(plan, samples, concurrent, grace_period, reduction_factor, search_seed)
        tuner = Tuner(
            trainable,
            tune_config=tune_config,
            param_space=_param_space(plan, seed_values),
            run_config=run_config,
        )
    grid = tuner.fit()
    ray.kill(ledger)
    statuses = {}
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path)
        statuses[str(trial_id)] = "ERROR" if result.error is not None else "TERMINATED"
    # The experiment state is the authority on trials that never reported (PENDING or errored early).
    statuses.update(_trial_statuses_from_state(plan.tune_dir))
    return concurrent, statuses


def _tune_config(plan, samples, concurrent, grace_period, reduction_factor, search_seed):
    import functools

    from ray.tune import TuneConfig
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    name_creator = functools.partial(_tune_trial_name, plan)
    dirname_creator = functools.partial(_tune_trial_dirname, plan)
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
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(
        space=plan.space.optuna_define_by_run,
        metric=plan.metric,
        mode=plan.mode,
        points_to_evaluate=plan.space.points_to_evaluate() or None,
        sampler=optuna.samplers.TPESampler(seed=search_seed),
    )
    epochs = int(plan.base_config["epochs"])
    return TuneConfig(
        metric=plan.metric,
        mode=plan.mode,
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrent),
        # time_attr epoch: rungs are in epochs; results without the metric (non-eval epochs) are skipped.
        scheduler=ASHAScheduler(
            time_attr="epoch", grace_period=grace_period, reduction_factor=reduction_factor, max_t=epochs
        ),
        num_samples=samples,
        max_concurrent_trials=concurrent,
        trial_name_creator=name_creator,
        trial_dirname_creator=dirname_creator,
    )


def _param_space(plan: SweepPlan, seed_values: list[int]) -> dict:
    from ray import tune

    if plan.kind == "ablate":
        return {"arm": tune.grid_search(list(plan.arms)), "seed": tune.grid_search(seed_values)}
    return {}  # OptunaSearch's define-by-run function is the space


def _trial_id_from_path(path: str | None) -> str:
    # Our trial dirnames are "<run name>_<trial id>"; Tune's trial ids have no "_" for searchers and one
    # ("<5 hex>_<5 digits>") for the grid generator.
    name = Path(path or "").name
    parts = name.split("_")
    return "_".join(parts[-2:]) if len(parts) >= 3 and parts[-1].isdigit() else parts[-1]


def _trial_statuses_from_state(tune_dir: str) -> dict[str, str]:
    """Trial id -> status from the newest ``experiment_state-*.json`` of a Tune experiment directory."""
    # Newest by the session start time in the name (experiment_state-YYYY-MM-DD_HH-MM-SS.json), not by mtime:
    # at the end of a resumed sweep Tune may rewrite the older session's file after the newer one (seen here:
    # the stale file, with a trial still RUNNING, came out 0.5 ms newer).
    files = sorted(Path(tune_dir).glob("experiment_state-*.json"), key=lambda p: (p.name, p.stat().st_mtime))
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
        statuses = {}
        for trial_json, _ in state.get("trial_data", []):
            trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
            statuses[str(trial["trial_id"])] = str(trial["status"])
        return statuses
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("could not read the Tune experiment state in %s: %s", tune_dir, err)
        return {}


def _finish(plan: SweepPlan, client, trial_statuses: dict[str, str], print_fn) -> dict[str, Any]:
    """Reconcile child statuses, write and log the summary / ablation table, best config and plots."""
    import yaml

    from orchestrator import report

    # Any child still RUNNING gets its Tune trial's status (the callback normally did this already).
    for run in report.child_runs(client, plan.experiment_id, plan.parent_run_id):
        if run.info.status != "RUNNING":
            continue
        trial_id = run.data.tags.get(TAG_TRIAL_ID, "")
        tune_status = trial_statuses.get(trial_id)
        if tune_status == "ERROR":
            tracking.end_run(run.info.run_id, "FAILED", client=client, error="trial failed (reconciled)")
        elif tune_status == "TERMINATED":
            last_epoch = run.data.metrics.get("epoch")
            epochs = int(run.data.params.get("epochs", plan.base_config["epochs"]))
            status = "FINISHED" if last_epoch is not None and last_epoch >= epochs else "KILLED"
            client.set_tag(run.info.run_id, TAG_END_REASON, "reconciled at the end of the sweep")
            tracking.end_run(run.info.run_id, status, client=client)
        else:
            tracking.end_run(run.info.run_id, "KILLED", client=client, error=f"trial {tune_status or 'lost'}")

    record = report.load_sweep(client, plan.parent_run_id)
    out_dir = Path(plan.sweep_dir)
    result: dict[str, Any] = {"run_statuses": {c.name: c.status for c in record.children}}
    artifacts = report.write_sweep_outputs(record, out_dir)
    for path in artifacts:
        client.log_artifact(plan.parent_run_id, str(path))
    result["artifacts"] = [p.name for p in artifacts]
    result["summary_path"] = str(out_dir / "summary.md")
    if plan.kind == "ablate":
        table = report.ablation_markdown(report.ablation_rows(record))
    else:
        table = report.sweep_markdown(record, top=10)
        best = report.best_child(record)
        if best is not None:
            run_name = best.name
            values = apply_overrides(
                plan.base_config, plan.space.to_overrides(best.sampled, ignore_unknown=True)
            )
            values["output_dir"] = str(Path(plan.base_config["output_dir"]) / "best" / plan.sweep_id)
            config_from_dict(values, source=f"best config ({run_name})")  # must load in fowkal train
            best_path = out_dir / "best_config.yaml"
            header = (
                f"# Best config of sweep {plan.sweep_id} (MLflow run {best.run_id}, {run_name}): "
                f"{plan.metric} = {best.score:.4f}\n# fowkal train --config {best_path}\n"
            )
            best_path.write_text(header + yaml.safe_dump(values, sort_keys=False))
            client.log_artifact(plan.parent_run_id, str(best_path))
            client.log_metric(plan.parent_run_id, f"best/{plan.metric}", float(best.score))
            client.set_tag(plan.parent_run_id, "fowkal.best_run", f"{run_name} ({best.run_id})")
            result["best_config_path"] = str(best_path)
            result["artifacts"].append(best_path.name)
    result["table_markdown"] = table
    print_fn(table)
    return result


__all__ = [
    "ABLATION_METRIC",
    "MlflowTrialStatusCallback",
    "SweepError",
    "SweepInterrupted",
    "SweepOutcome",
    "SweepPlan",
    "TRIAL_CPUS",
    "derive_max_concurrent",
    "run_sweep",
    "run_trial",
    "sweep_name_for",
    "trial_end_status",
    "trial_overrides",
    "trial_resume_key",
    "trial_run_name",
    "trial_train_config",
]
