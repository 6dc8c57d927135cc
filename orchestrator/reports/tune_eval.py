"""The sections of a ``fowkal tune-eval`` report: the checkpoint and run evaluated, the best settings beside
the defaults with the ``fowkal eval --set`` line that applies them, the best trial minus the defaults' trial
for whole-body AP and every part, the importances the sweep computed (Optuna fANOVA), the top trials and the
runs."""

from __future__ import annotations

from pathlib import Path

from orchestrator import tracking
from orchestrator.reports.figures import plot_importances
from orchestrator.reports.records import ChildRecord, SweepRecord
from orchestrator.reports.render import Block, _code, _link
from orchestrator.reports.sweep_tables import (
    IMPORTANCES_NONE,
    IMPORTANCES_NOTE,
    best_child,
    importances_rows,
    param_importances,
)
from orchestrator.reports.tune_eval_tables import (
    defaults_child,
    tune_eval_gain,
    tune_eval_gain_table,
    tune_eval_settings_table,
    tune_eval_status_line,
    tune_eval_trials_table,
)


def _run_link(store: str, experiment_id: str, child: ChildRecord | None) -> str:
    if child is None:
        return "not scored"
    return _link(child.name, tracking.run_url(store, experiment_id, child.run_id))


def tune_eval_setup_rows(record: SweepRecord, tracking_uri: str) -> list[list[str]]:
    """Setting | value rows of a tune-eval: what was evaluated, on what, how many trials."""
    info = record.tune_eval
    store = tracking.absolute_tracking_uri(tracking_uri)
    rows = [["Checkpoint", _code(info.checkpoint) if info.checkpoint else "—"]]
    if info.evaluated_run_id:
        name = info.evaluated_run_name or info.evaluated_run_id
        experiment = info.evaluated_experiment_id or record.experiment_id
        rows.append(
            ["Evaluated run", _link(name, tracking.run_url(store, experiment, info.evaluated_run_id))]
        )
    else:
        rows.append(["Evaluated run", "— (a checkpoint file, `--checkpoint`)"])
    rows.append(["Annotations", _code(info.ann_file) if info.ann_file else "—"])
    det = info.det_file
    rows.append(["Boxes", "ground-truth boxes" if det in ("", "ground-truth boxes") else _code(det)])
    rows.append(["Trials", str(record.params.get("sweep.samples", len(record.children)))])
    if "sweep.search_seed" in record.params:
        rows.append(
            ["Search", f"Optuna TPE, seed {record.params['sweep.search_seed']}; first trial the defaults"]
        )
    if info.space_file:
        rows.append(["Search space", _code(info.space_file)])
    rows.append(["Metric", f"{_code(record.metric)} ({record.mode})"])
    return rows


def tune_eval_blocks(record: SweepRecord, tracking_uri: str, tmp: Path) -> list[Block]:
    store = tracking.absolute_tracking_uri(tracking_uri)
    info = record.tune_eval
    best, defaults = best_child(record), defaults_child(record)
    blocks = [Block("h2", "Setup")]
    if record.description:
        blocks.append(Block("p", record.description))
    blocks.append(
        Block("table", header=["Setting", "Value"], rows=tune_eval_setup_rows(record, tracking_uri))
    )

    blocks.append(Block("h2", "Best settings and the defaults"))
    if best is None:
        blocks.append(Block("p", f"No trial was scored: {tune_eval_status_line(record)}"))
    else:
        _, _, gain = tune_eval_gain(record, best, defaults)[record.metric]
        text = (
            f"Best {_code(record.metric)}: **{best.score:.2f}%** "
            f"({_run_link(store, record.experiment_id, best)}); the defaults (the checkpoint's own settings, "
            f"the first trial): "
        )
        if defaults is None or gain is None:
            text += "not scored, so no gain over them can be stated."
        else:
            text += (
                f"{defaults.metrics[record.metric]:.2f}% "
                f"({_run_link(store, record.experiment_id, defaults)}), gain **{gain:+.2f}** points."
            )
        blocks.append(Block("p", text))
        header, rows = tune_eval_settings_table(record, best)
        blocks.append(Block("table", header=header, rows=rows))
        if info.apply_command:
            blocks.append(
                Block(
                    "p",
                    f"Apply them: {_code(info.apply_command)} (also the {_code('best_eval.yaml')} artifact "
                    "of the parent run).",
                )
            )
        blocks.append(Block("h2", "Gain over the defaults"))
        blocks.append(
            Block(
                "p",
                "The best trial (by the sweep's metric) minus the defaults' trial, on the same cached "
                "heatmaps and the same annotations, in percentage points. Each is one evaluation, so there "
                "is no interval; the best of many trials is chosen on the set it is scored on, so the gain "
                "is an optimistic estimate of what the settings give on other data.",
            )
        )
        header, rows = tune_eval_gain_table(record, best, defaults)
        blocks.append(Block("table", header=header, rows=rows))

    blocks.append(Block("h2", "Parameter importances"))
    importances = info.importances or param_importances(record)
    if importances:
        blocks.append(Block("p", IMPORTANCES_NOTE))
        blocks.append(Block("table", header=["Parameter", "Importance"], rows=importances_rows(importances)))
        path = plot_importances(importances, tmp / "importances.png")
        blocks.append(Block("figure", "Evaluation-setting importances", path=path))
    else:
        blocks.append(Block("p", IMPORTANCES_NONE))

    blocks.append(Block("h2", "Top trials"))
    blocks.append(Block("p", tune_eval_status_line(record)))
    header, rows = tune_eval_trials_table(record)
    if rows:
        blocks.append(Block("table", header=header, rows=rows))
    return blocks


def tune_eval_runs_block(record: SweepRecord, tracking_uri: str) -> list[Block]:
    """The trials: name, status, the metric, boxes scored, seconds, the run id as a link."""
    store = tracking.absolute_tracking_uri(tracking_uri)
    defaults = defaults_child(record)
    rows = []
    for child in record.children:
        value = child.metrics.get(record.metric)
        # What the family's cache holds per entry: boxes (top-down) or images (whole-image families).
        boxes = child.metrics.get("eval/boxes", child.metrics.get("eval/images"))
        seconds = child.metrics.get("time/trial_s")
        rows.append(
            [
                child.name + (" (defaults)" if child is defaults else ""),
                child.status,
                "—" if value is None else f"{value:.2f}",
                "—" if boxes is None else str(int(boxes)),
                "—" if seconds is None else f"{seconds:.2f}",
                _link(_code(child.run_id), tracking.run_url(store, record.experiment_id, child.run_id)),
            ]
        )
    header = ["Trial", "Status", f"{record.metric} (%)", "Boxes / images", "Seconds", "MLflow run"]
    return [Block("h2", "Runs"), Block("table", header=header, rows=rows)]
