"""``fowkal eval``: evaluate a checkpoint the paper's way and print the COCO-WholeBody table.

The model side (checkpoint -> model with its own config, inference, scoring) is ``trainer.checkpoint`` and
``trainer.topdown.inference``; MLflow runs and their checkpoints are found by
``orchestrator.evaluation.run_lookup`` (its names
are importable from here as before); this module prints and logs back.

With ``--run RUN_ID``
    The run's ``best_checkpoint`` artifact (how ``orchestrator/runs/train.py`` logs the best checkpoint) and
    its
    ``config.yaml`` are downloaded to a temporary directory; after evaluation the metrics are logged to that
    run as ``eval/<part>_<stat>`` in percent (``trainer.evaluation.metric_units``; e.g. ``eval/wholebody_AP``,
    ``eval/hand_AP``; step = the checkpoint's epoch), the results file as the artifact
    ``eval/<file name>``, and the evaluation settings as ``eval.*`` tags. The store is
    ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``.

Protocol
    Top-down inference on the ground-truth boxes, or with ``--det-file`` on person detections with
    ``score >= --det-score-thr``; flip test (unless ``--no-flip``) and DARK decoding; instance rescoring and
    per-image OKS-NMS (``trainer.evaluation.wholebody.detections_to_results``, applied to GT boxes as well,
    as MMPose and
    the training loop's validation do, so ``fowkal eval`` reproduces ``val/wholebody_AP``); xtcocotools
    COCO-WholeBody AP/AR per part (``trainer.evaluation.wholebody.evaluate_wholebody``). ``--results FILE``
    scores an
    existing results file instead of running a model.

Devices and workers: ``--gpus`` and ``--workers`` as ``trainer.topdown.inference.select_device`` and the run's
``data.loader_workers``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from orchestrator import tracking
from orchestrator.evaluation.run_lookup import download_run_checkpoint, get_run, store_of_run
from trainer.checkpoint import CheckpointMismatchError, EvalError, LoadedCheckpoint, load_checkpoint_model
from trainer.evaluation.metric_units import UNIT_LABEL, metrics_to_percent
from trainer.evaluation.model_eval import EvalOutcome, apply_eval_settings, evaluate_model, score_results_file
from trainer.families import family_of
from trainer.topdown.codec import FLIP_MODES

EVAL_PREFIX = "eval/"
DEFAULT_RESULTS_FILE = "wholebody_results.json"

# Rows of the printed table: (label, part key of evaluate_wholebody).
TABLE_ROWS: tuple[tuple[str, str], ...] = (
    ("whole-body", "wholebody"),
    ("body", "body"),
    ("foot", "foot"),
    ("face", "face"),
    ("hand", "hand"),
)


def format_table(metrics: dict[str, float]) -> str:
    """The COCO-WholeBody table: AP, AP50, AP75, AR per row (whole-body, body, foot, face, hand), in the
    metrics' own unit (percent as ``run_eval`` passes them)."""

    def cell(key: str) -> str:
        value = metrics.get(key)
        return "    -" if value is None or value < 0 else f"{value:.2f}"

    lines = [f"{'':<11} {'AP':>6} {'AP50':>6} {'AP75':>6} {'AR':>6}"]
    for label, part in TABLE_ROWS:
        lines.append(
            f"{label:<11} "
            + " ".join(f"{cell(f'{part}/{stat}'):>6}" for stat in ("AP", "AP50", "AP75", "AR"))
        )
    return "\n".join(lines)


def eval_metric_name(key: str) -> str:
    """``wholebody/AP`` -> ``eval/wholebody_AP`` (the MLflow name of an ``evaluate_wholebody`` key)."""
    return EVAL_PREFIX + key.replace("/", "_")


def log_eval_to_run(
    client,
    run_id: str,
    metrics: dict[str, float],
    results_file: Path,
    tags: dict[str, str],
    step: int = 0,
) -> dict[str, float]:
    """Log ``eval/*`` metrics, the results file (artifact ``eval/<name>``) and ``eval.*`` tags to a run."""
    logged = tracking.log_epoch_metrics(
        run_id, {eval_metric_name(k): v for k, v in metrics.items()}, step, client=client
    )
    client.log_artifact(run_id, str(results_file), EVAL_PREFIX.rstrip("/"))
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return logged


