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
import functools
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

from trainer.datasets.sources import DATA_KINDS, DataSourceConfig, validate_data_source
from trainer.families import DEFAULT_FAMILY, FAMILIES, UnknownFamilyError, get_family

# The top-down family's sections, importable from here as before families existed.
from trainer.topdown.config import (
    EVAL_SETTING_KEYS,
    PAPER_EPOCHS,
    PAPER_LR_DECAY_EPOCHS,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
)
from trainer.topdown.losses import LOSS_VARIANTS as HEATMAP_LOSS_VARIANTS
from trainer.topdown.losses import LossConfig

LOSS_VARIANTS: tuple[str, ...] = tuple(HEATMAP_LOSS_VARIANTS)
AMP_MODES: tuple[str, ...] = ("auto", "bf16", "fp16", "none")


class ConfigError(ValueError):
    """A config file or override that does not match the dataclasses (names the file and dotted key)."""


@dataclass
class TrainConfig:
    """One training run: what ``trainer.loop.train_loop_per_worker`` runs and ``fowkal train`` launches.

    ``family`` picks the experiment family (``trainer.families``); the sections ``data``, ``model``,
    ``loss``, ``optim`` and ``eval`` are that family's dataclasses (the defaults here are the top-down
    family's). The other fields are shared by every family.
    """

    name: str = "fowkal"
    family: str = DEFAULT_FAMILY
    data: Any = field(default_factory=DataConfig)
    model: Any = field(default_factory=ModelConfig)
    loss: Any = field(default_factory=LossConfig)
    optim: Any = field(default_factory=OptimConfig)
    eval: Any = field(default_factory=EvalConfig)
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


def _build(cls: type, values: dict, prefix: str, source: str, sections: Mapping[str, type] = {}) -> Any:
    """``cls(**values)`` with every value checked against its annotation; ``sections`` gives the dataclass of
    a field annotated ``Any`` (a family's section), built from its defaults when ``values`` leaves it out."""
    hints = {**typing.get_type_hints(cls), **sections}
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{source}: {_unknown_key(dotted, cls.__name__, names)}")
    kwargs = {name: section() for name, section in sections.items() if name not in values}
    for name, value in values.items():
        dotted = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], dotted, source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # e.g. PipelineConfig's own checks
        raise ConfigError(f"{source}: {prefix or cls.__name__}: {err}") from err


def _unknown_key(dotted: str, owner: str, names: typing.Iterable[str]) -> str:
    """The message for a key that ``owner`` lacks; it names the family the key belongs to, if another."""
    owners = [
        name for name in FAMILIES if any(k == dotted or k.startswith(f"{dotted}.") for k in config_keys(name))
    ]
    where = (
        f"; it is a key of family {' / '.join(map(repr, owners))}: set family: {owners[0]}" if owners else ""
    )
    return f"unknown key {dotted!r} (known in {owner}: {', '.join(sorted(names))}){where}"


def _family_name(values: Mapping, source: str) -> str:
    name = values.get("family", DEFAULT_FAMILY)
    try:
        get_family(name)
    except UnknownFamilyError as err:
        raise ConfigError(f"{source}: family: {err}") from err
    return name


def _validate(cfg: TrainConfig, source: str) -> None:
    def check(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key}: expected {expected}, got {value!r}")

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key}: {message}")

    check(cfg.amp in AMP_MODES, "amp", cfg.amp, f"one of {AMP_MODES}")
    for key in ("epochs", "batch_size", "eval_interval", "num_workers"):
        check(getattr(cfg, key) >= 1, key, getattr(cfg, key), "an integer >= 1")
    check(cfg.max_failures >= -1, "max_failures", cfg.max_failures, "an integer >= -1 (-1 = retry forever)")
    validate_data_source(cfg.data, check)
    get_family(cfg.family).validate(cfg, check, fail)


