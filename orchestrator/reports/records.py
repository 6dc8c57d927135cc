"""What ``fowkal report`` reads back from MLflow: a sweep's parent run, its children and their artifacts.

:func:`load_sweep` gathers the parent (its description, the base config it stored, the arms or the search
space), and per child run its status, its best epoch's validation metrics (``best/val/*``, else the last
epoch's), which epoch that was, and the per-epoch history of the sweep's metric (the learning curve).
:func:`resolve_parent_runs` turns what a user typed (an experiment, a sweep's name or a run id) into parent
run ids; :func:`kaf_figures` downloads the KAF figure of every KAL-family arm. A ``fowkal tune-eval`` parent
(kind ``tune-eval``) reads the same way, its children being evaluation trials (step 0, ``eval/*`` metrics),
plus :class:`TuneEvalInfo`: the checkpoint and run it evaluated, the defaults and which trial scored them,
the importances the sweep computed, and ``best_eval.yaml``'s ``fowkal eval`` line. Reading only: no Ray, no
model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import tracking
from trainer.evaluation.metric_units import in_percent, is_ap_metric, logged_in_percent

# fowkal tune-eval's parent and child runs (not fowkal.sweep_kind, which marks a training sweep's parent): the
# parent carries TAG_TUNE_EVAL = "sweep" and is nested under the evaluated run when there is one.
TUNE_EVAL_KIND = "tune-eval"
TAG_TUNE_EVAL = "fowkal.tune_eval"  # "sweep" on the parent, "trial" on its children
TAG_EVALUATED_RUN = "fowkal.evaluated_run"
TAG_CHECKPOINT = "fowkal.checkpoint"
TAG_DEFAULTS_RUN = "fowkal.defaults_run"  # "<name> (<run id>)": the trial of the checkpoint's own settings
BEST_EVAL_FILE = "best_eval.yaml"
# Per-epoch metrics of the training loop whose mean over the epochs an ablation's cost table shows.
EPOCH_COST_METRICS = ("throughput/img_per_s", "time/epoch_s")


def is_tune_eval_parent(tags: dict) -> bool:
    return tags.get(TAG_TUNE_EVAL) == "sweep"


def is_report_parent(tags: dict) -> bool:
    """A parent run ``fowkal report`` reads: a sweep's or ablation's (not nested), or a tune-eval's."""
    return is_tune_eval_parent(tags) or bool(
        tags.get(tracking.TAG_SWEEP_KIND) and tracking.TAG_PARENT_RUN_ID not in tags
    )


class ReportError(ValueError):
    """Nothing to report (unknown experiment or run, no sweep in it); names what was asked for."""


@dataclass
class ChildRecord:
    """One trial's MLflow child run."""

    run_id: str
    name: str
    status: str
    trial_id: str
    arm_key: str | None
    seed: int | None
    metrics: dict[str, float]  # the val/ metrics of the best epoch where the run logged them, else the last
    params: dict[str, str]
    sampled: dict[str, Any] = field(default_factory=dict)  # sweeps: sampled dotted key -> typed value
    score: float | None = None  # best value of the sweep's metric over the run's epochs
    epochs: int | None = None  # the last epoch the run reported
    best_epoch: int | None = None  # the epoch of the best val/wholebody_AP (best/epoch)
    last_metrics: dict[str, float] = field(default_factory=dict)  # latest value of each metric
    curve: dict[int, float] = field(default_factory=dict)  # epoch -> the sweep's metric at that epoch
    loss_variant: str | None = None
    family: str | None = None  # the run's experiment family (tracking.TAG_FAMILY)
    start_time: int | None = None  # the MLflow run's start and end, ms since the epoch (end: None if running)
    end_time: int | None = None
    # Ablations: the mean over the run's epochs of each EPOCH_COST_METRICS metric (training throughput)
    epoch_means: dict[str, float] = field(default_factory=dict)

    @property
    def hours(self) -> float | None:
        """Wall-clock hours from the run's start to its end (None while it has no end)."""
        if self.start_time is None or self.end_time is None:
            return None
        return max(self.end_time - self.start_time, 0) / 3.6e6


