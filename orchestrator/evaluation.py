"""``fowkal eval``: evaluate a checkpoint the paper's way and print the COCO-WholeBody table.

What a checkpoint is and where its config comes from
    A checkpoint is what ``trainer.loop.train_loop_per_worker`` writes: a ``.pt`` file (``best.pt``,
    ``latest.pt``), a Ray checkpoint directory holding ``checkpoint.pt`` or a plain run's ``checkpoints``
    directory (``best.pt`` is taken): a dict with ``model`` (the state dict) and ``config``
    (``config_to_dict`` of the run's ``TrainConfig``). A bare state dict is accepted too.
    The model is rebuilt from the run's own config (backbone; KAF head when the loss variant has one; input
    and heatmap size for the crops), looked up in this order:

    1. the ``config`` stored in the checkpoint;
    2. a ``config.yaml`` in the checkpoint's directory or its parent (a run's downloaded MLflow artifacts
       are laid out as ``config.yaml`` + ``best_checkpoint/checkpoint.pt``; a plain run as
       ``<output_dir>/checkpoints/best.pt``);
    3. with ``--run``, the MLflow run's ``config.yaml`` artifact (``fowkal train`` logs it).

    The message printed at the start says which one was used.

With ``--run RUN_ID``
    The run's ``best_checkpoint`` artifact (how ``orchestrator/train.py`` logs the best checkpoint) and its
    ``config.yaml`` are downloaded to a temporary directory; after evaluation the metrics are logged to that
    run as ``eval/<part>_<stat>`` (e.g. ``eval/wholebody_AP``, ``eval/hand_AP``; step = the checkpoint's
    epoch), the results file as the artifact ``eval/<file name>``, and the evaluation settings as ``eval.*``
    tags. The store is ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``.

Protocol
    Top-down inference on the ground-truth boxes, or with ``--det-file`` on person detections with
    ``score >= --det-score-thr``; flip test (unless ``--no-flip``) and DARK decoding; instance rescoring and
    per-image OKS-NMS (``trainer.evaluate.detections_to_results``, applied to GT boxes as well, as MMPose and
    the training loop's validation do, so ``fowkal eval`` reproduces ``val/wholebody_AP``); xtcocotools
    COCO-WholeBody AP/AR per part (``trainer.evaluate.evaluate_wholebody``). ``--results FILE`` scores an
    existing results file instead of running a model.

Devices and workers
    DataLoader worker processes read and warp the images (``--workers``, default the run's
    ``data.loader_workers``) while the model runs; a tqdm progress bar shows the batches. ``--gpus 0`` runs on
    the CPU, ``--gpus 1`` on ``cuda:0`` (the default when CUDA is available), ``--gpus N`` > 1 splits every
    batch over ``cuda:0..N-1`` with ``torch.nn.DataParallel`` (one process; simple, and the data loading,
    not the model, is the usual bottleneck of top-down evaluation).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CONFIG_ARTIFACT = "config.yaml"  # orchestrator/train.py: tracking.log_config_yaml(run_id, ...)
CHECKPOINT_ARTIFACT_DIR = "best_checkpoint"  # orchestrator/train.py: the best Ray checkpoint directory
CHECKPOINT_FILE = "checkpoint.pt"  # trainer.loop.CHECKPOINT_FILE, inside a Ray checkpoint directory
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


class EvalError(ValueError):
    """Bad input to ``fowkal eval`` / ``fowkal show``; the message names the file, run or argument."""


class CheckpointMismatchError(EvalError):
    """The checkpoint's weights do not fit the model its config describes (architecture / keypoint count)."""


