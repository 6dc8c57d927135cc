"""The top-down family's config sections (``data``, ``model``, ``optim``, ``eval``; ``loss`` is
``trainer.topdown.losses.LossConfig``) and their range checks. Each default is written here once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from trainer.datasets.sources import DataSourceConfig
from trainer.evaluation.wholebody import OKS_NMS_THR, RESCORE_KEYPOINT_THR
from trainer.topdown.codec import FLIP_MODES
from trainer.topdown.data import PipelineConfig
from trainer.topdown.losses import LOSS_VARIANTS
from trainer.topdown.model import SUPPORTED_BACKBONES

# The paper's schedule (Implementation Details): lr x0.1 at epochs 170 and 200 of 210.
PAPER_EPOCHS = 210
PAPER_LR_DECAY_EPOCHS = (170, 200)


@dataclass
class DataConfig(DataSourceConfig):
    """The data set (``DataSourceConfig``) and the top-down pipeline's parameters.

    ``val_det_file`` (e.g. the AP_H 56 person detections) switches validation from ground-truth boxes to
    detection boxes with ``det_score_thr``.
    """

    val_det_file: str | None = None
    det_score_thr: float = 0.0
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


@dataclass
class ModelConfig:
    """Backbone and weights; the KAF head is built when the loss variant needs it."""

    backbone: str = "hrnet_w32"
    # Local ImageNet weights (.safetensors or .pth); null trains from scratch. Never downloaded.
    pretrained_path: str | None = None


@dataclass
class OptimConfig:
    """Adam with linear warm-up and step decay (paper, Implementation Details).

    The decay points are fractions of ``TrainConfig.epochs`` so that the paper's 170/210 and 200/210 carry
    over to shorter runs; a milestone at epoch e multiplies the lr by ``lr_decay_factor`` from epoch e on.
    """

    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    lr_decay_at: tuple[float, ...] = tuple(e / PAPER_EPOCHS for e in PAPER_LR_DECAY_EPOCHS)
    lr_decay_factor: float = 0.1
    # Max global L2 norm of the gradients; null disables clipping.
    grad_clip: float | None = None


@dataclass
class EvalConfig:
    """How validation and ``fowkal eval`` turn heatmaps into keypoints (beyond ``flip_test`` itself)."""

    # Flip test: the mirrored heatmaps are put back with MMPose's one-pixel shift ("shift", the paper's
    # recipe), unshifted ("none"), or about the input's pixel grid ("exact"; codec.flip_back_heatmaps).
    flip_mode: str = "shift"
    # DARK's modulating Gaussian (codec.decode_dark): odd kernel size, sigma derived as OpenCV's (2.0 for 11).
    blur_kernel: int = 11
    # Instance rescoring (evaluate.rescore_instances): keypoints scoring above this count towards the mean.
    rescore_keypoint_thr: float = RESCORE_KEYPOINT_THR
    # Per-image OKS-NMS (evaluate.oks_nms): a candidate with OKS above this to a kept one is dropped.
    nms_thr: float = OKS_NMS_THR


# The settings that change how a trained model is evaluated, not the model: what ``fowkal eval --set`` and
# ``fowkal tune-eval``'s search space may name.
EVAL_SETTING_KEYS: tuple[str, ...] = (
    *(f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)),
    "data.det_score_thr",
)

SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
}


def validate(cfg, check) -> None:
    """Range checks of the top-down sections: ``check(ok, dotted_key, value, expected)``."""
    check(
        cfg.model.backbone in SUPPORTED_BACKBONES,
        "model.backbone",
        cfg.model.backbone,
        f"one of {SUPPORTED_BACKBONES}",
    )
    variants = tuple(LOSS_VARIANTS)
    check(cfg.loss.variant in variants, "loss.variant", cfg.loss.variant, f"one of {variants}")
    check(cfg.eval.flip_mode in FLIP_MODES, "eval.flip_mode", cfg.eval.flip_mode, f"one of {FLIP_MODES}")
    kernel = cfg.eval.blur_kernel
    check(kernel >= 1 and kernel % 2 == 1, "eval.blur_kernel", kernel, "an odd integer >= 1")
    for key in ("rescore_keypoint_thr", "nms_thr"):
        check(0 <= getattr(cfg.eval, key) <= 1, f"eval.{key}", getattr(cfg.eval, key), "a number in [0, 1]")
    check(cfg.data.det_score_thr >= 0, "data.det_score_thr", cfg.data.det_score_thr, "a number >= 0")
    input_w, input_h = cfg.data.pipeline.input_size
    check(
        input_w % 32 == 0 and input_h % 32 == 0,
        "data.pipeline.input_size",
        list(cfg.data.pipeline.input_size),
        "[w, h] both multiples of 32 (HRNet's lowest branch has stride 32)",
    )
    check(
        tuple(cfg.data.pipeline.heatmap_size) == (input_w // 4, input_h // 4),
        "data.pipeline.heatmap_size",
        list(cfg.data.pipeline.heatmap_size),
        f"[{input_w // 4}, {input_h // 4}] (input_size / 4: the model predicts at stride 4)",
    )
    optim = cfg.optim
    check(optim.lr > 0, "optim.lr", optim.lr, "a positive number")
    check(optim.weight_decay >= 0, "optim.weight_decay", optim.weight_decay, "a number >= 0")
    check(optim.warmup_iters >= 0, "optim.warmup_iters", optim.warmup_iters, "an integer >= 0")
    check(0 < optim.warmup_ratio <= 1, "optim.warmup_ratio", optim.warmup_ratio, "a number in (0, 1]")
    check(
        all(0 < f <= 1 for f in optim.lr_decay_at) and list(optim.lr_decay_at) == sorted(optim.lr_decay_at),
        "optim.lr_decay_at",
        list(optim.lr_decay_at),
        "increasing fractions of the epochs in (0, 1]",
    )
    check(optim.lr_decay_factor > 0, "optim.lr_decay_factor", optim.lr_decay_factor, "a positive number")
    check(optim.grad_clip is None or optim.grad_clip > 0, "optim.grad_clip", optim.grad_clip, "null or > 0")


__all__ = [
    "DataConfig",
    "EVAL_SETTING_KEYS",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "PAPER_EPOCHS",
    "PAPER_LR_DECAY_EPOCHS",
    "SECTIONS",
    "validate",
]