@dataclass
class SweepRecord:
    """A sweep or ablation as stored in MLflow."""

    parent_run_id: str
    name: str
    kind: str  # "tune", "ablate" or "tune-eval"
    status: str
    metric: str
    mode: str
    children: list[ChildRecord]
    arms: list[dict] = field(default_factory=list)  # ablations: AblationArm fields, in file order
    space: dict = field(default_factory=dict)  # sweeps: {"parameters": {name: distribution info}}
    sampled_names: list[str] = field(default_factory=list)
    experiment_id: str = "0"
    description: str = ""  # the parent run's description (tracking.TAG_DESCRIPTION)
    base_config: dict = field(default_factory=dict)  # the parent's base_config.yaml (nested), if stored
    params: dict[str, str] = field(default_factory=dict)  # the parent's params (base.*, sweep.*)
    tune_eval: TuneEvalInfo | None = None  # kind "tune-eval" only


@dataclass
class TuneEvalInfo:
    """What a ``fowkal tune-eval`` parent adds: what was evaluated, on what, and its results."""

    checkpoint: str
    ann_file: str
    det_file: str
    space_file: str = ""  # the search space file given to --space
    evaluated_run_id: str | None = None  # --run: the training run whose checkpoint was evaluated
    evaluated_run_name: str | None = None
    evaluated_experiment_id: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # the checkpoint's own settings, dotted keys
    setting_keys: tuple[str, ...] = ()  # the evaluation settings of the checkpoint's family, in its order
    defaults_run_id: str | None = None  # the trial that scored them (the first trial)
    importances: dict[str, float] = field(default_factory=dict)  # as the sweep computed them (fANOVA)
    apply_command: str | None = None  # best_eval.yaml's `fowkal eval ... --set ...` line
    parent_metrics: dict[str, float] = field(default_factory=dict)


def setting_value(text: str | None) -> Any:
    """An MLflow param string as the value it was (``"11"`` -> 11, ``"0.9"`` -> 0.9, ``"shift"``)."""
    import yaml

    if text is None:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, str | int | float | bool) else text


# ------------------------------------------------------------------------------------------------------------
# Artifacts


def download_artifact(client, run_id: str, name: str, dest_dir: str | os.PathLike) -> Path | None:
    """The run's artifact ``name`` downloaded into ``dest_dir``; None when the run has no such artifact."""
    # MLflow draws a progress bar per download unless told not to (noise in a printed report).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        local = Path(client.download_artifacts(run_id, name, str(dest_dir)))
    except Exception:
        return None
    return local if local.exists() else None


def _read_artifact_text(client, run_id: str, name: str) -> str | None:
    with tempfile.TemporaryDirectory(prefix="fowkal_report_") as tmp:
        local = download_artifact(client, run_id, name, tmp)
        if local is None or not local.is_file():
            return None
        try:
            return local.read_text()
        except (OSError, UnicodeDecodeError):
            return None


def _read_json_artifact(client, run_id: str, name: str) -> Any | None:
    text = _read_artifact_text(client, run_id, name)
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return None


def _read_yaml_artifact(client, run_id: str, name: str) -> dict:
    import yaml

    text = _read_artifact_text(client, run_id, name)
    try:
        data = None if text is None else yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------------------------------------
# Runs


def child_runs(client, experiment_id: str, parent_run_id: str) -> list:
    """All MLflow runs of the experiment whose ``mlflow.parentRunId`` is ``parent_run_id``."""
    return _search_all(client, [experiment_id], f"tags.`{tracking.TAG_PARENT_RUN_ID}` = '{parent_run_id}'")


def _search_all(client, experiment_ids: list[str], filter_string: str, order_by=None) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids=experiment_ids,
            filter_string=filter_string,
            order_by=order_by,
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


def _typed(value: str, info: dict | None) -> Any:
    """An MLflow param string back as the sampled type (float / int / one of the categorical choices)."""
    if info is None:
        return value
    distribution = info.get("distribution")
    try:
        if distribution in ("uniform", "loguniform"):
            return float(value)
        if distribution == "int":
            return int(float(value))
    except ValueError:
        return value
    if distribution == "categorical":
        for choice in info.get("choices", []):
            if str(choice) == value:
                return choice
    return value


def _best(values: list[float], mode: str) -> float | None:
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if mode == "max" else min(finite)


def _curve(history) -> dict[int, float]:
    """Epoch -> value from a metric history; a step logged twice (a replay after resume) keeps the latest."""
    curve: dict[int, float] = {}
    for m in sorted(history, key=lambda m: (int(m.step), m.timestamp)):
        curve[int(m.step)] = float(m.value)
    return dict(sorted(curve.items()))


