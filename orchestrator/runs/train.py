"""``fowkal train``: one training run under Ray Train (V2), tracked in MLflow, resumable by re-running it.

How the pieces fit:

- The driver (this module) loads the config, connects to Ray (``orchestrator.runs.ray_utils.init_ray``),
creates or
  reopens the MLflow run, and launches a ``TorchTrainer`` running ``trainer.loop.train_loop_per_worker``.
- ``RunConfig(name, storage_path)`` uses a *stable* name derived from the config, so running the same command
  again finds the run's checkpoint-manager snapshot in storage and ``ray.train.get_checkpoint()`` hands the
  workers the latest checkpoint: the run resumes at the next epoch. The MLflow run is reopened through a
  ``fowkal.resume_key`` tag (storage path + run name) instead of being duplicated.
- Per-epoch metrics reach MLflow through ``orchestrator.runs.metric_callback.MlflowReportCallback`` (on Ray
  Train's controller) and the run's spool (``orchestrator.runs.metric_spool``); where Ray keeps the run:
  ``orchestrator.runs.storage``.
- The run ends with its real status: FINISHED, FAILED (the error kept as tag and ``error.txt``), or KILLED on
  Ctrl-C / SIGTERM (``ray job stop`` sends SIGTERM). Ray Train installs its own SIGINT handler during
  ``fit()`` that aborts the controller gracefully; ``InterruptAwareTorchTrainer`` wraps it to remember that
  an interrupt happened and routes SIGTERM through the same graceful abort.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.train.torch import TorchTrainer

from orchestrator import tracking
from orchestrator.runs.launch import build_torch_trainer
from orchestrator.runs.metric_callback import (  # noqa: F401 (re-exported: sweeps and tests import them from here)
    FINAL_FLUSH_S,
    MlflowReportCallback,
)
from orchestrator.runs.metric_spool import (
    MetricSpool,
    deliver_pending,
    spool_path,
    tracking_server_reachable,
    wait_for_tracking_server,
)
from orchestrator.runs.outputs import BEST_METRIC, log_run_outputs, selection_metric
from orchestrator.runs.storage import (  # noqa: F401 (re-exported: callers and tests import them from here)
    StorageError,
    check_storage_path,
    default_storage_path,
    is_storage_uri,
    resolve_storage_path,
    storage_join,
)
from trainer.config import config_digest
from trainer.preflight import check_input_files

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = tracking.TRAIN_EXPERIMENT
# How long the end of `fowkal train` waits for an unreachable tracking server before keeping the record's
# rest (metrics, outputs, status) for a re-run of the same command.
FINISH_WAIT_S = 30.0


class TrackingIncomplete(RuntimeError):
    """Training finished but the tracking server was unreachable: the record's rest is kept locally, and
    re-running the same command completes it without training again."""

    def __init__(self, message: str, run_id: str):
        super().__init__(message)
        self.run_id = run_id


class TrainingInterrupted(RuntimeError):
    """The run was stopped by Ctrl-C or SIGTERM; its MLflow run has been ended as KILLED."""

    def __init__(self, message: str, run_id: str | None = None):
        super().__init__(message)
        self.run_id = run_id


@dataclass
class TrainingOutcome:
    """What ``run_training`` returns."""

    run_id: str
    tracking_uri: str
    ray_run_name: str
    storage_path: str
    metrics: dict[str, Any]
    best_metrics: dict[str, Any] | None
    best_checkpoint_path: str | None
    latest_checkpoint_path: str | None
    status: str = "FINISHED"
    artifacts: list[str] = field(default_factory=list)


def stable_run_name(config) -> str:
    """``<name>-<family's run label>-<8 hex of the config hash>`` (the top-down family's label is the loss
    variant: ``smoke-fowkal-1a2b3c4d``): same config, same Ray run (so it resumes)."""
    from trainer.families import family_of

    digest = config_digest(config)
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(config.name)) or "run"
    return f"{safe_name}-{family_of(config).run_label(config)}-{digest}"


class InterruptAwareTorchTrainer(TorchTrainer):
    """TorchTrainer that notes SIGINT/SIGTERM before Ray Train's graceful abort of the controller.

    ``_register_sigint_handler`` is Ray Train's (private) hook, called in ``fit()`` on the main thread once
    the controller exists. We keep Ray's handler (which aborts the controller and its workers) and route
    SIGTERM to it as well. If a Ray upgrade renames the hook, this override is simply not called and the
    fallback SIGTERM handler of ``run_training`` still marks the run KILLED.
    """

    interrupt_log: list[str]

    def _register_sigint_handler(self, controller):
        super()._register_sigint_handler(controller)
        ray_handler = signal.getsignal(signal.SIGINT)
        log = self.interrupt_log

        def handler(signum, frame):
            log.append(signal.Signals(signum).name)
            if callable(ray_handler):
                ray_handler(signal.SIGINT, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def _final_summary(metrics: dict[str, Any]) -> str:
    from trainer.loop import VAL_METRICS

    keys = ["epoch", "train/loss", *VAL_METRICS.values()]
    parts = []
    for key in keys:
        if key in metrics and tracking.is_finite_number(metrics[key]):
            value = metrics[key]
            parts.append(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}")
    return "  ".join(parts)


def run_training(
    config,
    *,
    tracking_uri: str | None = None,
    address: str | None = None,
    storage_path: str | None = None,
    resume: bool = True,
    experiment_name: str = DEFAULT_EXPERIMENT,
    callbacks: list | None = None,
    num_cpus: int | None = None,
    print_fn=print,
) -> TrainingOutcome:
    """Train ``config`` (a ``trainer.config.TrainConfig``) with Ray Train and track it in MLflow.

    Args:
        config: the validated training config.
        tracking_uri: MLflow store; default ``MLFLOW_TRACKING_URI`` or ``sqlite:///<output_dir>/mlflow.db``.
        address: Ray cluster address; default ``RAY_ADDRESS`` or a new local Ray.
        storage_path: where Ray Train keeps checkpoints; default ``<output_dir>/ray_results``. Must be shared
            by all nodes on a multi-node cluster.
        resume: re-use the stable run name (resume from the last checkpoint, continue the MLflow run). False
            starts a new run with a time-stamped name.
        experiment_name: MLflow experiment.
        callbacks: extra ``ray.train.UserCallback`` objects (e.g. Tune's report callback for sweeps).
        num_cpus: logical CPUs of a local Ray (ignored when connecting to a cluster).
        print_fn: where the summary lines go.

    Returns:
        TrainingOutcome with the MLflow run id, final and best metrics and checkpoint paths.

    Raises:
        TrainingInterrupted: Ctrl-C or SIGTERM (the MLflow run is KILLED).
        Exception: whatever made training fail (the MLflow run is FAILED).
    """
    from orchestrator.runs.ray_utils import init_ray
    from trainer.config import config_to_dict, flatten_config

    check_input_files(config)  # the data and weights files, before MLflow and Ray start
    config_dict = config_to_dict(config)
    uri = tracking.resolve_tracking_uri(tracking_uri, config.output_dir)
    storage = resolve_storage_path(storage_path, config)
    check_storage_path(storage)  # an unknown scheme or a missing bucket, before MLflow and Ray start
    name = stable_run_name(config)
    if not resume:
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Ray Train V2 would chdir every worker into a per-run scratch directory; the config's relative paths
    # (data, outputs) are meant relative to the working directory (the repository, or the --working-dir of
    # `ray job submit`), so keep it.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")

    client = tracking.make_client(uri)
    experiment_id = tracking.get_or_create_experiment(client, experiment_name)
    tags = tracking.build_run_tags(
        config=config,
        dataset_kind=config.data.kind,
        commit=tracking.git_commit(),
        extra={tracking.TAG_RAY_RUN_NAME: name, tracking.TAG_STORAGE_PATH: storage},
    )
    run_id = tracking.start_run(
        client,
        experiment_id,
        name,
        params=flatten_config(config),
        tags=tags,
        resume_key=f"{storage}/{name}",
    )
    print_fn(f"MLflow run {run_id} ({name}) in {uri}")
    spool = MetricSpool(spool_path(config.output_dir, run_id))
    if resume and finish_marker(spool).is_file():
        outcome = _complete_pending_record(config, client, run_id, uri, name, storage, spool, print_fn)
        if outcome is not None:
            print_fn(f"MLflow UI: {tracking.ui_command(uri)}")
            return outcome
    replayed = _replay_spool(spool, run_id, client)  # values an earlier process could not deliver
    if replayed:
        print_fn(f"replayed {replayed} metric value(s) that had not reached MLflow ({spool.path})")

    interrupt_log: list[str] = []
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous_handlers = {}
    if on_main_thread:
        previous_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def fallback_sigterm(signum, frame):  # until Ray Train's handler takes over inside fit()
            interrupt_log.append(signal.Signals(signum).name)
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, fallback_sigterm)

    try:
        tracking.log_config_yaml(run_id, config_dict, client=client)
        init_ray(address, num_cpus=num_cpus)
        trainer = build_torch_trainer(
            config,
            name=name,
            storage_path=storage,
            callbacks=[MlflowReportCallback(uri, run_id, spool_dir=config.output_dir), *(callbacks or [])],
            score_metric=selection_metric(config),
            trainer_cls=InterruptAwareTorchTrainer,
        )
        trainer.interrupt_log = interrupt_log
        print_fn(
            f"Ray Train run {name!r} in {storage} ({config.num_workers} worker(s), use_gpu={config.use_gpu})"
        )
        with tracking.system_metrics(run_id, uri):
            result = trainer.fit()
    except (KeyboardInterrupt, SystemExit) as err:
        _restore_handlers(previous_handlers)
        _replay_spool(spool, run_id, client)  # the epochs that were reported reach the run
        reason = ", ".join(interrupt_log) or type(err).__name__
        tracking.end_run(run_id, "KILLED", client=client, error=f"interrupted by {reason}")
        print_fn(f"training interrupted ({reason}); MLflow run {run_id} ended as KILLED")
        raise TrainingInterrupted(f"training {name!r} interrupted by {reason}", run_id) from err
    except Exception as err:
        _restore_handlers(previous_handlers)
        _replay_spool(spool, run_id, client)
        if interrupt_log and (_is_ray_actor_error(err) or _is_training_failed_error(err)):
            reason = ", ".join(interrupt_log)
            tracking.end_run(run_id, "KILLED", client=client, error=f"interrupted by {reason}")
            print_fn(f"training interrupted ({reason}); MLflow run {run_id} ended as KILLED")
            raise TrainingInterrupted(f"training {name!r} interrupted by {reason}", run_id) from err
        tracking.end_run(run_id, "FAILED", client=client, error=err)
        print_fn(f"training failed: {tracking.error_summary(err)}; MLflow run {run_id} ended as FAILED")
        raise
    _restore_handlers(previous_handlers)

    outcome = _record_finished(config, result, client, run_id, uri, name, storage, spool, print_fn)
    print_fn(f"MLflow UI: {tracking.ui_command(uri)}")
    print_fn(f"runs table: {tracking.runs_table_url(uri, experiment_id)}")
    return outcome


def _finish(config, result, client, run_id, uri, name, storage, print_fn) -> TrainingOutcome:
    """Log the run's outputs (``orchestrator.runs.outputs``), print the final metrics; returns the outcome."""
    metrics = dict(result.metrics or {})
    outputs = log_run_outputs(client, run_id, config, result, print_fn)
    print_fn(f"final metrics: {_final_summary(metrics)}")
    best = outputs.best_metrics
    if best is not None:
        print_fn(f"best {BEST_METRIC} = {best[BEST_METRIC]:.4f} at epoch {best.get('epoch')}")
    return TrainingOutcome(
        run_id=run_id,
        tracking_uri=uri,
        ray_run_name=name,
        storage_path=storage,
        metrics=metrics,
        best_metrics=best,
        best_checkpoint_path=outputs.best_checkpoint_path,
        latest_checkpoint_path=outputs.latest_checkpoint_path,
        artifacts=outputs.artifacts,
    )


def finish_marker(spool: MetricSpool) -> Path:
    """The file that says a run trained to the end but its record is incomplete (beside its spool)."""
    return spool.path.with_suffix(".finish.json")


def _replay_spool(spool: MetricSpool, run_id: str, client) -> int:
    """Deliver what the run's spool holds; returns the values sent (0 when that failed: they stay)."""
    if not spool.pending() or not tracking_server_reachable(client.tracking_uri):
        return 0
    try:
        return deliver_pending(spool, run_id, client)
    except Exception as err:  # kept for the next contact
        logger.warning("delivering the spooled metrics of run %s failed: %s", run_id, err)
        return 0


def _record_finished(config, result, client, run_id, uri, name, storage, spool, print_fn) -> TrainingOutcome:
    """Deliver the spooled metrics, log the outputs, end the run FINISHED. With the tracking server
    unreachable, keep a finish marker and raise :class:`TrackingIncomplete` naming the server and what is
    pending (the run stays RUNNING in MLflow until the same command is run again)."""
    error: BaseException | None = None
    if wait_for_tracking_server(uri, FINISH_WAIT_S):
        try:
            deliver_pending(spool, run_id, client)
            outcome = _finish(config, result, client, run_id, uri, name, storage, print_fn)
            tracking.end_run(run_id, "FINISHED", client=client)
        except Exception as err:
            if tracking_server_reachable(uri):  # not an outage: the record itself is at fault
                tracking.end_run(run_id, "FAILED", client=client, error=err)
                raise
            error = err
        else:
            marker = finish_marker(spool)
            if marker.is_file():
                marker.unlink()
            return outcome
    marker = finish_marker(spool)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(
        json.dumps(
            {
                "run_id": run_id,
                "tracking_uri": uri,
                "ray_run_name": name,
                "storage_path": storage,
                "status": "FINISHED",
            }
        )
    )
    message = (
        f"the MLflow tracking server {uri} is unreachable at the end of training; pending: "
        f"{spool.pending_values()} metric value(s) (kept in {spool.path}), the run's outputs (checkpoints, "
        f"KAF history) and its status FINISHED; MLflow run {run_id} stays RUNNING. Run the same command "
        "again when the server is back: it completes the record without training again"
    )
    print_fn(message)
    raise TrackingIncomplete(message, run_id) from error


def _complete_pending_record(config, client, run_id, uri, name, storage, spool, print_fn):
    """Complete the record of a run that trained to the end (its finish marker exists) from the Ray Train
    run in storage, without Ray or training; None when that run is not in storage (then it trains)."""
    from ray.train import Result

    try:
        result = Result.from_path(storage_join(storage, name))
    except Exception as err:
        logger.warning(
            "the finished Ray Train run %s is not readable in %s (%s); training again", name, storage, err
        )
        finish_marker(spool).unlink(missing_ok=True)
        return None
    print_fn(f"Ray Train run {name!r} trained to the end earlier; completing MLflow run {run_id}")
    return _record_finished(config, result, client, run_id, uri, name, storage, spool, print_fn)


def _restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _is_ray_actor_error(err: BaseException) -> bool:
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(err, RayActorError)


def _is_training_failed_error(err: BaseException) -> bool:
    try:
        from ray.train import TrainingFailedError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(err, TrainingFailedError)
