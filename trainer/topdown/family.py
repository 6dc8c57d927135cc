"""The top-down heatmap family as the shared code sees it (``trainer.families.ExperimentFamily``).

HRNet on person crops (``trainer.topdown.model``), DARK heatmaps (``trainer.topdown.codec``), the crop
pipeline
(``trainer.topdown.data``), the FoWKAL loss family (``trainer.topdown.losses``: the variant table), flip test
+ DARK +
rescoring + OKS-NMS at evaluation (``trainer.topdown.inference``). Per epoch it reports the loss per part
and, for
the variants with a KAF head (KAL), the per-part mean and spread of the keypoint-wise adaptive factors;
checkpoints hold the KAF history ``[epochs, K]`` (the paper's Fig. 5), also written as ``kaf_history.npy``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.datasets.keypoints import COCO_WHOLEBODY_PARTS, NUM_KEYPOINTS
from trainer.evaluation.wholebody import VAL_METRICS
from trainer.latency import PROBE_IMAGES
from trainer.topdown import config as topdown_config
from trainer.topdown.losses import (
    LOSS_VARIANTS,
    VARIANT_PROPERTIES,
    HeatmapLoss,
    LossConfig,
    LossSettingError,
)

PARTS = tuple(COCO_WHOLEBODY_PARTS)  # body, foot, face, hand
KAF_HISTORY_FILE = "kaf_history.npy"


class TopDownTraining:
    """The FoWKAL loss of one run on one worker, and the KAF statistics it tracks (KAL variants)."""

    def __init__(self, cfg, device: torch.device) -> None:
        self.loss_fn = HeatmapLoss(cfg.loss)
        self.needs_kaf = self.loss_fn.needs_kaf
        self.loss_parts = PARTS + (("reg",) if self.needs_kaf else ())
        self.device = device
        self.kaf_history: list[np.ndarray] = []
        self._reset()

    def _reset(self) -> None:
        self.kaf_sum = torch.zeros(NUM_KEYPOINTS, dtype=torch.float64, device=self.device)
        self.kaf_sq_sum = torch.zeros_like(self.kaf_sum)
        self.samples = torch.zeros(1, dtype=torch.float64, device=self.device)

    def step(self, model, batch: dict, device: torch.device, amp_dtype, channels_last: bool):
        images = batch["image"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = batch["heatmaps"].to(device, non_blocking=True)
        target_weight = batch["target_weight"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            heatmaps, kaf = model(images)
        # The loss in float32: AWing's log and FWAHR's powers are not half-precision friendly.
        total, parts = self.loss_fn(
            heatmaps.float(),
            target,
            target_weight,
            kaf=None if kaf is None else kaf.float(),
            return_parts=True,
        )
        self.samples += images.shape[0]
        if kaf is not None:
            kaf = kaf.detach().double()
            self.kaf_sum += kaf.sum(0)
            self.kaf_sq_sum += (kaf * kaf).sum(0)
        return total, parts

    def epoch_metrics(self, all_reduce: Callable[[torch.Tensor], None] | None) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.needs_kaf:
            if all_reduce is not None:
                for tensor in (self.kaf_sum, self.kaf_sq_sum, self.samples):
                    all_reduce(tensor)
            kaf_mean = (self.kaf_sum / self.samples[0]).cpu().numpy()
            kaf_sq_mean = (self.kaf_sq_sum / self.samples[0]).cpu().numpy()
            self.kaf_history.append(kaf_mean.astype(np.float32))
            for name, indices in COCO_WHOLEBODY_PARTS.items():
                mean = float(kaf_mean[list(indices)].mean())  # over samples and the part's keypoints
                variance = float(kaf_sq_mean[list(indices)].mean()) - mean * mean
                metrics[f"kaf/{name}_mean"] = mean
                metrics[f"kaf/{name}_std"] = max(variance, 0.0) ** 0.5
        self._reset()
        return metrics

    def checkpoint_state(self) -> dict[str, Any]:
        history = np.asarray(self.kaf_history, dtype=np.float32).reshape(-1, NUM_KEYPOINTS)
        return {"kaf_history": torch.from_numpy(history)}

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        self.kaf_history = [row.numpy() for row in state["kaf_history"]]

    def write_outputs(self, directory) -> list[str]:
        if not self.kaf_history:
            return []
        np.save(Path(directory) / KAF_HISTORY_FILE, np.asarray(self.kaf_history, dtype=np.float32))
        return [KAF_HISTORY_FILE]

    def after_optimizer_step(self, model) -> None:
        return None

    def eval_model(self, model):
        return model


class HeatmapEvalSweep:
    """``fowkal tune-eval`` of the top-down family (``trainer.families.EvalSweep``): the plain and mirrored
    heatmaps of every box down to the space's lowest detection score, cached once
    (``trainer.topdown.heatmap_cache``); a trial decodes them with its flip mode and kernel (once per pair and
    sweep, every kernel of the space in one pass), rescores, suppresses and scores."""

    setting_keys = topdown_config.EVAL_SETTING_KEYS

    def base_settings(self, cfg) -> dict[str, Any]:
        values = {f"eval.{key}": value for key, value in dataclasses.asdict(cfg.eval).items()}
        values["data.det_score_thr"] = float(cfg.data.det_score_thr)
        return values

    def build_cache(self, loaded, ann_file, image_dir, cache_root, *, det_file, reach, progress: bool):
        from trainer.families import SweepCacheInfo
        from trainer.topdown.heatmap_cache import build_heatmap_cache

        config = loaded.config
        base = self.base_settings(config)
        floor = min(reach.get("data.det_score_thr", (base["data.det_score_thr"],)))
        kernels = {int(k) for k in reach.get("eval.blur_kernel", ()) if int(k) % 2 == 1}
        cache = build_heatmap_cache(
            loaded,
            ann_file,
            image_dir,
            Path(cache_root) / "heatmap_cache",
            det_file=det_file,
            det_score_thr=float(floor),
            progress=progress,
        )
        options = {
            "flip_test": bool(config.flip_test),
            "batch_size": int(config.data.val_batch_size),
            "kernels": tuple(sorted(kernels | {int(base["eval.blur_kernel"])})),
        }
        return SweepCacheInfo(str(cache.path), len(cache.image_ids), "boxes", options)

    def open_cache(self, path):
        from trainer.topdown.heatmap_cache import HeatmapCache

        return HeatmapCache.open(path)

    def score(self, cache, settings, evaluator, options, *, image_ids=None, memo_dir=None):
        from trainer.families import SweepScore

        eval_settings = topdown_config.EvalConfig(
            **{key[len("eval.") :]: value for key, value in settings.items() if key.startswith("eval.")}
        )
        metrics, boxes = cache.evaluate(
            eval_settings,
            float(settings["data.det_score_thr"]),
            evaluator,
            options.get("flip_test", True),
            options.get("batch_size", 64),
            kernels=options.get("kernels", ()),
            memo_dir=memo_dir,
            image_ids=image_ids,
        )
        return SweepScore(metrics, boxes)


class TopDownHeatmapFamily:
    """``family: topdown_heatmap``: see the module docstring."""

    name = "topdown_heatmap"
    summary = "HRNet + DARK heatmaps on person crops, the FoWKAL loss family (top-down)"
    sections: Mapping[str, type] = {**topdown_config.SECTIONS, "loss": LossConfig}
    eval_setting_keys = topdown_config.EVAL_SETTING_KEYS
    sweep_conditions = {"loss.variant": (LOSS_VARIANTS, VARIANT_PROPERTIES)}
    arm_key = "loss.variant"
    selection_metric = "val/wholebody_AP"
    best_on_ties = False  # MMPose's CheckpointHook: save_best with the rule "greater" (strictly)
    val_metrics = VAL_METRICS
    # ``fowkal tune-eval`` caches this family's heatmaps (trainer.topdown.heatmap_cache) and sweeps their
    # decoding.
    heatmap_eval_sweep = True
    setting_errors = (LossSettingError,)
    eval_sweep = HeatmapEvalSweep()
    predicts_per_box = True  # one prediction row per person box of the eval data set

    def validate(self, cfg, check, fail) -> None:
        topdown_config.validate(cfg, check)
        try:  # the loss's own range checks, naming the key
            cfg.loss.validate()
        except LossSettingError as err:
            fail(f"loss.{err.field}", str(err))

    def run_label(self, cfg) -> str:
        return cfg.loss.variant

    def run_tags(self, cfg) -> dict[str, str]:
        return {"loss_variant": cfg.loss.variant}

    def build_datasets(self, cfg, paths: Mapping[str, str | None]):
        from trainer.topdown.data import WholeBodyTopDownDataset

        annotations = {"cache_dir": cfg.data.cache_dir, "gt_instances": cfg.data.gt_instances}
        train_set = WholeBodyTopDownDataset(
            paths["train_ann"], paths["train_images"], config=cfg.data.pipeline, train=True, **annotations
        )
        val_set = WholeBodyTopDownDataset(
            paths["val_ann"],
            paths["val_images"],
            config=cfg.data.pipeline,
            train=False,
            det_file=paths["val_det"],
            det_score_thr=cfg.data.det_score_thr,
            **annotations,
        )
        return train_set, val_set

    def eval_dataset(self, cfg, ann_file, image_dir, det_file=None):
        """The test-mode crops of ``ann_file``'s GT boxes, or of ``det_file``'s person detections."""
        from trainer.topdown.data import WholeBodyTopDownDataset

        return WholeBodyTopDownDataset(
            ann_file,
            image_dir,
            config=cfg.data.pipeline,
            train=False,
            det_file=det_file,
            det_score_thr=cfg.data.det_score_thr,
            cache_dir=cfg.data.cache_dir,
            gt_instances=cfg.data.gt_instances,
        )

    def collate_fn(self, cfg):
        return None

    def has_kaf_head(self, cfg) -> bool:
        return LOSS_VARIANTS[cfg.loss.variant].needs_kaf

    def build_model(self, cfg, pretrained: bool = True) -> torch.nn.Module:
        from trainer.topdown.model import build_pose_model

        return build_pose_model(
            cfg.model.backbone,
            NUM_KEYPOINTS,
            with_kaf=self.has_kaf_head(cfg),
            pretrained_path=cfg.model.pretrained_path if pretrained else None,
        )

    def describe_protocol(self, cfg, flip_test: bool, det_file=None, det_score_thr=None) -> tuple[str, str]:
        boxes = f"detections {det_file} (score >= {det_score_thr})" if det_file else "ground-truth boxes"
        return boxes, f"{'flip test' if flip_test else 'no flip test'}, DARK"

    def describe_inference(self, cfg) -> str:
        """The model and its input, for ``fowkal eval``'s first line."""
        pipeline = cfg.data.pipeline
        return (
            f"model {cfg.model.backbone}, loss {cfg.loss.variant}, input {list(pipeline.input_size)}, "
            f"heatmaps {list(pipeline.heatmap_size)}"
        )

    def describe_model(self, cfg) -> str:
        return (
            f"backbone {cfg.model.backbone!r} with {NUM_KEYPOINTS} keypoints"
            + (" and a KAF head" if self.has_kaf_head(cfg) else "")
            + f" (loss variant {cfg.loss.variant!r})"
        )

    def describe_recipe(self, cfg) -> tuple[str, str]:
        width, height = cfg.data.pipeline.input_size
        return f"{cfg.model.backbone} at {height}x{width} (h x w)", f"lr {cfg.optim.lr:g}"

    def latency_probe(self, cfg, dataset, images: int = PROBE_IMAGES, image_ids=None):
        """Per image its person crops (GT boxes or detections: the rows of ``dataset``) at the input size;
        post-processing: DARK decode, inverse crop affine, rescoring and OKS-NMS (no flip test). The person
        detector that gave the boxes is not part of it."""
        from trainer.latency import LatencyProbe, first_images
        from trainer.topdown.inference import decode_heatmaps, results_from_predictions

        sample_images, _ = dataset.sample_ids
        groups = [
            [dataset[int(row)] for row in np.flatnonzero(sample_images == image_id)]
            for image_id in first_images(sample_images, images, image_ids)
        ]
        inputs = [torch.stack([s["image"] for s in group]) for group in groups]
        meta = [
            {
                "center": np.stack([s["center"].numpy() for s in group]),
                "scale": np.stack([s["scale"].numpy() for s in group]),
                "image_ids": np.asarray([s["image_id"] for s in group]),
                "box_scores": np.asarray([s["bbox_score"] for s in group], dtype=np.float64),
            }
            for group in groups
        ]
        input_width = cfg.data.pipeline.input_size[0]

        def forward(model, x):
            return model(x)[0]

        def post(heatmaps, indices) -> int:
            rows = {key: np.concatenate([meta[i][key] for i in indices]) for key in meta[0]}
            heatmaps = heatmaps.float()
            keypoints, scores = decode_heatmaps(
                heatmaps,
                None,
                rows["center"],
                rows["scale"],
                cfg.eval.flip_mode,
                input_width / heatmaps.shape[-1],
                cfg.eval.blur_kernel,
            )
            predictions = {
                "image_ids": rows["image_ids"],
                "keypoints": keypoints,
                "keypoint_scores": scores,
                "box_scores": rows["box_scores"],
                "areas": rows["scale"][:, 0].astype(np.float64) * rows["scale"][:, 1],
            }
            return len(results_from_predictions(predictions, cfg.eval))

        return LatencyProbe(inputs=inputs, forward=forward, post=post)

    def build_optimizer(self, cfg, model, iters_per_epoch: int):
        from trainer.topdown.schedule import build_optimizer

        optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.epochs, iters_per_epoch)
        return optimizer, scheduler, 1

    def grad_clip(self, cfg) -> float | None:
        return cfg.optim.grad_clip

    def training(self, cfg, model, device: torch.device) -> TopDownTraining:
        return TopDownTraining(cfg, device)

    def predict(self, model, loader, cfg, device, amp_dtype, channels_last: bool) -> dict:
        from trainer.topdown.inference import predict_keypoints

        return predict_keypoints(
            model,
            loader,
            device,
            cfg.flip_test,
            amp_dtype,
            channels_last,
            cfg.eval.flip_mode,
            cfg.eval.blur_kernel,
        )

    def results(self, predictions: Mapping, cfg) -> list[dict]:
        from trainer.topdown.inference import results_from_predictions

        return results_from_predictions(predictions, cfg.eval)

    def selection_score(self, metrics: Mapping[str, float], cfg=None) -> float | None:
        return metrics.get(self.selection_metric)

    def run_artifacts(self, cfg, checkpoint_dir: Path, out_dir: Path) -> tuple[list[Path], list[str]]:
        """The files a finished run logs beside its checkpoints, from its last checkpoint's directory: for
        a KAL variant ``kaf_history.npy`` and its figure ``kaf_history.png``. Returns ``(files, notes)``."""
        if not self.has_kaf_head(cfg):
            return [], []
        path = Path(checkpoint_dir) / KAF_HISTORY_FILE
        history = np.load(path) if path.is_file() else None
        if history is None or history.ndim != 2 or history.shape[0] == 0:
            return [], ["the checkpoint holds no KAF history; the KAF figure is skipped"]
        from trainer.topdown.kaf_plot import KAF_PLOT_FILE, plot_kaf_history

        np.save(Path(out_dir) / KAF_HISTORY_FILE, history)
        figure = plot_kaf_history(history, Path(out_dir) / KAF_PLOT_FILE)
        return [Path(out_dir) / KAF_HISTORY_FILE, figure], []


TOPDOWN_HEATMAP = TopDownHeatmapFamily()

__all__ = [
    "KAF_HISTORY_FILE",
    "TOPDOWN_HEATMAP",
    "HeatmapEvalSweep",
    "TopDownHeatmapFamily",
    "TopDownTraining",
]
