"""``fowkal tune-eval``: Optuna TPE over the evaluation settings of a trained checkpoint, as Ray Tune trials.

The settings that act after the network cost no training, and with the network's output kept no forward pass
either. What they are and what is kept is the family's (``trainer.families.EvalSweep``, the family's
``eval_sweep``); nothing here names a family. The top-down family sweeps ``trainer.config.EVAL_SETTING_KEYS``
(the flip-test mode, DARK's blur kernel, the rescoring keypoint threshold, the OKS-NMS threshold, the
detection-score threshold) over cached heatmaps; KAPAO its six thresholds, fusion, the unfused-keypoint score
and the test-time augmentation over cached candidates (``trainer.kapao.candidate_cache``). For the top-down
family:

- Before Ray: the search space (``search_spaces/eval_space.yaml``, the format of ``sweep_space``; a key that
  is not an evaluation setting is an error naming it), the checkpoint (its weights must fit the model its
  config describes), the annotation file, the image directory and the detection file are checked
  (``orchestrator.evaluation.tune_eval_inputs``).
- The network runs once: ``trainer.topdown.heatmap_cache.build_heatmap_cache`` keeps the plain and mirrored
  heatmaps of every box (down to the lowest detection score the space can ask for) under
  ``<storage>/heatmap_cache/<key>``; a later tune-eval of the same checkpoint and data reuses them.
- Each Tune trial (``orchestrator.evaluation.tune_eval_trial``: ``run_eval_trial``, importable from here as
every
  public name of the trial side) decodes, rescores, suppresses and scores the cached heatmaps with its
  settings, in its own MLflow child run under the sweep's parent. Decoding depends only on the flip
  mode and the kernel: the first trial of a flip mode decodes every box for every kernel of the space and
  keeps the keypoints under ``<sweep>/decoded``; later trials of that mode only select, rescore and score.
  The first trial is the checkpoint config's own settings (the defaults), so the gain over them is
  measured, not assumed.
- Parent run: in the evaluated run's experiment and nested under it with ``--run``; else in
  ``--experiment`` (``fowkal-tune-eval``). Children end FINISHED (scored), FAILED (error) or KILLED (the
  sweep ended before they were scored), the status rules of sweeps (``orchestrator.sweeps.trial_status``).
- The trials run on the one Tuner set-up of sweeps (``orchestrator.sweeps.tuner``): Optuna TPE from the
defaults,
  no early stopping, as many at once as the cluster's CPUs hold (``resources.EVAL_TRIAL_CPUS`` each).
- Results, in the sweep directory and on the parent run (``orchestrator.evaluation.tune_eval_results``):
  ``best_eval.yaml`` (the best settings, and the ``fowkal eval --set`` line that applies them),
  ``summary.md`` (best, defaults, gain overall and per part, the top trials, Optuna's parameter importances,
  computed as ``fowkal report`` computes them).
- ``--holdout F`` (``orchestrator.evaluation.tune_eval_holdout``): the trials score a seeded part of the
  images, the best settings and the defaults are then scored on the held-out fraction F; both parts' numbers
  go into the summary and the parent run (``holdout/...``).
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
from orchestrator.evaluation.tune_eval_holdout import HOLDOUT_PREFIX, check_holdout, write_split
from orchestrator.evaluation.tune_eval_inputs import (  # the checks before Ray
    TuneEvalError,
    base_settings,
    blur_kernels,
    check_det_file,
    defaults_point,
    file_digest,
    load_eval_space,
    lowest_det_score_thr,
    metric_names,
    space_reach,
    trial_settings_for,
)
from orchestrator.evaluation.tune_eval_results import (  # the results; importable from here as before
    PART_AP_METRICS,
    SUMMARY_FILE,
    parameter_importances,
    scored_trials,
    write_results,
)
from orchestrator.evaluation.tune_eval_trial import (  # the trial side; importable from here as before
    DEFAULT_METRIC,
    EVAL_PREFIX,
    SHORT_METRIC,
    EvalSweepPlan,
    EvalTrialStatusCallback,
    evaluate_trial,
    open_trial_run,
    reconcile_eval_runs,
    run_eval_trial,
    trial_run_name,
    trial_settings,
)
from orchestrator.reports.records import (  # the tags and file fowkal report reads a tune-eval by
    BEST_EVAL_FILE,
    TAG_CHECKPOINT,
    TAG_DEFAULTS_RUN,
    TAG_EVALUATED_RUN,
    TAG_TUNE_EVAL,
)
from orchestrator.sweeps.definition_file import SearchSpaceError

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "fowkal-tune-eval"


class TuneEvalFailed(RuntimeError):
    """Every trial failed; the parent run is FAILED with the first error."""


@dataclass
class TuneEvalOutcome:
    """What :func:`run_tune_eval` returns."""

    sweep_id: str
    sweep_dir: str
    tracking_uri: str
    parent_run_id: str
    cache_dir: str
    defaults: dict[str, Any]
    default_score: float | None
    best: dict[str, Any] | None
    best_score: float | None
    importances: dict[str, float]
    trial_statuses: dict[str, str]
    run_statuses: dict[str, str]
    best_eval_path: str | None = None
    summary_path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    holdout: dict[str, Any] | None = None  # --holdout: the parts' sizes and scores (write_results' holdout)


# ----------------------------------------------------------------------------------------------------------
# the command


def run_tune_eval(
    *,
    ann_file: str,
    image_dir: str,
    space_path: str,
    samples: int,
    run: str | None = None,
    checkpoint: str | None = None,
    det_file: str | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    storage_path: str | None = None,
    max_concurrent: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    holdout: float | None = None,
    verbose: int = 1,
    print_fn=print,
) -> TuneEvalOutcome:
    """What ``fowkal tune-eval`` does (module docstring). Raises ``TuneEvalError`` / ``SearchSpaceError`` /
    ``EvalError`` on bad inputs, before Ray starts; ``TuneEvalFailed`` when every trial failed."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if (run is None) == (checkpoint is None):
        raise TuneEvalError("pass exactly one of --run RUN and --checkpoint CKPT")
    if samples < 1:
        raise TuneEvalError(f"--samples must be >= 1, got {samples}")
    if max_concurrent is not None and max_concurrent < 1:
        raise TuneEvalError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    check_holdout(holdout)
    if not Path(ann_file).is_file():
        raise TuneEvalError(f"annotation file {str(ann_file)!r} does not exist (--ann)")
    if not Path(image_dir).is_dir():
        raise TuneEvalError(f"image directory {str(image_dir)!r} does not exist (--images)")
    if not Path(space_path).is_file():
        raise TuneEvalError(f"search space {str(space_path)!r} does not exist (--space)")
    space = load_eval_space(space_path)
    check_det_file(det_file)
    ann_file, image_dir = str(Path(ann_file).resolve()), str(Path(image_dir).resolve())
    det_file = None if det_file is None else str(Path(det_file).resolve())

    # ---- the checkpoint (weights that do not fit the config's model: CheckpointMismatchError, an EvalError)
    from orchestrator.evaluation.eval_command import download_run_checkpoint, get_run, store_of_run
    from trainer.checkpoint import checkpoint_file, load_checkpoint_model

    evaluated_run = None
    if run is not None:
        uri = store_of_run(tracking_uri)
        client = tracking.make_client(uri)
        evaluated_run = get_run(client, run, uri, experiment)
        base_dir = Path(storage_path) if storage_path else Path("runs") / "tune_eval"
        download_dir = base_dir / "checkpoints" / evaluated_run.info.run_id
        if (download_dir / tracking.BEST_CHECKPOINT_ARTIFACT).exists():
            loaded = load_checkpoint_model(download_dir / tracking.BEST_CHECKPOINT_ARTIFACT)
        else:
            download_dir.mkdir(parents=True, exist_ok=True)
            loaded = download_run_checkpoint(client, evaluated_run.info.run_id, uri, download_dir)
        experiment_id = evaluated_run.info.experiment_id
        source_args = f"--run {evaluated_run.info.run_id}"
    else:
        loaded = load_checkpoint_model(checkpoint)
        uri = tracking.resolve_tracking_uri(tracking_uri, loaded.config.output_dir)
        client = tracking.make_client(uri)
        experiment_id = tracking.get_or_create_experiment(client, experiment or DEFAULT_EXPERIMENT)
        base_dir = Path(storage_path) if storage_path else Path(loaded.config.output_dir) / "tune_eval"
        source_args = f"--checkpoint {Path(checkpoint).resolve()}"
    source_args += f" --ann {ann_file} --images {image_dir}" + (f" --det-file {det_file}" if det_file else "")
    config = loaded.config
    from trainer.families import family_of

    family = family_of(config)
    sweep = family.eval_sweep
    if sweep is None:
        raise TuneEvalError(
            f"{loaded.checkpoint_path}: a checkpoint of family {family.name!r}, whose inference-time "
            "settings fowkal tune-eval cannot sweep (the family has no eval_sweep)"
        )
    if space.family != family.name:
        raise TuneEvalError(
            f"{space_path}: a search space of family {space.family!r} (its family: field), but the "
            f"checkpoint {loaded.checkpoint_path} is of family {family.name!r}: give --space a space of "
            "that family"
        )
    settings = base_settings(config)
    defaults = defaults_point(space, settings, space_path)
    points = [defaults] + [dict(p) for p in space.extra_points]
    try:  # every point the search starts from must give a valid config
        for point in points:
            trial_settings_for(space, settings, point, config)
    except (SearchSpaceError, ValueError, TypeError) as err:
        raise TuneEvalError(f"{space_path}: {err}") from err
    timings["checks_s"] = time.perf_counter() - start

    # ---- the network, once
    print_fn(
        f"checkpoint {loaded.checkpoint_path} ({family.describe_model(config)}, config from "
        f"{loaded.config_source})"
    )
    began = time.perf_counter()
    cache = sweep.build_cache(
        loaded,
        ann_file,
        image_dir,
        base_dir.resolve(),
        det_file=det_file,
        reach=space_reach(space, settings),
        progress=verbose > 0,
    )
    timings["cache_s"] = time.perf_counter() - began
    what = f"{cache.units} {cache.unit_name}"
    print_fn(f"network outputs of {what} cached in {cache.path} ({timings['cache_s']:.1f} s)")

    # ---- parent run
    digest = hashlib.sha256(
        json.dumps(
            [
                file_digest(checkpoint_file(Path(loaded.checkpoint_path))),
                ann_file,
                det_file,
                Path(space_path).read_text(),
                samples,
                seed,
            ]
            + ([holdout] if holdout is not None else [])
        ).encode()
    ).hexdigest()[:8]
    sweep_id = f"{config.name}-tune-eval-{digest}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = (base_dir / sweep_id).resolve()
    parent_tags = tracking.build_run_tags(
        config=config,
        dataset_kind=config.data.kind,
        commit=tracking.git_commit(),
        parent_run_id=evaluated_run.info.run_id if evaluated_run is not None else None,
        sweep_id=sweep_id,
        extra={
            TAG_TUNE_EVAL: "sweep",
            TAG_CHECKPOINT: str(loaded.checkpoint_path),
            tracking.TAG_SWEEP_DIR: str(sweep_dir),
            tracking.TAG_METRIC: space.metric,
            tracking.TAG_MODE: space.mode,
            tracking.TAG_DEFINITION_FILE: str(space_path),
            tracking.TAG_SAMPLED: json.dumps(list(space.sampled_names)),
            **({TAG_EVALUATED_RUN: evaluated_run.info.run_id} if evaluated_run is not None else {}),
        },
    )
    params = {f"base.{k}": v for k, v in settings.items()}
    params.update({"sweep.samples": samples, "sweep.search_seed": seed, "eval.ann_file": ann_file})
    params["eval.det_file"] = det_file or "ground-truth boxes"
    split = None
    if holdout is not None:
        split = write_split(ann_file, holdout, seed, sweep_dir / "holdout")
        params.update({"sweep.holdout": holdout, "holdout.tuned_ann": split.tuned_ann})
        print_fn(
            f"--holdout {holdout}: trials score {len(split.tuned_ids)} images, the best settings are checked "
            f"on the other {len(split.held_out_ids)}"
        )
    parent_run_id = tracking.start_run(client, experiment_id, sweep_id, params=params, tags=parent_tags)
    client.set_tag(
        parent_run_id,
        tracking.TAG_DESCRIPTION,
        f"Evaluation-settings sweep: {samples} trials of Optuna TPE over {space_path} on the cached network "
        f"outputs of {loaded.checkpoint_path} ({what}, {ann_file}); the first trial is the checkpoint's own "
        "settings."
        + (
            f" Tuned on {1 - holdout:.0%} of the images, checked on the other {holdout:.0%}." if split else ""
        ),
    )
    print_fn(f"MLflow parent run {parent_run_id} ({sweep_id}) in {uri}")
    plan = EvalSweepPlan(
        sweep_id=sweep_id,
        sweep_dir=str(sweep_dir),
        cache_dir=str(cache.path),
        ann_file=split.tuned_ann if split else ann_file,
        base_settings=settings,
        flip_test=bool(config.flip_test),
        batch_size=int(config.data.val_batch_size),
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        space=space,
        metric=space.metric,
        mode=space.mode,
        family=family.name,
        options=dict(cache.options),
        unit_name=cache.unit_name,
        image_ids=split.tuned_ids if split else None,
    )
    try:
        client.log_text(parent_run_id, Path(space_path).read_text(), Path(space_path).name)
        # The sweeps' search_space.json: fowkal report reads the parameters' types from it.
        from orchestrator.sweeps.kinds import space_summary as _space_summary

        summary_json = json.dumps(_space_summary(space), indent=1)
        client.log_text(parent_run_id, summary_json, tracking.SPACE_ARTIFACT)
        began = time.perf_counter()
        results, trial_statuses = _fit(
            plan, points, samples, seed, max_concurrent, address, num_cpus, verbose, print_fn
        )
        timings["tune_s"] = time.perf_counter() - began
        run_statuses = reconcile_eval_runs(plan, client, trial_statuses)
        scored = scored_trials(results, settings, space, defaults)
        importances = parameter_importances(space, [(t["sampled"], t["score"]) for t in scored], space.mode)
        sign = 1 if space.mode == "max" else -1
        best = max(scored, key=lambda t: sign * t["score"]) if scored else None
        default_trial = next((t for t in scored if t["is_default"]), None)
        held_out = _held_out_check(plan, split, best, default_trial) if split else None
        best_path, summary_path = write_results(
            plan, scored, defaults, importances, source_args, holdout=held_out
        )
        for path in (best_path, summary_path):
            if path is not None:
                client.log_artifact(parent_run_id, str(path))
        summary_metrics = {}
        if best is not None:
            summary_metrics[f"best/{plan.metric}"] = best["score"]
            client.set_tag(parent_run_id, tracking.TAG_BEST_RUN, f"{best['name']} ({best['run_id']})")
        if default_trial is not None:
            summary_metrics[f"defaults/{plan.metric}"] = default_trial["score"]
            client.set_tag(
                parent_run_id, TAG_DEFAULTS_RUN, f"{default_trial['name']} ({default_trial['run_id']})"
            )
            if best is not None:
                summary_metrics[f"gain/{plan.metric}"] = best["score"] - default_trial["score"]
        summary_metrics.update({f"importance/{k}": v for k, v in importances.items()})
        summary_metrics.update(_holdout_metrics(held_out, plan.metric))
        shorts = [t["metrics"].get(SHORT_METRIC, 0.0) for t in scored]
        if any(shorts):
            summary_metrics[f"max/{SHORT_METRIC}"] = max(shorts)
        summary_metrics.update({f"time/{k}": v for k, v in timings.items()})
        tracking.log_epoch_metrics(parent_run_id, summary_metrics, 0, client=client)
    except KeyboardInterrupt:
        tracking.end_run(parent_run_id, "KILLED", client=client, error="interrupted")
        raise
    except BaseException as err:
        tracking.end_run(parent_run_id, "FAILED", client=client, error=err)
        raise
    failed = sum(s == "ERROR" for s in trial_statuses.values())
    if trial_statuses and failed == len(trial_statuses):
        first = next((r["error"] for r in results if r.get("error")), "see the trials' error files")
        reason = f"all {failed} trial(s) failed: {first}"
        tracking.end_run(parent_run_id, "FAILED", client=client, error=reason)
        raise TuneEvalFailed(f"tune-eval {sweep_id!r}: {reason}")
    if failed:
        client.set_tag(parent_run_id, tracking.TAG_FAILED_TRIALS, f"{failed} of {len(trial_statuses)}")
    tracking.end_run(parent_run_id, "FINISHED", client=client)
    timings["total_s"] = time.perf_counter() - start
    print_fn(summary_path.read_text())
    print_fn(f"results in {sweep_dir}")
    return TuneEvalOutcome(
        sweep_id=sweep_id,
        sweep_dir=str(sweep_dir),
        tracking_uri=uri,
        parent_run_id=parent_run_id,
        cache_dir=str(cache.path),
        defaults=defaults,
        default_score=default_trial["score"] if default_trial else None,
        best=best["values"] if best else None,
        best_score=best["score"] if best else None,
        importances=importances,
        trial_statuses=trial_statuses,
        run_statuses=run_statuses,
        best_eval_path=str(best_path) if best_path else None,
        summary_path=str(summary_path),
        timings=timings,
        holdout=held_out,
    )