def load_sweep(client, parent_run_id: str) -> SweepRecord:
    """The sweep or ablation whose parent run is ``parent_run_id``, with all its children.

    Raises:
        ReportError: the run does not exist or is not a fowkal sweep/ablation parent run.
    """
    try:
        parent = client.get_run(parent_run_id)
    except Exception as err:
        raise ReportError(f"no MLflow run with id {parent_run_id!r} ({err})") from err
    tags = parent.data.tags
    kind = TUNE_EVAL_KIND if is_tune_eval_parent(tags) else tags.get(tracking.TAG_SWEEP_KIND)
    if kind != TUNE_EVAL_KIND and (kind not in ("tune", "ablate") or tracking.TAG_PARENT_RUN_ID in tags):
        raise ReportError(
            f"MLflow run {parent_run_id!r} ({parent.info.run_name}) is not the parent run of a fowkal sweep, "
            f"ablation or tune-eval (its tag {tracking.TAG_SWEEP_KIND!r} is {kind!r}, "
            f"{TAG_TUNE_EVAL!r} is {tags.get(TAG_TUNE_EVAL)!r})"
        )
    metric = tags.get(tracking.TAG_METRIC, "val/wholebody_AP")
    mode = tags.get(tracking.TAG_MODE, "max")
    space = (
        (_read_json_artifact(client, parent_run_id, tracking.SPACE_ARTIFACT) or {})
        if kind in ("tune", TUNE_EVAL_KIND)
        else {}
    )
    arms = (
        (_read_json_artifact(client, parent_run_id, tracking.ARMS_ARTIFACT) or []) if kind == "ablate" else []
    )
    sampled_names = json.loads(tags.get(tracking.TAG_SAMPLED, "[]"))
    infos = space.get("parameters", {})
    children = []
    for run in child_runs(client, parent.info.experiment_id, parent_run_id):
        run_tags, params = run.data.tags, run.data.params
        seed = run_tags.get(tracking.TAG_SEED)
        sampled = {name: _typed(params[name], infos.get(name)) for name in sampled_names if name in params}
        # AP/AR in percent whatever unit the run logged them in (fractions before fowkal.metric_unit).
        unit = run_tags.get(tracking.TAG_METRIC_UNIT)
        last = logged_in_percent(run.data.metrics, unit)
        # Compare arms at their best epoch (what the run logged as best/<metric>), not at the last one.
        at_best = {**last, **{k[5:]: v for k, v in last.items() if k.startswith("best/val/")}}
        at_best.pop("best/epoch", None)
        curve = _curve(client.get_metric_history(run.info.run_id, metric))
        if is_ap_metric(metric):
            curve = {epoch: in_percent(value, unit) for epoch, value in curve.items()}
        score = _best(list(curve.values()), mode)
        if score is None:
            score = at_best.get(metric)
        best_epoch = last.get("best/epoch")
        epoch_means = {}
        if kind == "ablate":
            for name in EPOCH_COST_METRICS:
                values = list(_curve(client.get_metric_history(run.info.run_id, name)).values())
                values = [v for v in values if math.isfinite(v)]
                if values:
                    epoch_means[name] = sum(values) / len(values)
        children.append(
            ChildRecord(
                run_id=run.info.run_id,
                name=run.info.run_name or run.info.run_id,
                status=run.info.status,
                trial_id=run_tags.get(tracking.TAG_TRIAL_ID, ""),
                arm_key=run_tags.get(tracking.TAG_ARM_KEY),
                seed=int(seed) if seed is not None and str(seed).lstrip("-").isdigit() else None,
                metrics=at_best,
                params=dict(params),
                sampled=sampled,
                score=score,
                epochs=tracking.last_epoch(client, run.info.run_id),
                best_epoch=int(best_epoch) if best_epoch is not None else None,
                last_metrics=last,
                curve=curve,
                loss_variant=run_tags.get(tracking.TAG_LOSS_VARIANT) or params.get("loss.variant"),
                family=run_tags.get(tracking.TAG_FAMILY),
                start_time=run.info.start_time,
                end_time=run.info.end_time,
                epoch_means=epoch_means,
            )
        )
    children.sort(key=lambda c: c.name)
    tune_eval = _tune_eval_info(client, parent) if kind == TUNE_EVAL_KIND else None
    return SweepRecord(
        parent_run_id=parent_run_id,
        name=parent.info.run_name or parent_run_id,
        kind=kind,
        status=parent.info.status,
        metric=metric,
        mode=mode,
        children=children,
        arms=arms,
        space=space,
        sampled_names=sampled_names,
        experiment_id=parent.info.experiment_id,
        description=tags.get(tracking.TAG_DESCRIPTION, ""),
        base_config=_read_yaml_artifact(client, parent_run_id, tracking.BASE_CONFIG_ARTIFACT),
        params=dict(parent.data.params),
        tune_eval=tune_eval,
    )


