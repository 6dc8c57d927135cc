"""One ``fowkal tune-eval`` trial and how its MLflow child run ends (the command itself: ``tune_eval``).

- :class:`EvalSweepPlan`: what every trial receives (plain, picklable data).
- :func:`run_eval_trial`: the Tune trial function. It opens the trial's child run under the sweep's parent
  (:func:`open_trial_run`), scores its settings on the family's cache (:func:`evaluate_trial`: the family's
  ``eval_sweep.score``, e.g. the top-down family decodes its cached heatmaps once per (flip mode, kernel) and
  sweep, KAPAO runs NMS and fusion on its cached candidates), logs the ``eval/*`` metrics and ends the run
  FINISHED, or FAILED with the error. A cache of limited depth that ran out on some images says so
  (``eval/cache_short_images`` > 0, and a warning in the trial's log).
- The sweeps' status rules (``orchestrator.sweeps.trial_status``): :class:`EvalTrialStatusCallback` is the
  sweeps' callback (the same run lookup by resume key, a FAILED run stays FAILED, an ended run is left
  alone) with the rule of an evaluation for FINISHED: the trial reported its metric, else KILLED (the
  sweep ended first). :func:`reconcile_eval_runs` settles at the end any child still RUNNING by the same
  rule.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.reports.records import TAG_TUNE_EVAL
from orchestrator.sweeps.space import SearchSpace
from orchestrator.sweeps.trial_status import MlflowTrialStatusCallback
from trainer.config import EvalConfig
from trainer.evaluation.metric_units import metrics_to_percent
from trainer.families import DEFAULT_FAMILY, get_family

DEFAULT_METRIC = "eval/wholebody_AP"
EVAL_PREFIX = "eval/"
# Images whose cached candidates ran out before the trial's poses were decided (0: the trial is exact).
SHORT_METRIC = "eval/cache_short_images"

logger = logging.getLogger(__name__)


@dataclass
class EvalSweepPlan:
    """What every trial receives (plain, picklable data)."""

    sweep_id: str
    sweep_dir: str
    cache_dir: str
    ann_file: str
    base_settings: dict  # the checkpoint config's EvalConfig fields + data.det_score_thr, dotted keys
    flip_test: bool
    batch_size: int
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    space: SearchSpace
    metric: str = DEFAULT_METRIC
    mode: str = "max"
    family: str = DEFAULT_FAMILY  # whose eval_sweep scores the trials
    options: dict = field(default_factory=dict)  # the family's SweepCacheInfo.options
    unit_name: str = "boxes"  # what the cache holds per entry (logged as eval/<unit_name>)
    image_ids: tuple | None = None  # the images trials score (--holdout: the tuned part); None: all

    @property
    def tune_dir(self) -> str:
        return str(Path(self.sweep_dir) / "tune")

    @property
    def decoded_dir(self) -> str:
        """Where trials keep the decoded keypoints per (flip mode, kernel), for the sweep's other trials."""
        return str(Path(self.sweep_dir) / "decoded")


def trial_settings(plan: EvalSweepPlan, trial_config: dict) -> tuple[EvalConfig, float]:
    """The trial's ``EvalConfig`` and detection-score threshold: base settings + the sampled values."""
    values = dict(plan.base_settings)
    values.update(plan.space.to_overrides(trial_config, ignore_unknown=True))
    settings = EvalConfig(**{key[5:]: value for key, value in values.items() if key.startswith("eval.")})
    return settings, float(values["data.det_score_thr"])


_OPEN: dict[str, Any] = {}  # per trial process: the opened cache (memory-mapped), reused by later trials


def _cache(path: str):
    """The cache at ``path``, opened by the family that wrote it (its ``info.json`` names it; a cache
    without the field is the top-down family's, written before families)."""
    if _OPEN.get("path") != path:
        try:
            family = json.loads((Path(path) / "info.json").read_text()).get("family", DEFAULT_FAMILY)
        except (OSError, ValueError) as err:
            raise ValueError(f"evaluation cache {path!r} is incomplete or unreadable: {err}") from err
        _OPEN.update(path=path, cache=get_family(family).eval_sweep.open_cache(path))
    return _OPEN["cache"]


def trial_run_name(experiment_tag: str) -> str:
    head = str(experiment_tag).split("_", 1)[0]
    return f"ev-{int(head) if head.isdigit() else 0:03d}"


