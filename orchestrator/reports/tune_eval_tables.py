"""A ``fowkal tune-eval`` sweep's numbers for ``fowkal report``: the trial of the checkpoint's own settings
(:func:`defaults_child`), the best settings beside the defaults (:func:`tune_eval_settings_table`), the best
trial minus the defaults' trial for whole-body and every part (:func:`tune_eval_gain_table`), the trials
ranked (:func:`tune_eval_trials_table`). ``report_tune_eval`` lays them out.
"""

from __future__ import annotations

import math
from typing import Any

from orchestrator.reports.records import ChildRecord, SweepRecord, setting_value
from orchestrator.reports.sweep_tables import format_value, ranked_children

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
    info = record.tune_eval
    defaults, keys = (info.defaults, info.setting_keys) if info else ({}, ())
    rows = []
    # The family's settings in their order, then any other the sweep sampled.
    for key in dict.fromkeys([*keys, *defaults, *record.sampled_names]):
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
        f"{len(record.children)} trials ({status_line}), each one evaluation of the cached network outputs; "
        f"ranked by {record.metric} ({record.mode})."
    )


__all__ = [
    "TUNE_EVAL_GAIN_METRICS",
    "defaults_child",
    "tune_eval_gain",
    "tune_eval_gain_table",
    "tune_eval_settings_table",
    "tune_eval_status_line",
    "tune_eval_trials_table",
]
