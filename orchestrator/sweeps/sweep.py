"""``fowkal tune`` and ``fowkal ablate``: the engine, :func:`run_sweep`.

Sweeps (Optuna TPE + ASHA over a search space) and ablations (every arm x seed, no early stopping) share it:

- Everything that can be wrong with the inputs (settings, config, search space or arms file, every arm and
  the paper point applied to the config, the resume state) is checked before Ray starts.
- Each Tune trial is ``orchestrator.sweeps.trial.run_trial``, which launches a Ray Train run; Tune never
starts
  more trials than the cluster can also place the workers of (``orchestrator.runs.resources``).
- MLflow: one parent run per sweep, found again by its resume key when it continues; one child run per
  trial; every child ends with its real status (``orchestrator.sweeps.trial_status``).
- Re-running the same command (or ``--resume``) restores the Tune experiment
  (``Tuner.restore(resume_unfinished=True)``); ``--fresh`` starts a new sweep beside it. Finished trials are
  kept, unfinished ones restart under the same trial id and their Ray Train run (stable name per trial)
  continues from its last checkpoint.

Directory layout of a sweep, ``<storage path>/<sweep name>/``: ``tune/`` (the Tune experiment), ``train/``
(Ray Train storage of the trials), ``trials/<run name>/`` (each trial's ``output_dir``), and the results:
``best_config.yaml``, ``summary.md``, ``importances.png``, ``parallel_coordinates.png`` (sweeps),
``ablation.md``, ``ablation.png`` (ablations). With a filesystem URI (``--storage-path s3://bucket/prefix``,
what a multi-node cluster needs) only ``tune/`` and ``train/`` go there, to ``<URI>/<sweep name>/``: all that
must outlive a node, what ``--resume`` and re-running the command restore from; the trials' output
directories and the results stay local, in ``<output_dir>/sweeps/<sweep name>/``. The URI is checked
(scheme, bucket) before anything starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.runs.storage import (
    StorageError,
    check_storage_path,
    is_storage_uri,
    storage_exists,
    storage_is_file,
    storage_join,
)
from orchestrator.sweeps.definition_file import SearchSpaceError
from orchestrator.sweeps.kinds import ABLATION_METRIC, get_sweep_kind
from orchestrator.sweeps.kinds import space_summary as _space_summary  # noqa: F401 (tune_eval*.py import it)
from orchestrator.sweeps.settings import SweepError, SweepSettings
from orchestrator.sweeps.trial import (
    SweepPlan,
    trial_train_config,
)
from orchestrator.sweeps.trial_status import (
    MlflowTrialStatusCallback,
    reconcile_child_runs,
)
from orchestrator.sweeps.tune import (  # noqa: F401 (re-exported: tests and callers import them from here)
    TRIAL_RESTARTS_CAP,
    EvaluationEpochOptunaSearch,
    trial_restarts,
)
from orchestrator.sweeps.tune import fit_sweep as _fit  # a module global, so that tests can replace it
from trainer.config import ConfigError, TrainConfig, config_digest, config_to_dict, flatten_config
from trainer.evaluation.metric_units import UNIT_LABEL
from trainer.families import family_of
from trainer.preflight import check_input_files

logger = logging.getLogger(__name__)

# Base-config keys logged as the parent run's parameters (the whole config is its base_config.yaml).
PARENT_PARAM_KEYS = (
    "family",
    "data.kind",
    "model.backbone",
    "data.pipeline.input_size",
    "epochs",
    "batch_size",
    "num_workers",
    "optim.lr",
    "loss.variant",
    "seed",
)


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
    """Stable default sweep name ``<config name>-<kind>-<8 hex>``: the same experiment, the same sweep.

    ``extra`` is :meth:`SweepSettings.identity`; the digest covers the config (``config_digest``), the
    definition file's text and ``extra``.
    """
    payload = json.dumps(
        {"config": config_digest(config), "definition": definition_text, **extra}, sort_keys=True
    )
    digest = hashlib.sha256(payload.encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(config.name)) or "sweep"
    return f"{safe}-{kind}-{digest}"


def _check_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise SweepError(f"--name must be letters, digits, '-', '_' or '.', got {name!r}")
    return name


def _validate_trial_configs(plan: SweepPlan, source: str) -> None:
    """Apply the paper point / every arm to the base config now, so a bad combination fails before Ray."""
    for trial_config, label in plan.sweep_kind.check_points(plan):
        try:
            trial_train_config(plan, trial_config, "check")
        except (ConfigError, SearchSpaceError, ValueError) as err:
            raise SweepError(f"{source}: {label} does not give a valid config: {err}") from err


def run_sweep(
    kind: str,
    config: TrainConfig,
    settings: SweepSettings | None = None,
    *,
    callbacks: list | None = None,
    print_fn=print,
    **changes,
) -> SweepOutcome:
    """Run (or resume) a hyperparameter sweep (``kind="tune"``) or an ablation (``kind="ablate"``).

    Args:
        kind: "tune" (needs ``settings.space_path``) or "ablate" (needs ``settings.arms_path``).
        config: base training config; trials override it.
        settings: everything else (``orchestrator.sweeps.settings.SweepSettings``; its fields document
            themselves). ``changes`` set single fields on top, e.g. ``run_sweep("ablate", cfg,
            arms_path=..., seeds=2)``.
        callbacks: extra ``ray.tune.Callback`` objects (driver side), e.g. for measurements.
        print_fn: where the progress lines go.

    Raises:
        SweepError, SearchSpaceError, ConfigError: bad inputs, before Ray starts.
    """
    from trainer.config import resolve_paths

    start = time.perf_counter()
    settings = (settings or SweepSettings()).replace(kind=kind, **changes)
    settings.validate(config.epochs)
    sweep_kind = settings.sweep_kind
    gpus_per_trial = settings.gpus_per_trial
    if gpus_per_trial is None:
        gpus_per_trial = float(config.num_workers) if config.use_gpu else 0.0

    # ---- inputs, all before Ray
    definition_path = settings.definition_path
    definition_text = Path(definition_path).read_text() if Path(definition_path).is_file() else ""
    definition = sweep_kind.load(definition_path, config)
    metric, mode = definition.metric, definition.mode
    config = resolve_paths(config)  # trial actors and Train workers may run in other directories
    check_input_files(config)  # the data and weights files, before Ray and MLflow
    sweep_name = _check_name(settings.name) if settings.name else None
    sweep_name = sweep_name or sweep_name_for(kind, config, definition_text, settings.identity())
    storage_path = str(settings.storage_path).strip() if settings.storage_path else None
    remote = is_storage_uri(storage_path)
    if remote:
        # What must outlive a node (the Tune experiment, the trials' Ray Train runs) goes to the URI; the
        # trials' logs and the report files stay on this machine, under output_dir/sweeps.
        try:
            check_storage_path(storage_path)
        except StorageError as err:
            raise SweepError(str(err)) from err
        base_storage = Path(config.output_dir) / "sweeps"
    else:
        local = storage_path.removeprefix("file://") if storage_path else None
        base_storage = Path(local).expanduser() if local else Path(config.output_dir) / "sweeps"
    if settings.fresh and not settings.name:  # a new sweep beside the old one: nothing is overwritten
        sweep_name = f"{sweep_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = (base_storage / sweep_name).resolve()
    storage_dir = storage_join(storage_path, sweep_name) if remote else str(sweep_dir)
    tune_dir = storage_join(storage_dir, "tune")
    # One rule for train, tune and ablate: re-running the same command continues it; --fresh starts over.
    restorable = storage_is_file(storage_join(tune_dir, "tuner.pkl"))
    if settings.resume and not restorable:
        raise SweepError(
            f"--resume: no interrupted sweep {sweep_name!r} in {storage_dir} (no tune/tuner.pkl); "
            "run without --resume to start it, or pass the --name of the sweep to resume"
        )
    if settings.fresh and storage_exists(tune_dir):
        raise SweepError(
            f"--fresh: sweep {sweep_name!r} already exists in {storage_dir}: pass another --name, or leave "
            "out --fresh to continue it"
        )
    if not restorable and storage_exists(tune_dir):
        raise SweepError(
            f"sweep {sweep_name!r} in {storage_dir} has a tune/ directory but no saved Tune state "
            "(tune/tuner.pkl) to continue from: pass --fresh to start a new sweep beside it"
        )
    resume = restorable
    settings = settings.replace(resume=resume)
    uri = tracking.resolve_tracking_uri(settings.tracking_uri, config.output_dir)
    experiment_name = settings.experiment
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
        space=definition.space,
        arms={arm.key: arm for arm in definition.arms},
        storage_dir=storage_dir if remote else "",
    )
    _validate_trial_configs(plan, str(definition_path))
    seed_values = [config.seed + i for i in range(settings.seeds)]

    # ---- MLflow parent run (reopened by its resume key on --resume)
    client = tracking.make_client(uri)
    experiment_id = tracking.get_or_create_experiment(client, experiment_name)
    parent_tags = tracking.build_run_tags(
        config=config if sweep_kind.parent_config_tags else None,
        dataset_kind=config.data.kind,
        commit=tracking.git_commit(),
        sweep_id=sweep_name,
        extra={
            tracking.TAG_SWEEP_KIND: kind,
            tracking.TAG_SWEEP_DIR: str(sweep_dir),
            tracking.TAG_STORAGE_PATH: storage_dir,
            tracking.TAG_METRIC: metric,
            tracking.TAG_MODE: mode,
            tracking.TAG_DEFINITION_FILE: str(definition_path),
            **sweep_kind.parent_tags(plan),
        },
    )
    # A handful of the base config's keys (the whole config is the base_config.yaml artifact): the runs
    # table then shows the children's parameters, not copies of the parent's.
    flat = flatten_config(config)
    sweep_params = {f"base.{k}": flat[k] for k in PARENT_PARAM_KEYS if k in flat}
    sweep_params.update(sweep_kind.parent_params(plan, settings, seed_values))
    parent_run_id = tracking.start_run(
        client,
        experiment_id,
        sweep_name,
        params=sweep_params,
        tags=parent_tags,
        resume_key=f"sweep:{sweep_name}",
    )
    plan.experiment_id, plan.parent_run_id = experiment_id, parent_run_id
    client.set_tag(parent_run_id, tracking.TAG_DESCRIPTION, sweep_description(kind, config, settings, plan))
    print_fn(f"MLflow parent run {parent_run_id} ({sweep_name}) in {uri}, experiment {experiment_name!r}")
    try:
        tracking.log_config_yaml(
            parent_run_id, plan.base_config, client=client, filename=tracking.BASE_CONFIG_ARTIFACT
        )
        client.log_text(parent_run_id, definition_text, Path(definition_path).name)
        client.log_text(parent_run_id, sweep_kind.definition_json(plan), sweep_kind.definition_artifact)
    except Exception as err:
        tracking.end_run(parent_run_id, "FAILED", client=client, error=err)
        raise

    # ---- Ray and Tune
    status_callback = MlflowTrialStatusCallback(plan)
    try:
        outcome = _fit(plan, settings, status_callback, seed_values, callbacks, print_fn)
    except KeyboardInterrupt as err:
        tracking.end_run(parent_run_id, "KILLED", client=client, error="interrupted (re-run to continue)")
        print_fn(f"sweep {sweep_name!r} interrupted; run the same command again to continue it")
        raise SweepInterrupted(f"sweep {sweep_name!r} interrupted", parent_run_id) from err
    except BaseException as err:
        tracking.end_run(parent_run_id, "FAILED", client=client, error=err)
        raise
    max_concurrent_used, trial_statuses = outcome

    # ---- results: reconcile, summary, best config, plots, all logged to the parent
    try:
        for run_id in reconcile_child_runs(plan, client, trial_statuses):
            print_fn(
                f"deleted child run {run_id}: its trial started after Tune last saved the sweep's state, and "
                f"this sweep drew its sample again (to restore it: mlflow runs restore --run-id {run_id})"
            )
        result = _write_results(plan, client, print_fn)
    except BaseException as err:
        tracking.end_run(parent_run_id, "FAILED", client=client, error=err)
        raise
    interrupted = any(s not in ("TERMINATED", "ERROR") for s in trial_statuses.values())
    failed = sum(s == "ERROR" for s in trial_statuses.values())
    total = len(trial_statuses)
    if failed:
        client.set_tag(parent_run_id, tracking.TAG_FAILED_TRIALS, f"{failed} of {total}")
        print_fn(f"{failed} of {total} trial(s) failed (their child runs hold the error and error.txt)")
    all_failed = total > 0 and failed == total
    if all_failed:
        reason = f"all {total} trial(s) failed: {_first_trial_error(plan, client)}"
        tracking.end_run(parent_run_id, "FAILED", client=client, error=reason)
    else:
        tracking.end_run(parent_run_id, "KILLED" if interrupted else "FINISHED", client=client)
    print_fn(f"results in {sweep_dir}")
    print_fn(f"report: fowkal report {experiment_name} --tracking-uri {uri}")
    print_fn(f"MLflow UI: {tracking.ui_command(uri)}")
    print_fn(f"runs table: {tracking.runs_table_url(uri, experiment_id)}")
    if all_failed:
        raise SweepFailed(f"sweep {sweep_name!r}: {reason}", parent_run_id)
    if interrupted:
        print_fn(f"sweep {sweep_name!r} interrupted; run the same command again to continue it")
        raise SweepInterrupted(
            f"sweep {sweep_name!r} interrupted; run the same command again (or with --resume) to continue it",
            parent_run_id,
        )
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


class SweepFailed(RuntimeError):
    """Every trial of the sweep failed; the parent run is FAILED with the first trial's error."""

    def __init__(self, message: str, parent_run_id: str | None = None):
        super().__init__(message)
        self.parent_run_id = parent_run_id