@dataclass
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint, with the run config it was built from."""

    model: Any  # trainer.model.PoseModel, in eval mode on the CPU
    config: Any  # trainer.config.TrainConfig
    checkpoint_path: Path
    config_source: str
    epoch: int | None
    label: str


@dataclass
class EvalOutcome:
    """What ``evaluate_model`` returns."""

    metrics: dict[str, float]
    results: list[dict]
    num_boxes: int


# ----------------------------------------------------------------------------------------------------------
# checkpoints and runs


def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        # A Ray checkpoint directory, or a plain run's <output_dir>/checkpoints (best before latest).
        for name in (CHECKPOINT_FILE, "best.pt", "latest.pt"):
            if (path / name).is_file():
                return path / name
        raise EvalError(
            f"checkpoint directory {str(path)!r} holds no {CHECKPOINT_FILE}, best.pt or latest.pt"
        )
    if not path.is_file():
        raise EvalError(f"checkpoint {str(path)!r} does not exist")
    return path


def check_state_dict_fits(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], checkpoint: Path, what: str
):
    """Raise ``CheckpointMismatchError`` naming the checkpoint and the first mismatching keys and shapes."""
    expected = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if not (mismatched or missing or unexpected):
        return
    lines = [f"checkpoint {str(checkpoint)!r} does not fit {what}:"]
    for label, keys in (
        ("shape mismatches", mismatched),
        ("missing keys", missing),
        ("unexpected keys", unexpected),
    ):
        if keys:
            lines.append(f"  {len(keys)} {label}, first: {'; '.join(keys[:5])}")
    lines.append(
        "  (a checkpoint of another backbone or keypoint count, or a config that is not the checkpoint's own)"
    )
    raise CheckpointMismatchError("\n".join(lines))


def _read_config_yaml(path: Path, origin: str):
    import yaml

    from trainer.config import config_from_dict

    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise EvalError(f"could not read the run config {str(path)!r}: {err}") from err
    return config_from_dict(values if values is not None else {}, source=f"{path} ({origin})")


def load_checkpoint_model(
    checkpoint: str | os.PathLike, config_file: str | os.PathLike | None = None, config_origin: str = ""
) -> LoadedCheckpoint:
    """Rebuild the pose model of a training checkpoint with its own config (see the module docstring).

    Args:
        checkpoint: a ``.pt`` file or a Ray checkpoint directory (``checkpoint.pt`` inside).
        config_file: a config YAML to use when the checkpoint holds no config (e.g. a run's artifact);
            looked for beside the checkpoint when None.
        config_origin: where ``config_file`` came from, for messages.

    Raises:
        EvalError: missing or unreadable checkpoint, no config found.
        CheckpointMismatchError: weights of another architecture or keypoint count.
    """
    from trainer.config import ConfigError, config_from_dict
    from trainer.keypoints import NUM_KEYPOINTS
    from trainer.losses import LOSS_VARIANTS
    from trainer.model import build_pose_model

    path = _checkpoint_file(Path(checkpoint))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or non-checkpoint files
        raise EvalError(f"could not read checkpoint {str(path)!r}: {err}") from err
    if not isinstance(state, dict):
        raise EvalError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a dict")
    if isinstance(state.get("model"), dict):
        weights = state["model"]
    elif state and all(isinstance(v, torch.Tensor) for v in state.values()):
        weights, state = state, {}
    else:
        raise EvalError(
            f"checkpoint {str(path)!r} has no 'model' state dict (keys: {sorted(map(str, state))[:10]})"
        )
    weights = {str(k).removeprefix("module."): v for k, v in weights.items()}

    try:
        if isinstance(state.get("config"), dict):
            config = config_from_dict(state["config"], source=f"{path} (stored config)")
            source = "the config stored in the checkpoint"
        else:
            candidates = [Path(config_file)] if config_file is not None else []
            candidates += [path.parent / CONFIG_ARTIFACT, path.parent.parent / CONFIG_ARTIFACT]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise EvalError(
                    f"checkpoint {str(path)!r} holds no config and no {CONFIG_ARTIFACT} was found "
                    f"(looked at {', '.join(str(c) for c in candidates)})"
                )
            origin = config_origin if config_file is not None and found == Path(config_file) else "beside it"
            config = _read_config_yaml(found, origin or "config file")
            source = f"{found} ({origin or 'config file'})"
    except ConfigError as err:
        raise EvalError(f"checkpoint {str(path)!r}: its config is not valid: {err}") from err

    with_kaf = LOSS_VARIANTS[config.loss.variant].needs_kaf
    model = build_pose_model(config.model.backbone, NUM_KEYPOINTS, with_kaf=with_kaf)
    what = (
        f"backbone {config.model.backbone!r} with {NUM_KEYPOINTS} keypoints"
        + (" and a KAF head" if with_kaf else "")
        + f" (loss variant {config.loss.variant!r}, config from {source})"
    )
    check_state_dict_fits(model, weights, path, what)
    model.load_state_dict(weights, strict=True)
    model.eval()
    epoch = state.get("epoch")
    return LoadedCheckpoint(
        model=model,
        config=config,
        checkpoint_path=path,
        config_source=source,
        epoch=int(epoch) if isinstance(epoch, int | float) else None,
        label=f"{config.name} ({config.loss.variant})",
    )


def resolve_tracking_uri(cli_value: str | None) -> str:
    """The store of ``--run``: ``tracking.resolve_store_to_read`` (flag, ``MLFLOW_TRACKING_URI``, then the
    embedded default's ``runs/smoke/mlflow.db``), its error as an ``EvalError``."""
    from orchestrator import tracking

    try:
        return tracking.resolve_store_to_read(cli_value)
    except FileNotFoundError as err:
        raise EvalError(f"--run: {err}") from err


def get_run(client, run_id: str, tracking_uri: str):
    """The MLflow run ``run_id``; ``EvalError`` naming the id and the store when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        raise EvalError(f"MLflow run {run_id!r} not found in {tracking_uri}: {err.message}") from err


def download_run_checkpoint(
    client, run_id: str, tracking_uri: str, dest: str | os.PathLike
) -> LoadedCheckpoint:
    """Download a run's ``best_checkpoint`` (and ``config.yaml``) artifacts to ``dest`` and load the model."""
    run = get_run(client, run_id, tracking_uri)
    names = [info.path for info in client.list_artifacts(run_id)]
    if CHECKPOINT_ARTIFACT_DIR not in names:
        raise EvalError(
            f"MLflow run {run_id!r} ({run.info.run_name}, status {run.info.status}) has no "
            f"{CHECKPOINT_ARTIFACT_DIR!r} artifact (artifacts: {names or 'none'}); fowkal train logs it "
            "once an evaluation epoch has produced a best checkpoint"
        )
    checkpoint_dir = client.download_artifacts(run_id, CHECKPOINT_ARTIFACT_DIR, str(dest))
    config_file = None
    if CONFIG_ARTIFACT in names:
        config_file = client.download_artifacts(run_id, CONFIG_ARTIFACT, str(dest))
    loaded = load_checkpoint_model(
        checkpoint_dir, config_file, config_origin=f"artifact {CONFIG_ARTIFACT} of MLflow run {run_id}"
    )
    loaded.label = f"{run.info.run_name or run_id} ({loaded.config.loss.variant})"
    return loaded


# ----------------------------------------------------------------------------------------------------------
# inference and scoring


def select_device(gpus: int | None) -> tuple[torch.device, list[int]]:
    """``(device, device_ids)`` for ``--gpus``: None = 1 GPU when CUDA is available else CPU, 0 = CPU."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus is None:
        gpus = 1 if available else 0
    if gpus < 0:
        raise EvalError(f"--gpus must be >= 0, got {gpus}")
    if gpus == 0:
        return torch.device("cpu"), []
    if gpus > available:
        raise EvalError(f"--gpus {gpus} asked for, but torch sees {available} CUDA device(s)")
    return torch.device("cuda:0"), list(range(gpus))


def with_progress(iterable, total: int, description: str, enabled: bool = True):
    """Iterate with a tqdm bar on stderr (a plain counter every ~10% when tqdm is missing)."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm import tqdm
    except ImportError:
        step = max(1, total // 10)
        for index, item in enumerate(iterable, 1):
            if index % step == 0 or index == total:
                print(f"{description}: {index}/{total}", flush=True)
            yield item
        return
    yield from tqdm(iterable, total=total, desc=description, unit="batch", dynamic_ncols=True)


def build_eval_dataset(config, ann_file, image_dir, det_file=None, det_score_thr: float = 0.0):
    """The test-mode ``WholeBodyTopDownDataset`` with the run's pipeline; errors name the missing path."""
    from trainer.data import WholeBodyTopDownDataset

    if not Path(ann_file).is_file():
        raise EvalError(f"annotation file {str(ann_file)!r} does not exist (--ann)")
    if not Path(image_dir).is_dir():
        raise EvalError(f"image directory {str(image_dir)!r} does not exist (--images)")
    if det_file is not None and not Path(det_file).is_file():
        raise EvalError(f"detection file {str(det_file)!r} does not exist (--det-file)")
    return WholeBodyTopDownDataset(
        ann_file,
        image_dir,
        config=config.data.pipeline,
        train=False,
        det_file=det_file,
        det_score_thr=det_score_thr,
    )


def evaluate_model(
    loaded: LoadedCheckpoint,
    ann_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    det_file: str | os.PathLike | None = None,
    det_score_thr: float = 0.0,
    flip_test: bool = True,
    batch_size: int | None = None,
    workers: int | None = None,
    gpus: int | None = None,
    progress: bool = True,
) -> EvalOutcome:
    """Top-down inference (flip test + DARK) -> rescoring + OKS-NMS -> COCO-WholeBody AP/AR.

    ``batch_size`` / ``workers`` default to the run's ``data.val_batch_size`` / ``data.loader_workers``.
    """
    from torch.utils.data import DataLoader

    from trainer.evaluate import evaluate_wholebody
    from trainer.loop import autocast_dtype, predict_keypoints, results_from_predictions

    config = loaded.config
    dataset = build_eval_dataset(config, ann_file, image_dir, det_file, det_score_thr)
    batch_size = config.data.val_batch_size if batch_size is None else int(batch_size)
    workers = config.data.loader_workers if workers is None else int(workers)
    if batch_size < 1:
        raise EvalError(f"--batch must be >= 1, got {batch_size}")
    if workers < 0:
        raise EvalError(f"--workers must be >= 0, got {workers}")
    device, device_ids = select_device(gpus)
    model = loaded.model.to(device).eval()
    if len(device_ids) > 1:
        model = torch.nn.DataParallel(model, device_ids=device_ids)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    batches = with_progress(loader, len(loader), "eval", enabled=progress)
    predictions = predict_keypoints(
        model, batches, device, flip_test, autocast_dtype(device, config.amp), False
    )
    results = results_from_predictions(predictions)
    metrics = evaluate_wholebody(ann_file, results)
    return EvalOutcome(metrics=metrics, results=results, num_boxes=len(dataset))


def score_results_file(results_file: str | os.PathLike, ann_file: str | os.PathLike) -> EvalOutcome:
    """Score an existing COCO-WholeBody results file; errors name the file (e.g. ids not in ``ann_file``)."""
    from trainer.evaluate import evaluate_wholebody

    path = Path(results_file)
    if not path.is_file():
        raise EvalError(f"results file {str(path)!r} does not exist (--results)")
    if not Path(ann_file).is_file():
        raise EvalError(f"annotation file {str(ann_file)!r} does not exist (--ann)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvalError(f"results file {str(path)!r} is not valid JSON: {err}") from err
    try:
        metrics = evaluate_wholebody(ann_file, results)
    except ValueError as err:
        raise EvalError(f"results file {str(path)!r}: {err}") from err
    return EvalOutcome(metrics=metrics, results=results, num_boxes=len(results))


def format_table(metrics: dict[str, float]) -> str:
    """The COCO-WholeBody table: AP, AP50, AP75, AR per row (whole-body, body, foot, face, hand)."""

    def cell(key: str) -> str:
        value = metrics.get(key)
        return "    -" if value is None or value < 0 else f"{value:.3f}"

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
    from orchestrator import tracking

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
    det_score_thr: float = 0.0,
    flip_test: bool = True,
    batch_size: int | None = None,
    workers: int | None = None,
    gpus: int | None = None,
    out: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> dict[str, float]:
    """What ``fowkal eval`` does (see the module docstring); returns the ``evaluate_wholebody`` metrics.

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
    if det_score_thr < 0:
        raise EvalError(f"--det-score-thr must be >= 0, got {det_score_thr}")

    client, uri = None, None
    if run_id is not None:
        from orchestrator import tracking

        uri = resolve_tracking_uri(tracking_uri)
        client = tracking.make_client(uri)
        get_run(client, run_id, uri)  # fail before any work on an unknown id

    epoch = None
    with tempfile.TemporaryDirectory(prefix="fowkal_eval_") as scratch:
        if results_file is not None:
            print_fn(f"scoring results file {results_file} against {ann_file}")
            outcome = score_results_file(results_file, ann_file)
            boxes = f"results file {results_file}"
        else:
            if run_id is not None:
                loaded = download_run_checkpoint(client, run_id, uri, scratch)
                print_fn(f"MLflow run {run_id}: checkpoint {loaded.checkpoint_path.name}")
            else:
                loaded = load_checkpoint_model(checkpoint)
                print_fn(f"checkpoint {loaded.checkpoint_path}")
            epoch = loaded.epoch
            config = loaded.config
            print_fn(
                f"model {config.model.backbone}, loss {config.loss.variant}, "
                f"input {list(config.data.pipeline.input_size)}, "
                f"heatmaps {list(config.data.pipeline.heatmap_size)}; "
                f"config from {loaded.config_source}"
            )
            boxes = (
                f"detections {det_file} (score >= {det_score_thr})"
                if det_file is not None
                else "ground-truth boxes"
            )
            outcome = evaluate_model(
                loaded,
                ann_file,
                image_dir,
                det_file=det_file,
                det_score_thr=det_score_thr,
                flip_test=flip_test,
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
        protocol = (
            "" if results_file is not None else (", flip test" if flip_test else ", no flip test") + ", DARK"
        )
        print_fn(f"COCO-WholeBody on {ann_file} ({boxes}: {outcome.num_boxes}{protocol})")
        print_fn(format_table(outcome.metrics))
        if client is not None:
            tags = {
                "eval.ann_file": str(ann_file),
                "eval.boxes": boxes,
                "eval.flip_test": str(bool(flip_test)) if results_file is None else "n/a",
            }
            log_eval_to_run(client, run_id, outcome.metrics, out_path, tags, step=epoch or 0)
            print_fn(f"logged {EVAL_PREFIX}* metrics and {EVAL_PREFIX}{out_path.name} to MLflow run {run_id}")
    return outcome.metrics


__all__ = [
    "CHECKPOINT_ARTIFACT_DIR",
    "CONFIG_ARTIFACT",
    "CheckpointMismatchError",
    "EVAL_PREFIX",
    "EvalError",
    "EvalOutcome",
    "LoadedCheckpoint",
    "build_eval_dataset",
    "check_state_dict_fits",
    "download_run_checkpoint",
    "eval_metric_name",
    "evaluate_model",
    "format_table",
    "get_run",
    "load_checkpoint_model",
    "log_eval_to_run",
    "resolve_tracking_uri",
    "run_eval",
    "score_results_file",
    "select_device",
    "with_progress",
]
