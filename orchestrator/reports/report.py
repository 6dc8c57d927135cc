"""``fowkal report``: sweeps and ablations read back from MLflow, as Markdown and a self-contained HTML page.

A sweep or ablation is one MLflow parent run with one child run per trial (``orchestrator.sweeps.sweep``). The
work is split by job: ``report_records`` reads MLflow (no Ray), ``report_tables`` computes the numbers,
``report_figures`` draws, ``report_render`` writes blocks as Markdown and HTML, ``report_tune_eval`` holds
the tune-eval sections; this module lays them out as one report per sweep, in this order:

- where it lives (the parent run, the store's absolute URI, links into the MLflow UI and how to start it)
  and the setup it measured (the parent's description; data, model, input size, epochs, seeds);
- ablations: the paper's Table 2 layout at each run's best epoch, saying which epoch; with >= 2 seeds,
  each arm's paired difference to arm (a) with a 95% interval, else a plain statement that the deltas are
  single runs; the bar chart, the learning curves per arm, the KAF figure of every KAL-family arm;
- sweeps: the top configurations, the parameter importances and their figures, the learning curves;
- tune-eval sweeps (``fowkal tune-eval``): the checkpoint and run evaluated, the best settings beside the
  defaults with the ``fowkal eval --set`` line that applies them, the best trial minus the defaults' trial
  for whole-body AP and every part, the importances the sweep computed (Optuna fANOVA), the top trials;
- the runs: name, status, best epoch and the run id linking to its MLflow page.

The report is built once as a list of blocks and written out twice (``report_render``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from orchestrator import tracking
from orchestrator.reports.cost_tables import (
    cost_rows,
    detector_note,
    inference_cost_table,
    inference_note,
    training_cost_table,
    training_note,
)
from orchestrator.reports.figures import (
    ablation_figure,
    plot_ablation,
    plot_importances,
    plot_learning_curves,
    plot_parallel_coordinates,
)
from orchestrator.reports.records import (
    TUNE_EVAL_KIND,
    ChildRecord,
    KafFigure,
    ReportError,
    SweepRecord,
    child_runs,
    kaf_figures,
    load_sweep,
    resolve_parent_runs,
)
from orchestrator.reports.render import (
    Block,
    _code,
    _link,
    blocks_html_body,
    blocks_markdown,
    html_page,
    inline_html,
)
from orchestrator.reports.tables import (
    ABLATION_COLUMNS,
    BASELINE_ARM_KEY,
    IMPORTANCES_NONE,
    IMPORTANCES_NOTE,
    AblationRow,
    ablation_header,
    ablation_markdown,
    ablation_note,
    ablation_rows,
    ablation_table_cells,
    arm_curves,
    baseline_row,
    best_child,
    has_paper,
    importances_markdown,
    importances_rows,
    paired_differences,
    paired_table,
    param_importances,
    ranked_children,
    sweep_markdown,
    sweep_status_line,
    sweep_table,
    trial_curves,
)
from orchestrator.reports.tune_eval import tune_eval_blocks, tune_eval_runs_block, tune_eval_setup_rows
from trainer.evaluation.metric_units import is_ap_metric
from trainer.families import DEFAULT_FAMILY

FIGURES_DIR = "figures"  # beside report.md: the PNGs its Markdown shows


# ------------------------------------------------------------------------------------------------------------
# Sections


def _nested(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _setting(record: SweepRecord, dotted: str):
    """A base-config value: from the parent's base_config.yaml, else its ``base.<key>`` param."""
    value = _nested(record.base_config, dotted)
    if value is None and f"base.{dotted}" in record.params:
        text = record.params[f"base.{dotted}"]
        try:
            value = json.loads(text)
        except ValueError:
            value = text
    return value


def _seeds(record: SweepRecord) -> list:
    try:
        seeds = json.loads(record.params.get("sweep.seeds", ""))
    except ValueError:
        seeds = None
    if isinstance(seeds, list) and seeds:
        return seeds
    return sorted({c.seed for c in record.children if c.seed is not None})


