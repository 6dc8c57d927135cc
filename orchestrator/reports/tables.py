"""The numbers of ``fowkal report``, by the kind of sweep: every name importable from here as before.

- ablations (``report_ablation_tables``): :func:`ablation_rows`, the paper's Table 2 layout;
  :func:`paired_differences`, each arm minus arm (a) seed by seed, with a 95% Student t interval;
  :func:`arm_curves`, the mean learning curve of each arm;
- sweeps (``report_sweep_tables``): the top configurations (:func:`sweep_markdown`) and Optuna's fANOVA
  parameter importances (:func:`param_importances`), and what every table shares (:func:`markdown_table`,
  :func:`format_value`, :class:`Curve`);
- tune-eval sweeps (``report_tune_eval_tables``): the trial of the checkpoint's own settings
  (:func:`defaults_child`), the best settings beside the defaults, the gain over them, the trials ranked.

Statuses: only FINISHED children enter the ablation means; sweeps rank FINISHED and KILLED (stopped early by
ASHA) children by their best value of the metric, as Tune does.
"""

from __future__ import annotations

from orchestrator.reports.ablation_tables import (
    ABLATION_COLUMNS,
    BASELINE_ARM_KEY,
    CONFIDENCE,
    AblationRow,
    PairedDifference,
    ablation_header,
    ablation_markdown,
    ablation_note,
    ablation_rows,
    ablation_table_cells,
    arm_curves,
    baseline_row,
    best_epochs_cell,
    has_paper,
    max_seeds,
    paired_cell,
    paired_differences,
    paired_table,
    student_t_quantile,
)
from orchestrator.reports.sweep_tables import (
    IMPORTANCES_NONE,
    IMPORTANCES_NOTE,
    Curve,
    best_child,
    format_value,
    importances_markdown,
    importances_rows,
    markdown_table,
    param_importances,
    ranked_children,
    sweep_markdown,
    sweep_status_line,
    sweep_table,
    trial_curves,
)
from orchestrator.reports.tune_eval_tables import (
    TUNE_EVAL_GAIN_METRICS,
    defaults_child,
    tune_eval_gain,
    tune_eval_gain_table,
    tune_eval_settings_table,
    tune_eval_status_line,
    tune_eval_trials_table,
)

__all__ = [
    "ABLATION_COLUMNS",
    "BASELINE_ARM_KEY",
    "CONFIDENCE",
    "IMPORTANCES_NONE",
    "IMPORTANCES_NOTE",
    "TUNE_EVAL_GAIN_METRICS",
    "AblationRow",
    "Curve",
    "PairedDifference",
    "ablation_header",
    "ablation_markdown",
    "ablation_note",
    "ablation_rows",
    "ablation_table_cells",
    "arm_curves",
    "baseline_row",
    "best_child",
    "best_epochs_cell",
    "defaults_child",
    "format_value",
    "has_paper",
    "importances_markdown",
    "importances_rows",
    "markdown_table",
    "max_seeds",
    "paired_cell",
    "paired_differences",
    "paired_table",
    "param_importances",
    "ranked_children",
    "student_t_quantile",
    "sweep_markdown",
    "sweep_status_line",
    "sweep_table",
    "trial_curves",
    "tune_eval_gain",
    "tune_eval_gain_table",
    "tune_eval_settings_table",
    "tune_eval_status_line",
    "tune_eval_trials_table",
]