def run_eval(
    *,
    ann_file: str,
    image_dir: str | None = None,
    checkpoint: str | None = None,
    run_id: str | None = None,
    results_file: str | None = None,
    det_file: str | None = None,
    det_score_thr: float | None = None,
    flip_test: bool = True,
    batch_size: int | None = None,
    workers: int | None = None,
    gpus: int | None = None,
    out: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
    experiment: str | None = None,
    flip_mode: str | None = None,
    overrides: Sequence[str] = (),
    print_fn: Callable[[str], None] = print,
) -> dict[str, float]:
    """What ``fowkal eval`` does (see the module docstring); returns the ``evaluate_wholebody`` metrics in
    percent (``trainer.evaluation.metric_units``), as printed and logged.

    Exactly one of ``checkpoint`` and ``run_id`` names the model, or ``results_file`` an existing results
    file to score (with ``run_id`` it is then only the run to log to).
    """
    if checkpoint is not None and run_id is not None:
        raise EvalError("pass either --checkpoint or --run, not both")
    if results_file is not None and checkpoint is not None:
        raise EvalError("--results scores an existing results file: do not pass --checkpoint with it")
    if results_file is None and checkpoint is None and run_id is None:
        raise EvalError("pass --checkpoint CKPT or --run RUN_ID (or --results FILE to score a results file)")
    if results_file is None and image_dir is None:
        raise EvalError("--images DIR is required to run a model")
    if det_score_thr is not None and det_score_thr < 0:
        raise EvalError(f"--det-score-thr must be >= 0, got {det_score_thr}")
    if flip_mode is not None and flip_mode not in FLIP_MODES:
        raise EvalError(f"--flip-mode must be one of {', '.join(FLIP_MODES)}, got {flip_mode!r}")

    client, uri = None, None
    if run_id is not None:
        uri = store_of_run(tracking_uri)
        client = tracking.make_client(uri)
        run_id = get_run(client, run_id, uri, experiment).info.run_id  # fail early on an unknown run

    epoch = None
    with tempfile.TemporaryDirectory(prefix="fowkal_eval_") as scratch:
        if results_file is not None:
            print_fn(f"scoring results file {results_file} against {ann_file}")
            outcome = score_results_file(results_file, ann_file)
            boxes = f"results file {results_file}"
        else:
            if run_id is not None:
                loaded = download_run_checkpoint(client, run_id, uri, scratch, experiment)
                print_fn(f"MLflow run {run_id}: checkpoint {loaded.checkpoint_path.name}")
            else:
                loaded = load_checkpoint_model(checkpoint)
                print_fn(f"checkpoint {loaded.checkpoint_path}")
            epoch = loaded.epoch
            # --set eval.<key>=...: evaluation settings on top of the checkpoint's config
            loaded.config = config = apply_eval_settings(loaded.config, overrides)
            if det_score_thr is None:
                det_score_thr = getattr(config.data, "det_score_thr", None)
            family = family_of(config)
            print_fn(
                f"{family.name}: {family.describe_inference(config)}; config from {loaded.config_source}"
            )
            boxes, protocol = family.describe_protocol(config, flip_test, det_file, det_score_thr)
            outcome = evaluate_model(
                loaded,
                ann_file,
                image_dir,
                det_file=det_file,
                det_score_thr=det_score_thr,
                flip_test=flip_test,
                flip_mode=flip_mode,
                batch_size=batch_size,
                workers=workers,
                gpus=gpus,
                progress=progress,
            )
        out_path = Path(out if out is not None else DEFAULT_RESULTS_FILE)
        if results_file is None or (out is not None and Path(out).resolve() != Path(results_file).resolve()):
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(outcome.results))
            print_fn(f"wrote {len(outcome.results)} results to {out_path}")
        else:
            out_path = Path(results_file)
        metrics = metrics_to_percent(outcome.metrics)
        how = "" if results_file is not None else f", {protocol}"
        print_fn(f"COCO-WholeBody on {ann_file} ({boxes}: {outcome.num_boxes}{how}); {UNIT_LABEL}")
        print_fn(format_table(metrics))
        if client is not None:
            tags = {
                "eval.ann_file": str(ann_file),
                "eval.boxes": boxes,
                "eval.flip_test": str(bool(flip_test)) if results_file is None else "n/a",
                "eval.flip_mode": (flip_mode or getattr(config.eval, "flip_mode", "n/a"))
                if results_file is None
                else "n/a",
            }
            if results_file is None:
                tags.update({f"eval.{k}": str(v) for k, v in asdict(config.eval).items() if k != "flip_mode"})
            log_eval_to_run(client, run_id, metrics, out_path, tags, step=epoch or 0)
            print_fn(f"logged {EVAL_PREFIX}* metrics and {EVAL_PREFIX}{out_path.name} to MLflow run {run_id}")
    return metrics


__all__ = [
    "CheckpointMismatchError",
    "EVAL_PREFIX",
    "EvalError",
    "EvalOutcome",
    "LoadedCheckpoint",
    "download_run_checkpoint",
    "eval_metric_name",
    "format_table",
    "get_run",
    "log_eval_to_run",
    "run_eval",
    "store_of_run",
]
