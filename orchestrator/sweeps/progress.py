"""The console of a sweep: one table of the trials and one line per finished trial, nothing else.

``SweepProgress`` is a Ray Tune ``ProgressReporter``. The table (arm label or trial name, status, epoch k/N,
last and best value of the sweep's metric, the trial's time left, and the sweep's) is printed when it
changed, at most every ``interval_s`` seconds (and at the end); a trial that ends gets one line with its
outcome. Workers' own output goes to each trial's ``train.log`` (``trainer.loop``), not to the console.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ray.tune import ProgressReporter

from orchestrator.sweeps.trial import SweepPlan
from trainer.evaluation.metric_units import is_ap_metric

_ENDED = ("TERMINATED", "ERROR")


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``4m05s``, ``12s``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class SweepProgress(ProgressReporter):
    """Tune reporter printing the sweep's table and a line per finished trial (see the module docstring)."""

    # Tune pickles the reporter into its experiment state and a resumed sweep unpickles that one: attributes
    # added later need a class-level default.
    total_trials: int | None = None

    def __init__(
        self,
        plan: SweepPlan,
        epochs: int,
        concurrency: int,
        interval_s: float = 30.0,
        print_fn: Callable[[str], None] = print,
        total_trials: int | None = None,
    ):
        self.plan = plan
        # Tune creates trials as it goes: the sweep's size (arms x seeds, or --samples) counts the rest.
        self.total_trials = total_trials
        self.epochs = int(epochs)
        self.concurrency = max(1, int(concurrency))
        self.interval_s = float(interval_s)
        self.print_fn = print_fn
        self._last_print = -math.inf
        self._last_table = ""
        self._ended: set[str] = set()
        self._last: dict[str, float] = {}
        self._best: dict[str, tuple[float, int]] = {}
        self._epoch_s: dict[str, float] = {}

    def should_report(self, trials, done: bool = False) -> bool:
        return True  # report() throttles itself and prints ended trials at once

    # ---- state from Tune's trials

    def _label(self, trial) -> str:
        """The arm's label and seed (ablations) or the trial's run name (sweeps)."""
        return self.plan.sweep_kind.progress_label(
            self.plan, trial.config, getattr(trial, "experiment_tag", "")
        )

    def _observe(self, trial) -> None:
        result = trial.last_result or {}
        value = result.get(self.plan.metric)
        epoch = result.get("epoch")
        if isinstance(value, int | float) and math.isfinite(value):
            self._last[trial.trial_id] = float(value)
            best = self._best.get(trial.trial_id)
            better = best is None or (value > best[0] if self.plan.mode == "max" else value < best[0])
            if better:
                self._best[trial.trial_id] = (float(value), int(epoch or 0))
        epoch_s = result.get("time/epoch_s")
        if isinstance(epoch_s, int | float) and math.isfinite(epoch_s) and epoch_s > 0:
            self._epoch_s[trial.trial_id] = float(epoch_s)

    def _epoch(self, trial) -> int:
        epoch = (trial.last_result or {}).get("epoch")
        return int(epoch) if isinstance(epoch, int | float) and math.isfinite(epoch) else 0

    def _time_left(self, trial) -> float | None:
        if trial.status in _ENDED:
            return 0.0
        per_epoch = self._epoch_s.get(trial.trial_id) or self._mean_epoch_s()
        return None if per_epoch is None else per_epoch * max(0, self.epochs - self._epoch(trial))

    def _mean_epoch_s(self) -> float | None:
        return sum(self._epoch_s.values()) / len(self._epoch_s) if self._epoch_s else None

    # ---- output

    def _format_value(self, value: float | None) -> str:
        # AP/AR in percent (trainer.evaluation.metric_units): two decimals keep a smoke run's 0.21 readable.
        return "-" if value is None else f"{value:.2f}" if is_ap_metric(self.plan.metric) else f"{value:.4g}"

    def table(self, trials) -> str:
        """The table as text (one row per trial, then the sweep's time left)."""
        metric = self.plan.metric.split("/")[-1] + (" (%)" if is_ap_metric(self.plan.metric) else "")
        header = ("trial", "status", "epoch", f"last {metric}", f"best {metric} (epoch)", "time left")
        rows = []
        left = []
        for trial in trials:
            best = self._best.get(trial.trial_id)
            trial_left = self._time_left(trial)
            left.append(trial_left)
            rows.append(
                (
                    self._label(trial),
                    trial.status,
                    f"{self._epoch(trial)}/{self.epochs}",
                    self._format_value(self._last.get(trial.trial_id)),
                    "-" if best is None else f"{self._format_value(best[0])} ({best[1]})",
                    format_duration(trial_left),
                )
            )
        widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
        lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(header, widths, strict=True))]
        lines += ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
        total_trials = max(len(trials), self.total_trials or 0)
        mean_epoch_s = self._mean_epoch_s()
        if total_trials > len(trials):  # trials Tune has not created yet: a whole run each
            missing = total_trials - len(trials)
            left += [None if mean_epoch_s is None else missing * self.epochs * mean_epoch_s]
        known = [t for t in left if t is not None]
        total = None if len(known) < len(left) else sum(known) / self.concurrency
        ended = sum(t.status in _ENDED for t in trials)
        lines.append(f"{ended}/{total_trials} trials done; about {format_duration(total)} left")
        return "\n".join(lines)

    def report(self, trials, done: bool, *sys_info: str) -> None:
        for trial in trials:
            self._observe(trial)
        for trial in trials:
            if trial.status in _ENDED and trial.trial_id not in self._ended:
                self._ended.add(trial.trial_id)
                best = self._best.get(trial.trial_id)
                if trial.status == "ERROR":
                    outcome = "failed (its MLflow run holds the error)"
                elif self._epoch(trial) >= self.epochs:
                    outcome = "finished"
                else:
                    outcome = "stopped early by the scheduler"
                score = (
                    ""
                    if best is None
                    else f", best {self.plan.metric} {self._format_value(best[0])} at epoch {best[1]}"
                )
                self.print_fn(f"{self._label(trial)}: {outcome} after epoch {self._epoch(trial)}{score}")
        now = time.monotonic()
        table = self.table(trials)
        if done or (table != self._last_table and now - self._last_print >= self.interval_s):
            self.print_fn(table)
            self._last_print, self._last_table = now, table


__all__ = ["SweepProgress", "format_duration"]