def evaluate_trial(plan: EvalSweepPlan, trial_config: dict, **where) -> tuple[dict[str, float], int]:
    """``eval/*`` metrics (AP/AR in percent) of one trial's settings on the family's cache, and the units
    (boxes, images) scored; ``eval/cache_short_images`` too where the family's cache has a depth. ``where``:
    ``ann_file`` / ``image_ids`` instead of the plan's (the held-out check)."""
    from trainer.evaluation.wholebody import WholeBodyEvaluator

    values = dict(plan.base_settings)
    values.update(plan.space.to_overrides(trial_config, ignore_unknown=True))
    evaluator = WholeBodyEvaluator.for_file(where.get("ann_file", plan.ann_file))
    score = get_family(plan.family).eval_sweep.score(
        _cache(plan.cache_dir),
        values,
        evaluator,
        {"flip_test": plan.flip_test, "batch_size": plan.batch_size, **plan.options},
        image_ids=where.get("image_ids", plan.image_ids),
        memo_dir=plan.decoded_dir,
    )
    # AP/AR in percent, the project's one unit (trainer.evaluation.metric_units), as fowkal eval logs them.
    metrics = metrics_to_percent(score.metrics)
    metrics = {EVAL_PREFIX + key.replace("/", "_"): value for key, value in metrics.items()}
    if score.short_images is not None:
        metrics[SHORT_METRIC] = float(score.short_images)
        if score.short_images:
            logger.warning(
                "%d image(s) ran out of cached candidates before this trial's poses were decided: its "
                "scores may differ from fowkal eval's (rebuild the cache deeper)",
                score.short_images,
            )
    return metrics, score.units


def open_trial_run(plan: EvalSweepPlan, client, trial_id: str, run_name: str, trial_config: dict) -> str:
    """The trial's MLflow child run under the parent (params: every setting; reopened by trial id)."""
    overrides = plan.space.to_overrides(trial_config, ignore_unknown=True)
    return tracking.start_run(
        client,
        plan.experiment_id,
        run_name,
        params={**plan.base_settings, **overrides},
        tags=tracking.build_run_tags(
            commit=tracking.git_commit(),
            parent_run_id=plan.parent_run_id,
            sweep_id=plan.sweep_id,
            extra={tracking.TAG_TRIAL_ID: trial_id, TAG_TUNE_EVAL: "trial"},
        ),
        resume_key=f"{plan.sweep_id}/{trial_id}",
    )


def run_eval_trial(trial_config: dict, plan: EvalSweepPlan) -> None:
    """One Tune trial: open the child run, score the settings on the cached heatmaps, report, end FINISHED."""
    import ray.tune

    context = ray.tune.get_context()
    client = tracking.make_client(plan.tracking_uri)
    run_id = open_trial_run(
        plan, client, context.get_trial_id(), context.get_trial_name() or "ev-000", trial_config
    )
    try:
        start = time.perf_counter()
        metrics, boxes = evaluate_trial(plan, trial_config)
        metrics[f"eval/{plan.unit_name}"] = float(boxes)
        metrics["time/trial_s"] = time.perf_counter() - start
        tracking.log_epoch_metrics(run_id, metrics, 0, client=client)
    except BaseException as err:
        tracking.end_run(run_id, "FAILED", client=client, error=err)
        raise
    tracking.end_run(run_id, "FINISHED", client=client)
    ray.tune.report(metrics)


class EvalTrialStatusCallback(MlflowTrialStatusCallback):
    """The sweeps' status rules for evaluation trials: FINISHED once scored (the trial reported its
    metric), FAILED on an error, KILLED when the sweep ended before the trial was scored. The ending itself
    (``MlflowTrialStatusCallback._end``) is the sweeps'; an evaluation trial has no Train controller to
    abort and no metric spool to deliver."""

    def _deliver_spool(self, trial, run_id: str, client) -> None:
        return  # the trial logs its one step itself; nothing is spooled (and the plan has no trial dirs)

    def _abort(self, trial) -> None:
        return  # no Train controller

    def _completed_status(self, trial) -> str:
        return "FINISHED" if self.plan.metric in (trial.last_result or {}) else "KILLED"

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, self._completed_status(trial), "finished")


def reconcile_eval_runs(plan: EvalSweepPlan, client, trial_statuses: dict[str, str]) -> dict[str, str]:
    """End every child still RUNNING (FINISHED if it logged the metric, else KILLED); name -> status.

    A child whose trial the Tune state (``trial_statuses``) lacks started after Tune's last save before its
    driver died: deleted, as the training sweeps' (:func:`orchestrator.sweeps.trial_status.delete_lost_run`).
    """
    from orchestrator.reports.records import child_runs
    from orchestrator.sweeps.trial_status import delete_lost_run, is_lost_run

    statuses = {}
    for run in child_runs(client, plan.experiment_id, plan.parent_run_id):
        if is_lost_run(run, trial_statuses):
            delete_lost_run(client, run)
            continue
        status = run.info.status
        if status == "RUNNING":
            status = "FINISHED" if plan.metric in run.data.metrics else "KILLED"
            client.set_tag(run.info.run_id, tracking.TAG_END_REASON, "reconciled at the end of the sweep")
            tracking.end_run(run.info.run_id, status, client=client)
        statuses[run.info.run_name or run.info.run_id] = status
    return statuses


__all__ = [
    "DEFAULT_METRIC",
    "EVAL_PREFIX",
    "SHORT_METRIC",
    "EvalSweepPlan",
    "EvalTrialStatusCallback",
    "evaluate_trial",
    "open_trial_run",
    "reconcile_eval_runs",
    "run_eval_trial",
    "trial_run_name",
    "trial_settings",
]
