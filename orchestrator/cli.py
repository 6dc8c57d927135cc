"""fowkal: whole-body pose estimation (COCO-WholeBody, 133 keypoints) with the FoWKAL loss, trained,
swept and ablated on a Ray cluster, tracked in MLflow.

Re-running the same train, tune or ablate command continues it where it stopped; --fresh starts over.
APs and ARs are in percent (0-100) everywhere: MLflow metrics, the console, fowkal eval, the reports (as the
paper; runs logged by versions before 0.2 hold fractions, which the reports convert).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from orchestrator.sweeps.settings import DEFAULT_EXPERIMENTS, SweepSettings
from orchestrator.tracking import EMBEDDED_DEFAULT_STORE, TRAIN_EXPERIMENT
from trainer.arguments import add_config_arguments
from trainer.evaluation.visualize import DRAW_KEYPOINT_THR
from trainer.topdown.flip_modes import FLIP_MODES

# Stated in the help of every command that logs or shows AP (trainer.evaluation.metric_units).
UNIT_NOTE = (
    "COCO-WholeBody AP and AR are in percent (0-100) in MLflow, on the console and in the reports;\n"
    "-1 means no labelled ground truth."
)


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (left out where there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default == [] or default == argparse.SUPPRESS
        shown = not hidden and "default" not in text
        return f"{text} (default: %(default)s)" if shown and action.option_strings else text


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from trainer.datasets.synth import write_synthetic_dataset

    ann_file = write_synthetic_dataset(args.out, num_images=args.images, seed=args.seed)
    print(f"wrote {args.images} images and {ann_file}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from orchestrator.data_check_command import data_check_command

    return data_check_command(args.ann, args.images, args.workers, args.out, progress=not args.no_progress)


def _cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.runs.train import run_training
    from trainer.config import load_config

    run_training(
        load_config(args.config, args.overrides),
        tracking_uri=args.tracking_uri,
        address=args.address,
        storage_path=args.storage_path,
        resume=not args.no_resume,
        experiment_name=args.experiment,
    )
    return 0


def sweep_settings_from_args(args: argparse.Namespace) -> SweepSettings:
    """The one ``SweepSettings`` of a ``fowkal tune`` / ``fowkal ablate`` command line."""
    return SweepSettings(
        kind=args.command,
        space_path=getattr(args, "space", None),
        arms_path=getattr(args, "arms", None),
        samples=getattr(args, "samples", SweepSettings.samples),
        seeds=getattr(args, "seeds", SweepSettings.seeds),
        max_concurrent=args.max_concurrent,
        gpus_per_trial=args.gpus_per_trial,
        grace_period=getattr(args, "grace_period", SweepSettings.grace_period),
        reduction_factor=getattr(args, "reduction_factor", SweepSettings.reduction_factor),
        search_seed=getattr(args, "seed", SweepSettings.search_seed),
        resume=args.resume,
        fresh=args.fresh,
        restart_errored=args.restart_errored,
        tracking_uri=args.tracking_uri,
        experiment_name=args.experiment,
        name=args.name,
        storage_path=args.storage_path,
        address=args.address,
        verbose=0 if args.quiet else 1,
    )


def _cmd_sweep(args: argparse.Namespace) -> int:
    """``fowkal tune`` and ``fowkal ablate`` (one engine: orchestrator.sweeps.sweep.run_sweep)."""
    from orchestrator.sweeps.sweep import run_sweep
    from trainer.config import load_config

    run_sweep(args.command, load_config(args.config, args.overrides), sweep_settings_from_args(args))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from orchestrator import tracking
    from orchestrator.reports.report import write_report

    uri = tracking.resolve_store_to_read(args.tracking_uri)
    write_report(args.experiment, tracking_uri=uri, out_dir=args.out, all_sweeps=args.all)
    return 0


# Kept for callers of the earlier name: the store read when no tracking URI is given.
DEFAULT_REPORT_STORE = EMBEDDED_DEFAULT_STORE


def _add_sweep_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    add_config_arguments(parser, help_config="base YAML config of the trials (see configs/)")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="cap on concurrent trials (default: as many as the cluster's CPUs/GPUs hold)",
    )
    parser.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="GPUs per trial, spread over the config's num_workers (default: num_workers if use_gpu, else 0)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="insist on continuing the sweep of the same name (re-running the same command continues it "
        "anyway; an error if there is none)",
    )
    parser.add_argument(
        "--fresh",
        "--no-resume",
        dest="fresh",
        action="store_true",
        help="start a new sweep (its name gets a time stamp) instead of continuing the one of the same name",
    )
    parser.add_argument(
        "--restart-errored", action="store_true", help="with --resume: run errored trials again"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db)",
    )
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENTS[kind], help="MLflow experiment")
    parser.add_argument(
        "--name",
        default=None,
        help="sweep name (default: <config name>-<kind>-<hash of what defines the sweep: the config, the "
        "definition file, the TPE seed and ASHA settings, or the seeds>)",
    )
    parser.add_argument(
        "--storage-path",
        default=None,
        help="where the sweep's Tune state and the trials' checkpoints live, shared by all nodes: a "
        "directory (NFS) or a filesystem URI such as s3://bucket/prefix; trial logs and reports stay under "
        "<output_dir>/sweeps (default: <output_dir>/sweeps)",
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a new local Ray)"
    )
    parser.add_argument("--quiet", "--no-progress", action="store_true", help="no live progress table")
    parser.set_defaults(func=_cmd_sweep)


def _cmd_eval(args: argparse.Namespace) -> int:
    from orchestrator.evaluation.eval_command import run_eval

    run_eval(
        ann_file=args.ann,
        image_dir=args.images,
        checkpoint=args.checkpoint,
        run_id=args.run,
        results_file=args.results,
        det_file=args.det_file,
        det_score_thr=args.det_score_thr,
        flip_test=not args.no_flip,
        batch_size=args.batch,
        workers=args.workers,
        gpus=args.gpus,
        out=args.out,
        tracking_uri=args.tracking_uri,
        progress=not args.no_progress,
        experiment=args.experiment,
        flip_mode=args.flip_mode,
        overrides=args.eval_overrides,
    )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from orchestrator.evaluation.show import run_show

    run_show(
        sources=args.models,
        ann_file=args.ann,
        image_dir=args.images,
        out_dir=args.out,
        n=args.n,
        log=args.log,
        tracking_uri=args.tracking_uri,
        heatmaps=args.heatmaps,
        instance=args.instance,
        kpt_thr=args.kpt_thr,
        top_k=args.top_k,
        flip_test=not args.no_flip,
        experiment=args.experiment,
    )
    return 0


def _cmd_tune_eval(args: argparse.Namespace) -> int:
    """``fowkal tune-eval`` (orchestrator/evaluation/tune_eval.py): TPE over the evaluation settings of a
    checkpoint."""
    from orchestrator.evaluation.tune_eval import run_tune_eval

    run_tune_eval(
        run=args.run,
        checkpoint=args.checkpoint,
        ann_file=args.ann,
        image_dir=args.images,
        det_file=args.det_file,
        space_path=args.space,
        samples=args.samples,
        seed=args.seed,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        storage_path=args.storage_path,
        max_concurrent=args.max_concurrent,
        address=args.address,
        holdout=args.holdout,
        verbose=0 if args.quiet else 1,
    )
    return 0


# The model and data arguments of eval, show and tune-eval, written once.
RUN_HELP = "MLflow run (its best checkpoint): a run id, a run name (a-mse-s0) or SWEEP/NAME"
CHECKPOINT_HELP = "checkpoint .pt file or Ray checkpoint directory"
EXPERIMENT_LOOKUP_HELP = "look a --run name up in this MLflow experiment only"


def _add_data_arguments(parser, images_required: bool, det_file: bool = True) -> None:
    """--ann, --images and (unless ``det_file=False``) --det-file."""
    parser.add_argument("--ann", required=True, help="COCO-WholeBody annotation JSON")
    parser.add_argument("--images", required=images_required, default=None, help="image directory")
    if det_file:
        parser.add_argument("--det-file", default=None, help="person detections JSON (default: GT boxes)")


def _add_tune_eval(sub) -> None:
    """The ``tune-eval`` subcommand."""
    parser = sub.add_parser(
        "tune-eval",
        help="Optuna TPE over the evaluation settings of one checkpoint (top-down: flip mode, DARK kernel, "
        "rescoring, OKS-NMS, detection threshold; KAPAO: its thresholds, fusion, TTA): the network runs "
        "once, each Ray Tune trial only decodes and scores",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", default=None, metavar="RUN", help=RUN_HELP)
    source.add_argument("--checkpoint", default=None, metavar="CKPT", help=CHECKPOINT_HELP)
    _add_data_arguments(parser, images_required=True)
    parser.add_argument(
        "--space",
        required=True,
        help="search space (search_spaces/eval_space.yaml; KAPAO: kapao_eval_space.yaml)",
    )
    parser.add_argument("--samples", type=int, required=True, help="trials (the first: the defaults)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the run's store / "
        "sqlite:///<output_dir>/mlflow.db)",
    )
    parser.add_argument(
        "--experiment",
        default=None,
        help="MLflow experiment of a --checkpoint's sweep (default: fowkal-tune-eval); with --run, where to "
        "look the run name up (the sweep goes to the run's experiment)",
    )
    parser.add_argument(
        "--storage-path",
        default=None,
        help="directory of the sweep and the heatmap cache (default: <output_dir>/tune_eval)",
    )
    parser.add_argument("--max-concurrent", type=int, default=None, help="cap on concurrent trials")
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a new local Ray)"
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=None,
        metavar="F",
        help="hold out this fraction of the images (0 < F < 1, a split by image id seeded by --seed): the "
        "trials tune on the rest, the best settings are then scored on the held-out part (default: none, "
        "tune and score on every image)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=_cmd_tune_eval)


def _add_eval_and_show(sub) -> None:
    """The ``eval`` and ``show`` subcommands (orchestrator/evaluation/eval_command.py,
    orchestrator/evaluation/show.py)."""
    tracking_help = (
        f"MLflow tracking URI of --run (default: $MLFLOW_TRACKING_URI, else {EMBEDDED_DEFAULT_STORE})"
    )
    evaluate = sub.add_parser(
        "eval",
        help="COCO-WholeBody AP/AR of a checkpoint or MLflow run (flip test, DARK, rescoring, OKS-NMS)",
    )
    evaluate.add_argument("--checkpoint", default=None, metavar="CKPT", help=CHECKPOINT_HELP)
    evaluate.add_argument("--run", default=None, metavar="RUN", help=RUN_HELP)
    evaluate.add_argument("--experiment", default=None, help=EXPERIMENT_LOOKUP_HELP)
    evaluate.add_argument(
        "--results", default=None, metavar="FILE", help="score this results file instead of running a model"
    )
    _add_data_arguments(evaluate, images_required=False)
    evaluate.add_argument(
        "--det-score-thr",
        type=float,
        default=None,
        help="keep detections scoring >= this (default: the run config's data.det_score_thr)",
    )
    evaluate.add_argument(
        "--set",
        dest="eval_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an evaluation setting on top of the checkpoint's config, e.g. eval.nms_thr=0.7 (repeatable; "
        "eval.* keys and data.det_score_thr, as fowkal tune-eval's best_eval.yaml lists them)",
    )
    evaluate.add_argument("--no-flip", action="store_true", help="disable the flip test")
    evaluate.add_argument(
        "--flip-mode",
        choices=FLIP_MODES,
        default=None,
        help="how the mirrored heatmaps are put back: MMPose's one-pixel shift, none, or exact (about the "
        "input's pixel grid) (default: the run config's eval.flip_mode)",
    )
    evaluate.add_argument("--batch", type=int, default=None, help="batch size (default: data.val_batch_size)")
    evaluate.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (default: data.loader_workers)"
    )
    evaluate.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="0 = CPU, 1 = cuda:0, N > 1 = DataParallel over N GPUs (default: 1 if CUDA is available)",
    )
    evaluate.add_argument(
        "--out", default=None, help="results file to write (default: wholebody_results.json)"
    )
    evaluate.add_argument("--tracking-uri", default=None, help=tracking_help)
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_cmd_eval)

    show = sub.add_parser(
        "show",
        help="draw predicted skeletons (two runs side by side, per-part OKS) or one instance's heatmaps",
    )
    show.add_argument(
        "--run",
        dest="models",
        action="append",
        type=lambda value: ("run", value),
        metavar="RUN",
        help=RUN_HELP + " (give two --run/--checkpoint to compare; left to right)",
    )
    show.add_argument("--experiment", default=None, help=EXPERIMENT_LOOKUP_HELP)
    show.add_argument(
        "--checkpoint",
        dest="models",
        action="append",
        type=lambda value: ("checkpoint", value),
        metavar="CKPT",
        help=CHECKPOINT_HELP + ", in place of a --run",
    )
    _add_data_arguments(show, images_required=True, det_file=False)
    show.add_argument("--out", required=True, help="output directory for the PNGs")
    show.add_argument("--n", type=int, default=16, help="number of images")
    show.add_argument("--log", action="store_true", help="log the PNGs as MLflow artifacts of the run(s)")
    show.add_argument("--tracking-uri", default=None, help=tracking_help)
    show.add_argument(
        "--heatmaps",
        default=None,
        metavar="PART",
        help="heatmap view of one instance: body, foot, face, hand, lefthand or righthand",
    )
    show.add_argument(
        "--instance", type=int, default=None, metavar="ANN_ID", help="annotation id for --heatmaps"
    )
    show.add_argument(
        "--kpt-thr", type=float, default=DRAW_KEYPOINT_THR, help="draw keypoints scoring >= this"
    )
    show.add_argument("--top-k", type=int, default=5, help="keypoints that moved most to mark (two runs)")
    show.add_argument("--no-flip", action="store_true", help="disable the flip test")
    show.set_defaults(func=_cmd_show, models=None)


EXAMPLES = """examples:
  fowkal train  --config configs/smoke.yaml --set loss.variant=mse --set epochs=2
  fowkal ablate --config configs/smoke.yaml --arms search_spaces/ablation_paper.yaml --seeds 3
  fowkal tune   --config configs/smoke.yaml --space search_spaces/fowkal_loss.yaml --samples 16
  fowkal report fowkal-ablate --out runs/smoke/report
  fowkal eval   --run a-mse-s0 --ann ANN.json --images DIR [--det-file DETS.json]
  fowkal show   --run a-mse-s0 --run f-fowkal-s0 --ann ANN.json --images DIR --out figs/
