"""The numbers of ``fowkal report``: ablation rows, paired differences to the baseline, sweep rankings.

- ablations: :func:`ablation_rows`, the paper's Table 2 layout: whole-body AP and AR, body, foot, face and
  hand AP as mean ± std over seeds at each run's best epoch (in percent, like the paper), the delta of
  whole-body AP to arm (a), and the paper's numbers beside ours where the arms file gives them;
  :func:`paired_differences`, each arm minus arm (a) seed by seed, with a 95% Student t interval;
  :func:`arm_curves`, the mean learning curve of each arm;
- sweeps: the top configurations (:func:`sweep_markdown`) and Optuna's fANOVA parameter importances
  (:func:`param_importances`), rebuilt from the children as a fresh Optuna study;
- tune-eval sweeps: the trial of the checkpoint's own settings (:func:`defaults_child`), the best settings
  beside the defaults (:func:`tune_eval_settings_table`), the best trial minus the defaults' trial for
  whole-body and every part (:func:`tune_eval_gain_table`), the trials ranked
  (:func:`tune_eval_trials_table`).

Statuses: only FINISHED children enter the ablation means; sweeps rank FINISHED and KILLED (stopped early by
ASHA) children by their best value of the metric, as Tune does.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from orchestrator.report_records import ChildRecord, SweepRecord, setting_value

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
CONFIDENCE = 0.95  # of the paired differences' Student t intervals


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
    # (seed, best epoch or None when the run logged no best/ metrics, last epoch) of each finished seed
    best_epochs: list[tuple[int | None, int | None, int | None]] = field(default_factory=list)


def _finished_runs(record: SweepRecord, arm_key: str) -> list[ChildRecord]:
    runs = [c for c in record.children if c.arm_key == arm_key and c.status == "FINISHED"]
    return sorted(runs, key=lambda c: (c.seed is None, c.seed if c.seed is not None else 0, c.name))


def ablation_rows(record: SweepRecord) -> list[AblationRow]:
    """Per arm (in the arms file's order) the statistics over its FINISHED seeds."""
    rows = []
    for arm in record.arms:
        runs = [c for c in record.children if c.arm_key == arm["key"]]
        done = _finished_runs(record, arm["key"])
        mean, std = {}, {}
        for metric, _, key in ABLATION_COLUMNS:
            values = [c.metrics[metric] for c in done if metric in c.metrics]
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
                paper=dict(arm.get("paper") or {}),
                best_epochs=[(c.seed, c.best_epoch, c.epochs) for c in done],
            )
        )
    baseline = baseline_row(rows)
    if baseline is not None:
        for row in rows:
            if "wholebody_AP" in row.mean and "wholebody_AP" in baseline.mean:
                row.delta = row.mean["wholebody_AP"] - baseline.mean["wholebody_AP"]
            if "wholebody_AP" in row.paper and "wholebody_AP" in baseline.paper:
                row.paper_delta = row.paper["wholebody_AP"] - baseline.paper["wholebody_AP"]
    return rows


def baseline_row(rows: list[AblationRow]) -> AblationRow | None:
    """Arm (a), else the first arm: what every delta is taken against."""
    return next((r for r in rows if r.key == BASELINE_ARM_KEY), rows[0] if rows else None)


def has_paper(rows: list[AblationRow]) -> bool:
    """Whether any arm carries the paper's numbers (else the table has no paper column)."""
    return any(row.paper for row in rows)


def max_seeds(rows: list[AblationRow]) -> int:
    return max((row.finished for row in rows), default=0)


def _cell(row: AblationRow, key: str, with_paper: bool) -> str:
    ours = "—"
    if key in row.mean:
        ours = f"{row.mean[key]:.2f}"
        if key in row.std:
            ours += f" ± {row.std[key]:.2f}"
    if not with_paper:
        return ours
    paper = f"{row.paper[key]:.1f}" if key in row.paper else "—"
    return f"{ours} ({paper})"


