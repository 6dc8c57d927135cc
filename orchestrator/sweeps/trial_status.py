"""MLflow statuses of sweep trials: every child run ends with the status of its Tune trial.

FINISHED when the trial trained all its epochs, KILLED when the scheduler stopped it early (or the sweep
ended with it unfinished), FAILED on an error. :class:`MlflowTrialStatusCallback` does it on the driver as
Tune reports each trial; :func:`reconcile_child_runs` settles, at the end of a sweep, any child still
RUNNING from the Tune experiment state (the authority on trials that never reported), and deletes the
run of a trial that state does not hold (started after its last save, before the driver died).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ray.tune import Callback as TuneCallback

from orchestrator import tracking
from orchestrator.reports import report
from orchestrator.sweeps.trial import SweepPlan, trial_overrides, trial_resume_key, tune_trial_name
from orchestrator.sweeps.trial_ledger import abort_trial_controller
from trainer.config import apply_overrides

logger = logging.getLogger(__name__)


def trained_all_epochs(last_epoch, epochs: int) -> bool:
    """The FINISHED rule: the last reported epoch reached the config's ``epochs``."""
    finite = isinstance(last_epoch, int | float) and not isinstance(last_epoch, bool)
    return finite and last_epoch >= epochs


def trial_end_status(plan: SweepPlan, trial_config: dict, last_result: dict | None, errored: bool) -> str:
    """MLflow status of a trial that Tune considers done: FAILED, FINISHED (all epochs) or KILLED."""
    if errored:
        return "FAILED"
    epochs = int(apply_overrides(plan.base_config, trial_overrides(plan, trial_config))["epochs"])
    return "FINISHED" if trained_all_epochs((last_result or {}).get("epoch"), epochs) else "KILLED"


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
            self._deliver_spool(trial, run_id, client)
            current = client.get_run(run_id).info.status
            if current == "FAILED" and status != "FAILED":
                return  # the trial function recorded a failure; keep it
            if current == status:
                return  # already ended so (by the trial itself, or earlier by this callback)
            client.set_tag(run_id, tracking.TAG_END_REASON, reason)
            error = None
            if status == "FAILED":
                error = _trial_error_text(trial) or "trial failed (see the Ray Tune logs)"
            tracking.end_run(run_id, status, client=client, error=error)
        except Exception as err:  # never let MLflow trouble stop the sweep
            logger.warning("could not end the MLflow run of trial %s: %s", trial, err)

    def _deliver_spool(self, trial, run_id: str, client) -> None:
        """Send what the trial's Train controller spooled but could not deliver before it ended (a trial the
        scheduler stopped is aborted mid-epoch, with its sender thread): no epoch is lost from MLflow."""
        from orchestrator.runs.metric_spool import MetricSpool, deliver_pending, spool_path

        output_dir = self.plan.trial_output_dir(tune_trial_name(self.plan, trial))
        path = spool_path(output_dir, run_id)
        if path.is_file():
            deliver_pending(MetricSpool(path), run_id, client)

    def _abort(self, trial) -> None:
        """Abort the trial's Train run, so that its workers and placement group are released (a finished
        run's controller is gone already: a no-op)."""
        abort_trial_controller(self.plan, trial.trial_id)

    def _completed_status(self, trial) -> str:
        """The MLflow status of a trial Tune completed (the sweeps' "trained all epochs" rule)."""
        return trial_end_status(self.plan, trial.config, trial.last_result, errored=False)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._abort(trial)  # called before Tune terminates the trial's actor
        status = self._completed_status(trial)
        reason = "finished" if status == "FINISHED" else "stopped early by the scheduler"
        self._end(trial, status, reason)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._abort(trial)
        self._end(trial, "FAILED", "error")

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            if trial.status == "ERROR":
                self._end(trial, "FAILED", "error")
            elif trial.status == "TERMINATED":
                self._end(trial, self._completed_status(trial), "reconciled at the end of the sweep")
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


