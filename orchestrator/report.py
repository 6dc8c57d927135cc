"""``fowkal report``: sweeps and ablations read back from MLflow, as Markdown and a self-contained HTML page.

A sweep or ablation is one MLflow parent run with one child run per trial (``orchestrator.tune``). This
module only reads MLflow (no Ray): :func:`load_sweep` gathers the parent, its children (status, final
metrics, the sampled parameters, the best value of the sweep's metric) and what the parent stored about the
search space or the ablation arms (with the paper's numbers). From that:

- ablations: :func:`ablation_rows` / :func:`ablation_markdown`, the paper's Table 2 layout: whole-body AP and
  AR, body, foot, face and hand AP as mean ± std over seeds (in percent, like the paper), the delta of
  whole-body AP to arm (a), and the paper's numbers beside ours;
- sweeps: the top configurations (:func:`sweep_markdown`) and Optuna's fANOVA parameter importances
  (:func:`param_importances`), rebuilt from the children as a fresh Optuna study;
- plots (matplotlib PNGs): importances, parallel coordinates, the ablation bars; the HTML page embeds them
  as base64, so it is a single file.

Statuses: only FINISHED children enter the ablation means; sweeps rank FINISHED and KILLED (stopped early by
ASHA) children by their best value of the metric, as Tune does.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import tracking

# Ablation columns: (MLflow metric, header, paper key).
ABLATION_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("val/wholebody_AP", "Whole-body AP", "wholebody_AP"),
    ("val/wholebody_AR", "Whole-body AR", "wholebody_AR"),
    ("val/body_AP", "Body AP", "body_AP"),
    ("val/foot_AP", "Foot AP", "foot_AP"),
    ("val/face_AP", "Face AP", "face_AP"),
    ("val/hand_AP", "Hand AP", "hand_AP"),
)
BASELINE_ARM_KEY = "a"


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


@dataclass
class SweepRecord:
    """A sweep or ablation as stored in MLflow."""

    parent_run_id: str
    name: str
    kind: str  # "tune" or "ablate"
    status: str
    metric: str
    mode: str
    children: list[ChildRecord]
    arms: list[dict] = field(default_factory=list)  # ablations: AblationArm fields, in file order
    space: dict = field(default_factory=dict)  # sweeps: {"parameters": {name: distribution info}}
    sampled_names: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------
# Reading MLflow


def child_runs(client, experiment_id: str, parent_run_id: str) -> list:
    """All MLflow runs of the experiment whose ``mlflow.parentRunId`` is ``parent_run_id``."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids=[experiment_id],
            filter_string=f"tags.`{tracking.TAG_PARENT_RUN_ID}` = '{parent_run_id}'",
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


def _read_json_artifact(client, run_id: str, name: str) -> Any | None:
    # MLflow draws a progress bar per download unless told not to (noise in a printed report).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="fowkal_report_") as tmp:
        try:
            local = client.download_artifacts(run_id, name, tmp)
        except Exception:
            return None
        try:
            return json.loads(Path(local).read_text())
        except (OSError, ValueError):
            return None


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
    kind = tags.get(tracking.TAG_SWEEP_KIND)
    if kind not in ("tune", "ablate") or tracking.TAG_PARENT_RUN_ID in tags:
        raise ReportError(
            f"MLflow run {parent_run_id!r} ({parent.info.run_name}) is not the parent run of a fowkal sweep "
            f"or ablation (its tag {tracking.TAG_SWEEP_KIND!r} is {kind!r})"
        )
    metric = tags.get(tracking.TAG_METRIC, "val/wholebody_AP")
    mode = tags.get(tracking.TAG_MODE, "max")
    space = (
        (_read_json_artifact(client, parent_run_id, tracking.SPACE_ARTIFACT) or {}) if kind == "tune" else {}
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
        last = dict(run.data.metrics)
        # Compare arms at their best epoch (what the run logged as best/<metric>), not at the last one.
        at_best = {**last, **{k[5:]: v for k, v in last.items() if k.startswith("best/val/")}}
        at_best.pop("best/epoch", None)
        history = client.get_metric_history(run.info.run_id, metric)
        score = _best([m.value for m in history], mode)
        if score is None:
            score = at_best.get(metric)
        best_epoch = last.get("best/epoch")
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
            )
        )
    children.sort(key=lambda c: c.name)
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
    )


