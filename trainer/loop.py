"""The training loop: one function for a plain single-process run and for a Ray Train worker, for every
experiment family.

``train_loop_per_worker(config)`` reads top to bottom: context -> data -> model, objective, optimiser,
schedule -> resume -> epochs (train, evaluate, report + checkpoint). Everything family-specific (data sets,
model, loss and its per-epoch statistics, optimiser and schedule, prediction on the val set) comes from the
config's family (``trainer.families``); the loop names none of it. Under Ray Train (``trainer.runtime``)
it wraps the model in DDP and the loader in a DistributedSampler through ``ray.train.torch.prepare_model`` /
``prepare_data_loader``, reports every epoch with a checkpoint from rank 0 and resumes from
``ray.train.get_checkpoint()``. Alone, it writes ``output_dir/checkpoints/latest.pt`` (and ``best.pt``) and
``output_dir/metrics.jsonl`` and resumes from ``latest.pt``. Either way rank 0 appends its progress lines to
``output_dir/train.log``.

Metrics reported each epoch: ``epoch``, ``train/loss``, ``train/loss_<part>`` (the family's loss parts),
the family's own (the top-down family's KAL variants: ``kaf/<part>_mean`` and ``kaf/<part>_std``),
``data/bad_images`` (distinct unreadable image files the training data skipped this epoch, over every
worker; listed in ``bad_images.txt``, and the run fails past ``data.max_bad_images``:
``trainer.datasets.bad_images``), ``data/dropped_instances`` (the run's GT instances whose box is empty once
clipped to its image, a constant of its annotation files, logged every epoch beside ``data/bad_images``),
``time/epoch_s``, ``throughput/img_per_s``; on evaluation epochs (every ``eval_interval`` epochs and the
last) also ``val/wholebody_AP``, ``val/wholebody_AR``, ``val/{body,foot,face,hand}_AP``, scored by the
shared COCO-WholeBody evaluator. The best checkpoint maximises the family's ``selection_score``.
"""

from __future__ import annotations