def _held_out_check(plan, split, best, default_trial) -> dict[str, Any]:
    """The held-out part's scores of the best trial's and the defaults' settings (``eval/*`` metrics, the
    same cache and scoring as a trial, the held-out part's annotation file), beside the tuned part's."""
    where = {"ann_file": split.held_out_ann, "image_ids": split.held_out_ids}
    out: dict[str, Any] = {
        "fraction": split.fraction,
        "tuned_images": len(split.tuned_ids),
        "held_out_images": len(split.held_out_ids),
    }
    for name, trial in (("best", best), ("defaults", default_trial)):
        if trial is not None:
            out[f"tuned/{name}"] = dict(trial["metrics"])
            out[f"held_out/{name}"] = evaluate_trial(plan, trial["sampled"], **where)[0]
    return out


def _holdout_metrics(held_out: dict[str, Any] | None, metric: str) -> dict[str, float]:
    """The parent run's ``holdout/...`` metrics: the parts' sizes, and per part (tuned, held_out) and settings
    (best, defaults) the sweep's metric and each body part's AP; the held-out gain of the best settings."""
    if not held_out:
        return {}
    out = {
        f"{HOLDOUT_PREFIX}fraction": held_out["fraction"],
        f"{HOLDOUT_PREFIX}tuned_images": float(held_out["tuned_images"]),
        f"{HOLDOUT_PREFIX}held_out_images": float(held_out["held_out_images"]),
    }
    for key, metrics in held_out.items():
        if isinstance(metrics, dict):
            for name in dict.fromkeys([metric, *PART_AP_METRICS]):
                if name in metrics:
                    out[f"{HOLDOUT_PREFIX}{key}/{name}"] = float(metrics[name])
    if "held_out/best" in held_out and "held_out/defaults" in held_out:
        gain = held_out["held_out/best"][metric] - held_out["held_out/defaults"][metric]
        out[f"{HOLDOUT_PREFIX}held_out/gain/{metric}"] = gain
    return out