def sweep_description(kind: str, config: TrainConfig, settings: SweepSettings, plan: SweepPlan) -> str:
    """The parent run's description (the MLflow UI's note): what was run, on what, for how long."""
    data = config.data
    if data.kind == "synthetic":
        where = f"synthetic COCO-WholeBody-format data ({data.synthetic_train_images} training images, "
        where += f"{data.synthetic_val_images} validation images)"
    else:
        where = f"COCO-WholeBody ({data.train_ann_file}; validation {data.val_ann_file})"
    model, learning_rate = family_of(config).describe_recipe(config)
    sweep_kind = get_sweep_kind(kind)
    return (
        f"{sweep_kind.title}: {sweep_kind.describe(plan, settings)}. Data: {where}. Model: "
        f"{model}, {config.epochs} epochs, batch {config.batch_size} x {config.num_workers} worker(s), "
        f"{learning_rate}. Metrics are {UNIT_LABEL}; best/ metrics are the best epoch's."
    )


def _first_trial_error(plan: SweepPlan, client) -> str:
    """The ``fowkal.error`` tag of the first failed child run (what went wrong, in one line)."""
    from orchestrator.reports import report

    for run in report.child_runs(client, plan.experiment_id, plan.parent_run_id):
        error = run.data.tags.get(tracking.TAG_ERROR)
        if run.info.status == "FAILED" and error:
            return f"{run.info.run_name}: {error}"
    return "see the trials' error.txt"


def _write_results(plan: SweepPlan, client, print_fn) -> dict[str, Any]:
    """Write and log the summary / ablation table, the best config and the plots to the parent run."""
    from orchestrator.reports import report

    record = report.load_sweep(client, plan.parent_run_id)
    out_dir = Path(plan.sweep_dir)
    result: dict[str, Any] = {"run_statuses": {c.name: c.status for c in record.children}}
    artifacts = report.write_sweep_outputs(record, out_dir)
    for path in artifacts:
        client.log_artifact(plan.parent_run_id, str(path))
    result["artifacts"] = [p.name for p in artifacts]
    result["summary_path"] = str(out_dir / "summary.md")
    table, best_path = plan.sweep_kind.results(plan, record, client, out_dir)
    if best_path is not None:
        result["best_config_path"] = str(best_path)
        result["artifacts"].append(best_path.name)
    result["table_markdown"] = table
    print_fn(table)
    return result


__all__ = [
    "ABLATION_METRIC",
    "SweepError",
    "SweepFailed",
    "SweepInterrupted",
    "SweepOutcome",
    "SweepSettings",
    "run_sweep",
    "sweep_name_for",
]
