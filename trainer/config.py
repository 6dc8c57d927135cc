"""Training configuration: dataclasses mirrored by YAML files, with strict loading and ``--set`` overrides.

A config file is a YAML mapping with the same nesting as ``TrainConfig``::

    name: smoke
    epochs: 4
    data: {kind: synthetic, pipeline: {input_size: [96, 128], heatmap_size: [24, 32]}}
    model: {backbone: hrnet_w18_small}
    loss: {variant: fowkal}

Keys left out take the dataclass defaults (the paper's recipe where the paper gives one). Unknown keys and
values of the wrong type raise ``ConfigError`` naming the file and the dotted key, before any work starts.
``load_config(path, ["optim.lr=1e-3", "loss.variant=mse"])`` applies overrides, each value parsed as YAML.

Relative paths in the config are kept as written and resolved by the process that opens them (the training
worker), i.e. against its working directory: with ``ray job submit --working-dir .`` that is the uploaded
repository on every node.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.codec import FLIP_MODES
from trainer.data import PipelineConfig
from trainer.losses import LOSS_VARIANTS as HEATMAP_LOSS_VARIANTS
from trainer.losses import LossConfig, LossSettingError
from trainer.model import SUPPORTED_BACKBONES

LOSS_VARIANTS: tuple[str, ...] = tuple(HEATMAP_LOSS_VARIANTS)
AMP_MODES: tuple[str, ...] = ("auto", "bf16", "fp16", "none")
DATA_KINDS: tuple[str, ...] = ("synthetic", "coco_wholebody")

# The paper's schedule (Implementation Details): lr x0.1 at epochs 170 and 200 of 210.
PAPER_EPOCHS = 210
PAPER_LR_DECAY_EPOCHS = (170, 200)


class ConfigError(ValueError):
    """A config file or override that does not match the dataclasses (names the file and dotted key)."""


@dataclass
class DataConfig:
    """Where the images and annotations come from, and the top-down pipeline's parameters.

    ``kind: synthetic`` generates ``trainer.synth`` data sets under ``synthetic_dir`` on first use (one for
    training with ``synthetic_train_seed``, one for validation with a different seed), reused afterwards.
    ``kind: coco_wholebody`` reads the real data set; ``val_det_file`` (e.g. the AP_H 56 person detections)
    switches validation from ground-truth boxes to detection boxes with ``det_score_thr``.
    """

    kind: str = "coco_wholebody"
    synthetic_dir: str = "data/synthetic"
    synthetic_train_images: int = 256
    synthetic_val_images: int = 32
    synthetic_train_seed: int = 0
    synthetic_val_seed: int = 1
    train_ann_file: str = "data/coco/annotations/coco_wholebody_train_v1.0.json"
    train_image_root: str = "data/coco/train2017"
    val_ann_file: str = "data/coco/annotations/coco_wholebody_val_v1.0.json"
    val_image_root: str = "data/coco/val2017"
    val_det_file: str | None = None
    det_score_thr: float = 0.0
    # DataLoader worker processes per training worker (0 = load in the training process).
    loader_workers: int = 2
    val_batch_size: int = 64
    # Per-node annotation cache (trainer.annotation_cache); null = $XDG_CACHE_HOME/fowkal or ~/.cache/fowkal.
    cache_dir: str | None = None
    # GT instances used: "body" = num_keypoints > 0 (MMPose), "any" = any of the 133 keypoints labelled.
    gt_instances: str = "body"
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
    rescore_keypoint_thr: float = 0.2
    # Per-image OKS-NMS (evaluate.oks_nms): a candidate with OKS above this to a kept one is dropped.
    nms_thr: float = 0.9


# The settings that change how a trained model is evaluated, not the model: what ``fowkal eval --set`` and
# ``fowkal tune-eval``'s search space may name.
EVAL_SETTING_KEYS: tuple[str, ...] = (
    *(f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)),
    "data.det_score_thr",
)


@dataclass
class TrainConfig:
    """One training run: what ``trainer.loop.train_loop_per_worker`` runs and ``fowkal train`` launches."""

    name: str = "fowkal"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    epochs: int = PAPER_EPOCHS
    batch_size: int = 32  # per training worker (per GPU)
    eval_interval: int = 10  # epochs between evaluations; the last epoch is always evaluated
    seed: int = 0
    amp: str = "auto"  # CUDA only: auto = bf16 where supported, else fp16; ignored on CPU
    channels_last: bool = True  # CUDA only
    flip_test: bool = True
    output_dir: str = "runs/fowkal"
    # Ray Train scaling: workers (one per GPU with use_gpu) and restarts after a worker failure.
    num_workers: int = 1
    use_gpu: bool = False
    max_failures: int = 0


# ----------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check ``value`` against a type annotation; return it converted (lists -> tuples, ints -> floats)."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {expected}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise fail(" or ".join(_type_name(o) for o in options))
        non_none = [o for o in options if o is not type(None)]
        errors = []
        for option in non_none:
            try:
                return _coerce(value, option, key, source)
            except ConfigError as err:
                errors.append(err)
        raise fail(" or ".join(_type_name(o) for o in options))
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise fail(f"a mapping of {annotation.__name__} fields")
        return _build(annotation, value, key, source)
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise fail(f"a list ({_type_name(annotation)})")
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                raise fail(f"a list of {len(args)} items")
            item_types = list(args)
        return tuple(
            _coerce(v, t, f"{key}[{i}]", source)
            for i, (v, t) in enumerate(zip(value, item_types, strict=True))
        )
    if annotation is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if annotation is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-3 without a dot as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail("a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    raise fail(_type_name(annotation))  # pragma: no cover - an annotation this module does not use


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(
                f"{source}: unknown key {dotted!r} (known in {cls.__name__}: {', '.join(sorted(names))})"
            )
    kwargs = {}
    for name, value in values.items():
        dotted = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], dotted, source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # e.g. PipelineConfig's own checks
        raise ConfigError(f"{source}: {prefix or cls.__name__}: {err}") from err


def _validate(cfg: TrainConfig, source: str) -> None:
    def check(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key}: expected {expected}, got {value!r}")

    check(cfg.data.kind in DATA_KINDS, "data.kind", cfg.data.kind, f"one of {DATA_KINDS}")
    check(
        cfg.model.backbone in SUPPORTED_BACKBONES,
        "model.backbone",
        cfg.model.backbone,
        f"one of {SUPPORTED_BACKBONES}",
    )
    check(cfg.loss.variant in LOSS_VARIANTS, "loss.variant", cfg.loss.variant, f"one of {LOSS_VARIANTS}")
    check(cfg.amp in AMP_MODES, "amp", cfg.amp, f"one of {AMP_MODES}")
    check(cfg.eval.flip_mode in FLIP_MODES, "eval.flip_mode", cfg.eval.flip_mode, f"one of {FLIP_MODES}")
    kernel = cfg.eval.blur_kernel
    check(kernel >= 1 and kernel % 2 == 1, "eval.blur_kernel", kernel, "an odd integer >= 1")
    for key in ("rescore_keypoint_thr", "nms_thr"):
        check(0 <= getattr(cfg.eval, key) <= 1, f"eval.{key}", getattr(cfg.eval, key), "a number in [0, 1]")
    check(cfg.data.det_score_thr >= 0, "data.det_score_thr", cfg.data.det_score_thr, "a number >= 0")
    for key in ("epochs", "batch_size", "eval_interval", "num_workers"):
        check(getattr(cfg, key) >= 1, key, getattr(cfg, key), "an integer >= 1")
    check(cfg.max_failures >= -1, "max_failures", cfg.max_failures, "an integer >= -1 (-1 = retry forever)")
    for key in ("synthetic_train_images", "synthetic_val_images", "val_batch_size"):
        value = getattr(cfg.data, key)
        check(value >= 1, f"data.{key}", value, "an integer >= 1")
    check(cfg.data.loader_workers >= 0, "data.loader_workers", cfg.data.loader_workers, "an integer >= 0")
    if cfg.data.kind == "synthetic":
        check(
            cfg.data.synthetic_train_seed != cfg.data.synthetic_val_seed,
            "data.synthetic_val_seed",
            cfg.data.synthetic_val_seed,
            "a seed different from data.synthetic_train_seed (validation must not be the training set)",
        )
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
    try:  # the loss's own range checks, here before any Ray work, naming the key
        cfg.loss.validate()
    except LossSettingError as err:
        raise ConfigError(f"{source}: loss.{err.field}: {err}") from err


def config_from_dict(values: dict, source: str = "<dict>") -> TrainConfig:
    """A validated ``TrainConfig`` from a nested dict (``config_to_dict``'s output or parsed YAML)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(values).__name__}")
    cfg = _build(TrainConfig, values, "", source)
    _validate(cfg, source)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    """Nested plain dict (tuples as lists): YAML-, JSON- and Ray-friendly; ``config_from_dict`` inverts it."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def flatten_dict(values: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys to leaves (``{"loss": {"tau": 1}}`` -> ``{"loss.tau": 1}``)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_dict(value, dotted))
        else:
            flat[dotted] = value
    return flat


def flatten_config(cfg: TrainConfig) -> dict[str, Any]:
    """Dotted keys to scalars (lists joined as strings), e.g. for MLflow params: ``{"loss.variant": ...}``."""
    return {
        key: ",".join(str(v) for v in value) if isinstance(value, list) else value
        for key, value in flatten_dict(config_to_dict(cfg)).items()
    }


def config_digest(cfg: TrainConfig | Mapping, exclude: typing.Iterable[str] = ("max_failures",)) -> str:
    """8 hex digits of the config's content, without the top-level keys that do not change what is trained.

    The identity behind resumable names: ``fowkal train``'s Ray run name and a sweep's default name.
    """
    values = config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else copy.deepcopy(dict(cfg))
    for key in exclude:
        values.pop(key, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------------------
# Dotted keys: the one override engine (``--set``, search spaces, ablation arms)


def _config_keys() -> tuple[str, ...]:
    return tuple(flatten_dict(config_to_dict(TrainConfig())))


# Every leaf of TrainConfig by dotted key (loss.tau, optim.lr, data.pipeline.sigma, ...).
CONFIG_KEYS: tuple[str, ...] = _config_keys()


def unknown_key_message(key: str) -> str:
    """Why ``key`` is not a TrainConfig leaf: a section, or a typo (with the closest keys)."""
    parts = key.split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth])
        if prefix in CONFIG_KEYS:
            return f"{prefix!r} is a value of TrainConfig, it has no sub-keys ({key!r})"
    leaves = [k for k in CONFIG_KEYS if k.startswith(f"{key}.")]
    if leaves:
        return f"{key!r} is a section of TrainConfig, not a value: name a leaf such as {leaves[0]}"
    close = difflib.get_close_matches(key, CONFIG_KEYS, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown TrainConfig key {key!r}{hint} (keys look like loss.tau, optim.lr)"


def set_dotted(values: dict, key: str, value: Any) -> None:
    """Set ``values[a][b][c] = value`` for ``key = "a.b.c"``, creating missing sections."""
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def apply_overrides(config_dict: Mapping, overrides: Mapping[str, Any]) -> dict:
    """A copy of a nested ``TrainConfig`` dict with ``overrides`` (dotted leaf key -> value) set.

    Missing intermediate sections are created, so a partial dict read from a config YAML works too.

    Raises:
        ConfigError: an override key is not a ``TrainConfig`` leaf (names the key, suggests close ones).
    """
    if not isinstance(config_dict, Mapping):
        raise ConfigError(f"apply_overrides: config_dict must be a mapping, got {type(config_dict).__name__}")
    result = copy.deepcopy(dict(config_dict))
    for key, value in overrides.items():
        if key not in CONFIG_KEYS:
            raise ConfigError(f"apply_overrides: {unknown_key_message(key)}")
        set_dotted(result, key, value)
    return result


# Fields holding file system paths, as (section, field); "" is the top level.
PATH_FIELDS: tuple[tuple[str, str], ...] = (
    ("", "output_dir"),
    ("data", "synthetic_dir"),
    ("data", "train_ann_file"),
    ("data", "train_image_root"),
    ("data", "val_ann_file"),
    ("data", "val_image_root"),
    ("data", "val_det_file"),
    ("model", "pretrained_path"),
)


def resolve_paths(cfg: TrainConfig, base_dir: str | Path | None = None) -> TrainConfig:
    """A copy of ``cfg`` with every relative path made absolute against ``base_dir`` (default: the cwd).

    Useful on a driver before handing the config to Ray Train workers, which Ray Train V2 starts in a
    per-run directory of its own (unless ``RAY_CHDIR_TO_TRIAL_DIR=0``).
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    cfg = copy.deepcopy(cfg)
    for section, name in PATH_FIELDS:
        holder = getattr(cfg, section) if section else cfg
        value = getattr(holder, name)
        if value is not None and not Path(value).is_absolute():
            setattr(holder, name, str((base / value).resolve()))
    return cfg


def _apply_override(values: dict, override: str, source: str) -> None:
    """One ``--set key=value`` (value parsed as YAML) on the nested dict read from a config file."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"{source}: override {override!r} must look like key.subkey=value")
    dotted, raw = override.split("=", 1)
    dotted = dotted.strip()
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: override {dotted!r}: value {raw!r} is not valid YAML: {err}") from err
    if dotted not in CONFIG_KEYS:
        raise ConfigError(f"{source}: override {dotted!r}: {unknown_key_message(dotted)}")
    # Keys the file leaves at their defaults can be overridden too; a section the file wrote as a
    # non-mapping is its own error, named, rather than silently replaced.
    node = values
    parts = dotted.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is not None and not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[: depth + 1])}: expected a mapping, got {child!r}")
        node = node.setdefault(part, {}) if child is None else child
    node[parts[-1]] = value


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config, apply ``key.subkey=value`` overrides (values parsed as YAML) and validate it.

    Raises:
        ConfigError: the file is missing or not YAML, or a key is unknown or has the wrong type or value
            (the message names the file, or ``--set`` for overrides, and the dotted key).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    source = str(path)
    for override in overrides:
        _apply_override(values, override, f"{source} (--set)")
    return config_from_dict(values, source)


__all__ = [
    "AMP_MODES",
    "CONFIG_KEYS",
    "ConfigError",
    "DATA_KINDS",
    "DataConfig",
    "EVAL_SETTING_KEYS",
    "EvalConfig",
    "LOSS_VARIANTS",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "config_digest",
    "config_from_dict",
    "config_to_dict",
    "flatten_config",
    "flatten_dict",
    "load_config",
    "set_dotted",
    "unknown_key_message",
    "resolve_paths",
]