def setup_rows(record: SweepRecord) -> list[list[str]]:
    """Setting | value rows: data, model, input size, epochs, seeds (or trials), batch, learning rate."""
    rows = []
    kind = _setting(record, "data.kind")
    if kind == "synthetic":
        train, val = (
            _setting(record, "data.synthetic_train_images"),
            _setting(record, "data.synthetic_val_images"),
        )
        sizes = f" ({train} training / {val} validation images)" if train is not None else ""
        rows.append(["Data", f"synthetic, COCO-WholeBody format{sizes}"])
    elif kind is not None:
        train_ann, val_ann = _setting(record, "data.train_ann_file"), _setting(record, "data.val_ann_file")
        files = f": training {_code(train_ann)}, validation {_code(val_ann)}" if train_ann else ""
        rows.append(["Data", f"{kind}{files}"])
    backbone = _setting(record, "model.backbone")
    if backbone is not None:
        rows.append(["Model", _code(str(backbone))])
    size = _setting(record, "data.pipeline.input_size")
    if isinstance(size, list) and len(size) == 2:
        rows.append(["Input size", f"{size[0]}×{size[1]} (w × h)"])
    epochs = _setting(record, "epochs")
    if epochs is not None:
        rows.append(["Epochs", str(epochs)])
    if record.kind == "ablate":
        seeds = _seeds(record)
        rows.append(["Seeds", f"{len(seeds)} ({', '.join(map(str, seeds))})" if seeds else "—"])
        rows.append(["Arms", f"{len(record.arms)} ({', '.join(a['key'] for a in record.arms)})"])
        base_family = _setting(record, "family") or DEFAULT_FAMILY
        families = {a["key"]: (a.get("overrides") or {}).get("family") or base_family for a in record.arms}
        if len(set(families.values())) > 1:  # model and input size above are --config's family's
            listed = ", ".join(f"{key}: {name}" for key, name in families.items())
            rows.append(["Families", f"{listed} (arms of another family than {base_family}: its defaults)"])
    else:
        rows.append(["Trials", str(record.params.get("sweep.samples", len(record.children)))])
    batch, workers = _setting(record, "batch_size"), _setting(record, "num_workers")
    if batch is not None:
        rows.append(["Batch", f"{batch} per worker × {workers or 1} worker(s)"])
    lr = _setting(record, "optim.lr")
    if lr is not None:
        rows.append(["Learning rate", f"{float(lr):g}"])
    return rows


def _where(record: SweepRecord, tracking_uri: str) -> list[Block]:
    store = tracking.absolute_tracking_uri(tracking_uri)
    parent_url = tracking.run_url(store, record.experiment_id, record.parent_run_id)
    table_url = tracking.runs_table_url(store, record.experiment_id)
    text = (
        f"MLflow parent run {_link(_code(record.parent_run_id), parent_url)} ({record.status}) in store "
        f"{_code(store)}; {len(record.children)} child runs ({_link('runs table', table_url)})."
    )
    if not store.startswith(("http://", "https://")):
        text += f" The links open in the MLflow UI, started with {_code(tracking.ui_command(store))}."
    return [Block("p", text)]


def _setup(record: SweepRecord) -> list[Block]:
    blocks = [Block("h2", "Setup")]
    if record.description:
        blocks.append(Block("p", record.description))
    rows = setup_rows(record)
    if rows:
        blocks.append(Block("table", header=["Setting", "Value"], rows=rows))
    return blocks


def _best_epoch_text(child: ChildRecord) -> str:
    if child.best_epoch is None:
        return "— (last reported)"
    return str(child.best_epoch)


def runs_block(record: SweepRecord, tracking_uri: str) -> list[Block]:
    """The children: name, status, best epoch, epochs, the metric at the best epoch, run id as a link."""
    store = tracking.absolute_tracking_uri(tracking_uri)
    rows = []
    for child in record.children:
        value = child.metrics.get(record.metric)
        rows.append(
            [
                child.name,
                child.status,
                _best_epoch_text(child),
                "—" if child.epochs is None else str(child.epochs),
                "—" if value is None else f"{value:.2f}",  # AP/AR already in percent (load_sweep)
                _link(_code(child.run_id), tracking.run_url(store, record.experiment_id, child.run_id)),
            ]
        )
    unit = " (%)" if is_ap_metric(record.metric) else ""
    header = ["Run", "Status", "Best epoch", "Epochs", f"{record.metric} at best epoch{unit}", "MLflow run"]
    return [Block("h2", "Runs"), Block("table", header=header, rows=rows)]


def _paired(record: SweepRecord, rows: list[AblationRow]) -> list[Block]:
    baseline = baseline_row(rows)
    if baseline is None:
        return []
    diffs = paired_differences(record, rows)
    pairs = max((len(d.seeds) for d in diffs), default=0)
    blocks = [Block("h2", f"Paired differences to ({baseline.key})")]
    if pairs < 2:
        blocks.append(
            Block(
                "p",
                f"Each arm has at most one seed in common with ({baseline.key}): every Δ in the table is the "
                "difference of two single runs, with no interval, and says nothing about seed-to-seed "
                "noise. Run more seeds (`--seeds 3`) for paired differences with 95% intervals.",
            )
        )
        return blocks
    header, table = paired_table(rows, diffs)
    blocks.append(
        Block(
            "p",
            f"Each arm minus ({baseline.key}) on the same seed, at each run's best epoch, in percentage "
            "points: mean [95% Student t interval] over the pairs. (contains 0): the interval holds 0, so "
            f"these seeds do not show the arm differs from ({baseline.key}).",
        )
    )
    blocks.append(Block("table", header=header, rows=table))
    return blocks