def _fit(plan, points, samples, seed, max_concurrent, address, num_cpus, verbose, print_fn):
    """Ray Tune over :func:`run_eval_trial` (the sweeps' Tuner set-up: TPE from ``points``, no early
    stopping); returns per trial (name, config, metrics, run id, error) and the Tune statuses."""
    from orchestrator.runs.resources import EVAL_TRIAL_CPUS
    from orchestrator.sweeps.settings import SweepError
    from orchestrator.sweeps.tuner import TpeSearch, TunerSpec, fit_tuner, start_tune_cluster

    try:
        resources, concurrent = start_tune_cluster(
            address, num_cpus, trial_cpus=EVAL_TRIAL_CPUS, requested=max_concurrent
        )
    except SweepError as err:  # not even one trial fits the cluster
        raise TuneEvalError(str(err)) from err
    print_fn(f"cluster: {resources.get('CPU', 0):g} CPU -> up to {concurrent} concurrent trial(s)")
    spec = TunerSpec(
        trial=run_eval_trial,
        plan=plan,
        trial_cpus=EVAL_TRIAL_CPUS,
        metric=plan.metric,
        mode=plan.mode,
        num_samples=samples,
        storage_path=plan.sweep_dir,
        tune_dir=plan.tune_dir,
        trial_name=lambda trial: trial_run_name(trial.experiment_tag),
        trial_dirname=lambda trial: f"{trial_run_name(trial.experiment_tag)}_{trial.trial_id}",
        search=TpeSearch(define_by_run=plan.space.optuna_define_by_run, points=points, seed=seed),
        reuse_actors=True,  # a trial process keeps the opened cache and the parsed annotation file
        callbacks=[EvalTrialStatusCallback(plan)],
        verbose=bool(verbose),
        max_failures=0,
    )
    grid, statuses = fit_tuner(spec, concurrent)
    from orchestrator.sweeps.trial_status import trial_id_from_path

    client = tracking.make_client(plan.tracking_uri)
    results = []
    for result in grid:
        trial_id = str((result.metrics or {}).get("trial_id") or trial_id_from_path(result.path))
        run_id = tracking.find_run_by_resume_key(client, plan.experiment_id, f"{plan.sweep_id}/{trial_id}")
        results.append(
            {
                "name": Path(result.path).name.rsplit("_", 1)[0] if result.path else trial_id,
                "config": {k: v for k, v in (result.config or {}).items() if k in plan.space.parameters},
                "metrics": dict(result.metrics or {}),
                "run_id": run_id,
                "error": None if result.error is None else str(result.error).splitlines()[0][:500],
            }
        )
    return results, statuses


__all__ = [
    "BEST_EVAL_FILE",
    "DEFAULT_EXPERIMENT",
    "DEFAULT_METRIC",
    "EVAL_PREFIX",
    "SUMMARY_FILE",
    "EvalSweepPlan",
    "EvalTrialStatusCallback",
    "TuneEvalError",
    "TuneEvalFailed",
    "TuneEvalOutcome",
    "base_settings",
    "blur_kernels",
    "check_det_file",
    "defaults_point",
    "evaluate_trial",
    "load_eval_space",
    "lowest_det_score_thr",
    "metric_names",
    "open_trial_run",
    "parameter_importances",
    "reconcile_eval_runs",
    "run_eval_trial",
    "run_tune_eval",
    "scored_trials",
    "trial_run_name",
    "trial_settings",
    "trial_settings_for",
    "write_results",
]
