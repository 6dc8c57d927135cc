"""MLflow tracking for fowkal runs: URI resolution, runs addressed by id, metrics, artifacts, the KAF plot.

Every helper takes an explicit ``MlflowClient`` and run id instead of using MLflow's global "active run", so
one driver can hold several open runs at once (a sweep's parent run and its trials' child runs) and so the
Ray Train controller process can log into a run the driver created.

This module owns the names other modules and the report read back: tag keys and artifact names. It imports
MLflow lazily and never Ray, so ``fowkal report`` needs neither Ray nor a model.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer.evaluation.metric_units import METRIC_UNIT
from trainer.topdown.kaf_plot import KAF_PLOT_FILE

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow limits (mlflow.utils.validation): values longer than this are rejected, and log_batch takes at most
# 100 params / 1000 metrics per request.
_MAX_PARAM_VALUE_CHARS = 6000
_MAX_TAG_VALUE_CHARS = 5000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000

# Tag keys. ``mlflow.parentRunId`` and ``mlflow.source.git.commit`` are MLflow's own (the UI nests child runs
# and shows the commit); the rest are ours and short so they read well in the UI's columns.
TAG_PARENT_RUN_ID = "mlflow.parentRunId"
TAG_DESCRIPTION = "mlflow.note.content"  # the run's description in the UI
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_LOSS_VARIANT = "loss_variant"
TAG_FAMILY = "fowkal.family"  # the experiment family (trainer.families) of the run
TAG_DATASET = "dataset"
TAG_ARM = "arm"
TAG_SEED = "seed"
TAG_SWEEP_ID = "sweep_id"
TAG_RESUME_KEY = "fowkal.resume_key"
TAG_ERROR = "fowkal.error"
# Sweeps and ablations (parent and child runs).
TAG_SWEEP_KIND = "fowkal.sweep_kind"
TAG_SWEEP_DIR = "fowkal.sweep_dir"
TAG_TRIAL_ID = "fowkal.trial_id"
TAG_ARM_KEY = "fowkal.arm_key"
TAG_ARM_LABEL = "fowkal.arm_label"
TAG_METRIC = "fowkal.metric"
TAG_MODE = "fowkal.mode"
TAG_SAMPLED = "fowkal.sampled_params"  # JSON list of the sampled dotted keys (sweeps)
TAG_END_REASON = "fowkal.end_reason"
TAG_BEST_RUN = "fowkal.best_run"
TAG_DEFINITION_FILE = "fowkal.definition_file"
TAG_FAILED_TRIALS = "fowkal.failed_trials"  # "k of n" on a sweep's parent run
# fowkal train.
TAG_RAY_RUN_NAME = "fowkal.ray_run_name"
TAG_STORAGE_PATH = "fowkal.storage_path"
TAG_LAST_WORKER_ERROR = "fowkal.last_worker_error"
# The unit of the run's AP/AR metrics (trainer.evaluation.metric_units.METRIC_UNIT); absent on runs of
# earlier versions,
# which logged fractions.
TAG_METRIC_UNIT = "fowkal.metric_unit"

# Keys of a report that are its step, not metrics; and the metric whose steps say which epochs were reported.
STEP_KEYS = ("epoch",)
EPOCH_METRIC = "train/loss"

# `fowkal train`'s MLflow experiment when --experiment is not given (the sweeps': orchestrator.sweeps.kinds).
TRAIN_EXPERIMENT = "fowkal-train"

# Artifact names. A run's config (trainer.checkpoint reads a config.yaml beside a checkpoint by that name).
CONFIG_ARTIFACT = "config.yaml"
BASE_CONFIG_ARTIFACT = "base_config.yaml"  # a sweep's parent run
BEST_CHECKPOINT_ARTIFACT = "best_checkpoint"  # the best Ray checkpoint directory
LAST_CHECKPOINT_ARTIFACT = "last_checkpoint"  # the latest one
KAF_PLOT_ARTIFACT = KAF_PLOT_FILE  # the top-down family's KAF figure (the report shows it per arm)
ARMS_ARTIFACT = "arms.json"  # an ablation's parent run
SPACE_ARTIFACT = "search_space.json"  # a sweep's parent run
ERROR_ARTIFACT = "error.txt"


class TrackingStoreError(FileNotFoundError):
    """A store to read that does not exist (a ``sqlite:///`` file); the message names it and the flag."""


class TrackingServerError(ValueError):
    """A tracking server that does not answer or refuses the credentials; the message names the server
    (never a password)."""


# Where MLflow's client takes a tracking server's credentials from (HTTP basic authentication).
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
SERVER_CHECK_TIMEOUT_S = 10.0


def is_tracking_server(tracking_uri: str | None) -> bool:
    return bool(tracking_uri) and str(tracking_uri).startswith(("http://", "https://"))


def shown_uri(tracking_uri: str) -> str:
    """``tracking_uri`` as it may be printed: without the user-info part (``user:password@``) of a URL."""
    return re.sub(r"^(https?://)[^/@]*@", r"\1", str(tracking_uri))


def check_tracking_server(tracking_uri: str) -> None:
    """For a tracking server (``http(s)://``): raise :class:`TrackingServerError` unless it answers and
    accepts this machine's credentials (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, as
    MLflow's client sends them). Local stores pass. Commands call it before Ray or a model starts."""
    if not is_tracking_server(tracking_uri):
        return
    import urllib.error
    import urllib.request

    from mlflow.exceptions import MlflowException

    server = shown_uri(tracking_uri)
    try:  # /health answers without credentials, and without MLflow's retries on a server that is down
        with urllib.request.urlopen(server.rstrip("/") + "/health", timeout=SERVER_CHECK_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass  # it answers; the request below says whether it lets us in
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingServerError(
            f"tracking server {server} does not answer ({reason}); start it, or pass another --tracking-uri "
            "(or MLFLOW_TRACKING_URI)"
        ) from None
    try:
        make_client(tracking_uri).search_experiments(max_results=1)
    except MlflowException as err:
        status = err.get_http_status_code()
        if status not in (401, 403):
            raise
        user = os.environ.get(USERNAME_ENV, "").strip()
        given = (
            f"user {user!r} from {USERNAME_ENV} / {PASSWORD_ENV}"
            if user
            else f"none given: set {USERNAME_ENV} and {PASSWORD_ENV} on this machine"
        )
        # ``from None``: the client's error says nothing more, and no traceback shows a request's headers.
        raise TrackingServerError(
            f"tracking server {server} refused the credentials (HTTP {status}; {given})"
        ) from None


# MLflow's switch for the tqdm bar it draws per artifact download or upload call (read at each call).
ARTIFACTS_PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@contextlib.contextmanager
def artifact_progress_bars_off():
    """No MLflow progress bars for the artifact transfers made in the block (the caller prints its own
    line)."""
    previous = os.environ.get(ARTIFACTS_PROGRESS_BAR_ENV)
    os.environ[ARTIFACTS_PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ARTIFACTS_PROGRESS_BAR_ENV, None)
        else:
            os.environ[ARTIFACTS_PROGRESS_BAR_ENV] = previous


def resolve_tracking_uri(cli_value: str | None, output_dir: str | os.PathLike) -> str:
    """Tracking URI by precedence: the CLI flag, then ``MLFLOW_TRACKING_URI``, then a SQLite file.

    The default is ``sqlite:///<absolute output_dir>/mlflow.db`` (MLflow 3 no longer accepts a plain
    directory store for new runs). The directory is created so SQLite can create the file.
    """
    if cli_value is not None and str(cli_value).strip():
        return str(cli_value).strip()
    env_value = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env_value:
        return env_value
    if output_dir is None or not str(output_dir).strip():
        raise ValueError(f"output_dir must name a directory for the default SQLite store, got {output_dir!r}")
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for any other store."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        return Path(tracking_uri[len(prefix) :])
    return None


# Where `fowkal train/tune/ablate --config configs/smoke.yaml` (the embedded default) keep their runs: the
# smoke config's output_dir, relative to the current directory as that config's paths are.
EMBEDDED_DEFAULT_STORE = "sqlite:///runs/smoke/mlflow.db"


def resolve_store_to_read(cli_value: str | None) -> str:
    """Tracking URI for commands that read existing runs (``fowkal report``, ``eval --run``, ``show --run``).

    By precedence: the CLI flag, then ``MLFLOW_TRACKING_URI``, then the embedded default's store
    (``EMBEDDED_DEFAULT_STORE``). A SQLite store that does not exist is an error naming the file and how to
    name another store: reading must never create an empty database.
    """
    uri = (cli_value or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    uri = uri or EMBEDDED_DEFAULT_STORE
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise TrackingStoreError(
            f"no MLflow store at {database} (tracking URI {uri}); pass --tracking-uri or set "
            "MLFLOW_TRACKING_URI (fowkal train/tune/ablate write sqlite:///<output_dir>/mlflow.db)"
        )
    return uri


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for a new experiment: ``<db dir>/mlartifacts`` beside a SQLite store, else the server's.

    Without this MLflow puts artifacts under the *current directory*, which for ``ray job submit`` is a
    temporary copy of the working dir that Ray deletes.
    """
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    return (db.parent / "mlartifacts").resolve().as_uri()


UI_PORT = 5000
# The experiment kind MLflow 3's UI reads to open an experiment on its runs table (model training), not on
# the GenAI traces view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ui_command(tracking_uri: str) -> str:
    """The full shell command that opens the MLflow UI on this store (on 127.0.0.1), or, for a tracking
    server, where to point the browser."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    command = str(mlflow_bin) if mlflow_bin.is_file() else "mlflow"
    return f"{command} ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port {UI_PORT}"


def runs_table_url(tracking_uri: str, experiment_id: str) -> str:
    """Deep link to the experiment's runs table in the UI's model-training view."""
    return f"{ui_base_url(tracking_uri)}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def make_client(tracking_uri: str):
    """An ``MlflowClient`` bound to ``tracking_uri`` (no global MLflow state is touched)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def get_or_create_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """Id of the experiment called ``name``, creating it (with ``artifact_location`` when given) if absent.

    A deleted experiment of that name is restored rather than failing with MLflow's "already exists" error.
    """
    if not name or not str(name).strip():
        raise ValueError(f"experiment name must be a non-empty string, got {name!r}")
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    if artifact_location is None:
        artifact_location = default_artifact_location(client.tracking_uri)
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except Exception:
        # Another process (a concurrent trial) created it between our lookup and create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_commit(repo_dir: str | os.PathLike | None = None) -> str | None:
    """HEAD commit of the git checkout holding ``repo_dir`` (default: this package's checkout), or None."""
    cwd = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit or None


def config_tags(config) -> dict[str, str]:
    """The tags that say what a run of ``config`` trains: its family, and the family's own (the top-down
    family's ``loss_variant``)."""
    from trainer.families import family_of

    family = family_of(config)
    return {TAG_FAMILY: family.name, **family.run_tags(config)}


def build_run_tags(
    *,
    config=None,
    loss_variant: str | None = None,
    dataset_kind: str | None = None,
    commit: str | None = None,
    parent_run_id: str | None = None,
    arm: str | None = None,
    seed: int | None = None,
    sweep_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Tags for a run; keys whose value is None are left out. ``parent_run_id`` nests it under a sweep run.
    ``config`` (a ``TrainConfig``) adds :func:`config_tags`."""
    tags: dict[str, Any] = {
        TAG_LOSS_VARIANT: loss_variant,
        TAG_DATASET: dataset_kind,
        TAG_GIT_COMMIT: commit,
        TAG_PARENT_RUN_ID: parent_run_id,
        TAG_ARM: arm,
        TAG_SEED: seed,
        TAG_SWEEP_ID: sweep_id,
    }
    if config is not None:
        tags.update(config_tags(config))
    if extra:
        tags.update(extra)
    return {str(k): _truncate(str(v), _MAX_TAG_VALUE_CHARS) for k, v in tags.items() if v is not None}


def find_run_by_resume_key(client, experiment_id: str, resume_key: str) -> str | None:
    """Id of the newest run in the experiment tagged with ``resume_key``, or None."""
    key = resume_key.replace("'", "\\'")
    runs = client.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{TAG_RESUME_KEY}` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_run(
    client,
    experiment_id: str,
    run_name: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    resume_key: str | None = None,
) -> str:
    """Create a run (or reopen the one tagged ``resume_key``) and return its id.

    ``resume_key`` makes re-running an interrupted training or sweep continue its MLflow run instead of
    creating a duplicate: the existing run is set back to RUNNING and its metrics continue at the next step.
    Params are logged with ``log_params``; reopening with different param values is an MLflow error, which is
    what we want (a resumed run must be the same configuration).
    """
    if not run_name or not str(run_name).strip():
        raise ValueError(f"run_name must be a non-empty string, got {run_name!r}")
    all_tags = {TAG_METRIC_UNIT: METRIC_UNIT, **(tags or {})}
    run_id = None
    if resume_key is not None:
        all_tags[TAG_RESUME_KEY] = resume_key
        run_id = find_run_by_resume_key(client, experiment_id, resume_key)
    if run_id is None:
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        run_id = run.info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
        for key, value in all_tags.items():
            client.set_tag(run_id, key, value)
    if params:
        log_params(run_id, params, client=client)
    return run_id


def log_params(run_id: str, params: Mapping[str, Any], *, client) -> None:
    """Log flat params (e.g. from ``trainer.config.flatten_config``); lists/dicts become JSON strings."""
    from mlflow.entities import Param

    items = []
    for key, value in params.items():
        if isinstance(value, (list, tuple, dict)):
            text = json.dumps(value)
        else:
            text = str(value)
        items.append(Param(str(key), _truncate(text, _MAX_PARAM_VALUE_CHARS)))
    # Parameters already logged with the same value are accepted by MLflow; skip them anyway so a resumed run
    # does not depend on that.
    existing = client.get_run(run_id).data.params
    items = [p for p in items if existing.get(p.key) != p.value]
    for start in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + _PARAMS_PER_BATCH])


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` that are real numbers (bools, strings, lists and None are dropped)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, numbers.Real):
            out[str(key)] = float(value)
        elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch 0-d scalar
            item = value.item()
            if isinstance(item, numbers.Real) and not isinstance(item, bool):
                out[str(key)] = float(item)
    return out


def epoch_metric_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of one epoch's report as MLflow metrics: ``epoch`` left out, since the epoch is
    every metric's step, not a metric of its own (a constant column in the compare views)."""
    return {k: v for k, v in numeric_metrics(metrics).items() if k not in STEP_KEYS}


def log_epoch_metrics(run_id: str, metrics: Mapping[str, Any], step: int, *, client) -> dict[str, float]:
    """Log the numeric entries of ``metrics`` at ``step`` (the epoch), ``epoch`` itself left out; returns
    what was logged.

    Non-finite values are logged as they are (MLflow stores NaN/inf) so a diverging run is visible.
    """
    from mlflow.entities import Metric

    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be a non-negative integer epoch, got {step!r}")
    values = epoch_metric_values(metrics)
    now_ms = int(time.time() * 1000)
    items = [Metric(key, value, now_ms, int(step)) for key, value in values.items()]
    for start in range(0, len(items), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[start : start + _METRICS_PER_BATCH])
    return values


def last_epoch(client, run_id: str) -> int | None:
    """The last epoch a run reported: the last step of ``EPOCH_METRIC`` (logged every epoch), or None."""
    history = client.get_metric_history(run_id, EPOCH_METRIC)
    return max(int(m.step) for m in history) if history else None


def end_run(run_id: str, status: str, *, client, error: BaseException | str | None = None) -> None:
    """End the run with its real status (FINISHED, FAILED or KILLED); ``error`` is kept as tag and file."""
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
    if error is not None:
        text = error if isinstance(error, str) else _format_exception(error)
        client.set_tag(run_id, TAG_ERROR, _truncate(error_summary(error), _MAX_TAG_VALUE_CHARS))
        try:
            client.log_text(run_id, text, ERROR_ARTIFACT)
        except Exception:  # the status matters more than the attachment
            pass
    client.set_terminated(run_id, status=status)


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit): \S")


def error_summary(error: BaseException | str) -> str:
    """One line saying what went wrong: ``Type: message`` of an exception (of its root cause when Ray
    wrapped it), or for a traceback text its last line, which holds the exception (not "Traceback ...")."""
    if isinstance(error, BaseException):
        root = error
        while root.__cause__ is not None and root.__cause__ is not root:
            root = root.__cause__
        failures = getattr(root, "worker_failures", None)  # Ray Train's WorkerGroupError: the workers' own
        if isinstance(failures, dict) and failures:
            return error_summary(next(iter(failures.values())))
        message = str(root).strip()
        lines = [line for line in message.splitlines() if line.strip()]
        if lines and lines[0].startswith("Traceback"):  # Ray re-raises with the worker's traceback as text
            return error_summary(message)
        if len(lines) > 1:  # a wrapper whose text quotes the worker's exception line
            quoted = [line.strip() for line in lines if _EXCEPTION_LINE.match(line.strip())]
            if quoted:
                return quoted[-1]
        return f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return "error"
    if lines[0].startswith("Traceback"):
        exception_lines = [line for line in lines if not line.startswith(("File ", "Traceback", "^", "~"))]
        return exception_lines[-1] if exception_lines else lines[-1]
    return lines[0]


def log_config_yaml(
    run_id: str, config_dict: Mapping[str, Any], *, client, filename: str = CONFIG_ARTIFACT
) -> None:
    """Store the (resolved) config as a YAML artifact, ready to feed back to ``fowkal train --config``."""
    import yaml

    client.log_text(run_id, yaml.safe_dump(dict(config_dict), sort_keys=False), filename)


def log_artifact_path(
    run_id: str, path: str | os.PathLike, *, client, artifact_path: str | None = None
) -> None:
    """Upload a file or a whole directory (e.g. a checkpoint) under ``artifact_path``."""
    local = Path(path)
    if not local.exists():
        raise FileNotFoundError(f"artifact path does not exist: {local}")
    if local.is_dir():
        client.log_artifacts(run_id, str(local), artifact_path)
    else:
        client.log_artifact(run_id, str(local), artifact_path)


@contextlib.contextmanager
def system_metrics(run_id: str, tracking_uri: str, sampling_interval: float = 10.0):
    """Log this machine's CPU, memory, disk, network (and GPU, with nvidia-ml-py) as ``system/*`` metrics of
    the run while the block runs (MLflow's monitor; its failures never reach the caller)."""
    monitor = None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=sampling_interval, resume_logging=True, tracking_uri=tracking_uri
        )
        monitor.start()
    except Exception:  # no psutil, an old MLflow, an unreachable server: training goes on
        monitor = None
    try:
        yield monitor
    finally:
        if monitor is not None:
            # finish() joins the monitor's thread, which may sit in MLflow's retry backoff during a tracking
            # outage: stop it in the background and wait a few seconds at most.
            stopper = threading.Thread(target=_finish_quietly, args=(monitor,), daemon=True)
            stopper.start()
            stopper.join(timeout=SYSTEM_METRICS_STOP_S)


SYSTEM_METRICS_STOP_S = 5.0


def _finish_quietly(monitor) -> None:
    try:
        monitor.finish()
    except Exception:
        pass


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_exception(error: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def is_finite_number(value: Any) -> bool:
    """True for a real, finite number (used to pick the best checkpoint's score)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def absolute_tracking_uri(tracking_uri: str) -> str:
    """``tracking_uri`` with a relative ``sqlite:///`` path made absolute (against the current directory), so
    it names the same store from anywhere; other URIs as given."""
    database = sqlite_path(tracking_uri)
    if database is None or database.is_absolute():
        return tracking_uri
    return f"sqlite:///{database.resolve()}"


def ui_base_url(tracking_uri: str) -> str:
    """Where the MLflow UI of this store answers: the tracking server itself, else the address that
    :func:`ui_command` starts it on."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return f"http://127.0.0.1:{UI_PORT}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Deep link to one run's page in the MLflow UI."""
    return f"{ui_base_url(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"