def _cost(record: SweepRecord) -> list[Block]:
    """The arms' cost side by side: inference (latency, FLOPs, parameters) and training (throughput,
    hours), with what the top-down family's numbers leave out (its person detector)."""
    rows = cost_rows(record)
    if not rows:
        return []
    blocks = [Block("h2", "Cost"), Block("h3", "Inference"), Block("p", inference_note(rows))]
    header, table = inference_cost_table(rows)
    blocks.append(Block("table", header=header, rows=table))
    detector = detector_note(rows)
    if detector is not None:
        blocks.append(Block("p", detector))
    header, table = training_cost_table(rows)
    blocks += [Block("h3", "Training"), Block("p", training_note(rows))]
    blocks.append(Block("table", header=header, rows=table))
    return blocks


def _kaf(record: SweepRecord, figures: list[KafFigure], tracking_uri: str) -> list[Block]:
    if not figures:
        return []
    store = tracking.absolute_tracking_uri(tracking_uri)
    blocks = [
        Block("h2", "KAF of the KAL-family arms"),
        Block(
            "p",
            f"Each figure is the {_code(tracking.KAF_PLOT_ARTIFACT)} artifact of the arm's first seed: λ_k "
            "per keypoint and per part over the epochs (0 is MSE, 1 AWing), and the paper's Fig. 5 view, "
            "min-max normalised per epoch.",
        ),
    ]
    missing = []  # after the figures, which then sit side by side
    for figure in figures:
        if figure.run_id is None:
            missing.append(Block("p", f"{figure.label}: no run yet."))
            continue
        run = _link(
            figure.run_name or figure.run_id, tracking.run_url(store, record.experiment_id, figure.run_id)
        )
        if figure.path is None:
            missing.append(
                Block("p", f"{figure.label}: run {run} logged no {_code(tracking.KAF_PLOT_ARTIFACT)}.")
            )
        else:
            caption = f"KAF of {figure.label}: {_code(tracking.KAF_PLOT_ARTIFACT)} of run {run}"
            blocks.append(Block("figure", caption, path=figure.path, group="kaf"))
    return blocks + missing


def _ablation_blocks(record: SweepRecord, client, tracking_uri: str, tmp: Path) -> list[Block]:
    rows = ablation_rows(record)
    blocks = [
        Block("h2", "Results at the best epoch"),
        Block("p", ablation_note(rows)),
        Block("table", header=ablation_header(rows=rows), rows=ablation_table_cells(rows, has_paper(rows))),
    ]
    blocks += _paired(record, rows)
    blocks += _cost(record)
    if rows:
        caption = "Ablation bars: ours" + (
            " and the paper's, each on its own scale" if has_paper(rows) else ""
        )
        blocks.append(Block("figure", caption, path=plot_ablation(rows, tmp / "ablation.png")))
    curves = arm_curves(record)
    if curves:
        title = f"{record.metric} per epoch, mean over each arm's finished seeds"
        path = plot_learning_curves(curves, tmp / "learning_curves.png", record.metric, title)
        blocks += [Block("h2", "Learning curves"), Block("figure", title, path=path)]
    blocks += _kaf(record, kaf_figures(client, record, tmp / "kaf"), tracking_uri)
    return blocks


def _sweep_blocks(record: SweepRecord, tmp: Path) -> list[Block]:
    importances = param_importances(record)
    header, rows = sweep_table(record)
    blocks = [Block("h2", "Top configurations"), Block("p", sweep_status_line(record))]
    blocks.append(Block("table", header=header, rows=rows))
    blocks.append(Block("h2", "Parameter importances"))
    if importances:
        blocks.append(Block("p", IMPORTANCES_NOTE))
        blocks.append(Block("table", header=["Parameter", "Importance"], rows=importances_rows(importances)))
        blocks.append(
            Block(
                "figure",
                "Hyperparameter importances",
                path=plot_importances(importances, tmp / "importances.png"),
            )
        )
    else:
        blocks.append(Block("p", IMPORTANCES_NONE))
    if ranked_children(record):
        path = plot_parallel_coordinates(record, tmp / "parallel_coordinates.png")
        blocks.append(Block("figure", "Parallel coordinates of the scored trials", path=path))
    curves = trial_curves(record)
    if curves:
        title = f"{record.metric} per epoch of the top {len(curves)} trials"
        path = plot_learning_curves(curves, tmp / "learning_curves.png", record.metric, title)
        blocks += [Block("h2", "Learning curves"), Block("figure", title, path=path)]
    return blocks