def resolve_parent_runs(client, target: str, *, newest_only: bool = True) -> list[str]:
    """Parent run ids for ``target``: an MLflow experiment name (its newest sweep, or all) or a run id.

    Raises:
        ReportError: neither an experiment nor a run of that name/id, or an experiment with no sweep.
    """
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        try:
            run = client.get_run(target)
        except Exception as err:
            names = ", ".join(e.name for e in client.search_experiments(max_results=50))
            raise ReportError(
                f"{target!r} is neither an MLflow experiment nor a run id in {client.tracking_uri} "
                f"(experiments: {names or 'none'})"
            ) from err
        return [run.info.run_id]
    runs = client.search_runs(
        experiment_ids=[experiment.experiment_id],
        filter_string=f"tags.`{tracking.TAG_SWEEP_KIND}` != ''",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    parents = [r.info.run_id for r in runs if tracking.TAG_PARENT_RUN_ID not in r.data.tags]
    if not parents:
        raise ReportError(f"experiment {target!r} holds no fowkal sweep or ablation (no parent run)")
    return parents[:1] if newest_only else parents


# ------------------------------------------------------------------------------------------------------------
# Ablation table


@dataclass
class AblationRow:
    """One arm: our mean ± std (percent) per column over its finished seeds, and the paper's numbers."""

    key: str
    name: str
    label: str
    finished: int
    total: int
    mean: dict[str, float]  # paper key (wholebody_AP, ...) -> percent
    std: dict[str, float]  # sample std (n - 1); absent for n = 1
    paper: dict[str, float]
    delta: float | None = None  # our whole-body AP minus arm (a)'s
    paper_delta: float | None = None


def ablation_rows(record: SweepRecord) -> list[AblationRow]:
    """Per arm (in the arms file's order) the statistics over its FINISHED seeds."""
    rows = []
    for arm in record.arms:
        runs = [c for c in record.children if c.arm_key == arm["key"]]
        done = [c for c in runs if c.status == "FINISHED"]
        mean, std = {}, {}
        for metric, _, key in ABLATION_COLUMNS:
            values = [100.0 * c.metrics[metric] for c in done if metric in c.metrics]
            values = [v for v in values if math.isfinite(v)]
            if values:
                mean[key] = statistics.fmean(values)
                if len(values) > 1:
                    std[key] = statistics.stdev(values)
        rows.append(
            AblationRow(
                key=arm["key"],
                name=arm["name"],
                label=arm["label"],
                finished=len(done),
                total=len(runs),
                mean=mean,
                std=std,
                paper=dict(arm.get("paper", {})),
            )
        )
    baseline = next((r for r in rows if r.key == BASELINE_ARM_KEY), rows[0] if rows else None)
    if baseline is not None:
        for row in rows:
            if "wholebody_AP" in row.mean and "wholebody_AP" in baseline.mean:
                row.delta = row.mean["wholebody_AP"] - baseline.mean["wholebody_AP"]
            if "wholebody_AP" in row.paper and "wholebody_AP" in baseline.paper:
                row.paper_delta = row.paper["wholebody_AP"] - baseline.paper["wholebody_AP"]
    return rows


def _cell(row: AblationRow, key: str) -> str:
    ours = "—"
    if key in row.mean:
        ours = f"{row.mean[key]:.2f}"
        if key in row.std:
            ours += f" ± {row.std[key]:.2f}"
    paper = f"{row.paper[key]:.1f}" if key in row.paper else "—"
    return f"{ours} ({paper})"


def _signed(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:+.{digits}f}"


def ablation_header(baseline_key: str = BASELINE_ARM_KEY) -> list[str]:
    return ["Arm", "n", *[h for _, h, _ in ABLATION_COLUMNS[:1]], f"Δ AP vs ({baseline_key})"] + [
        h for _, h, _ in ABLATION_COLUMNS[1:]
    ]


def ablation_table_cells(rows: list[AblationRow]) -> list[list[str]]:
    """The table's rows as strings: ``ours mean ± std (paper)`` per metric column."""
    out = []
    for row in rows:
        n = f"{row.finished}" if row.finished == row.total else f"{row.finished}/{row.total}"
        cells = [row.label, n, _cell(row, ABLATION_COLUMNS[0][2])]
        cells.append(f"{_signed(row.delta, 2)} ({_signed(row.paper_delta, 1)})")
        cells += [_cell(row, key) for _, _, key in ABLATION_COLUMNS[1:]]
        out.append(cells)
    return out


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ablation_markdown(rows: list[AblationRow]) -> str:
    """The ablation table in Markdown (the paper's Table 2 layout, paper numbers in parentheses)."""
    note = (
        "Ours: mean ± std over seeds (n finished runs), COCO-WholeBody metrics in percent; "
        "(paper): the number the paper reports (HRNet-w32 + DARK, full COCO-WholeBody)."
    )
    return note + "\n\n" + _markdown_table(ablation_header(), ablation_table_cells(rows))


# ------------------------------------------------------------------------------------------------------------
# Sweep summary and importances


def ranked_children(record: SweepRecord) -> list[ChildRecord]:
    """FINISHED and KILLED children with a score, best first."""
    scored = [c for c in record.children if c.status in ("FINISHED", "KILLED") and c.score is not None]
    return sorted(scored, key=lambda c: c.score, reverse=record.mode == "max")


def best_child(record: SweepRecord) -> ChildRecord | None:
    """The best-scoring FINISHED child (a config that trained all its epochs), else the best stopped one."""
    ranked = ranked_children(record)
    finished = [c for c in ranked if c.status == "FINISHED"]
    if finished:
        return finished[0]
    return ranked[0] if ranked else None


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sweep_markdown(record: SweepRecord, top: int = 10) -> str:
    """Top ``top`` configs of a sweep (score, status, epochs reached, sampled values) and the statuses."""
    ranked = ranked_children(record)[:top]
    header = ["Rank", "Run", "Status", "Epochs", f"best {record.metric}", *record.sampled_names]
    rows = []
    for i, child in enumerate(ranked, start=1):
        epochs = child.epochs
        rows.append(
            [
                str(i),
                child.name,
                child.status,
                "—" if epochs is None else str(int(epochs)),
                f"{child.score:.4f}",
                *[_format_value(child.sampled.get(name, "—")) for name in record.sampled_names],
            ]
        )
    counts: dict[str, int] = {}
    for child in record.children:
        counts[child.status] = counts.get(child.status, 0) + 1
    status_line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return (
        f"Sweep {record.name}: {len(record.children)} trials ({status_line}); "
        f"ranked by the best {record.metric} ({record.mode}) over each trial's epochs.\n\n"
        + _markdown_table(header, rows)
    )


def param_importances(record: SweepRecord, seed: int = 0) -> dict[str, float]:
    """Optuna's fANOVA importances of the sampled parameters over the scored trials (empty if < 2 trials).

    A fresh study is rebuilt from the children (``optuna.trial.create_trial`` with the space's
    distributions and each child's best score), so it works for finished, resumed and stopped sweeps alike.
    """
    import optuna

    distributions = {}
    for name in record.sampled_names:
        info = record.space.get("parameters", {}).get(name)
        if info is None:
            continue
        if info["distribution"] in ("uniform", "loguniform"):
            distributions[name] = optuna.distributions.FloatDistribution(
                float(info["low"]), float(info["high"]), log=bool(info["log"])
            )
        elif info["distribution"] == "int":
            distributions[name] = optuna.distributions.IntDistribution(
                int(info["low"]), int(info["high"]), log=bool(info["log"])
            )
        elif info["distribution"] == "categorical":
            distributions[name] = optuna.distributions.CategoricalDistribution(info["choices"])
    trials = []
    for child in ranked_children(record):
        params = {k: v for k, v in child.sampled.items() if k in distributions}
        dists = {k: distributions[k] for k in params}
        try:
            trials.append(optuna.trial.create_trial(params=params, distributions=dists, value=child.score))
        except ValueError:
            continue  # a value outside the distribution (space edited since): leave the trial out
    if len(trials) < 2:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if record.mode == "max" else "minimize")
    study.add_trials(trials)
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}  # e.g. all scores equal: nothing to attribute