def _signed(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:+.{digits}f}"


def best_epochs_cell(row: AblationRow) -> str:
    """Each finished seed's best epoch, in seed order, e.g. ``8, 10 of 10`` (``last`` where a run logged
    no best/ metrics, so its last epoch is reported)."""
    if not row.best_epochs:
        return "—"
    best = ["last" if b is None else str(b) for _, b, _ in row.best_epochs]
    lasts = {e for _, _, e in row.best_epochs if e is not None}
    if len(lasts) == 1:
        return f"{', '.join(best)} of {lasts.pop()}"
    return ", ".join(
        f"{b}/{'?' if e is None else e}" for b, (_, _, e) in zip(best, row.best_epochs, strict=True)
    )


def ablation_header(baseline_key: str = BASELINE_ARM_KEY) -> list[str]:
    return [
        "Arm",
        "n",
        "Best epoch",
        ABLATION_COLUMNS[0][1],
        f"Δ AP vs ({baseline_key})",
        *[h for _, h, _ in ABLATION_COLUMNS[1:]],
    ]


def ablation_table_cells(rows: list[AblationRow], with_paper: bool | None = None) -> list[list[str]]:
    """The table's rows as strings: ``ours mean ± std (paper)`` per metric column (without ``(paper)`` when
    ``with_paper`` is false; by default, when any arm has paper numbers)."""
    with_paper = has_paper(rows) if with_paper is None else with_paper
    out = []
    for row in rows:
        n = f"{row.finished}" if row.finished == row.total else f"{row.finished}/{row.total}"
        cells = [row.label, n, best_epochs_cell(row), _cell(row, ABLATION_COLUMNS[0][2], with_paper)]
        delta = _signed(row.delta, 2)
        cells.append(f"{delta} ({_signed(row.paper_delta, 1)})" if with_paper else delta)
        cells += [_cell(row, key, with_paper) for _, _, key in ABLATION_COLUMNS[1:]]
        out.append(cells)
    return out


def ablation_note(rows: list[AblationRow]) -> str:
    """What the table's cells are."""
    spread = "mean ± std over seeds (n finished runs)" if max_seeds(rows) >= 2 else "single runs (n = 1)"
    note = (
        f"Ours: {spread} at each run's best epoch (the epoch of its best validation whole-body AP, "
        "given per seed), COCO-WholeBody metrics in percent"
    )
    if has_paper(rows):
        note += "; (paper): the number the paper reports (HRNet-w32 + DARK, full COCO-WholeBody)"
    return note + "."


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ablation_markdown(rows: list[AblationRow]) -> str:
    """The ablation table in Markdown (the paper's Table 2 layout, paper numbers in parentheses if any)."""
    return (
        ablation_note(rows)
        + "\n\n"
        + markdown_table(ablation_header(), ablation_table_cells(rows, has_paper(rows)))
    )


# ------------------------------------------------------------------------------------------------------------
# Paired differences to the baseline


@dataclass
class PairedDifference:
    """One arm minus the baseline on one metric, seed by seed (percentage points)."""

    key: str
    metric: str  # paper key, e.g. wholebody_AP
    seeds: list[int]  # the seeds both arms finished
    mean: float | None  # None: no common seed
    low: float | None = None  # the 95% Student t interval; None for fewer than 2 pairs
    high: float | None = None

    @property
    def contains_zero(self) -> bool | None:
        """Whether the interval holds 0 (no difference from the baseline shown); None without interval."""
        if self.low is None or self.high is None:
            return None
        return self.low <= 0.0 <= self.high


