"""One sweep trial: the plan every trial receives, its config and run names, and ``run_trial``, the Tune
trial function that launches a Ray Train run (Train V2's way of tuning a Train run; handing a Trainer to
``Tuner`` is deprecated).

``run_trial`` builds the trial's ``TrainConfig`` (base config + sampled values or the arm's overrides +
seed), creates or reopens its MLflow child run (keyed by ``<sweep id>/<trial id>``: Tune keeps trial ids
across ``Tuner.restore``, so a resumed sweep never duplicates a run), and runs a ``TorchTrainer``
(``orchestrator.runs.launch``) whose callbacks are Tune's ``TuneReportCallback`` (every ``ray.train.report``
of
the workers becomes a Tune result, so ASHA sees each epoch) and
``orchestrator.runs.metric_callback.MlflowReportCallback`` (the same metrics into the child run).

What differs between a sweep's and an ablation's trials (overrides, run name, arm) the sweep's kind says
(``orchestrator.sweeps.kinds``). When ASHA stops a trial, Tune terminates the trial's actor. The workers'
placement group is scoped to the sweep's driver job and would stay reserved, so the driver first aborts the
trial's Train controller through the sweep's controller ledger (``orchestrator.sweeps.trial_ledger``;
``orchestrator.sweeps.trial_status``'s callback does that).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.runs.launch import build_torch_trainer
from orchestrator.runs.outputs import log_run_outputs, selection_metric
from orchestrator.runs.storage import storage_join
from orchestrator.sweeps.ablation_arms import AblationArm
from orchestrator.sweeps.kinds import SweepKind, get_sweep_kind
from orchestrator.sweeps.space import SearchSpace
from orchestrator.sweeps.trial_ledger import (  # noqa: F401 (re-exported: sweep_tune.py and tests import them here)
    ControllerLedger,
    ControllerRegistrar,
    abort_trial_controller,
    earlier_failure,
    ledger_name,
    record_failure,
    was_aborted,
)
from trainer.config import TrainConfig, apply_overrides, config_from_dict, config_to_dict, flatten_config

logger = logging.getLogger(__name__)


@dataclass
class SweepPlan:
    """Everything a trial needs, shipped to it by ``tune.with_parameters`` (plain, picklable data)."""

    kind: str  # "tune" or "ablate": the name of its sweep kind (a plain string: Tune pickles the plan)
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
    def sweep_kind(self) -> SweepKind:
        """What differs between the kinds of sweep (``orchestrator.sweeps.kinds``)."""
        return get_sweep_kind(self.kind)

    @property
    def storage_root(self) -> str:
        return self.storage_dir or self.sweep_dir

    @property
    def tune_dir(self) -> str:
        return storage_join(self.storage_root, "tune")

    @property
    def train_storage(self) -> str:
        return storage_join(self.storage_root, "train")

    @property
    def ledger_name(self) -> str:
        """Name of the sweep's ``ControllerLedger`` actor (``orchestrator.sweeps.trial_ledger``)."""
        return ledger_name(self.sweep_id)

    def trial_output_dir(self, run_name: str) -> Path:
        """A trial's ``output_dir`` (its logs and metric spool): ``<sweep_dir>/trials/<run name>``, local."""
        return Path(self.sweep_dir) / "trials" / run_name


def trial_resume_key(sweep_id: str, trial_id: str) -> str:
    """The MLflow resume-key tag of a trial's child run: ``<sweep id>/<trial id>``."""
    return f"{sweep_id}/{trial_id}"


def trial_run_name(plan: SweepPlan, trial_config: dict, experiment_tag: str = "") -> str:
    """Readable child-run name: ``tpe-017`` (the sweep's 17th trial) or ``<arm key>-<arm name>-s<seed>``."""
    return plan.sweep_kind.run_name(plan, trial_config, experiment_tag)


def tune_trial_name(plan: SweepPlan, trial) -> str:
    """``TuneConfig(trial_name_creator=...)``: the run name shown in the progress table."""
    return trial_run_name(plan, trial.config, trial.experiment_tag)


def tune_trial_dirname(plan: SweepPlan, trial) -> str:
    return f"{tune_trial_name(plan, trial)}_{trial.trial_id}"


def trial_overrides(plan: SweepPlan, trial_config: dict) -> dict[str, Any]:
    """Dotted ``TrainConfig`` overrides of a trial: the sampled values, or the arm's overrides and seed."""
    return plan.sweep_kind.trial_overrides(plan, trial_config)


def trial_train_config(plan: SweepPlan, trial_config: dict, run_name: str) -> TrainConfig:
    """The trial's validated ``TrainConfig``: base + :func:`trial_overrides`, its own ``output_dir``."""
    values = apply_overrides(plan.base_config, trial_overrides(plan, trial_config))
    values["output_dir"] = str(plan.trial_output_dir(run_name))
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

    from orchestrator.runs.metric_callback import MlflowReportCallback

    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    run_name = context.get_trial_name() or trial_run_name(plan, trial_config)
    earlier = earlier_failure(plan, trial_id)
    if earlier is not None:
        # Tune restarts a trial whose actor died (its node went away) so that its Train run continues from
        # its checkpoint; a trial whose training itself failed (after Ray Train's own retries) is not run
        # again: its child run keeps the first error.
        raise TrialFailed(f"{earlier} (the trial failed earlier in this sweep; not run again)")
    cfg = trial_train_config(plan, trial_config, run_name)
    client = tracking.make_client(plan.tracking_uri)
    arm = plan.sweep_kind.trial_arm(plan, trial_config)
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
        record_failure(plan, trial_id, err)
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


class TrialFailed(RuntimeError):
    """A restarted trial whose training had already failed in this sweep (see :func:`run_trial`)."""


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