def importances_markdown(importances: dict[str, float]) -> str:
    if not importances:
        return "Parameter importances: not available (fewer than 2 scored trials, or all scores equal)."
    rows = [[name, f"{value:.3f}"] for name, value in importances.items()]
    return "Parameter importances (Optuna fANOVA, normalised to sum 1):\n\n" + _markdown_table(
        ["Parameter", "Importance"], rows
    )


# ------------------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_importances(importances: dict[str, float], out_png: str | os.PathLike) -> Path:
    """Horizontal bars of the parameter importances."""
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(len(names), 2) + 1.2))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title("Hyperparameter importances")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_parallel_coordinates(record: SweepRecord, out_png: str | os.PathLike) -> Path:
    """One line per scored trial across the sampled parameters (log axes normalised in log space) and the
    score, coloured by the score."""
    import numpy as np

    plt = _pyplot()
    children = ranked_children(record)
    names = [n for n in record.sampled_names if any(n in c.sampled for c in children)]
    infos = record.space.get("parameters", {})
    axes_labels = [n.split(".")[-1] for n in names] + [record.metric]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(axes_labels)), 4.5))
    scores = np.array([c.score for c in children], dtype=float)
    low, high = (scores.min(), scores.max()) if len(scores) else (0.0, 1.0)
    cmap = plt.get_cmap("viridis")

    def position(name: str, value: Any) -> float | None:
        info = infos.get(name, {})
        if info.get("distribution") == "categorical":
            choices = [str(c) for c in info.get("choices", [])]
            return choices.index(str(value)) / max(len(choices) - 1, 1) if str(value) in choices else None
        try:
            v, lo, hi = float(value), float(info["low"]), float(info["high"])
        except (KeyError, TypeError, ValueError):
            return None
        if info.get("log") and lo > 0 and v > 0:
            v, lo, hi = math.log(v), math.log(lo), math.log(hi)
        return (v - lo) / (hi - lo) if hi > lo else 0.5

    for child in children:
        ys = [position(n, child.sampled[n]) if n in child.sampled else None for n in names]
        ys.append((child.score - low) / (high - low) if high > low else 0.5)
        xs = [i for i, y in enumerate(ys) if y is not None]
        colour = cmap((child.score - low) / (high - low) if high > low else 0.5)
        style = "-" if child.status == "FINISHED" else "--"
        ax.plot(xs, [ys[i] for i in xs], style, color=colour, alpha=0.8, marker="o", markersize=3)
    ax.set_xticks(range(len(axes_labels)), axes_labels, rotation=20)
    ax.set_yticks([0, 1], ["low", "high"])
    for i in range(len(axes_labels)):
        ax.axvline(i, color="grey", linewidth=0.6)
    ax.set_title(
        f"Trials: solid finished, dashed stopped early\ncolour and last axis: best {record.metric}",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_ablation(rows: list[AblationRow], out_png: str | os.PathLike) -> Path:
    """Per arm: our whole-body / part APs (mean ± std) next to the paper's whole-body AP."""
    import numpy as np

    plt = _pyplot()
    keys = [key for _, _, key in ABLATION_COLUMNS if key != "wholebody_AR"]
    labels = [row.name for row in rows]
    x = np.arange(len(rows))
    width = 0.8 / (len(keys) + 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(rows)), 4.5))
    for i, key in enumerate(keys):
        means = [row.mean.get(key, np.nan) for row in rows]
        stds = [row.std.get(key, 0.0) for row in rows]
        ax.bar(x + i * width, means, width, yerr=stds, label=f"ours {key}")
    paper = [row.paper.get("wholebody_AP", np.nan) for row in rows]
    ax.bar(x + len(keys) * width, paper, width, label="paper wholebody_AP", color="black", alpha=0.3)
    ax.set_xticks(x + 0.4 - width / 2, labels, rotation=20)
    ax.set_ylabel("AP (%)")
    ax.set_title("Ablation: ours (mean ± std over seeds) and the paper's whole-body AP")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------------------
