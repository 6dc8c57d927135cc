"""An ablation's numbers for ``fowkal report``: :func:`ablation_rows`, the paper's Table 2 layout
(whole-body AP and AR, body, foot, face and hand AP as mean ± std over seeds at each run's best epoch, in
percent like the paper, the delta of whole-body AP to arm (a), and the paper's numbers beside ours where the
arms file gives them); :func:`paired_differences`, each arm minus arm (a) seed by seed, with a 95% Student t
interval; :func:`arm_curves`, the mean learning curve of each arm.

Only FINISHED children enter the ablation means.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from orchestrator.reports.records import ChildRecord, SweepRecord
from orchestrator.reports.sweep_tables import Curve, markdown_table

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


def ablation_header(baseline_key: str = BASELINE_ARM_KEY, rows: list[AblationRow] | None = None) -> list[str]:
    """The table's header; with ``rows`` the delta column names their baseline (arm (a), else the first)."""
    baseline = baseline_row(rows) if rows else None
    if baseline is not None:
        baseline_key = baseline.key
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


def _selection_metrics() -> str:
    """``name metric`` of every family's best-checkpoint metric."""
    from trainer.families import FAMILIES

    return ", ".join(f"{name} {family.selection_metric}" for name, family in FAMILIES.items())


def ablation_note(rows: list[AblationRow]) -> str:
    """What the table's cells are."""
    spread = "mean ± std over seeds (n finished runs)" if max_seeds(rows) >= 2 else "single runs (n = 1)"
    note = (
        f"Ours: {spread} at each run's best epoch (its best checkpoint's, by its family's validation score: "
        f"{_selection_metrics()}; given per seed), COCO-WholeBody metrics in percent"
    )
    if has_paper(rows):
        note += "; (paper): the number the paper reports (HRNet-w32 + DARK, full COCO-WholeBody)"
    return note + "."


def ablation_markdown(rows: list[AblationRow]) -> str:
    """The ablation table in Markdown (the paper's Table 2 layout, paper numbers in parentheses if any)."""
    return (
        ablation_note(rows)
        + "\n\n"
        + markdown_table(ablation_header(rows=rows), ablation_table_cells(rows, has_paper(rows)))
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


__all__ = [
    "ABLATION_COLUMNS",
    "BASELINE_ARM_KEY",
    "CONFIDENCE",
    "AblationRow",
    "PairedDifference",
    "ablation_header",
    "ablation_markdown",
    "ablation_note",
    "ablation_rows",
    "ablation_table_cells",
    "arm_curves",
    "baseline_row",
    "best_epochs_cell",
    "has_paper",
    "max_seeds",
    "paired_cell",
    "paired_differences",
    "paired_table",
    "student_t_quantile",
]
