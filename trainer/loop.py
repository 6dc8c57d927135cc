"""The training loop: one function for a plain single-process run and for a Ray Train worker.

``train_loop_per_worker(config)`` reads top to bottom: context -> data -> model, loss, optimiser, schedule ->
resume -> epochs (train, evaluate, report + checkpoint). Under Ray Train (detected with
``ray.train.get_context()``) it wraps the model in DDP and the loader in a DistributedSampler through
``ray.train.torch.prepare_model`` / ``prepare_data_loader``, reports every epoch with a checkpoint from rank 0
and resumes from ``ray.train.get_checkpoint()``. Alone, it writes ``output_dir/checkpoints/latest.pt`` (and
``best.pt``) and ``output_dir/metrics.jsonl`` and resumes from ``latest.pt``. Either way rank 0 appends its
progress lines to ``output_dir/train.log``.

The paper's recipe (Implementation Details): Adam, lr 5e-4, linear warm-up over 500 iterations from ratio
0.001, lr x0.1 at epochs 170 and 200 of 210; flip test and DARK decoding at evaluation.

Metrics reported each epoch: ``epoch``, ``train/loss``, ``train/loss_<part>`` (body, foot, face, hand; plus
``train/loss_reg`` for KAL variants), ``kaf/<part>_mean`` and ``kaf/<part>_std`` (KAL variants),
``time/epoch_s``, ``throughput/img_per_s``; on evaluation epochs (every ``eval_interval`` epochs and the
last) also ``val/wholebody_AP``, ``val/wholebody_AR``, ``val/{body,foot,face,hand}_AP``.
The per-keypoint KAF means of every epoch (the paper's Fig. 5) are kept as ``kaf_history`` ``[epochs, K]``
in the checkpoint and written to ``output_dir/kaf_history.npy`` (and into each Ray checkpoint directory).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from trainer.checkpoint import (
    CHECKPOINT_FILE,
    load_ray_training_checkpoint,
    load_training_checkpoint,
    save_atomic,
)
from trainer.config import DataConfig, OptimConfig, TrainConfig, config_from_dict, config_to_dict
from trainer.data import WholeBodyTopDownDataset
from trainer.evaluate import WholeBodyEvaluator
from trainer.inference import autocast_dtype, predict_keypoints, results_from_predictions
from trainer.keypoints import COCO_WHOLEBODY_PARTS, NUM_KEYPOINTS
from trainer.losses import HeatmapLoss
from trainer.metric_units import to_percent
from trainer.model import build_pose_model

PARTS = tuple(COCO_WHOLEBODY_PARTS)  # body, foot, face, hand
# evaluate_wholebody key -> reported metric name (reported in percent: trainer.metric_units)
VAL_METRICS = {
    "wholebody/AP": "val/wholebody_AP",
    "wholebody/AR": "val/wholebody_AR",
    "body/AP": "val/body_AP",
    "foot/AP": "val/foot_AP",
    "face/AP": "val/face_AP",
    "hand/AP": "val/hand_AP",
}


def lr_decay_epochs(epochs: int, optim: OptimConfig) -> list[int]:
    """Epochs (0-based) from which each lr decay applies: the paper's 170 and 200 for 210 epochs."""
    return [int(round(fraction * epochs)) for fraction in optim.lr_decay_at]


def lr_factor(iteration: int, iters_per_epoch: int, epochs: int, optim: OptimConfig) -> float:
    """Multiplier of the base lr at 0-based global ``iteration``: linear warm-up x step decay.

    Warm-up as MMCV's ``linear`` policy: ``1 - (1 - i / warmup_iters) * (1 - warmup_ratio)`` for
    ``i < warmup_iters`` (``warmup_ratio`` at i = 0, 1 at the end), times ``lr_decay_factor`` per decay
    milestone reached by the iteration's epoch.
    """
    factor = 1.0
    if iteration < optim.warmup_iters:
        factor = 1.0 - (1.0 - iteration / optim.warmup_iters) * (1.0 - optim.warmup_ratio)
    epoch = iteration // iters_per_epoch
    decays = sum(epoch >= milestone for milestone in lr_decay_epochs(epochs, optim))
    return factor * optim.lr_decay_factor**decays