# Outputs


def write_sweep_outputs(record: SweepRecord, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``summary.md`` and the plots (and ``ablation.md`` for ablations) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if record.kind == "ablate":
        rows = ablation_rows(record)
        table = ablation_markdown(rows)
        (out / "ablation.md").write_text(f"# Ablation {record.name}\n\n{table}\n")
        paths.append(out / "ablation.md")
        paths.append(plot_ablation(rows, out / "ablation.png"))
        summary = table
    else:
        importances = param_importances(record)
        summary = sweep_markdown(record) + "\n\n" + importances_markdown(importances)
        if importances:
            paths.append(plot_importances(importances, out / "importances.png"))
        if ranked_children(record):
            paths.append(plot_parallel_coordinates(record, out / "parallel_coordinates.png"))
    (out / "summary.md").write_text(f"# {record.name}\n\n{summary}\n")
    paths.insert(0, out / "summary.md")
    return paths


def _png_base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(record: SweepRecord, tracking_uri: str) -> tuple[str, str]:
    """(Markdown, self-contained HTML) for one sweep or ablation."""
    buffer = io.StringIO()
    title = f"{'Ablation' if record.kind == 'ablate' else 'Sweep'} {record.name}"
    meta = (
        f"MLflow parent run `{record.parent_run_id}` ({record.status}) in `{tracking_uri}`; "
        f"{len(record.children)} child runs."
    )
    sections_html = []
    with tempfile.TemporaryDirectory(prefix="fowkal_report_") as tmp:
        if record.kind == "ablate":
            rows = ablation_rows(record)
            buffer.write(f"# {title}\n\n{meta}\n\n{ablation_markdown(rows)}\n")
            sections_html.append(
                "<p>Ours: mean ± std over seeds (n finished runs), percent; (paper) beside it.</p>"
                + _html_table(ablation_header(), ablation_table_cells(rows))
            )
            plots = [plot_ablation(rows, Path(tmp) / "ablation.png")] if rows else []
        else:
            importances = param_importances(record)
            buffer.write(f"# {title}\n\n{meta}\n\n{sweep_markdown(record)}\n\n")
            buffer.write(importances_markdown(importances) + "\n")
            ranked = ranked_children(record)[:10]
            header = ["Rank", "Run", "Status", f"best {record.metric}", *record.sampled_names]
            rows_html = [
                [str(i), c.name, c.status, f"{c.score:.4f}"]
                + [_format_value(c.sampled.get(n, "—")) for n in record.sampled_names]
                for i, c in enumerate(ranked, start=1)
            ]
            sections_html.append(_html_table(header, rows_html))
            if importances:
                sections_html.append(
                    _html_table(
                        ["Parameter", "Importance"], [[k, f"{v:.3f}"] for k, v in importances.items()]
                    )
                )
            plots = []
            if importances:
                plots.append(plot_importances(importances, Path(tmp) / "importances.png"))
            if ranked:
                plots.append(plot_parallel_coordinates(record, Path(tmp) / "parallel_coordinates.png"))
        images = "".join(
            f'<figure><img alt="{p.stem}" src="data:image/png;base64,{_png_base64(p)}"/>'
            f"<figcaption>{p.stem}</figcaption></figure>"
            for p in plots
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em;} table{border-collapse:collapse;margin:1em 0;}"
        "th,td{border:1px solid #bbb;padding:4px 8px;text-align:right;} th{background:#eee;}"
        "td:first-child{text-align:left;} img{max-width:100%;}"
        f"</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(meta)}</p>"
        + "".join(sections_html)
        + images
        + "</body></html>"
    )
    return buffer.getvalue(), page