def student_t_quantile(probability: float, dof: int) -> float:
    """The ``probability`` quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(probability, dof))


def paired_differences(record: SweepRecord, rows: list[AblationRow] | None = None) -> list[PairedDifference]:
    """Per non-baseline arm and metric, arm minus baseline over the seeds both finished (pairs by seed):
    the mean difference and, with >= 2 pairs, mean ± t(0.975, n - 1) · s / sqrt(n)."""
    rows = ablation_rows(record) if rows is None else rows
    baseline = baseline_row(rows)
    if baseline is None:
        return []
    base_runs = {c.seed: c for c in _finished_runs(record, baseline.key) if c.seed is not None}
    out = []
    for row in rows:
        if row.key == baseline.key:
            continue
        runs = {c.seed: c for c in _finished_runs(record, row.key) if c.seed is not None}
        for metric, _, key in ABLATION_COLUMNS:
            seeds, diffs = [], []
            for seed in sorted(set(runs) & set(base_runs)):
                ours, base = runs[seed].metrics.get(metric), base_runs[seed].metrics.get(metric)
                if ours is None or base is None or not (math.isfinite(ours) and math.isfinite(base)):
                    continue
                seeds.append(seed)
                diffs.append(ours - base)
            diff = PairedDifference(row.key, key, seeds, statistics.fmean(diffs) if diffs else None)
            if len(diffs) >= 2:
                half = student_t_quantile(0.5 + CONFIDENCE / 2, len(diffs) - 1) * statistics.stdev(diffs)
                half /= math.sqrt(len(diffs))
                diff.low, diff.high = diff.mean - half, diff.mean + half
            out.append(diff)
    return out


def paired_cell(diff: PairedDifference) -> str:
    if diff.mean is None:
        return "—"
    if diff.low is None:
        return f"{diff.mean:+.2f} (1 pair)"
    text = f"{diff.mean:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}]"
    return text + " (contains 0)" if diff.contains_zero else text


def paired_table(rows: list[AblationRow], diffs: list[PairedDifference]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the paired-difference table: per arm, pairs and ``mean [low, high]`` per metric."""
    by_arm: dict[str, dict[str, PairedDifference]] = {}
    for diff in diffs:
        by_arm.setdefault(diff.key, {})[diff.metric] = diff
    header = ["Arm", "pairs (seeds)", *[f"Δ {h}" for _, h, _ in ABLATION_COLUMNS]]
    out = []
    for row in rows:
        if row.key not in by_arm:
            continue
        cells = by_arm[row.key]
        seeds = cells[ABLATION_COLUMNS[0][2]].seeds
        out.append(
            [
                row.label,
                f"{len(seeds)} ({', '.join(map(str, seeds))})" if seeds else "0",
                *[paired_cell(cells[key]) for _, _, key in ABLATION_COLUMNS],
            ]
        )
    return header, out


# ------------------------------------------------------------------------------------------------------------
# Learning curves


@dataclass
class Curve:
    """A learning curve: the metric (percent) per epoch, mean over ``n[i]`` runs at each epoch."""

    label: str
    epochs: list[int]
    values: list[float]
    n: list[int]


def arm_curves(record: SweepRecord) -> list[Curve]:
    """Per arm (in file order), the mean over its FINISHED seeds of the sweep's metric at each epoch."""
    curves = []
    for arm in record.arms:
        by_epoch: dict[int, list[float]] = {}
        for child in _finished_runs(record, arm["key"]):
            for epoch, value in child.curve.items():
                if math.isfinite(value):
                    by_epoch.setdefault(epoch, []).append(value)
        if by_epoch:
            epochs = sorted(by_epoch)
            curves.append(
                Curve(
                    label=f"({arm['key']}) {arm['name']}",
                    epochs=epochs,
                    values=[statistics.fmean(by_epoch[e]) for e in epochs],
                    n=[len(by_epoch[e]) for e in epochs],
                )
            )
    return curves