def render_report(
    record: SweepRecord,
    tracking_uri: str,
    *,
    client=None,
    figures_dir: str | os.PathLike | None = None,
    figure_prefix: str = "",
) -> tuple[str, str]:
    """(Markdown, self-contained HTML) for one sweep, ablation or tune-eval.

    ``client`` reads the KAF figures (default: a client of ``tracking_uri``). With ``figures_dir`` the PNGs
    are also written there (as ``<figure_prefix><name>.png``) and the Markdown shows them by a link relative
    to the directory holding ``figures_dir``; without it the Markdown names each figure.
    """
    client = client if client is not None else tracking.make_client(tracking_uri)
    kind = {"ablate": "Ablation", TUNE_EVAL_KIND: "Evaluation-settings sweep"}.get(record.kind, "Sweep")
    title = f"{kind} {record.name}"
    with tempfile.TemporaryDirectory(prefix="fowkal_report_") as tmp_dir:
        tmp = Path(tmp_dir)
        blocks = _where(record, tracking_uri)
        if record.kind == TUNE_EVAL_KIND:
            blocks += tune_eval_blocks(record, tracking_uri, tmp)
            blocks += tune_eval_runs_block(record, tracking_uri)
        else:
            blocks += _setup(record)
            if record.kind == "ablate":
                blocks += _ablation_blocks(record, client, tracking_uri, tmp)
            else:
                blocks += _sweep_blocks(record, tmp)
            blocks += runs_block(record, tracking_uri)
        links: dict[Path, str] = {}
        if figures_dir is not None:
            out = Path(figures_dir)
            out.mkdir(parents=True, exist_ok=True)
            for block in blocks:
                if block.kind == "figure" and block.path is not None:
                    name = f"{figure_prefix}{block.path.stem}.png"
                    shutil.copyfile(block.path, out / name)
                    links[block.path] = f"{out.name}/{name}"
        markdown = blocks_markdown(title, blocks, links)
        page = html_page(title, blocks_html_body(title, blocks))
    return markdown, page


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
        curves = arm_curves(record)
        summary = table
    else:
        importances = param_importances(record)
        summary = sweep_markdown(record) + "\n\n" + importances_markdown(importances)
        if importances:
            paths.append(plot_importances(importances, out / "importances.png"))
        if ranked_children(record):
            paths.append(plot_parallel_coordinates(record, out / "parallel_coordinates.png"))
        curves = trial_curves(record)
    if curves:
        paths.append(plot_learning_curves(curves, out / "learning_curves.png", record.metric, record.metric))
    (out / "summary.md").write_text(f"# {record.name}\n\n{summary}\n")
    paths.insert(0, out / "summary.md")
    return paths


def write_report(
    target: str,
    *,
    tracking_uri: str,
    out_dir: str | os.PathLike = "reports",
    all_sweeps: bool = False,
    print_fn=print,
) -> list[Path]:
    """``fowkal report``: write ``report.md`` (its figures under ``figures/``) and ``report.html`` for an
    experiment's newest sweep (or all with ``all_sweeps``), a sweep's name or a parent run id ``target``;
    print the Markdown; returns the two paths.

    Raises:
        ReportError: nothing to report under ``target``, or a sweep name that several parents carry.
    """
    client = tracking.make_client(tracking_uri)
    parents = resolve_parent_runs(client, target, newest_only=not all_sweeps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown_parts, html_parts = [], []
    for parent in parents:
        record = load_sweep(client, parent)
        prefix = f"{parent[:8]}-" if len(parents) > 1 else ""
        md, page = render_report(
            record, tracking_uri, client=client, figures_dir=out / FIGURES_DIR, figure_prefix=prefix
        )
        markdown_parts.append(md)
        html_parts.append(page)
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
    "BASELINE_ARM_KEY",
    "AblationRow",
    "Block",
    "ChildRecord",
    "KafFigure",
    "ReportError",
    "SweepRecord",
    "ablation_figure",
    "ablation_markdown",
    "ablation_rows",
    "arm_curves",
    "best_child",
    "blocks_html_body",
    "blocks_markdown",
    "child_runs",
    "html_page",
    "inline_html",
    "kaf_figures",
    "load_sweep",
    "paired_differences",
    "param_importances",
    "plot_ablation",
    "plot_importances",
    "plot_learning_curves",
    "plot_parallel_coordinates",
    "ranked_children",
    "render_report",
    "resolve_parent_runs",
    "sweep_markdown",
    "tune_eval_runs_block",
    "tune_eval_setup_rows",
    "write_report",
    "write_sweep_outputs",
]