def write_report(
    target: str,
    *,
    tracking_uri: str,
    out_dir: str | os.PathLike = "reports",
    all_sweeps: bool = False,
    print_fn=print,
) -> list[Path]:
    """``fowkal report``: write ``report.md`` and ``report.html`` for an experiment's newest sweep (or all
    with ``all_sweeps``, or the parent run id ``target``), print the Markdown; returns the paths.

    Raises:
        ReportError: nothing to report under ``target``.
    """
    client = tracking.make_client(tracking_uri)
    parents = resolve_parent_runs(client, target, newest_only=not all_sweeps)
    markdown_parts, html_parts = [], []
    for parent in parents:
        record = load_sweep(client, parent)
        md, page = render_report(record, tracking_uri)
        markdown_parts.append(md)
        html_parts.append(page)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n\n".join(markdown_parts))
    if len(html_parts) == 1:
        html_path.write_text(html_parts[0])
    else:  # several sweeps: one page, the bodies one after the other
        bodies = [p.split("<body>", 1)[1].rsplit("</body>", 1)[0] for p in html_parts]
        head = html_parts[0].split("<body>", 1)[0]
        html_path.write_text(head + "<body>" + "<hr/>".join(bodies) + "</body></html>")
    print_fn("\n\n".join(markdown_parts))
    print_fn(f"wrote {md_path} and {html_path}")
    return [md_path, html_path]


__all__ = [
    "ABLATION_COLUMNS",
    "AblationRow",
    "ChildRecord",
    "ReportError",
    "SweepRecord",
    "ablation_markdown",
    "ablation_rows",
    "best_child",
    "child_runs",
    "load_sweep",
    "param_importances",
    "plot_ablation",
    "plot_importances",
    "plot_parallel_coordinates",
    "render_report",
    "resolve_parent_runs",
    "sweep_markdown",
    "write_report",
    "write_sweep_outputs",
]