def dataset_paths(data: DataConfig) -> dict[str, str | None]:
    """``{"train_ann", "train_images", "val_ann", "val_images", "val_det"}`` of the run, without generating
    anything (synthetic sets: where :func:`resolve_datasets` puts them)."""
    if data.kind == "coco_wholebody":
        return {
            "train_ann": data.train_ann_file,
            "train_images": data.train_image_root,
            "val_ann": data.val_ann_file,
            "val_images": data.val_image_root,
            "val_det": data.val_det_file,
        }
    paths: dict[str, str | None] = {"val_det": None}
    for split in ("train", "val"):
        directory = _synthetic_dir(data, split)
        paths[f"{split}_ann"] = str(directory / _SYNTH_ANN_FILE)
        paths[f"{split}_images"] = str(directory / _SYNTH_IMAGE_DIR)
    return paths


def _synthetic_dir(data: DataConfig, split: str) -> Path:
    images = data.synthetic_train_images if split == "train" else data.synthetic_val_images
    seed = data.synthetic_train_seed if split == "train" else data.synthetic_val_seed
    return Path(data.synthetic_dir) / f"{split}_n{images}_s{seed}"


def resolve_datasets(data: DataConfig) -> dict[str, str | None]:
    """Annotation files and image roots of the run; synthetic data sets are generated here on first use.

    Returns :func:`dataset_paths`. Generation is safe when several workers (or nodes) start at once: each
    writes into a private temporary directory that is renamed into place; a worker that loses the race
    discards its copy (same seed, same data).
    """
    if data.kind == "synthetic":
        for split, images, seed in (
            ("train", data.synthetic_train_images, data.synthetic_train_seed),
            ("val", data.synthetic_val_images, data.synthetic_val_seed),
        ):
            _synthetic_dataset(_synthetic_dir(data, split), images, seed)
    return dataset_paths(data)


_SYNTH_ANN_FILE = "annotations.json"
_SYNTH_IMAGE_DIR = "images"


def _synthetic_dataset(directory: Path, num_images: int, seed: int) -> tuple[str, str]:
    from trainer.synth import write_synthetic_dataset

    ann_file = directory / _SYNTH_ANN_FILE
    if not ann_file.is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        written = Path(write_synthetic_dataset(scratch, num_images=num_images, seed=seed))
        if written != scratch / _SYNTH_ANN_FILE:
            raise RuntimeError(f"trainer.synth wrote {written}, expected {scratch / _SYNTH_ANN_FILE}")
        try:
            os.rename(scratch, directory)
        except OSError:  # another worker renamed its copy first
            shutil.rmtree(scratch, ignore_errors=True)
            if not ann_file.is_file():
                raise
    return str(ann_file), str(directory / _SYNTH_IMAGE_DIR)


