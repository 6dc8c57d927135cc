"""A sweep's numbers for ``fowkal report``: its trials ranked (:func:`ranked_children`, :func:`best_child`),
the top configurations (:func:`sweep_markdown`), Optuna's fANOVA parameter importances
(:func:`param_importances`, ``orchestrator.sweeps.param_importance``) and the top trials' learning curves;
and what
every table of the report shares: a Markdown table (:func:`markdown_table`), a value's cell
(:func:`format_value`), a learning curve (:class:`Curve`).

Sweeps rank FINISHED and KILLED (stopped early by ASHA) children by their best value of the metric, as Tune
does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.reports.records import ChildRecord, SweepRecord
from orchestrator.sweeps.param_importance import FANOVA_SEED, fanova_importances


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class Curve:
    """A learning curve: the metric (percent) per epoch, mean over ``n[i]`` runs at each epoch."""

    label: str
    epochs: list[int]
    values: list[float]
    n: list[int]


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


def param_importances(record: SweepRecord, seed: int = FANOVA_SEED) -> dict[str, float]:
    """Optuna's fANOVA importances of the sampled parameters over the scored trials (empty if < 2 trials).

    A fresh study is rebuilt from the children, best first (``param_importance.fanova_importances`` with
    the space's distributions and each child's best score), so it works for finished, resumed and stopped
    sweeps alike.
    """
    trials = [(child.sampled, child.score) for child in ranked_children(record)]
    return fanova_importances(
        record.space.get("parameters", {}), record.sampled_names, trials, record.mode, seed=seed
    )


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


__all__ = [
    "IMPORTANCES_NONE",
    "IMPORTANCES_NOTE",
    "Curve",
    "best_child",
    "format_value",
    "importances_markdown",
    "importances_rows",
    "markdown_table",
    "param_importances",
    "ranked_children",
    "sweep_markdown",
    "sweep_status_line",
    "sweep_table",
    "trial_curves",
]