def config_from_dict(values: dict, source: str = "<dict>") -> TrainConfig:
    """A validated ``TrainConfig`` from a nested dict (``config_to_dict``'s output or parsed YAML); its
    sections are the dataclasses of the family ``values["family"]`` names (default ``topdown_heatmap``)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(values).__name__}")
    family = get_family(_family_name(values, source))
    cfg = _build(TrainConfig, values, "", source, family.sections)
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


def config_digest(
    cfg: TrainConfig | Mapping, exclude: typing.Iterable[str] = ("max_failures", "data.max_bad_images")
) -> str:
    """8 hex digits of the config's content, without the (dotted) keys that do not change what is trained.

    The identity behind resumable names: ``fowkal train``'s Ray run name and a sweep's default name. The
    default family is left out, so a config keeps the digest it had before families existed; so are the
    limits on failures (``max_failures``, ``data.max_bad_images``: a run raised past one resumes under its
    name).
    """
    values = config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else copy.deepcopy(dict(cfg))
    for key in exclude:
        *sections, leaf = key.split(".")
        node = values
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    if values.get("family") == DEFAULT_FAMILY:
        values.pop("family")
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------------------
# Dotted keys: the one override engine (``--set``, search spaces, ablation arms, ``fowkal eval --set``)


@functools.cache
def config_keys(family: str = DEFAULT_FAMILY) -> tuple[str, ...]:
    """Every leaf of a ``TrainConfig`` of ``family`` by dotted key (``loss.tau``, ``optim.lr``, ...)."""
    sections = get_family(family).sections
    return tuple(flatten_dict(config_to_dict(_build(TrainConfig, {"family": family}, "", "", sections))))


# Every leaf of the default family's TrainConfig by dotted key (loss.tau, optim.lr, data.pipeline.sigma, ...).
CONFIG_KEYS: tuple[str, ...] = config_keys(DEFAULT_FAMILY)


def unknown_key_message(key: str, family: str = DEFAULT_FAMILY) -> str:
    """Why ``key`` is not a leaf of ``family``'s TrainConfig: a section, another family's key, or a typo
    (with the closest keys)."""
    keys = config_keys(family)
    parts = key.split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth])
        if prefix in keys:
            return f"{prefix!r} is a value of TrainConfig, it has no sub-keys ({key!r})"
    leaves = [k for k in keys if k.startswith(f"{key}.")]
    if leaves:
        return f"{key!r} is a section of TrainConfig, not a value: name a leaf such as {leaves[0]}"
    owners = [name for name in FAMILIES if name != family and key in config_keys(name)]
    if owners:
        return f"{key!r} is a key of family {owners[0]!r}, not of family {family!r} (the config's family)"
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown TrainConfig key {key!r}{hint} (keys look like loss.tau, optim.lr)"


def set_override(values: dict, key: str, value: Any, source: str = "overrides") -> None:
    """Set the dotted leaf ``key`` of a nested config dict in place, after checking it against the keys of
    the dict's family (``values["family"]``, default ``topdown_heatmap``); missing sections are created.

    The one override engine: ``--set``, search spaces, ablation arms and ``fowkal eval --set`` all end here.

    Raises:
        ConfigError: the key is not a leaf of the family's ``TrainConfig`` (named, with the closest keys),
            or the dict holds a non-mapping where the key needs a section.
    """
    if key == "family":
        _family_name({"family": value}, source)
    else:
        family = _family_name(values, source)
        if key not in config_keys(family):
            raise ConfigError(f"{source}: {unknown_key_message(key, family)}")
    node = values
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is not None and not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[: depth + 1])}: expected a mapping, got {child!r}")
        node = node.setdefault(part, {}) if child is None else child
    node[parts[-1]] = value


def set_dotted(values: dict, key: str, value: Any) -> None:
    """Alias of :func:`set_override` (the name before the engines were one)."""
    set_override(values, key, value, source="set_dotted")


def switch_family(config_dict: Mapping, family: str) -> dict:
    """A copy of a nested ``TrainConfig`` dict as a config of ``family``: the shared settings stay (the
    top-level fields and the data source: files, synthetic sets, loaders), the sections of the old family
    go (the new family's defaults apply). How an ablation arm of another family runs on the same data."""
    shared_data = {f.name for f in dataclasses.fields(DataSourceConfig)}
    sections = set(get_family(family).sections) | {
        name for other in FAMILIES.values() for name in other.sections
    }
    result = {k: copy.deepcopy(v) for k, v in config_dict.items() if k not in sections}
    data = config_dict.get("data")
    if isinstance(data, Mapping):
        result["data"] = {k: copy.deepcopy(v) for k, v in data.items() if k in shared_data}
    result["family"] = family
    return result


def apply_overrides(config_dict: Mapping, overrides: Mapping[str, Any]) -> dict:
    """A copy of a nested ``TrainConfig`` dict with ``overrides`` (dotted leaf key -> value) set.

    Missing intermediate sections are created, so a partial dict read from a config YAML works too. A
    ``family`` override is applied first: the other keys are checked against that family, and a family other
    than the dict's keeps only the shared settings (:func:`switch_family`).

    Raises:
        ConfigError: an override key is not a ``TrainConfig`` leaf (names the key, suggests close ones).
    """
    if not isinstance(config_dict, Mapping):
        raise ConfigError(f"apply_overrides: config_dict must be a mapping, got {type(config_dict).__name__}")
    result = copy.deepcopy(dict(config_dict))
    family = overrides.get("family")
    if family is not None and family != result.get("family", DEFAULT_FAMILY):
        _family_name({"family": family}, "apply_overrides")
        result = switch_family(result, family)
    for key, value in sorted(overrides.items(), key=lambda item: item[0] != "family"):
        set_override(result, key, value, source="apply_overrides")
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
        if not hasattr(holder, name):  # a field of another family's section
            continue
        value = getattr(holder, name)
        if value is not None and not Path(value).is_absolute():
            setattr(holder, name, str((base / value).resolve()))
    return cfg


def parse_override(override: str, source: str) -> tuple[str, Any]:
    """``"key.subkey=value"`` -> ``(key, value)`` with the value parsed as YAML."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"{source}: override {override!r} must look like key.subkey=value")
    dotted, raw = override.split("=", 1)
    dotted = dotted.strip()
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: override {dotted!r}: value {raw!r} is not valid YAML: {err}") from err
    return dotted, value


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
    parsed = [parse_override(override, f"{source} (--set)") for override in overrides]
    for key, value in sorted(parsed, key=lambda item: item[0] != "family"):
        set_override(values, key, value, f"{source} (--set): override {key!r}")
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
    "PAPER_EPOCHS",
    "PAPER_LR_DECAY_EPOCHS",
    "TrainConfig",
    "apply_overrides",
    "config_keys",
    "parse_override",
    "set_override",
    "switch_family",
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
