"""What every finished training run leaves in its MLflow run, ``fowkal train`` and sweep trials alike.

- ``best_checkpoint/`` (the Ray checkpoint scoring highest on ``val/wholebody_AP``) and ``last_checkpoint/``
  (the latest one: what a resume continues from);
- ``best/val/wholebody_AP``, the per-part APs and AR of that same epoch (``best/val/<part>_AP``) and
  ``best/epoch``, so the runs table compares arms at their best epoch, not their last;
- the family's own files (``ExperimentFamily.run_artifacts``): for the top-down family's KAL variants
  ``kaf_history.npy`` (``[epochs, K]`` mean lambda per keypoint) and ``kaf_history.png`` (absolute lambda per
  keypoint and per part, and the paper's Fig. 5 view, min-max normalised per epoch);
- ``bad_images.txt``, when training skipped unreadable image files (``trainer.datasets.bad_images``);
- the inference cost of the best checkpoint (``cost/*``, ``latency/*``: parameters, FLOPs, forward and
  post-processing ms per image at batch 1 and batched, on a few val images, on this process's CPU;
  ``trainer.latency``), logged at the best epoch's step.

The best checkpoint is the one scoring highest on the family's ``selection_metric`` (``val/wholebody_AP``
for the top-down family).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import tracking
from trainer.datasets.bad_images import BAD_IMAGES_FILE
from trainer.families import family_of
from trainer.latency import PROBE_IMAGES

BEST_METRIC = "val/wholebody_AP"  # the top-down family's selection metric (the default family's)
DATASET_INPUT_ATTEMPTS = 3


@dataclass
class RunOutputs:
    """What :func:`log_run_outputs` logged."""

    best_metrics: dict[str, Any] | None = None
    best_checkpoint_path: str | None = None
    latest_checkpoint_path: str | None = None
    artifacts: list[str] = field(default_factory=list)


def pick_best(best_checkpoints, metric: str = BEST_METRIC) -> tuple[Any, dict] | tuple[None, None]:
    """The (checkpoint, metrics) pair of ``Result.best_checkpoints`` with the highest ``metric``."""
    scored = [
        (ckpt, metrics)
        for ckpt, metrics in (best_checkpoints or [])
        if tracking.is_finite_number((metrics or {}).get(metric))
    ]
    if not scored:
        return None, None
    return max(scored, key=lambda item: item[1][metric])


def selection_metric(config) -> str:
    """The metric the best checkpoint of a run of ``config`` maximises (its family's)."""
    return family_of(config).selection_metric


def best_epoch_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``best/<metric>`` for the validation metrics of the best epoch, and ``best/epoch``."""
    best = {f"best/{k}": float(v) for k, v in metrics.items() if k.startswith("val/") and _finite(v)}
    if _finite(metrics.get("epoch")):
        best["best/epoch"] = float(metrics["epoch"])
    return best


def log_run_outputs(client, run_id: str, config, result, print_fn=print) -> RunOutputs:
    """Log the best and last checkpoints, the best epoch's metrics, the family's files (the KAF history)
    and the data set inputs of a Train ``Result`` of ``config`` (a ``TrainConfig``)."""
    outputs = RunOutputs(artifacts=[tracking.CONFIG_ARTIFACT])
    for attempt in range(DATASET_INPUT_ATTEMPTS):
        try:
            log_dataset_inputs(client, run_id, config.data)
            break
        except Exception as err:  # a digest of an unreadable file must not cost the run its checkpoints
            # Trials of one sweep log the same data sets at about the same time: the store creates each
            # data set once per experiment, so all but one of them can fail on its unique key. A retry
            # finds the data set and only links it to the run.
            if attempt + 1 == DATASET_INPUT_ATTEMPTS:
                print_fn(f"could not log the data set inputs: {err}")
            else:
                time.sleep(0.5 * (attempt + 1))
    best_ckpt, best_metrics = pick_best(result.best_checkpoints, selection_metric(config))
    if best_ckpt is not None:
        with best_ckpt.as_directory() as local_dir:
            tracking.log_artifact_path(
                run_id, local_dir, client=client, artifact_path=tracking.BEST_CHECKPOINT_ARTIFACT
            )
        outputs.best_checkpoint_path = best_ckpt.path
        outputs.best_metrics = dict(best_metrics)
        outputs.artifacts.append(tracking.BEST_CHECKPOINT_ARTIFACT)
        step = int(best_metrics["epoch"]) if _finite(best_metrics.get("epoch")) else 0
        tracking.log_epoch_metrics(run_id, best_epoch_metrics(best_metrics), step, client=client)
        try:  # the run trained: a failed measurement costs it only these numbers
            with best_ckpt.as_directory() as local_dir:
                cost = inference_cost_metrics(config, local_dir)
            tracking.log_epoch_metrics(run_id, cost, step, client=client)
        except Exception as err:
            print_fn(f"could not measure the inference cost of the best checkpoint: {err}")
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as local_dir:
            tracking.log_artifact_path(
                run_id, local_dir, client=client, artifact_path=tracking.LAST_CHECKPOINT_ARTIFACT
            )
        outputs.latest_checkpoint_path = result.checkpoint.path
        outputs.artifacts.append(tracking.LAST_CHECKPOINT_ARTIFACT)
    if result.checkpoint is not None:
        # The latest checkpoint holds the family's whole history, also across resumes (the loop restores it).
        with (
            result.checkpoint.as_directory() as local_dir,
            tempfile.TemporaryDirectory(prefix="fowkal_") as tmp,
        ):
            files, notes = family_of(config).run_artifacts(config, Path(local_dir), Path(tmp))
            for note in notes:
                print_fn(note)
            for path in files:
                client.log_artifact(run_id, str(path))
                outputs.artifacts.append(Path(path).name)
            bad_images = Path(local_dir) / BAD_IMAGES_FILE  # the image files training skipped, if any
            if bad_images.is_file():
                client.log_artifact(run_id, str(bad_images))
                outputs.artifacts.append(BAD_IMAGES_FILE)
    return outputs


def inference_cost_metrics(config, checkpoint_dir, images: int = PROBE_IMAGES) -> dict[str, float]:
    """``trainer.latency.COST_METRICS`` of the model in ``checkpoint_dir`` (the run's best) on the first
    ``images`` images of the run's val set (its detections where it has them), on this process's CPU: the
    family's ``latency_probe`` timed by ``trainer.latency.inference_cost``."""
    from trainer.checkpoint import load_checkpoint_model
    from trainer.datasets.sources import resolve_datasets
    from trainer.latency import inference_cost

    family = family_of(config)
    loaded = load_checkpoint_model(checkpoint_dir)
    paths = resolve_datasets(config.data)
    dataset = family.eval_dataset(config, paths["val_ann"], paths["val_images"], det_file=paths["val_det"])
    return inference_cost(loaded.model, family.latency_probe(config, dataset, images), "cpu")


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (first 16 hex digits) of a file's content: the identity of a data set version."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def log_dataset_inputs(client, run_id: str, data_config) -> list[str]:
    """Log the run's annotation files as MLflow dataset inputs (``training`` / ``validation``), each with its
    content digest, the image root and the file as source. Files this process cannot read are left out."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from trainer.datasets.sources import dataset_paths

    paths = dataset_paths(data_config)
    inputs, logged = [], []
    for split, context in (("train", "training"), ("val", "validation")):
        ann_file = paths[f"{split}_ann"]
        if not ann_file or not Path(ann_file).is_file():
            continue
        profile = {"kind": data_config.kind, "image_root": paths[f"{split}_images"]}
        dataset = Dataset(
            name=f"{data_config.kind}-{split}",
            digest=file_digest(ann_file),
            source_type="local",
            source=json.dumps({"uri": str(Path(ann_file).resolve())}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
        logged.append(dataset.name)
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    return logged


def _finite(value) -> bool:
    return tracking.is_finite_number(value)


__all__ = [
    "BEST_METRIC",
    "RunOutputs",
    "best_epoch_metrics",
    "file_digest",
    "inference_cost_metrics",
    "log_dataset_inputs",
    "log_run_outputs",
    "pick_best",
    "selection_metric",
]