def _run_id_in(text: str | None) -> str | None:
    """The run id of a ``"<name> (<run id>)"`` tag value."""
    if not text or not text.endswith(")") or "(" not in text:
        return None
    return text.rsplit("(", 1)[1][:-1] or None


def family_setting_keys(family_name: str | None) -> tuple[str, ...]:
    """The evaluation settings a tune-eval of ``family_name``'s checkpoints sweeps (the family's
    ``eval_setting_keys``); a parent without the name (older runs) is the default family's."""
    from trainer.config import DEFAULT_FAMILY
    from trainer.families import FAMILIES

    family = FAMILIES.get(family_name or DEFAULT_FAMILY)
    if family is None:  # a family this version does not know: every known family's keys
        return tuple(dict.fromkeys(k for known in FAMILIES.values() for k in known.eval_setting_keys))
    return tuple(family.eval_setting_keys)


def _tune_eval_info(client, parent) -> TuneEvalInfo:
    tags, params, metrics = parent.data.tags, parent.data.params, dict(parent.data.metrics)
    setting_keys = family_setting_keys(tags.get(tracking.TAG_FAMILY))
    info = TuneEvalInfo(
        checkpoint=tags.get(TAG_CHECKPOINT, ""),
        ann_file=params.get("eval.ann_file", ""),
        det_file=params.get("eval.det_file", ""),
        space_file=tags.get(tracking.TAG_DEFINITION_FILE, ""),
        defaults={k: setting_value(params[f"base.{k}"]) for k in setting_keys if f"base.{k}" in params},
        setting_keys=setting_keys,
        defaults_run_id=_run_id_in(tags.get(TAG_DEFAULTS_RUN)),
        importances=dict(
            sorted(
                ((k[len("importance/") :], v) for k, v in metrics.items() if k.startswith("importance/")),
                key=lambda item: -item[1],
            )
        ),
        parent_metrics=metrics,
    )
    evaluated = tags.get(TAG_EVALUATED_RUN)
    if evaluated:
        info.evaluated_run_id = evaluated
        try:
            run = client.get_run(evaluated)
            info.evaluated_run_name = run.info.run_name
            info.evaluated_experiment_id = run.info.experiment_id
        except Exception:  # deleted since: the id is still worth naming
            pass
    text = _read_artifact_text(client, parent.info.run_id, BEST_EVAL_FILE)
    for line in (text or "").splitlines():
        if line.startswith("# fowkal eval "):
            info.apply_command = line[2:].strip()
    return info


def _experiment_ids(client) -> dict[str, str]:
    """Id -> name of every active experiment."""
    out, token = {}, None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        out.update({e.experiment_id: e.name for e in page})
        token = getattr(page, "token", None)
        if not token:
            return out


def _sweep_parents_named(client, name: str) -> list:
    """Parent runs (of every experiment) whose run name or ``sweep_id`` tag is ``name``, newest first."""
    experiments = _experiment_ids(client)
    if not experiments:
        return []
    quoted = name.replace("'", "\\'")
    found = {}
    # MLflow's filter has no OR: one search per field, merged by run id.
    for condition in (f"attributes.run_name = '{quoted}'", f"tags.`{tracking.TAG_SWEEP_ID}` = '{quoted}'"):
        for run in _search_all(client, list(experiments), condition):
            if is_report_parent(run.data.tags):
                found[run.info.run_id] = run
    return sorted(found.values(), key=lambda r: r.info.start_time or 0, reverse=True)


