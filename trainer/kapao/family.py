"""The KAPAO family as the shared code sees it (``trainer.families.ExperimentFamily``).

KAPAO (McNally et al., ECCV 2022): a YOLOv5-P6-style single-stage network that detects pose objects and
keypoint objects in whole images (``trainer.kapao.model``), trained with YOLOv5's box / objectness / class
terms plus the pose-keypoint term (``trainer.kapao.loss``), on mosaic-augmented letterboxed images
(``trainer.kapao.dataset``), with the authors' SGD recipe and an EMA of the weights (``trainer.kapao.optim``);
at evaluation NMS per object type and keypoint-object fusion (``trainer.kapao.postprocess``). The EMA is what
is evaluated and checkpointed as ``model``; the raw weights ride along in the checkpoint for resuming.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.datasets.keypoints import NUM_KEYPOINTS, SIGMAS
from trainer.datasets.sources import DataSourceConfig
from trainer.evaluation.wholebody import VAL_METRICS
from trainer.kapao.dataset import KapaoPipelineConfig, collate_kapao, images_to_float
from trainer.kapao.loss import KapaoLoss, KapaoLossConfig, KapaoLossSettingError
from trainer.kapao.model import KAPAO_SIZES
from trainer.kapao.optim import KapaoOptimConfig, ModelEMA, build_optimizer
from trainer.kapao.postprocess import (
    KapaoEvalConfig,
    KapaoEvalSettingError,
    poses_from_candidates,
    to_wholebody,
)
from trainer.kapao.tta import augmented_candidates
from trainer.latency import PROBE_IMAGES

KEYPOINT_SETS: dict[str, int] = {"wholebody": NUM_KEYPOINTS, "body": 17}
MAX_KP_BBOX = 0.5


@dataclass
class KapaoDataConfig(DataSourceConfig, KapaoPipelineConfig):
    """The ``data:`` section: the shared data fields and the KAPAO pipeline's (input size, keypoint-object
    boxes, augmentation). Range checks run in :meth:`KapaoFamily.validate`, which names the dotted key."""

    def __post_init__(self) -> None:  # checked by KapaoFamily.validate (dotted keys in the messages)
        pass


@dataclass
class KapaoModelConfig:
    """The ``model:`` section: KAPAO-S/M/L, the keypoint set, an optional local backbone weights file."""

    size: str = "s"  # KAPAO_SIZES
    keypoints: str = "wholebody"  # "wholebody" (133) or "body" (17, COCO)
    pretrained_path: str | None = None


SECTIONS: dict[str, type] = {
    "data": KapaoDataConfig,
    "model": KapaoModelConfig,
    "loss": KapaoLossConfig,
    "optim": KapaoOptimConfig,
    "eval": KapaoEvalConfig,
}
EVAL_SETTING_KEYS: tuple[str, ...] = tuple(f"eval.{f.name}" for f in dataclasses.fields(KapaoEvalConfig))


def num_keypoints(cfg) -> int:
    return KEYPOINT_SETS[cfg.model.keypoints]


def _field_of(message: str, names) -> str | None:
    """The field a ``__post_init__`` / ``validate`` message starts with (their convention), if any."""
    first = message.split(" ", 1)[0]
    return first if first in names else None


def _world_size() -> int:
    """Processes training together: DDP's world size under Ray Train, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class KapaoTraining:
    """KAPAO's loss of one run on one worker, and the EMA of the weights."""

    loss_parts: tuple[str, ...] = ("box", "obj", "cls", "kps")

    def __init__(self, cfg, model: torch.nn.Module, device: torch.device) -> None:
        self.loss_fn = KapaoLoss(cfg.loss)
        self.raw_model = model
        self.ema = ModelEMA(model, cfg.optim.ema_decay, cfg.optim.ema_ramp) if cfg.optim.ema else None

    def step(self, model, batch: dict, device: torch.device, amp_dtype, channels_last: bool):
        images = images_to_float(batch["images"].to(device, non_blocking=True))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = batch["targets"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(images)
        # KapaoLoss computes in float32 itself; its total is YOLOv5's batch-size-scaled loss, and under DDP
        # (which averages gradients over the workers) YOLOv5 scales it by the number of workers.
        total, parts = self.loss_fn(outputs, targets)
        world_size = _world_size()
        if world_size > 1:
            total = total * world_size
        return total, parts

    def epoch_metrics(self, all_reduce: Callable[[torch.Tensor], None] | None) -> dict[str, float]:
        return {}

    def checkpoint_state(self) -> dict[str, Any]:
        # The loop saves eval_model(raw).state_dict() (the EMA) as "model"; the raw weights are kept here so
        # that a resumed run continues from them, not from the EMA.
        if self.ema is None:
            return {}
        return {"raw_model": self.raw_model.state_dict(), "ema_updates": self.ema.updates}

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        if self.ema is None:
            return
        if "raw_model" in state:
            self.ema.module.load_state_dict(state["model"])
            self.raw_model.load_state_dict(state["raw_model"])
        else:  # a checkpoint written without an EMA: start the EMA from its weights
            self.ema.module.load_state_dict(self.raw_model.state_dict())
        self.ema.updates = int(state.get("ema_updates", 0))

    def write_outputs(self, directory) -> list[str]:
        return []

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        if self.ema is not None:
            self.ema.update(model)

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else model


class KapaoEvalSweep:
    """``fowkal tune-eval`` of KAPAO (``trainer.families.EvalSweep``): per image and TTA mode of the space,
    the pose and keypoint candidates above its lowest ``tau_cp`` / ``tau_ck`` (before NMS), cached once
    (``trainer.kapao.candidate_cache``); a trial runs the two NMS passes, fusion and the scores on them
    (``poses_from_candidates``, as ``fowkal eval``) and scores the poses."""

    setting_keys = EVAL_SETTING_KEYS

    def base_settings(self, cfg) -> dict[str, Any]:
        return {f"eval.{key}": value for key, value in dataclasses.asdict(cfg.eval).items()}

    def build_cache(self, loaded, ann_file, image_dir, cache_root, *, det_file, reach, progress: bool):
        from trainer.families import SweepCacheInfo
        from trainer.kapao.candidate_cache import build_candidate_cache

        base = self.base_settings(loaded.config)
        if det_file is not None:  # fowkal eval's error: KAPAO needs no detection file
            KAPAO.eval_dataset(loaded.config, ann_file, image_dir, det_file)

        def values(key):
            return reach.get(key, (base[key],))

        cache = build_candidate_cache(
            loaded,
            ann_file,
            image_dir,
            Path(cache_root) / "candidate_cache",
            modes=tuple(dict.fromkeys(values("eval.tta"))),
            pose_floor=float(min(values("eval.tau_cp"))),
            keypoint_floor=float(min(values("eval.tau_ck"))),
            progress=progress,
        )
        images = len(cache.mode(cache.info["modes"][0]).image_ids)
        return SweepCacheInfo(str(cache.path), images, "images", {})

    def open_cache(self, path):
        from trainer.kapao.candidate_cache import CandidateCache

        return CandidateCache.open(path)

    def score(self, cache, settings, evaluator, options, *, image_ids=None, memo_dir=None):
        from trainer.families import SweepScore

        eval_settings = KapaoEvalConfig(
            **{key[len("eval.") :]: value for key, value in settings.items() if key.startswith("eval.")}
        )
        metrics, images, short = cache.evaluate(eval_settings, evaluator, image_ids)
        return SweepScore(metrics, images, short)


class KapaoFamily:
    """``family: kapao``: see the module docstring."""

    name = "kapao"
    summary = "KAPAO: keypoints and poses as objects (YOLOv5-P6 single-stage, whole images)"
    sections: Mapping[str, type] = SECTIONS
    eval_setting_keys = EVAL_SETTING_KEYS
    sweep_conditions: Mapping[str, tuple[Mapping[str, Any], tuple[str, ...]]] = {}
    arm_key = None
    # The authors keep the checkpoint maximising 0.1 AP50 + 0.9 AP (their "fitness"), here of the keypoints
    # the model predicts: whole-body, or body for `model.keypoints: body` (whose whole-body AP is ~0: no face
    # or hands). The whole-body evaluator's body pass is COCO's keypoint AP (the same 17 keypoints, sigmas).
    selection_metric = "val/kapao_fitness"
    # Their train.py saves best.pt whenever the epoch's fitness equals the best (``if best_fitness == fi``): a
    # tie, 0 = 0 on an untrained start included, goes to the later epoch.
    best_on_ties = True
    val_metrics = {**VAL_METRICS, "wholebody/AP50": "val/wholebody_AP50", "body/AP50": "val/body_AP50"}
    heatmap_eval_sweep = False
    setting_errors = (KapaoLossSettingError, KapaoEvalSettingError)
    eval_sweep = KapaoEvalSweep()
    predicts_per_box = False  # KAPAO finds the people in whole images

    def describe_protocol(self, cfg, flip_test: bool, det_file=None, det_score_thr=None) -> tuple[str, str]:
        tta = "" if cfg.eval.tta == "none" else f", test-time augmentation {cfg.eval.tta!r}"
        return "whole images", "NMS per object type, " + ("fusion" if cfg.eval.fusion else "no fusion") + tta

    def validate(self, cfg, check, fail) -> None:
        data = cfg.data
        expected = f"a number in (0, {MAX_KP_BBOX}]"
        check(0 < data.kp_bbox <= MAX_KP_BBOX, "data.kp_bbox", data.kp_bbox, expected)
        check(
            data.input_size > 0 and data.input_size % 64 == 0,
            "data.input_size",
            data.input_size,
            "a positive multiple of 64 (the coarsest stride)",
        )
        try:  # the pipeline's and augmentation's own checks (their messages start with the field name)
            KapaoPipelineConfig.__post_init__(data)
        except ValueError as err:
            field = _field_of(str(err), {f.name for f in dataclasses.fields(KapaoPipelineConfig)})
            fail(f"data.{field}" if field else "data", str(err))
        check(cfg.model.size in KAPAO_SIZES, "model.size", cfg.model.size, f"one of {KAPAO_SIZES}")
        check(
            cfg.model.keypoints in KEYPOINT_SETS,
            "model.keypoints",
            cfg.model.keypoints,
            f"one of {tuple(KEYPOINT_SETS)}",
        )
        for section, error in (("loss", KapaoLossSettingError), ("eval", KapaoEvalSettingError)):
            try:
                getattr(cfg, section).validate()
            except error as err:
                fail(f"{section}.{err.field}", str(err))
        try:
            cfg.optim.validate()
        except ValueError as err:
            field = _field_of(str(err), {f.name for f in dataclasses.fields(KapaoOptimConfig)})
            fail(f"optim.{field}" if field else "optim", str(err))

    def run_label(self, cfg) -> str:
        return f"kapao-{cfg.model.size}-{'wb' if cfg.model.keypoints == 'wholebody' else 'body'}"

    def run_tags(self, cfg) -> dict[str, str]:
        return {"kapao_size": cfg.model.size, "kapao_keypoints": cfg.model.keypoints}

    def _dataset(self, cfg, ann_file, image_dir, train: bool):
        from trainer.kapao.dataset import KapaoDataset

        k = num_keypoints(cfg)
        return KapaoDataset(
            ann_file,
            image_dir,
            config=cfg.data,
            train=train,
            num_keypoints=k,
            sigmas=np.asarray(SIGMAS[:k]),
            cache_dir=cfg.data.cache_dir,
        )

    def build_datasets(self, cfg, paths: Mapping[str, str | None]):
        train_set = self._dataset(cfg, paths["train_ann"], paths["train_images"], train=True)
        val_set = self._dataset(cfg, paths["val_ann"], paths["val_images"], train=False)
        return train_set, val_set

    def eval_dataset(self, cfg, ann_file, image_dir, det_file=None):
        """Every image of ``ann_file``, letterboxed; KAPAO detects the people itself."""
        if det_file is not None:
            from trainer.checkpoint import EvalError

            raise EvalError(
                f"a detection file was given ({det_file}), but KAPAO detects people itself and needs no "
                "detection file: leave out --det-file"
            )
        return self._dataset(cfg, ann_file, image_dir, train=False)

    def collate_fn(self, cfg) -> Callable:
        return collate_batch

    def build_model(self, cfg, pretrained: bool = True) -> torch.nn.Module:
        from trainer.kapao.model import build_kapao_model

        return build_kapao_model(
            cfg.model.size, num_keypoints(cfg), cfg.model.pretrained_path if pretrained else None
        )

    def build_optimizer(self, cfg, model, iters_per_epoch: int):
        # The batch of one optimiser step is what the running workers load (``num_workers`` is what a Ray
        # run starts; ``python -m trainer`` of the same config trains in one process): accumulation and the
        # weight-decay scaling follow it.
        total_batch = cfg.batch_size * _world_size()
        return build_optimizer(model, cfg.optim, cfg.epochs, iters_per_epoch, total_batch)

    def grad_clip(self, cfg) -> float | None:
        return cfg.optim.grad_clip

    def training(self, cfg, model, device: torch.device) -> KapaoTraining:
        return KapaoTraining(cfg, model, device)

    def predict(self, model, loader, cfg, device, amp_dtype, channels_last: bool) -> dict:
        return predict_poses(model, loader, cfg.eval, device, amp_dtype, channels_last)

    def results(self, predictions: Mapping, cfg) -> list[dict]:
        from trainer.evaluation.wholebody import keypoints_to_results

        if len(predictions["image_ids"]) == 0:
            return []
        return keypoints_to_results(
            predictions["image_ids"].tolist(), predictions["keypoints"], predictions["scores"]
        )

    def selection_score(self, metrics: Mapping[str, float], cfg=None) -> float | None:
        part = "body" if cfg is not None and cfg.model.keypoints == "body" else "wholebody"
        ap, ap50 = metrics.get(f"val/{part}_AP"), metrics.get(f"val/{part}_AP50")
        if ap is None or ap50 is None:
            return None
        return 0.1 * ap50 + 0.9 * ap

    def run_artifacts(self, cfg, checkpoint_dir, out_dir) -> tuple[list, list[str]]:
        return [], []

    def describe_inference(self, cfg) -> str:
        return (
            f"model KAPAO-{cfg.model.size.upper()} ({num_keypoints(cfg)} keypoints), "
            f"input {cfg.data.input_size}x{cfg.data.input_size} letterboxed"
        )

    def describe_model(self, cfg) -> str:
        return f"KAPAO-{cfg.model.size.upper()} with {num_keypoints(cfg)} keypoints ({cfg.model.keypoints})"

    def describe_recipe(self, cfg) -> tuple[str, str]:
        size = cfg.data.input_size
        return f"{self.describe_model(cfg)} at {size}x{size}", f"SGD lr0 {cfg.optim.lr0:g} (cosine)"

    def latency_probe(self, cfg, dataset, images: int = PROBE_IMAGES, image_ids=None):
        """Per image the whole image letterboxed to ``data.input_size``; post-processing: decode of the
        candidates, NMS of both object types, fusion (``eval.*``), keypoints back in image pixels."""
        from trainer.kapao.postprocess import poses_from_outputs, to_wholebody
        from trainer.latency import LatencyProbe, first_images

        sample_images = dataset.image_ids
        index_of = {int(image_id): i for i, image_id in reversed(list(enumerate(sample_images)))}
        samples = [dataset[index_of[i]] for i in first_images(sample_images, images, image_ids)]
        letterboxes = [(float(s["ratio"]), (float(s["pad"][0]), float(s["pad"][1]))) for s in samples]

        def forward(model, x):
            return model(images_to_float(x))

        def post(outputs, indices) -> int:
            outputs = [o.float() for o in outputs]
            poses = poses_from_outputs(outputs, cfg.eval, [letterboxes[i] for i in indices])
            return sum(len(to_wholebody(keypoints)) for keypoints, _ in poses)

        return LatencyProbe(inputs=[s["image"][None] for s in samples], forward=forward, post=post)


def collate_batch(batch: list[dict]) -> dict:
    """``collate_kapao`` plus ``image`` (the same uint8 tensor): the shared loop counts samples by it."""
    out = collate_kapao(batch)
    out["image"] = out["images"]
    return out


def batch_candidates(model, batch, tta: str, pose_floor: float, keypoint_floor: float, device, amp_dtype,
                     channels_last: bool) -> tuple[list, list, list]:  # fmt: skip
    """One val batch of ``collate_batch`` through the network (every pass of the TTA mode ``tta``):
    ``(image ids, letterboxes, per-image Candidates above the floors)``. ``fowkal eval`` and the candidate
    cache of ``fowkal tune-eval`` both run this, so both see the same candidates."""
    images = images_to_float(batch["images"].to(device, non_blocking=True))

    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(x)
        return [o.float() for o in outputs]

    letterboxes = [
        (float(r), (float(p[0]), float(p[1])))
        for r, p in zip(batch["ratios"].tolist(), batch["pads"].tolist(), strict=True)
    ]
    found = augmented_candidates(forward, images, tta, pose_floor, keypoint_floor)
    return batch["image_ids"].tolist(), letterboxes, found


def predictions_from_poses(image_ids, poses) -> dict:
    """``predict_poses``' arrays from per-image ``(keypoints [P, K, 3], scores [P])`` (``image_ids`` in the
    same order)."""
    ids, keypoints, scores = [], [], []
    for image_id, (kps, pose_scores) in zip(image_ids, poses, strict=True):
        keypoints.append(to_wholebody(kps).astype(np.float32))
        scores.append(pose_scores.detach().float().cpu().numpy().reshape(-1))
        ids.append(np.full(len(scores[-1]), image_id, dtype=np.int64))
    if not ids:
        return {
            "image_ids": np.zeros(0, np.int64),
            "keypoints": np.zeros((0, NUM_KEYPOINTS, 3), np.float32),
            "scores": np.zeros(0, np.float32),
        }
    return {
        "image_ids": np.concatenate(ids),
        "keypoints": np.concatenate(keypoints),
        "scores": np.concatenate(scores),
    }


@torch.no_grad()
def predict_poses(model, loader, settings: KapaoEvalConfig, device, amp_dtype, channels_last: bool) -> dict:
    """Poses of every image of ``loader`` (val batches of ``collate_batch``) in original-image pixels, with
    the test-time augmentation ``settings.tta``.

    Returns ``image_ids`` int64 ``[N]``, ``keypoints`` float32 ``[N, 133, 3]`` (K = 17 padded with zeros) and
    ``scores`` float32 ``[N]``, one row per pose; arrays that concatenate on axis 0 across workers.
    """
    settings.validate()
    model.eval()
    image_ids, poses = [], []
    for batch in loader:
        ids, letterboxes, found = batch_candidates(
            model, batch, settings.tta, settings.tau_cp, settings.tau_ck, device, amp_dtype, channels_last
        )
        image_ids += ids
        poses += [poses_from_candidates(c, settings, lb) for c, lb in zip(found, letterboxes, strict=True)]
    return predictions_from_poses(image_ids, poses)


KAPAO = KapaoFamily()

__all__ = [
    "EVAL_SETTING_KEYS",
    "KAPAO",
    "KEYPOINT_SETS",
    "KapaoDataConfig",
    "KapaoEvalSweep",
    "KapaoFamily",
    "KapaoModelConfig",
    "KapaoTraining",
    "SECTIONS",
    "collate_batch",
    "num_keypoints",
    "batch_candidates",
    "predict_poses",
    "predictions_from_poses",
]