def say(line: str, log_file: Path | None = None) -> None:
    """One progress line on stdout, and appended to ``log_file`` (the run's ``train.log``) when given.

    Not ``print``: Ray Train patches ``print`` in its workers to log and also echo each line, so every
    printed line reached the driver's console twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if log_file is not None:
        with open(log_file, "a") as stream:
            stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def _ray_train_context() -> Any | None:
    """The Ray Train context inside a Ray Train worker, else None (plain run).

    A Ray Train worker has imported ``ray.train`` before it calls the loop; a plain run never imports it.
    """
    train = sys.modules.get("ray.train")
    if train is None:
        return None
    try:
        return train.get_context()
    except Exception:  # not in a Ray Train worker, or in a bare Tune session
        return None


# The legacy global NumPy generator is saved and restored on purpose: other code may draw from it.
def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)  # noqa: NPY002
    state = {
        "python": random.getstate(),
        "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(numpy_state["state"]["pos"]),
        "numpy_has_gauss": int(numpy_state["has_gauss"]),
        "numpy_gauss": float(numpy_state["gauss"]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(  # noqa: NPY002
        {
            "bit_generator": "MT19937",
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
            "has_gauss": state["numpy_has_gauss"],
            "gauss": state["numpy_gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def train_loop_per_worker(
    config: dict | TrainConfig,
    report_fn: Callable[[dict[str, float], str], None] | None = None,
) -> dict[str, float]:
    """Train (and evaluate) one model; returns the last epoch's metrics.

    Args:
        config: ``config_to_dict(cfg)`` (what Ray passes as ``train_loop_config``) or a ``TrainConfig``.
        report_fn: plain runs only: called after every epoch as ``report_fn(metrics, checkpoint_dir)`` once
            ``latest.pt`` (and ``best.pt``) are written to ``checkpoint_dir``, e.g. for logging.

    Raises:
        FloatingPointError: the loss became NaN or infinite (names the epoch and iteration).
    """
    cfg = config if isinstance(config, TrainConfig) else config_from_dict(config, source="train_loop_config")

    # ---- where we run: a Ray Train worker (DDP over world_size processes) or a plain process
    ray_context = _ray_train_context()
    if ray_context is not None:
        import ray.train
        import ray.train.torch

        rank, world_size = ray_context.get_world_rank(), ray_context.get_world_size()
        device = ray.train.torch.get_device()
    else:
        rank, world_size = 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    is_main = rank == 0
    distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    on_cuda = device.type == "cuda"
    amp_dtype = autocast_dtype(device, cfg.amp)
    channels_last = on_cuda and cfg.channels_last
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    _seed_everything(cfg.seed + rank)
    output_dir = Path(cfg.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    if is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # The run's own log of its progress lines (a sweep shows a table instead of every worker's output).
    log_file = output_dir / "train.log" if is_main else None

    # ---- data
    paths = resolve_datasets(cfg.data)
    pipeline = cfg.data.pipeline
    annotations = {"cache_dir": cfg.data.cache_dir, "gt_instances": cfg.data.gt_instances}
    train_set = WholeBodyTopDownDataset(
        paths["train_ann"], paths["train_images"], config=pipeline, train=True, **annotations
    )
    val_set = WholeBodyTopDownDataset(
        paths["val_ann"],
        paths["val_images"],
        config=pipeline,
        train=False,
        det_file=paths["val_det"],
        det_score_thr=cfg.data.det_score_thr,
        **annotations,
    )
    if len(train_set) < cfg.batch_size * world_size:
        raise ValueError(
            f"the training set {paths['train_ann']} has {len(train_set)} samples, fewer than batch_size "
            f"({cfg.batch_size}) x workers ({world_size}): not one full batch per worker"
        )
    loader_options = {
        "num_workers": cfg.data.loader_workers,
        "pin_memory": on_cuda,
        # Not persistent: each epoch's workers are seeded from torch's generator, which the checkpoint
        # restores, so a resumed run sees the same augmentations as an uninterrupted one.
        "persistent_workers": False,
    }
    # drop_last: equal, full batches on every worker (BatchNorm statistics, DDP step count). With several
    # workers, our own seeded DistributedSampler (prepare_data_loader keeps it and only moves batches).
    train_sampler = None
    if world_size > 1:
        train_sampler = DistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
    train_loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        drop_last=True,
        **loader_options,
    )
    # Validation: each worker predicts its own slice, rank 0 gathers and scores (no padded duplicates).
    val_loader = DataLoader(
        Subset(val_set, range(rank, len(val_set), world_size)),
        batch_size=cfg.data.val_batch_size,
        **loader_options,
    )
    if ray_context is not None:
        train_loader = ray.train.torch.prepare_data_loader(train_loader)
    iters_per_epoch = len(train_loader)

    # ---- model, loss, optimiser, schedule
    loss_fn = HeatmapLoss(cfg.loss)
    raw_model = build_pose_model(
        cfg.model.backbone,
        NUM_KEYPOINTS,
        with_kaf=loss_fn.needs_kaf,
        pretrained_path=cfg.model.pretrained_path,
    ).to(device)
    if channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda iteration: lr_factor(iteration, iters_per_epoch, cfg.epochs, cfg.optim)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- resume: Ray's latest reported checkpoint, or latest.pt of a plain run
    start_epoch, best_ap = 0, float("-inf")
    kaf_history: list[np.ndarray] = []
    state = None
    if ray_context is not None:
        ray_checkpoint = ray.train.get_checkpoint()
        if ray_checkpoint is not None:  # each worker reads it itself (see load_ray_training_checkpoint)
            state = load_ray_training_checkpoint(ray_checkpoint)
    elif (checkpoint_dir / "latest.pt").is_file():
        state = load_training_checkpoint(checkpoint_dir / "latest.pt")
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_ap = int(state["epoch"]), float(state["best_ap"])
        kaf_history = [row.numpy() for row in state["kaf_history"]]
        if is_main:
            _set_rng_state(state["rng"])
            if state.get("data_rng"):  # the main-process augmentation generator (loader_workers=0)
                train_set.restore_generator_state(state["data_rng"])
        else:  # only rank 0's generators are saved; the others restart from a seed that depends on the epoch
            _seed_everything(cfg.seed + rank + 1000 * start_epoch)
        if is_main:
            say(f"[fowkal] resuming at epoch {start_epoch + 1}/{cfg.epochs}", log_file)
    model = raw_model
    if ray_context is not None:
        model = ray.train.torch.prepare_model(raw_model)  # DDP when world_size > 1

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)

        # ---- train one epoch
        model.train()
        loss_sums = torch.zeros(len(PARTS) + 2, dtype=torch.float64, device=device)  # total, parts, reg
        kaf_sum = torch.zeros(NUM_KEYPOINTS, dtype=torch.float64, device=device)
        kaf_sq_sum = torch.zeros_like(kaf_sum)
        counts = torch.zeros(2, dtype=torch.float64, device=device)  # iterations, samples
        for iteration, batch in enumerate(train_loader):
            images = batch["image"].to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            target = batch["heatmaps"].to(device, non_blocking=True)
            target_weight = batch["target_weight"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                heatmaps, kaf = model(images)
            # The loss in float32: AWing's log and FWAHR's powers are not half-precision friendly.
            total, parts = loss_fn(
                heatmaps.float(),
                target,
                target_weight,
                kaf=None if kaf is None else kaf.float(),
                return_parts=True,
            )
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"non-finite training loss {total.item()} at epoch {epoch + 1}, "
                    f"iteration {iteration + 1}/{iters_per_epoch} "
                    f"(global iteration {epoch * iters_per_epoch + iteration}, "
                    f"lr {scheduler.get_last_lr()[0]:.3g}, rank {rank}); parts: "
                    + ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
                    + ". Lower optim.lr, set optim.grad_clip or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if cfg.optim.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            zero = total.new_zeros(())
            loss_sums += torch.stack(
                [total.detach()] + [parts.get(p, zero) for p in (*PARTS, "reg")]
            ).double()
            counts += torch.tensor([1.0, images.shape[0]], dtype=torch.float64, device=device)
            if kaf is not None:
                kaf = kaf.detach().double()
                kaf_sum += kaf.sum(0)
                kaf_sq_sum += (kaf * kaf).sum(0)
        if distributed:
            for tensor in (loss_sums, kaf_sum, kaf_sq_sum, counts):
                torch.distributed.all_reduce(tensor)
        train_seconds = time.perf_counter() - epoch_start

        loss_means = (loss_sums / counts[0]).tolist()
        metrics = {"epoch": epoch + 1, "train/loss": loss_means[0]}
        for name, value in zip(PARTS, loss_means[1 : 1 + len(PARTS)], strict=True):
            metrics[f"train/loss_{name}"] = value
        if loss_fn.needs_kaf:
            metrics["train/loss_reg"] = loss_means[-1]
            kaf_mean = (kaf_sum / counts[1]).cpu().numpy()
            kaf_sq_mean = (kaf_sq_sum / counts[1]).cpu().numpy()
            kaf_history.append(kaf_mean.astype(np.float32))
            for name, indices in COCO_WHOLEBODY_PARTS.items():
                mean = float(kaf_mean[list(indices)].mean())  # over samples and the part's keypoints
                variance = float(kaf_sq_mean[list(indices)].mean()) - mean * mean
                metrics[f"kaf/{name}_mean"] = mean
                metrics[f"kaf/{name}_std"] = max(variance, 0.0) ** 0.5
        metrics["throughput/img_per_s"] = float(counts[1]) / train_seconds

        # ---- evaluate: flip test + DARK on this worker's slice, scored on rank 0
        if (epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epochs:
            predictions = predict_keypoints(
                raw_model,
                val_loader,
                device,
                cfg.flip_test,
                amp_dtype,
                channels_last,
                cfg.eval.flip_mode,
                cfg.eval.blur_kernel,
            )
            if distributed:
                gathered: list[Any] = [None] * world_size
                torch.distributed.all_gather_object(gathered, predictions)
                predictions = {key: np.concatenate([part[key] for part in gathered]) for key in predictions}
            val_metrics = [None]
            if is_main:
                # The val annotation file is parsed at the first evaluation of the run, then reused.
                evaluator = WholeBodyEvaluator.for_file(paths["val_ann"])
                scores = evaluator.evaluate(results_from_predictions(predictions, cfg.eval))
                val_metrics = [{name: to_percent(scores[key]) for key, name in VAL_METRICS.items()}]
            if distributed:  # every worker reports the same numbers and tracks the same best AP
                torch.distributed.broadcast_object_list(val_metrics, src=0)
            metrics.update(val_metrics[0])
        metrics["time/epoch_s"] = time.perf_counter() - epoch_start
        is_best = "val/wholebody_AP" in metrics and metrics["val/wholebody_AP"] > best_ap
        if is_best:
            best_ap = metrics["val/wholebody_AP"]

        # ---- checkpoint and report
        checkpoint = {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch + 1,
            "best_ap": best_ap,
            "kaf_history": torch.from_numpy(
                np.asarray(kaf_history, dtype=np.float32).reshape(-1, NUM_KEYPOINTS)
            ),
            "rng": _rng_state(),
            "data_rng": train_set.generator_state() or "",
            "config": config_to_dict(cfg),
            "metrics": metrics,
        }
        if is_main:
            with open(output_dir / "metrics.jsonl", "a") as stream:
                stream.write(json.dumps(metrics) + "\n")
            if kaf_history:
                np.save(output_dir / "kaf_history.npy", np.asarray(kaf_history, dtype=np.float32))
            say("[fowkal] " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), log_file)
        if ray_context is not None:
            with tempfile.TemporaryDirectory() as directory:
                ray_checkpoint = None
                if is_main:
                    torch.save(checkpoint, Path(directory) / CHECKPOINT_FILE)
                    if kaf_history:
                        np.save(
                            Path(directory) / "kaf_history.npy", np.asarray(kaf_history, dtype=np.float32)
                        )
                    ray_checkpoint = ray.train.Checkpoint.from_directory(directory)
                ray.train.report(metrics, checkpoint=ray_checkpoint)
        else:
            save_atomic(checkpoint, checkpoint_dir / "latest.pt")
            if is_best:
                shutil.copyfile(checkpoint_dir / "latest.pt", checkpoint_dir / "best.pt")
            if report_fn is not None:
                report_fn(metrics, str(checkpoint_dir))
    return metrics


__all__ = [
    "CHECKPOINT_FILE",
    "VAL_METRICS",
    "load_training_checkpoint",
    "lr_decay_epochs",
    "lr_factor",
    "predict_keypoints",
    "results_from_predictions",
    "autocast_dtype",
    "resolve_datasets",
    "train_loop_per_worker",
]