import json
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
from trainer.config import TrainConfig, config_from_dict, config_to_dict
from trainer.datasets.annotations import count_dropped_instances
from trainer.datasets.bad_images import SAMPLE_KEY, BadImageTracker, CollateBadImages
from trainer.datasets.sources import dataset_paths, resolve_datasets
from trainer.evaluation.metric_units import to_percent
from trainer.evaluation.wholebody import VAL_METRICS, WholeBodyEvaluator
from trainer.families import family_of
from trainer.rng_state import rng_state, seed_everything, set_rng_state
from trainer.runtime import autocast_dtype, worker_context


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
    family = family_of(cfg)

    # ---- where we run: a Ray Train worker (DDP over world_size processes) or a plain process
    context = worker_context()
    if context.under_ray:
        import ray.train
        import ray.train.torch
    rank, world_size, device, is_main = context.rank, context.world_size, context.device, context.is_main
    on_cuda = device.type == "cuda"
    amp_dtype = autocast_dtype(device, cfg.amp)
    channels_last = on_cuda and cfg.channels_last
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.seed + rank)
    output_dir = Path(cfg.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    if is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # The run's own log of its progress lines (a sweep shows a table instead of every worker's output).
    log_file = output_dir / "train.log" if is_main else None

    # ---- data
    paths = resolve_datasets(cfg.data)
    train_set, val_set = family.build_datasets(cfg, paths)
    dropped_instances = count_dropped_instances((paths["train_ann"], paths["val_ann"]), cfg.data.cache_dir)
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
        # The samples' records of skipped bad images come back from the loader processes with the batches.
        "collate_fn": CollateBadImages(family.collate_fn(cfg)),
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
    if context.under_ray:
        train_loader = ray.train.torch.prepare_data_loader(train_loader)
    iters_per_epoch = len(train_loader)

    # ---- model, objective, optimiser, schedule
    raw_model = family.build_model(cfg).to(device)
    if channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    objective = family.training(cfg, raw_model, device)
    optimizer, scheduler, accumulate = family.build_optimizer(cfg, raw_model, iters_per_epoch)
    grad_clip = family.grad_clip(cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- resume: Ray's latest reported checkpoint, or latest.pt of a plain run
    start_epoch, best_score = 0, float("-inf")
    state = None
    if context.under_ray:
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
        objective.load_checkpoint_state(state)
        start_epoch, best_score = int(state["epoch"]), float(state["best_ap"])
        if is_main:
            set_rng_state(state["rng"])
            if state.get("data_rng"):  # the main-process augmentation generator (loader_workers=0)
                train_set.restore_generator_state(state["data_rng"])
        else:  # only rank 0's generators are saved; the others restart from a seed that depends on the epoch
            seed_everything(cfg.seed + rank + 1000 * start_epoch)
        if is_main:
            say(f"[fowkal] resuming at epoch {start_epoch + 1}/{cfg.epochs}", log_file)
    model = raw_model
    if context.under_ray:
        model = ray.train.torch.prepare_model(raw_model)  # DDP when world_size > 1
    bad_images = BadImageTracker(
        cfg.data.max_bad_images,
        seen=state.get("bad_images", []) if state is not None else (),
        directory=output_dir if is_main else None,
    )
    gather_bad_images = None
    if context.distributed:

        def gather_bad_images(value: list) -> list:
            parts: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(parts, value)
            return parts

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)

        # ---- train one epoch
        model.train()
        loss_sums = torch.zeros(len(objective.loss_parts) + 1, dtype=torch.float64, device=device)
        counts = torch.zeros(2, dtype=torch.float64, device=device)  # iterations, samples
        optimizer.zero_grad(set_to_none=True)
        for iteration, batch in enumerate(train_loader):
            bad_images.add(batch.pop(SAMPLE_KEY, ()))
            total, parts = objective.step(model, batch, device, amp_dtype, channels_last)
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"non-finite training loss {total.item()} at epoch {epoch + 1}, "
                    f"iteration {iteration + 1}/{iters_per_epoch} "
                    f"(global iteration {epoch * iters_per_epoch + iteration}, "
                    f"lr {scheduler.get_last_lr()[0]:.3g}, rank {rank}); parts: "
                    + ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
                    + ". Lower optim.lr, set optim.grad_clip or check the data."
                )
            # Accumulated gradients are summed, as the authors of families that accumulate (KAPAO) do.
            scaler.scale(total).backward()
            if (iteration + 1) % accumulate == 0 or iteration + 1 == iters_per_epoch:
                if grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                objective.after_optimizer_step(raw_model)

            zero = total.new_zeros(())
            loss_sums += torch.stack(
                [total.detach()] + [parts.get(p, zero) for p in objective.loss_parts]
            ).double()
            counts += torch.tensor([1.0, batch["image"].shape[0]], dtype=torch.float64, device=device)
        for tensor in (loss_sums, counts):
            context.all_reduce(tensor)
        train_seconds = time.perf_counter() - epoch_start

        loss_means = (loss_sums / counts[0]).tolist()
        metrics = {"epoch": epoch + 1, "train/loss": loss_means[0]}
        for name, value in zip(objective.loss_parts, loss_means[1:], strict=True):
            metrics[f"train/loss_{name}"] = value
        metrics.update(objective.epoch_metrics(context.all_reduce if context.distributed else None))
        metrics["data/bad_images"] = bad_images.end_epoch(gather_bad_images)
        metrics["data/dropped_instances"] = dropped_instances
        metrics["throughput/img_per_s"] = float(counts[1]) / train_seconds

        # ---- evaluate: the family predicts this worker's slice, rank 0 scores with the shared evaluator
        eval_model = objective.eval_model(raw_model)
        if (epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epochs:
            predictions = family.predict(eval_model, val_loader, cfg, device, amp_dtype, channels_last)
            if context.distributed:
                gathered: list[Any] = [None] * world_size
                torch.distributed.all_gather_object(gathered, predictions)
                predictions = {key: np.concatenate([part[key] for part in gathered]) for key in predictions}
            val_metrics = [None]
            if is_main:
                # The val annotation file is parsed at the first evaluation of the run, then reused.
                evaluator = WholeBodyEvaluator.for_file(paths["val_ann"])
                scores = evaluator.evaluate(family.results(predictions, cfg))
                val_metrics = [{name: to_percent(scores[key]) for key, name in family.val_metrics.items()}]
            if context.distributed:  # every worker reports the same numbers and tracks the same best score
                torch.distributed.broadcast_object_list(val_metrics, src=0)
            metrics.update(val_metrics[0])
        metrics["time/epoch_s"] = time.perf_counter() - epoch_start
        score = family.selection_score(metrics, cfg)
        if score is not None:  # e.g. a weighted mix of APs: reported so that Ray keeps the best checkpoint
            metrics.setdefault(family.selection_metric, score)
        is_best = score is not None and (score > best_score or (family.best_on_ties and score == best_score))
        if is_best:
            best_score = score

        # ---- checkpoint and report
        checkpoint = {
            "model": eval_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch + 1,
            "best_ap": best_score,  # the family's selection score (whole-body AP for the top-down family)
            **objective.checkpoint_state(),
            "rng": rng_state(),
            "data_rng": train_set.generator_state() or "",
            "bad_images": bad_images.state(),
            "config": config_to_dict(cfg),
            "metrics": metrics,
        }
        if is_main:
            with open(output_dir / "metrics.jsonl", "a") as stream:
                stream.write(json.dumps(metrics) + "\n")
            objective.write_outputs(output_dir)
            bad_images.write(output_dir)
            say("[fowkal] " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), log_file)
        if context.under_ray:
            with tempfile.TemporaryDirectory() as directory:
                ray_checkpoint = None
                if is_main:
                    torch.save(checkpoint, Path(directory) / CHECKPOINT_FILE)
                    objective.write_outputs(directory)
                    bad_images.write(directory)
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
    "dataset_paths",
    "load_training_checkpoint",
    "resolve_datasets",
    "say",
    "train_loop_per_worker",
]