on a cluster: ray job submit --address http://HEAD:8265 --working-dir . -- fowkal train ... (see README)
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fowkal")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fowkal", description=__doc__, epilog=EXAMPLES, formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"fowkal {_version()}")
    subparser_class = functools.partial(argparse.ArgumentParser, formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=subparser_class)

    data = sub.add_parser("data", help="data set utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=subparser_class)
    synth = data_sub.add_parser("synth", help="generate a synthetic COCO-WholeBody-format data set")
    synth.add_argument("--out", required=True, help="output directory (images/ and annotations.json)")
    synth.add_argument("--images", type=int, default=64, help="number of images")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")
    synth.set_defaults(func=_cmd_data_synth)
    check = data_sub.add_parser(
        "check",
        help="validate an annotation file as the commands do, then decode every image it names in parallel "
        "processes; report missing, unreadable, truncated and wrongly sized images",
        description="Reads the annotation file with the reader every command uses (the same errors), then\n"
        "decodes every image it names as the data sets do (cv2.imread) in --workers processes, with a\n"
        "progress line on stderr. Reported, printed and written to --out as report.txt and report.json:\n"
        "missing, unreadable, truncated (no end marker and a strict decode fails) and size mismatching the\n"
        "annotation's width x height.\n\n"
        "exit status: 0 clean; 1 the data has problems (an invalid annotation file or any image problem);\n"
        "2 a usage error (no such annotation file or image directory, --workers < 1).",
    )
    check.add_argument("--ann", required=True, help="COCO-WholeBody annotation JSON")
    check.add_argument("--images", required=True, help="image directory (the file names are relative to it)")
    check.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: the machine's CPU count)"
    )
    check.add_argument(
        "--out",
        default=None,
        help="directory for report.txt and report.json, created (default: ./data_check)",
    )
    check.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    check.set_defaults(func=_cmd_data_check)

    train = sub.add_parser(
        "train",
        help="train one model under Ray Train, tracked in MLflow (re-running the same command resumes)",
    )
    add_config_arguments(train)
    train.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db)",
    )
    train.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a new local Ray)"
    )
    train.add_argument(
        "--storage-path",
        default=None,
        help="checkpoint storage shared by all nodes: a directory (NFS) or a filesystem URI such as "
        "s3://bucket/prefix (default: <output_dir>/ray_results)",
    )
    train.add_argument("--experiment", default=TRAIN_EXPERIMENT, help="MLflow experiment name")
    train.add_argument(
        "--no-resume",
        "--fresh",
        dest="no_resume",
        action="store_true",
        help="start a new run (a time-stamped name) instead of continuing the same config's run",
    )
    train.set_defaults(func=_cmd_train)

    tune = sub.add_parser(
        "tune", help="hyperparameter sweep: Ray Tune + Optuna TPE + ASHA, one Ray Train run per trial"
    )
    tune.add_argument("--space", required=True, help="search-space YAML (see search_spaces/)")
    tune.add_argument("--samples", type=int, default=SweepSettings.samples, help="number of trials")
    tune.add_argument(
        "--grace-period",
        type=int,
        default=SweepSettings.grace_period,
        help="ASHA: epochs before a trial can stop",
    )
    tune.add_argument(
        "--reduction-factor",
        type=int,
        default=SweepSettings.reduction_factor,
        help="ASHA: keep 1/this at each rung",
    )
    tune.add_argument("--seed", type=int, default=SweepSettings.search_seed, help="seed of the TPE sampler")
    _add_sweep_arguments(tune, "tune")

    ablate = sub.add_parser(
        "ablate", help="the paper's ablation: every arm x seed as Ray Tune trials, then the ablation table"
    )
    ablate.add_argument(
        "--arms", required=True, help="ablation arms YAML (search_spaces/ablation_paper.yaml)"
    )
    ablate.add_argument(
        "--seeds", type=int, default=SweepSettings.seeds, help="seeds per arm: config seed, seed + 1, ..."
    )
    _add_sweep_arguments(ablate, "ablate")

    report = sub.add_parser(
        "report", help="Markdown + HTML report of a sweep, an ablation or a tune-eval, read from MLflow"
    )
    report.add_argument(
        "experiment",
        help="an MLflow experiment name (its newest sweep), a sweep's name, or a parent run id",
    )
    report.add_argument(
        "--tracking-uri",
        default=None,
        help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {DEFAULT_REPORT_STORE})",
    )
    report.add_argument("--out", default="reports", help="directory for report.md and report.html")
    report.add_argument("--all", action="store_true", help="every sweep of the experiment, newest first")
    report.set_defaults(func=_cmd_report)
    _add_eval_and_show(sub)
    _add_tune_eval(sub)
    for name in ("train", "tune", "ablate", "report", "eval", "tune-eval"):
        sub.choices[name].epilog = UNIT_NOTE
    return parser


def _tracking_uri_used(args: argparse.Namespace) -> str | None:
    """The tracking URI a command line will use when it is a server (its flag, else ``MLFLOW_TRACKING_URI``);
    None for a command that uses none (``eval``/``show`` of a checkpoint file, ``data``)."""
    if not hasattr(args, "tracking_uri"):
        return None
    models = getattr(args, "models", None) or []
    uses_runs = getattr(args, "run", None) is not None or any(kind == "run" for kind, _ in models)
    if args.command in ("eval", "show") and not (uses_runs or getattr(args, "log", False)):
        return None
    return (args.tracking_uri or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip() or None


def main(argv: list[str] | None = None) -> int:
    """Run a ``fowkal`` command line; an error ends it as ``orchestrator.user_errors.report_error`` says (one
    line and exit status 2 for a user's error, a traceback for a bug)."""
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    try:
        uri = _tracking_uri_used(args)
        if uri is not None:
            from orchestrator.tracking import check_tracking_server

            check_tracking_server(uri)  # answers, and lets these credentials in, before Ray starts
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as err:
        from orchestrator.user_errors import report_error

        status = report_error(command, err)
        if status is None:
            raise
        return status


if __name__ == "__main__":
    sys.exit(main())
