"""One sweep trial: the plan every trial receives, its config and run names, and ``run_trial``, the Tune
trial function that launches a Ray Train run (Train V2's way of tuning a Train run; handing a Trainer to
``Tuner`` is deprecated).

``run_trial`` builds the trial's ``TrainConfig`` (base config + sampled values or the arm's overrides +
seed), creates or reopens its MLflow child run (keyed by ``<sweep id>/<trial id>``: Tune keeps trial ids
across ``Tuner.restore``, so a resumed sweep never duplicates a run), and runs a ``TorchTrainer``
(``orchestrator.launch``) whose callbacks are Tune's ``TuneReportCallback`` (every ``ray.train.report`` of
the workers becomes a Tune result, so ASHA sees each epoch) and ``orchestrator.train.MlflowReportCallback``
(the same metrics into the child run).

When ASHA stops a trial, Tune terminates the trial's actor. The workers' placement group is scoped to the
sweep's driver job and would stay reserved, so the driver first aborts the trial's Train controller through
the sweep's :class:`ControllerLedger` (``orchestrator.trial_status``'s callback does that).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from orchestrator import tracking
from orchestrator.ablation_arms import AblationArm
from orchestrator.launch import build_torch_trainer
from orchestrator.run_outputs import log_run_outputs, selection_metric
from orchestrator.sweep_space import SearchSpace
from trainer.config import TrainConfig, apply_overrides, config_from_dict, config_to_dict, flatten_config

logger = logging.getLogger(__name__)


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
    # Where what must outlive a node lives (the Tune experiment, the trials' Ray Train runs): a filesystem
    # URI (``s3://bucket/prefix/<sweep name>``) or, by default, ``sweep_dir`` itself. ``sweep_dir`` is
    # always local: the trials' output directories (logs, metric spools) and the sweep's report files.
    storage_dir: str = ""

    @property
    def storage_root(self) -> str:
        return self.storage_dir or self.sweep_dir

    @property
    def tune_dir(self) -> str:
        return _join(self.storage_root, "tune")

    @property
    def train_storage(self) -> str:
        return _join(self.storage_root, "train")

    @property
    def ledger_name(self) -> str:
        """Name of the sweep's :class:`ControllerLedger` actor."""
        return f"fowkal-ledger-{self.sweep_id}"


def _join(root: str, name: str) -> str:
    if "://" in root and not root.startswith("file://"):
        return f"{root.rstrip('/')}/{name}"
    return str(Path(root) / name)


def trial_resume_key(sweep_id: str, trial_id: str) -> str:
    """The MLflow resume-key tag of a trial's child run: ``<sweep id>/<trial id>``."""
    return f"{sweep_id}/{trial_id}"


def trial_run_name(plan: SweepPlan, trial_config: dict, experiment_tag: str = "") -> str:
    """Readable child-run name: ``tpe-017`` (the sweep's 17th trial) or ``<arm key>-<arm name>-s<seed>``."""
    if plan.kind == "ablate":
        arm = plan.arms[trial_config["arm"]]
        return f"{arm.key}-{arm.name}-s{int(trial_config['seed'])}"  # sorts by the paper's letters
    head = str(experiment_tag).split("_", 1)[0]
    index = int(head) if head.isdigit() else 0
    return f"tpe-{index:03d}"


def tune_trial_name(plan: SweepPlan, trial) -> str:
    """``TuneConfig(trial_name_creator=...)``: the run name shown in the progress table."""
    return trial_run_name(plan, trial.config, trial.experiment_tag)


def tune_trial_dirname(plan: SweepPlan, trial) -> str:
    return f"{tune_trial_name(plan, trial)}_{trial.trial_id}"


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


