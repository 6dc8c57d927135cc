"""The figures of ``fowkal report`` (matplotlib PNGs): the ablation bars, learning curves, and for sweeps the
parameter importances and parallel coordinates. Each ``plot_*`` writes one PNG and returns its path; the
HTML page embeds them as base64, so it is a single file."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from orchestrator.reports.records import SweepRecord
from orchestrator.reports.tables import AblationRow, Curve, has_paper, max_seeds, ranked_children

# The bars of the ablation figure: whole-body AP and the four parts (AR has no paper number for most arms).
BAR_KEYS: tuple[tuple[str, str], ...] = (
    ("wholebody_AP", "whole-body AP"),
    ("body_AP", "body AP"),
    ("foot_AP", "foot AP"),
    ("face_AP", "face AP"),
    ("hand_AP", "hand AP"),
)
PAPER_SETUP = "HRNet-w32 + DARK, full COCO-WholeBody"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | os.PathLike) -> Path:
    plt = _pyplot()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def ablation_figure(rows: list[AblationRow]):
    """The ablation bars as a matplotlib figure: ours in one panel and, when any arm has the paper's
    numbers, the paper's in a second panel on its own scale (the paper's ~60% would dwarf a smoke run's few
    percent on a shared axis). X labels are the arm keys; the legend sits below both panels."""
    import numpy as np

    plt = _pyplot()
    with_paper = has_paper(rows)
    panels = 2 if with_paper else 1
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=(max(6.0, 0.9 * len(rows) + 2.5) * panels, 4.8),
        layout="constrained",
        squeeze=False,
    )
    axes = list(axes[0])
    x = np.arange(len(rows))
    width = 0.8 / len(BAR_KEYS)
    colours = plt.get_cmap("tab10")
    spread = max_seeds(rows) >= 2
    handles = []
    for i, (key, label) in enumerate(BAR_KEYS):
        offset = (i - (len(BAR_KEYS) - 1) / 2) * width
        means = [row.mean.get(key, np.nan) for row in rows]
        yerr = [row.std.get(key, 0.0) for row in rows] if spread else None
        handles.append(
            axes[0].bar(x + offset, means, width, yerr=yerr, capsize=2, color=colours(i), label=label)
        )
        if with_paper:
            paper = [row.paper.get(key, np.nan) for row in rows]
            axes[1].bar(x + offset, paper, width, color=colours(i), alpha=0.55, label=label)
    axes[0].set_title("ours", fontsize=10)
    axes[0].set_ylabel("AP (%), ours")
    if with_paper:
        axes[1].set_title(f"paper ({PAPER_SETUP})", fontsize=10)
        axes[1].set_ylabel("AP (%), paper")
    for ax in axes:
        ax.set_xticks(x, [f"({row.key})" for row in rows])
        ax.set_xlabel("arm")
        ax.set_ylim(bottom=0)
    title = "Ablation at each run's best epoch: " + (
        "mean ± std over seeds" if spread else "single runs (n = 1)"
    )
    if with_paper:
        title += "; ours and the paper's each on their own scale"
    fig.suptitle(title, fontsize=11)
    fig.legend(handles=handles, loc="outside lower center", ncols=len(BAR_KEYS), fontsize=8)
    return fig


def plot_ablation(rows: list[AblationRow], out_png: str | os.PathLike) -> Path:
    """Per arm: our whole-body and part APs (mean ± std where n >= 2), the paper's beside on its own axis."""
    return _save(ablation_figure(rows), out_png)


def learning_curves_figure(curves: list[Curve], metric: str, title: str):
    """One line per curve: ``metric`` (percent) per epoch; the legend right of the axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for curve in curves:
        ax.plot(curve.epochs, curve.values, marker="o", markersize=3, label=curve.label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if curves:
        fig.legend(loc="outside right upper", fontsize=8)
    return fig


def plot_learning_curves(curves: list[Curve], out_png: str | os.PathLike, metric: str, title: str) -> Path:
    return _save(learning_curves_figure(curves, metric, title), out_png)


def plot_importances(importances: dict[str, float], out_png: str | os.PathLike) -> Path:
    """Horizontal bars of the parameter importances."""
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(len(names), 2) + 1.2))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title("Hyperparameter importances")
    fig.tight_layout()
    return _save(fig, out_png)


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
    return _save(fig, out_png)


__all__ = [
    "ablation_figure",
    "learning_curves_figure",
    "plot_ablation",
    "plot_importances",
    "plot_learning_curves",
    "plot_parallel_coordinates",
]