def trial_curves(record: SweepRecord, top: int = 10) -> list[Curve]:
    """The learning curves of a sweep's ``top`` best trials (percent)."""
    return [
        Curve(
            label=c.name,
            epochs=list(c.curve),
            values=list(c.curve.values()),
            n=[1] * len(c.curve),
        )
        for c in ranked_children(record)[:top]
        if c.curve
    ]


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


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sweep_table(record: SweepRecord, top: int = 10) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the top ``top`` configs: score, status, epochs reached, sampled values."""
    header = ["Rank", "Run", "Status", "Epochs", f"best {record.metric}", *record.sampled_names]
    rows = []
    for i, child in enumerate(ranked_children(record)[:top], start=1):
        rows.append(
            [
                str(i),
                child.name,
                child.status,
                "—" if child.epochs is None else str(int(child.epochs)),
                f"{child.score:.4f}",
                *[format_value(child.sampled.get(name, "—")) for name in record.sampled_names],
            ]
        )
    return header, rows


def sweep_status_line(record: SweepRecord) -> str:
    counts: dict[str, int] = {}
    for child in record.children:
        counts[child.status] = counts.get(child.status, 0) + 1
    status_line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return (
        f"Sweep {record.name}: {len(record.children)} trials ({status_line}); "
        f"ranked by the best {record.metric} ({record.mode}) over each trial's epochs."
    )


def sweep_markdown(record: SweepRecord, top: int = 10) -> str:
    """Top ``top`` configs of a sweep (score, status, epochs reached, sampled values) and the statuses."""
    return sweep_status_line(record) + "\n\n" + markdown_table(*sweep_table(record, top))


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


IMPORTANCES_NONE = "Parameter importances: not available (fewer than 2 scored trials, or all scores equal)."
IMPORTANCES_NOTE = "Parameter importances (Optuna fANOVA, normalised to sum 1):"


def importances_rows(importances: dict[str, float]) -> list[list[str]]:
    return [[name, f"{value:.3f}"] for name, value in importances.items()]


def importances_markdown(importances: dict[str, float]) -> str:
    if not importances:
        return IMPORTANCES_NONE
    return (
        IMPORTANCES_NOTE + "\n\n" + markdown_table(["Parameter", "Importance"], importances_rows(importances))
    )


# ------------------------------------------------------------------------------------------------------------
# tune-eval sweeps

# The gain table's rows: (metric a trial logs, label); the sweep's own metric comes first if not among them.
TUNE_EVAL_GAIN_METRICS: tuple[tuple[str, str], ...] = (
    ("eval/wholebody_AP", "Whole-body AP"),
    ("eval/wholebody_AR", "Whole-body AR"),
    ("eval/body_AP", "Body AP"),
    ("eval/foot_AP", "Foot AP"),
    ("eval/face_AP", "Face AP"),
    ("eval/hand_AP", "Hand AP"),
    ("eval/lefthand_AP", "Left-hand AP"),
    ("eval/righthand_AP", "Right-hand AP"),
)


def defaults_child(record: SweepRecord) -> ChildRecord | None:
    """The trial that scored the checkpoint's own settings: the one the parent names, else the first child
    whose settings are the defaults."""
    info = record.tune_eval
    if info is None:
        return None
    for child in record.children:
        if child.run_id == info.defaults_run_id:
            return child
    if not info.defaults:
        return None
    matching = [
        c
        for c in record.children
        if all(setting_value(c.params.get(key)) == value for key, value in info.defaults.items())
    ]
    return min(matching, key=lambda c: c.name) if matching else None


def _changed(default: Any, best: Any) -> bool:
    if isinstance(default, int | float) and isinstance(best, int | float):
        return not math.isclose(float(default), float(best), rel_tol=1e-9, abs_tol=1e-12)
    return default != best


def tune_eval_settings_table(
    record: SweepRecord, best: ChildRecord | None
) -> tuple[list[str], list[list[str]]]:
    """(header, rows): every evaluation setting, the defaults' value, the best trial's, whether it changed
    and whether the sweep sampled it."""
    from trainer.config import EVAL_SETTING_KEYS

    defaults = record.tune_eval.defaults if record.tune_eval else {}
    rows = []
    for key in EVAL_SETTING_KEYS:
        default = defaults.get(key)
        chosen = setting_value(best.params.get(key)) if best is not None else None
        if default is None and chosen is None:
            continue
        changed = default is not None and chosen is not None and _changed(default, chosen)
        rows.append(
            [
                f"`{key}`",
                "—" if default is None else format_value(default),
                "—" if chosen is None else format_value(chosen),
                "changed" if changed else "same",
                "sampled" if key in record.sampled_names else "fixed",
            ]
        )
    return ["Setting", "Defaults", "Best", "vs defaults", "In the sweep"], rows


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"  # load_sweep gives AP/AR in percent


def tune_eval_gain(record: SweepRecord, best: ChildRecord | None, defaults: ChildRecord | None) -> dict:
    """Metric -> (defaults' value, best's value, best minus defaults), in percent (as ``load_sweep`` reads
    AP/AR); None where not logged."""
    names = [m for m, _ in TUNE_EVAL_GAIN_METRICS]
    if record.metric not in names:
        names.insert(0, record.metric)
    out = {}
    for name in names:
        d = defaults.metrics.get(name) if defaults is not None else None
        b = best.metrics.get(name) if best is not None else None
        out[name] = (d, b, None if d is None or b is None else b - d)
    return out


def tune_eval_gain_table(
    record: SweepRecord, best: ChildRecord | None, defaults: ChildRecord | None
) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per metric the defaults' trial, the best trial and the gain, in percent / points."""
    labels = dict(TUNE_EVAL_GAIN_METRICS)
    rows = []
    for name, (d, b, gain) in tune_eval_gain(record, best, defaults).items():
        label = labels.get(name, f"`{name}`") + (" (the sweep's metric)" if name == record.metric else "")
        rows.append([label, _percent(d), _percent(b), "—" if gain is None else f"{gain:+.2f}"])
    return ["Metric", "Defaults (%)", "Best (%)", "Gain (points)"], rows