def trial_id_from_path(path: str | None) -> str:
    # Our trial dirnames are "<run name>_<trial id>"; Tune's trial ids have no "_" for searchers and one
    # ("<5 hex>_<5 digits>") for the grid generator.
    name = Path(path or "").name
    parts = name.split("_")
    return "_".join(parts[-2:]) if len(parts) >= 3 and parts[-1].isdigit() else parts[-1]


def trial_statuses_from_state(tune_dir: str) -> dict[str, str]:
    """Trial id -> status from the newest ``experiment_state-*.json`` of a Tune experiment directory."""
    # Newest by the session start time in the name (experiment_state-YYYY-MM-DD_HH-MM-SS.json), not by mtime:
    # at the end of a resumed sweep Tune may rewrite the older session's file after the newer one, so the
    # stale file (with a trial still RUNNING) can be the newer by mtime.
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


LOST_RUN_REASON = (
    "lost: the trial started after the sweep's last saved Tune state, so the resumed sweep does not know it "
    "(Tune drew that sample again as a new trial)"
)


def is_lost_run(run, trial_statuses: dict[str, str]) -> bool:
    """Whether a child run's trial is missing from a Tune state that was read (``trial_statuses`` not
    empty): it started after Tune's last save before its driver died."""
    return bool(trial_statuses) and run.data.tags.get(tracking.TAG_TRIAL_ID, "") not in trial_statuses


def delete_lost_run(client, run) -> None:
    """End (KILLED) and soft-delete a child run whose trial the resumed Tune state does not hold."""
    if run.info.status == "RUNNING":
        tracking.end_run(run.info.run_id, "KILLED", client=client, error=LOST_RUN_REASON)
    client.set_tag(run.info.run_id, tracking.TAG_END_REASON, LOST_RUN_REASON)
    client.delete_run(run.info.run_id)


def reconcile_child_runs(plan: SweepPlan, client, trial_statuses: dict[str, str]) -> list[str]:
    """End every child run still RUNNING with its Tune trial's status (the callback normally did).

    A child whose trial the Tune experiment state does not hold was started after Tune last saved that state
    and the sweep's driver died: the resumed sweep drew the sample again as a new trial, so this run is
    nobody's. It is ended KILLED with that reason and deleted (MLflow's soft delete: ``mlflow runs restore
    --run-id ...`` brings it back), so that a sweep keeps exactly one child run per trial. Returns the ids
    of the runs deleted so.
    """
    lost = []
    for run in report.child_runs(client, plan.experiment_id, plan.parent_run_id):
        if is_lost_run(run, trial_statuses):
            delete_lost_run(client, run)
            lost.append(run.info.run_id)
            continue
        if run.info.status != "RUNNING":
            continue
        tune_status = trial_statuses.get(run.data.tags.get(tracking.TAG_TRIAL_ID, ""))
        if tune_status == "ERROR":
            tracking.end_run(run.info.run_id, "FAILED", client=client, error="trial failed (reconciled)")
        elif tune_status == "TERMINATED":
            epochs = int(run.data.params.get("epochs", plan.base_config["epochs"]))
            reached = tracking.last_epoch(client, run.info.run_id)
            status = "FINISHED" if trained_all_epochs(reached, epochs) else "KILLED"
            client.set_tag(run.info.run_id, tracking.TAG_END_REASON, "reconciled at the end of the sweep")
            tracking.end_run(run.info.run_id, status, client=client)
        else:
            tracking.end_run(run.info.run_id, "KILLED", client=client, error=f"trial {tune_status or 'lost'}")
    return lost


__all__ = [
    "LOST_RUN_REASON",
    "MlflowTrialStatusCallback",
    "delete_lost_run",
    "is_lost_run",
    "reconcile_child_runs",
    "trained_all_epochs",
    "trial_end_status",
    "trial_id_from_path",
    "trial_statuses_from_state",
]