def run_trial(trial_config: dict, plan: SweepPlan) -> None:
    """One Tune trial: build the config, open the MLflow child run, run a TorchTrainer reporting to Tune.

    Called by Tune in the trial's actor (through ``tune.with_parameters(run_trial, plan=...)``). Ends the
    child run as FINISHED or FAILED itself; a trial that Tune stops never gets here again, and the driver's
    :class:`MlflowTrialStatusCallback` ends its run as KILLED.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.train import MlflowReportCallback

    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    run_name = context.get_trial_name() or trial_run_name(plan, trial_config)
    earlier = _earlier_failure(plan, trial_id)
    if earlier is not None:
        # Tune restarts a trial whose actor died (its node went away) so that its Train run continues from
        # its checkpoint; a trial whose training itself failed (after Ray Train's own retries) is not run
        # again: its child run keeps the first error.
        raise TrialFailed(f"{earlier} (the trial failed earlier in this sweep; not run again)")
    cfg = trial_train_config(plan, trial_config, run_name)
    client = tracking.make_client(plan.tracking_uri)
    arm = plan.arms.get(trial_config.get("arm")) if plan.kind == "ablate" else None
    extra = {
        tracking.TAG_TRIAL_ID: trial_id,
        tracking.TAG_SWEEP_KIND: plan.kind,
        # The trial's Ray Train run: <storage path>/<ray run name> holds its checkpoints.
        tracking.TAG_RAY_RUN_NAME: trial_id,
        tracking.TAG_STORAGE_PATH: plan.train_storage,
    }
    if arm is not None:
        extra.update({tracking.TAG_ARM_KEY: arm.key, tracking.TAG_ARM_LABEL: arm.label})
    run_id = tracking.start_run(
        client,
        plan.experiment_id,
        run_name,
        params=flatten_config(cfg),
        tags=tracking.build_run_tags(
            config=cfg,
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
        trainer_ = build_torch_trainer(
            cfg,
            name=trial_id,  # stable: a restored trial continues its Ray Train run from the checkpoint
            storage_path=plan.train_storage,
            gpus_per_trial=plan.gpus_per_trial,
            score_metric=selection_metric(
                cfg
            ),  # keep the best checkpoint (and the latest) for the run's outputs
            # Order matters: the controller is registered before Tune sees the first result (and so before
            # the scheduler can stop the trial).
            callbacks=[
                ControllerRegistrar(plan.ledger_name, trial_id),
                TuneReportCallback(),
                MlflowReportCallback(
                    plan.tracking_uri, run_id, spool_dir=cfg.output_dir, final_epoch=cfg.epochs
                ),
            ],
        )
        with tracking.system_metrics(run_id, plan.tracking_uri):
            result = trainer_.fit()
    except BaseException as err:
        if was_aborted(plan, trial_id):
            # The scheduler stopped the trial and the driver aborted its Train run (ending the child run as
            # KILLED): not a failure.
            return
        tracking.end_run(run_id, "FAILED", client=client, error=err)
        _record_failure(plan, trial_id, err)
        raise
    # The Train run trained every epoch: the child run is FINISHED whatever Tune does next.
    try:
        log_run_outputs(client, run_id, cfg, result)
    except Exception as err:  # the run trained; its status must not depend on an artifact upload
        logger.warning("could not log the outputs of trial %s: %s", trial_id, err)
    tracking.end_run(run_id, "FINISHED", client=client)
    if _tune_iterations() == 0 and result.metrics:
        # The Train run had already finished before a --resume (the driver died between the trial's last
        # epoch and Tune's next state snapshot): nothing new was reported, so hand Tune the final metrics
        # the run recorded. Tune may end the function right there (SystemExit(0) out of report).
        ray.tune.report(dict(result.metrics))


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
        self._failed: dict[str, str] = {}

    def mark_failed(self, trial_id: str, error: str) -> None:
        """The trial's training failed (not its actor): a restart of it by Tune fails at once."""
        self._failed[trial_id] = error

    def failure(self, trial_id: str) -> str | None:
        return self._failed.get(trial_id)

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


class TrialFailed(RuntimeError):
    """A restarted trial whose training had already failed in this sweep (see :func:`run_trial`)."""


def _record_failure(plan: SweepPlan, trial_id: str, err: BaseException) -> None:
    try:
        import ray

        text = tracking.error_summary(err)
        ray.get(ray.get_actor(plan.ledger_name).mark_failed.remote(trial_id, text[:2000]), timeout=30)
    except Exception as record_err:  # without it a Tune restart trains the failing trial once more
        logger.warning("could not record the failure of trial %s: %s", trial_id, record_err)


def _earlier_failure(plan: SweepPlan, trial_id: str) -> str | None:
    try:
        import ray

        return ray.get(ray.get_actor(plan.ledger_name).failure.remote(trial_id), timeout=30)
    except Exception:
        return None


def was_aborted(plan: SweepPlan, trial_id: str) -> bool:
    try:
        import ray

        return bool(ray.get(ray.get_actor(plan.ledger_name).was_aborted.remote(trial_id), timeout=30))
    except Exception:
        return False


def abort_trial_controller(plan: SweepPlan, trial_id: str) -> None:
    try:
        import ray

        ledger = ray.get_actor(plan.ledger_name)
        ray.get(ledger.abort.remote(trial_id), timeout=180)
    except Exception as err:
        logger.warning("could not abort the Train run of trial %s: %s", trial_id, err)


__all__ = [
    "ControllerLedger",
    "ControllerRegistrar",
    "SweepPlan",
    "abort_trial_controller",
    "run_trial",
    "trial_overrides",
    "trial_resume_key",
    "trial_run_name",
    "trial_train_config",
    "was_aborted",
]
