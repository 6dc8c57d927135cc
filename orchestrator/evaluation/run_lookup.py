"""The MLflow run a ``--run`` names, and its checkpoint: ``fowkal eval``, ``fowkal show`` and
``fowkal tune-eval`` look runs up and download their ``best_checkpoint`` through here.

A ``--run`` is a run id, a run name (``a-mse-s0``; within ``--experiment`` when given) or ``SWEEP/NAME`` (a
trial of the sweep of that name), in the store of ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import os

from orchestrator import tracking
from orchestrator.tracking import BEST_CHECKPOINT_ARTIFACT, CONFIG_ARTIFACT
from trainer.checkpoint import EvalError, LoadedCheckpoint, load_checkpoint_model
from trainer.families import family_of


def store_of_run(cli_value: str | None) -> str:
    """The store of ``--run``: ``tracking.resolve_store_to_read`` (flag, ``MLFLOW_TRACKING_URI``, then the
    embedded default's ``runs/smoke/mlflow.db``), its error as an ``EvalError``."""
    try:
        return tracking.resolve_store_to_read(cli_value)
    except FileNotFoundError as err:
        raise EvalError(f"--run: {err}") from err


def get_run(client, run_ref: str, tracking_uri: str, experiment: str | None = None):
    """The MLflow run named by ``run_ref``: a run id, a run name (``a-mse-s0``; within ``experiment`` when
    given) or ``SWEEP/NAME`` (a trial of the sweep of that name). ``EvalError`` names the store when no run
    matches, and lists the candidates when a name is ambiguous."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_ref)
    except MlflowException as err:
        by_id_error = err.message
    sweep, _, name = run_ref.rpartition("/")
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise EvalError(f"--experiment {experiment!r}: no such MLflow experiment in {tracking_uri}")
        experiment_ids = [found.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    quoted = name.replace("'", "\\'")
    runs = client.search_runs(
        experiment_ids, filter_string=f"attributes.run_name = '{quoted}'", max_results=100
    )
    if sweep:
        runs = [r for r in runs if r.data.tags.get(tracking.TAG_SWEEP_ID) == sweep]
    if len(runs) == 1:
        return runs[0]
    where = f"experiment {experiment!r}" if experiment is not None else "any experiment"
    if not runs:
        raise EvalError(
            f"MLflow run {run_ref!r} not found in {tracking_uri}: neither a run id ({by_id_error}) nor a run "
            f"name in {where}"
        )
    candidates = "\n".join(
        f"  {r.info.run_id}  experiment {r.info.experiment_id}, sweep "
        f"{r.data.tags.get(tracking.TAG_SWEEP_ID, '-')}, status {r.info.status}"
        for r in runs[:20]
    )
    raise EvalError(
        f"run name {run_ref!r} matches {len(runs)} runs in {where} of {tracking_uri}; pass the run id, "
        f"--experiment NAME or SWEEP/{name}:\n{candidates}"
    )


def download_run_checkpoint(
    client,
    run_ref: str,
    tracking_uri: str,
    dest: str | os.PathLike,
    experiment: str | None = None,
    print_fn=print,
) -> LoadedCheckpoint:
    """Download a run's ``best_checkpoint`` (and ``config.yaml``) artifacts to ``dest`` and load the model;
    ``run_ref`` as for :func:`get_run`. One line says what is downloaded (MLflow's own progress bar, one per
    download call, is off)."""
    run = get_run(client, run_ref, tracking_uri, experiment)
    run_id = run.info.run_id
    names = [info.path for info in client.list_artifacts(run_id)]
    if BEST_CHECKPOINT_ARTIFACT not in names:
        raise EvalError(
            f"MLflow run {run_id!r} ({run.info.run_name}, status {run.info.status}) has no "
            f"{BEST_CHECKPOINT_ARTIFACT!r} artifact (artifacts: {names or 'none'}); fowkal train logs it "
            "(and every sweep trial) once an evaluation epoch has produced a best checkpoint"
        )
    wanted = [name for name in (BEST_CHECKPOINT_ARTIFACT, CONFIG_ARTIFACT) if name in names]
    print_fn(
        f"downloading {' and '.join(wanted)} of MLflow run {run_id} from {tracking.shown_uri(tracking_uri)}"
    )
    with tracking.artifact_progress_bars_off():
        checkpoint_dir = client.download_artifacts(run_id, BEST_CHECKPOINT_ARTIFACT, str(dest))
        config_file = None
        if CONFIG_ARTIFACT in names:
            config_file = client.download_artifacts(run_id, CONFIG_ARTIFACT, str(dest))
    loaded = load_checkpoint_model(
        checkpoint_dir, config_file, config_origin=f"artifact {CONFIG_ARTIFACT} of MLflow run {run_id}"
    )
    loaded.label = f"{run.info.run_name or run_id} ({family_of(loaded.config).run_label(loaded.config)})"
    return loaded


__all__ = ["download_run_checkpoint", "get_run", "store_of_run"]