def resolve_parent_runs(client, target: str, *, newest_only: bool = True) -> list[str]:
    """Parent run ids for ``target``: an MLflow experiment name (its newest sweep, or all), a sweep's name
    (the parent run's name or its ``sweep_id`` tag, in any experiment) or a run id.

    Raises:
        ReportError: none of these, an experiment with no sweep, or (with ``newest_only``) a sweep name that
            several parent runs carry (the message lists them with their experiments and run ids).
    """
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        named = _sweep_parents_named(client, target)
        if len(named) > 1 and newest_only:
            experiments = _experiment_ids(client)
            listed = "; ".join(
                f"{r.info.run_id} in experiment "
                f"{experiments.get(r.info.experiment_id, r.info.experiment_id)!r}"
                for r in named
            )
            raise ReportError(
                f"sweep name {target!r} is ambiguous in {client.tracking_uri}: {len(named)} parent runs "
                f"carry it ({listed}); pass one of these run ids, or the experiment's name"
            )
        if named:
            return [r.info.run_id for r in named]
        try:
            run = client.get_run(target)
        except Exception as err:
            names = ", ".join(e.name for e in client.search_experiments(max_results=50))
            raise ReportError(
                f"{target!r} is neither an MLflow experiment, nor a sweep's name, nor a run id in "
                f"{client.tracking_uri} (experiments: {names or 'none'})"
            ) from err
        return [run.info.run_id]
    runs = []
    for condition in (f"tags.`{tracking.TAG_SWEEP_KIND}` != ''", f"tags.`{TAG_TUNE_EVAL}` = 'sweep'"):
        runs += client.search_runs(
            experiment_ids=[experiment.experiment_id],
            filter_string=condition,
            order_by=["attributes.start_time DESC"],
            max_results=1000,
        )
    runs.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    parents = [r.info.run_id for r in runs if is_report_parent(r.data.tags)]
    if not parents:
        raise ReportError(
            f"experiment {target!r} holds no fowkal sweep, ablation or tune-eval (no parent run)"
        )
    return parents[:1] if newest_only else parents


# ------------------------------------------------------------------------------------------------------------
# KAF figures


@dataclass
class KafFigure:
    """The KAF figure of one KAL-family arm: the ``kaf_history.png`` of its first seed's run."""

    arm_key: str
    label: str
    run_name: str | None  # None: the arm has no run yet
    run_id: str | None
    path: Path | None  # None: that run logged no KAF figure


def is_kal_family(variant: str | None) -> bool:
    """True for the loss variants with keypoint-wise adaptive factors (they log a KAF history)."""
    from trainer.topdown.losses import LOSS_VARIANTS  # lazily: torch is needed only for this table

    info = LOSS_VARIANTS.get(variant) if variant else None
    return bool(info is not None and info.needs_kaf)


def kaf_figures(client, record: SweepRecord, dest_dir: str | os.PathLike) -> list[KafFigure]:
    """Per KAL-family arm (in the arms file's order): its first seed's KAF figure, copied to ``dest_dir``."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    figures = []
    for arm in record.arms:
        variant = (arm.get("overrides") or {}).get("loss.variant")
        if not is_kal_family(variant):
            continue
        runs = sorted(
            (c for c in record.children if c.arm_key == arm["key"]),
            key=lambda c: (c.seed is None, c.seed if c.seed is not None else 0, c.name),
        )
        first = runs[0] if runs else None
        path = None
        if first is not None:
            with tempfile.TemporaryDirectory(prefix="fowkal_kaf_") as tmp:
                local = download_artifact(client, first.run_id, tracking.KAF_PLOT_ARTIFACT, tmp)
                if local is not None and local.is_file():
                    path = dest / f"kaf-{arm['key']}.png"
                    shutil.copyfile(local, path)
        figures.append(
            KafFigure(
                arm_key=arm["key"],
                label=arm.get("label", arm["key"]),
                run_name=first.name if first else None,
                run_id=first.run_id if first else None,
                path=path,
            )
        )
    return figures


__all__ = [
    "BEST_EVAL_FILE",
    "EPOCH_COST_METRICS",
    "TAG_CHECKPOINT",
    "TAG_DEFAULTS_RUN",
    "TAG_EVALUATED_RUN",
    "TAG_TUNE_EVAL",
    "TUNE_EVAL_KIND",
    "TuneEvalInfo",
    "ChildRecord",
    "KafFigure",
    "ReportError",
    "SweepRecord",
    "child_runs",
    "download_artifact",
    "is_kal_family",
    "is_report_parent",
    "is_tune_eval_parent",
    "kaf_figures",
    "load_sweep",
    "resolve_parent_runs",
    "setting_value",
]