def tune_eval_trials_table(record: SweepRecord, top: int = 10) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the top ``top`` scored trials and the defaults' trial: score and sampled values."""
    defaults = defaults_child(record)
    ranked = ranked_children(record)
    shown = ranked[:top] + ([defaults] if defaults in ranked[top:] else [])
    rows = []
    for child in shown:
        rank = ranked.index(child) + 1
        mark = " (defaults)" if child is defaults else ""
        values = [format_value(setting_value(child.params.get(name))) for name in record.sampled_names]
        rows.append([str(rank), child.name + mark, f"{child.score:.2f}", *values])
    return ["Rank", "Trial", f"{record.metric} (%)", *[f"`{n}`" for n in record.sampled_names]], rows


def tune_eval_status_line(record: SweepRecord) -> str:
    counts: dict[str, int] = {}
    for child in record.children:
        counts[child.status] = counts.get(child.status, 0) + 1
    status_line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    return (
        f"{len(record.children)} trials ({status_line}), each one evaluation of the cached heatmaps; ranked "
        f"by {record.metric} ({record.mode})."
    )


__all__ = [
    "ABLATION_COLUMNS",
    "BASELINE_ARM_KEY",
    "AblationRow",
    "Curve",
    "PairedDifference",
    "ablation_header",
    "ablation_markdown",
    "ablation_rows",
    "ablation_table_cells",
    "arm_curves",
    "TUNE_EVAL_GAIN_METRICS",
    "best_child",
    "defaults_child",
    "has_paper",
    "importances_markdown",
    "paired_differences",
    "param_importances",
    "ranked_children",
    "student_t_quantile",
    "sweep_markdown",
    "trial_curves",
    "tune_eval_gain",
    "tune_eval_gain_table",
    "tune_eval_settings_table",
    "tune_eval_status_line",
    "tune_eval_trials_table",
]
