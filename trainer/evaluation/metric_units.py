"""The one unit of COCO-WholeBody AP and AR wherever the project logs or shows them: percent (0-100).

xtcocotools (``trainer.evaluation.wholebody``) returns fractions; every metric the project reports (``val/*``
of the
training loop, ``best/val/*``, ``eval/*`` of ``fowkal eval`` and ``fowkal tune-eval``, the console, the
report) is that fraction times 100, as in the paper's tables. Percent keeps a smoke run's small APs readable
where MLflow's compare view rounds to three decimals (0.0021 shows as 0.002; 0.21 % as 0.21). A statistic of
-1 (no labelled ground truth in the range, xtcocotools' convention) stays -1.

Runs logged by an earlier version carry fractions and no ``fowkal.metric_unit`` tag; the report reads them
with ``PERCENT_PER_UNIT``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

METRIC_UNIT = "percent"
UNIT_LABEL = "AP/AR in % (0-100)"
# A logged AP/AR metric: val/<part>_AP, best/val/<part>_AR, eval/<part>_AP50 (not eval/boxes, train/loss).
_AP_METRIC = re.compile(r"^(best/)?(val|eval)/\w+_A[PR](50|75|_M|_L)?$")
# Factor from a run's logged unit to percent: the tag's value -> factor. No tag: an earlier run, fractions.
PERCENT_PER_UNIT = {"percent": 1.0, "fraction": 100.0, None: 100.0}


def to_percent(value: float) -> float:
    """A fraction from xtcocotools as percent; -1 (no ground truth) stays -1."""
    value = float(value)
    return value * 100.0 if value >= 0.0 else value


def metrics_to_percent(metrics: Mapping[str, float]) -> dict[str, float]:
    """``evaluate_wholebody``'s ``{part}/{stat}`` metrics (every one an AP or AR) in percent."""
    return {key: to_percent(value) for key, value in metrics.items()}


def is_ap_metric(name: str) -> bool:
    """Whether the logged metric ``name`` is a COCO-WholeBody AP or AR (in the run's unit)."""
    return bool(_AP_METRIC.match(name))


def in_percent(value: float, unit: str | None) -> float:
    """One logged AP/AR value, logged in ``unit`` (a run's ``fowkal.metric_unit`` tag), in percent."""
    return value * PERCENT_PER_UNIT.get(unit, 1.0) if value >= 0 else value


def logged_in_percent(metrics: Mapping[str, float], unit: str | None) -> dict[str, float]:
    """A run's logged metrics with every AP/AR in percent, whatever ``unit`` (its ``fowkal.metric_unit`` tag)
    it was logged in; other metrics unchanged."""
    return {key: in_percent(value, unit) if is_ap_metric(key) else value for key, value in metrics.items()}
