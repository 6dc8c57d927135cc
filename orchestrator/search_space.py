"""Declarative search spaces and ablation arms (``search_spaces/*.yaml``), validated on load.

A search-space file names ``TrainConfig`` fields by their dotted keys (``loss.tau``) and gives each one a
distribution::

    metric: val/wholebody_AP        # optional (this is the default)
    mode: max                       # optional (default max)
    parameters:
      loss.variant: fowkal          # a bare scalar is a constant
      loss.tau:
        distribution: loguniform    # uniform | loguniform | int (optional log: true) | categorical | constant
        low: 1.0e-4
        high: 1.0
        paper: 0.01                 # the paper's value: part of the first point to evaluate
        when: {loss.variant: [heuristic_fwahr, fowkal]}   # sampled only for these variants
    points_to_evaluate:             # optional further points, after the paper's
      - {loss.tau: 0.1}

``load_search_space`` checks everything before any Ray work starts (unknown keys, bounds, distributions,
conditions, and every constant, bound, choice and paper value against ``TrainConfig`` and
``trainer.losses.HeatmapLoss``) and raises :class:`SearchSpaceError` naming the file, the dotted key and the
value. :meth:`SearchSpace.optuna_define_by_run` is the define-by-run function for
``ray.tune.search.optuna.OptunaSearch(space=...)``: it suggests the sampled parameters (Optuna parameter
names are the dotted keys; Ray unflattens on ``/`` only, so they reach the trial unchanged) and returns the
constants, which Ray merges into the trial's config. :meth:`SearchSpace.to_overrides` turns that config
into dotted-key overrides and :func:`apply_overrides` applies them to a ``config_to_dict`` dict.

An ablation file lists the arms of the paper's Tables 2 and 3 with their reported numbers
(:func:`load_ablation_arms`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.config import ConfigError, TrainConfig, config_from_dict, config_to_dict

try:  # the loss module is the authority on variants and on the loss hyperparameters' valid ranges
    from trainer.losses import LOSS_VARIANTS as _LOSS_VARIANT_SPECS
    from trainer.losses import HeatmapLoss
except ImportError:  # pragma: no cover - only while trainer/losses.py is missing
    _LOSS_VARIANT_SPECS = None
    HeatmapLoss = None

KNOWN_LOSS_VARIANTS: tuple[str, ...] = (
    tuple(_LOSS_VARIANT_SPECS)
    if _LOSS_VARIANT_SPECS is not None
    else ("mse", "awing", "heuristic", "kal", "heuristic_wahr", "heuristic_fwahr", "kal_wahr", "fowkal")
)

DEFAULT_METRIC = "val/wholebody_AP"
DEFAULT_MODE = "max"
DISTRIBUTIONS: tuple[str, ...] = ("constant", "uniform", "loguniform", "int", "categorical")
# Keys a parameter mapping may hold, per distribution (``when`` is allowed for all).
_PARAMETER_FIELDS: dict[str, tuple[str, ...]] = {
    "constant": ("distribution", "value", "when"),
    "uniform": ("distribution", "low", "high", "paper", "when"),
    "loguniform": ("distribution", "low", "high", "paper", "when"),
    "int": ("distribution", "low", "high", "log", "paper", "when"),
    "categorical": ("distribution", "choices", "paper", "when"),
}
_SPACE_FIELDS = ("metric", "mode", "parameters", "points_to_evaluate")
# Numbers an ablation arm may carry from the paper (Table 1 gives whole-body AR for two arms only).
PAPER_METRICS: tuple[str, ...] = ("wholebody_AP", "wholebody_AR", "body_AP", "foot_AP", "face_AP", "hand_AP")
PAPER_TABLES: tuple[str, ...] = ("2", "3")
_ARM_FIELDS = ("key", "name", "label", "table", "overrides", "paper")
_ARMS_FILE_FIELDS = ("description", "arms")


class SearchSpaceError(ValueError):
    """An invalid search-space or ablation file (or override); the message names file, key and value."""


# ------------------------------------------------------------------------------------------------------------
# YAML reading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping_no_duplicates(
    loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False
) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # SafeLoader itself reports unhashable keys
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_no_duplicates
)


def _read_yaml_mapping(path: Path) -> dict:
    if not path.is_file():
        raise SearchSpaceError(f"{path}: file does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        problem = getattr(err, "problem", None) or str(err)
        raise SearchSpaceError(f"{path}: malformed YAML at {where}: {problem}") from err
    if not isinstance(data, dict):
        raise SearchSpaceError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------------------
# Config keys and values


def _flatten(values: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


_DEFAULT_CONFIG: dict = config_to_dict(TrainConfig())
# Every leaf of TrainConfig by dotted key (loss.tau, optim.lr, data.pipeline.sigma, ...).
CONFIG_KEYS: tuple[str, ...] = tuple(_flatten(_DEFAULT_CONFIG))


def _unknown_key_message(key: str) -> str:
    leaves = [k for k in CONFIG_KEYS if k.startswith(f"{key}.")]
    if leaves:
        return f"{key!r} is a section of TrainConfig, not a value: name a leaf such as {leaves[0]}"
    close = difflib.get_close_matches(key, CONFIG_KEYS, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown TrainConfig key {key!r}{hint} (keys look like loss.tau, optim.lr)"


def _set_dotted(values: dict, key: str, value: Any) -> None:
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def apply_overrides(config_dict: Mapping, overrides: Mapping[str, Any]) -> dict:
    """A copy of a nested ``TrainConfig`` dict with ``overrides`` (dotted key -> value) set.

    Missing intermediate sections are created, so a partial dict read from a config YAML works too.

    Raises:
        SearchSpaceError: an override key is not a ``TrainConfig`` leaf (names the key, suggests close ones).
    """
    if not isinstance(config_dict, Mapping):
        raise SearchSpaceError(
            f"apply_overrides: config_dict must be a mapping, got {type(config_dict).__name__}"
        )
    result = copy.deepcopy(dict(config_dict))
    for key, value in overrides.items():
        if key not in CONFIG_KEYS:
            raise SearchSpaceError(f"apply_overrides: {_unknown_key_message(key)}")
        _set_dotted(result, key, value)
    return result


def _check_config_values(overrides: Mapping[str, Any]) -> None:
    """Raise ValueError if the overrides on top of the defaults are not a valid TrainConfig / HeatmapLoss."""
    try:
        cfg = config_from_dict(apply_overrides(_DEFAULT_CONFIG, overrides), "TrainConfig")
    except ConfigError as err:
        raise ValueError(str(err)) from err
    if HeatmapLoss is not None and any(key.startswith("loss.") for key in overrides):
        accepted = inspect.signature(HeatmapLoss).parameters
        loss_kwargs = {name: value for name, value in vars(cfg.loss).items() if name in accepted}
        HeatmapLoss(**loss_kwargs)  # its own checks: positive gamma/tau/AWing values, known choices


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number_hint(value: Any) -> str:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (YAML reads 1e-3 as a string: write 1.0e-3)"
    return ""


# ------------------------------------------------------------------------------------------------------------
# Search space


@dataclass(frozen=True)
class Parameter:
    """One dotted ``TrainConfig`` key and how it is chosen.

    ``when`` maps a (constant or categorical) parameter of the same space to the values for which this one
    is active; an inactive parameter is not sampled and keeps the config's value.
    """

    name: str
    distribution: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    value: Any = None
    paper: Any = None
    has_paper: bool = False
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def is_active(self, values: Mapping[str, Any]) -> bool:
        """Whether every condition holds for the already chosen ``values`` (a missing parent: inactive)."""
        return all(parent in values and values[parent] in allowed for parent, allowed in self.when.items())

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take."""
        if self.distribution == "constant":
            return value == self.value and type(value) is type(self.value)
        if self.distribution == "categorical":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if self.distribution == "int":
            return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high
        return _is_number(value) and self.low <= value <= self.high


@dataclass
class SearchSpace:
    """A validated search space (see the module docstring for the file format)."""

    path: str
    parameters: dict[str, Parameter]  # in sampling order: condition parents before their children
    metric: str = DEFAULT_METRIC
    mode: str = DEFAULT_MODE
    extra_points: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sampled_names(self) -> tuple[str, ...]:
        """Dotted keys Optuna samples (all but the constants)."""
        return tuple(name for name, p in self.parameters.items() if p.distribution != "constant")

    def optuna_define_by_run(self, trial: Any) -> dict[str, Any] | None:
        """Define-by-run function for ``OptunaSearch(space=...)``: suggest the active parameters.

        ``trial`` is an ``optuna.trial.Trial`` (or ``FixedTrial``, or Ray's wrapper around one). Returns the
        active constants (Ray merges them into the trial config) or None when there are none. Does no work
        besides the suggestions, as Ray requires.
        """
        chosen: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for name, param in self.parameters.items():
            if not param.is_active(chosen):
                continue
            if param.distribution == "constant":
                chosen[name] = constants[name] = param.value
            elif param.distribution == "categorical":
                chosen[name] = trial.suggest_categorical(name, list(param.choices))
            elif param.distribution == "int":
                chosen[name] = trial.suggest_int(name, param.low, param.high, log=param.log)
            else:
                chosen[name] = trial.suggest_float(
                    name, param.low, param.high, log=param.distribution == "loguniform"
                )
        return constants or None

    def paper_point(self) -> dict[str, Any]:
        """The paper's values of the sampled parameters that are active under them (empty if none given)."""
        chosen: dict[str, Any] = {}
        point: dict[str, Any] = {}
        for name, param in self.parameters.items():
            if not param.is_active(chosen):
                continue
            if param.distribution == "constant":
                chosen[name] = param.value
            elif param.has_paper:
                chosen[name] = point[name] = param.paper
        return point

    def points_to_evaluate(self) -> list[dict[str, Any]]:
        """``OptunaSearch(points_to_evaluate=...)``: the paper's values first, then the file's extra ones."""
        paper = self.paper_point()
        points = [paper] if paper else []
        return points + [dict(p) for p in self.extra_points]

    def to_overrides(self, sampled: Mapping[str, Any], *, ignore_unknown: bool = False) -> dict[str, Any]:
        """Dotted ``TrainConfig`` key -> value for one trial, ready for :func:`apply_overrides`.

        ``sampled`` is what a trial receives: the suggested values plus the constants (constants missing from
        it are added). Numpy scalars become Python numbers. Keys that are not parameters of this space raise
        unless ``ignore_unknown`` (e.g. a Tune config that also carries a seed or an arm).

        Raises:
            SearchSpaceError: an unknown key, a value outside its distribution, an active parameter missing,
                or a value given for a parameter whose condition does not hold.
        """
        plain = {key: _plain_scalar(value) for key, value in sampled.items()}
        unknown = [key for key in plain if key not in self.parameters]
        if unknown and not ignore_unknown:
            raise SearchSpaceError(
                f"{self.path}: sampled keys {unknown} are not parameters of this space "
                f"(parameters: {', '.join(self.parameters)})"
            )
        overrides: dict[str, Any] = {}
        for name, param in self.parameters.items():
            active = param.is_active(overrides)
            if not active:
                if name in plain and param.distribution != "constant":
                    raise SearchSpaceError(
                        f"{self.path}: {name}: got {plain[name]!r} but the parameter is inactive here "
                        f"(when {param.when})"
                    )
                continue
            if name not in plain:
                if param.distribution != "constant":
                    raise SearchSpaceError(f"{self.path}: {name}: missing from the sampled values {plain}")
                value = param.value
            else:
                value = plain[name]
                if param.distribution == "int" and isinstance(value, float) and value.is_integer():
                    value = int(value)
            if not param.contains(value):
                raise SearchSpaceError(
                    f"{self.path}: {name}: sampled value {value!r} is outside {_describe(param)}"
                )
            overrides[name] = value
        return overrides


def _plain_scalar(value: Any) -> Any:
    if isinstance(value, str):
        return str(value)  # numpy.str_ -> str
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and not isinstance(value, bytes):
        try:
            return item()
        except (TypeError, ValueError):
            return value
    return value


def _describe(param: Parameter) -> str:
    if param.distribution == "constant":
        return f"constant {param.value!r}"
    if param.distribution == "categorical":
        return f"choices {list(param.choices)}"
    return f"{param.distribution} [{param.low}, {param.high}]"


def _parse_parameter(path: Path, name: Any, spec: Any) -> Parameter:
    where = f"{path}: parameters.{name}"
    if not isinstance(name, str) or name not in CONFIG_KEYS:
        raise SearchSpaceError(f"{where}: {_unknown_key_message(str(name))}")

    def fail(key: str, value: Any, message: str) -> SearchSpaceError:
        return SearchSpaceError(f"{where}.{key}: {message}, got {value!r}")

    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise SearchSpaceError(
                f"{where}: a list is not a parameter spec, got {spec!r} "
                "(write distribution: categorical, choices: [...])"
            )
        spec = {"distribution": "constant", "value": spec}
    distribution = spec.get("distribution", "constant" if "value" in spec else None)
    if distribution not in DISTRIBUTIONS:
        raise fail("distribution", distribution, f"unknown distribution (known: {', '.join(DISTRIBUTIONS)})")
    for key in spec:
        if key not in _PARAMETER_FIELDS[distribution]:
            raise fail(
                key,
                spec[key],
                f"not a field of a {distribution} parameter ({', '.join(_PARAMETER_FIELDS[distribution])})",
            )

    def check_value(key: str, value: Any) -> None:
        try:
            _check_config_values({name: value})
        except ValueError as err:
            floats = (
                " (uniform and loguniform sample floats)" if distribution in ("uniform", "loguniform") else ""
            )
            raise fail(key, value, f"not a valid value for {name}{floats} ({err})") from err

    when = _parse_when(where, spec.get("when"))
    has_paper = "paper" in spec
    paper = spec.get("paper")

    if distribution == "constant":
        if "value" not in spec:
            raise SearchSpaceError(f"{where}: a constant needs value:")
        check_value("value", spec["value"])
        return Parameter(name, "constant", value=spec["value"], when=when)

    if distribution == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail("choices", choices, "a categorical parameter needs a non-empty list of choices")
        for i, choice in enumerate(choices):
            if not (choice is None or isinstance(choice, bool | int | float | str)):
                raise fail(f"choices[{i}]", choice, "choices must be scalars (Optuna's categorical)")
            check_value(f"choices[{i}]", choice)
        if len({(type(c), c) for c in choices}) != len(choices):
            raise fail("choices", choices, "choices must be distinct")
        param = Parameter(
            name, "categorical", choices=tuple(choices), paper=paper, has_paper=has_paper, when=when
        )
    else:
        low, high = spec.get("low"), spec.get("high")
        for key, bound in (("low", low), ("high", high)):
            if bound is None:
                raise SearchSpaceError(f"{where}: a {distribution} parameter needs {key}:")
            if distribution == "int":
                if not isinstance(bound, int) or isinstance(bound, bool):
                    raise fail(key, bound, "an int parameter needs integer bounds")
            elif not _is_number(bound):
                raise fail(key, bound, f"expected a finite number{_number_hint(bound)}")
        if low >= high:
            raise SearchSpaceError(f"{where}: bad bounds: low ({low!r}) must be < high ({high!r})")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise fail("log", log, "expected true or false")
        if distribution == "loguniform" and low <= 0:
            raise fail("low", low, "a loguniform parameter needs low > 0")
        if distribution == "int" and log and low < 1:
            raise fail("low", low, "an int parameter with log: true needs low >= 1")
        if distribution == "int":
            check_value("low", low)
            check_value("high", high)
        else:
            # Floats, also the midpoint: a float distribution on an int field fails here, not in a trial.
            check_value("low", float(low))
            check_value("high", float(high))
            check_value("(low + high) / 2", (float(low) + float(high)) / 2)
            low, high = float(low), float(high)
        param = Parameter(
            name, distribution, low=low, high=high, log=log, paper=paper, has_paper=has_paper, when=when
        )
    if has_paper:
        if (
            distribution in ("uniform", "loguniform")
            and isinstance(paper, int)
            and not isinstance(paper, bool)
        ):
            paper = float(paper)
            param = dataclasses.replace(param, paper=paper)
        if not param.contains(paper):
            raise fail(
                "paper", paper, f"the paper's value must lie in {_describe(param)}{_number_hint(paper)}"
            )
    return param


def _parse_when(where: str, when: Any) -> dict[str, tuple[Any, ...]]:
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise SearchSpaceError(f"{where}.when: expected a mapping parameter -> allowed values, got {when!r}")
    parsed = {}
    for parent, allowed in when.items():
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if not values:
            raise SearchSpaceError(f"{where}.when.{parent}: expected at least one value, got {allowed!r}")
        parsed[str(parent)] = values
    return parsed


def _order_by_conditions(path: Path, params: dict[str, Parameter]) -> dict[str, Parameter]:
    """Check the conditions' parents and values; return the parameters, parents first (else file order)."""
    for name, param in params.items():
        for parent, allowed in param.when.items():
            where = f"{path}: parameters.{name}.when.{parent}"
            if parent == name:
                raise SearchSpaceError(f"{where}: a parameter cannot be conditional on itself")
            if parent not in params:
                raise SearchSpaceError(
                    f"{where}: condition refers to unknown parameter {parent!r} "
                    f"(parameters of this file: {', '.join(params)})"
                )
            if params[parent].distribution not in ("constant", "categorical"):
                raise SearchSpaceError(
                    f"{where}: conditions need a constant or categorical parameter, "
                    f"{parent!r} is {params[parent].distribution}"
                )
            for value in allowed:
                # Any value valid for the key is fine (e.g. all *_fwahr variants while the file fixes one).
                if parent == "loss.variant" and value not in KNOWN_LOSS_VARIANTS:
                    raise SearchSpaceError(
                        f"{where}: unknown loss variant {value!r} (known: {', '.join(KNOWN_LOSS_VARIANTS)})"
                    )
                try:
                    _check_config_values({parent: value})
                except ValueError as err:
                    raise SearchSpaceError(
                        f"{where}: {value!r} is not a valid value for {parent} ({err})"
                    ) from err
    ordered: dict[str, Parameter] = {}
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise SearchSpaceError(f"{path}: parameters.{name}.when: conditions form a cycle ({cycle})")
        visiting.append(name)
        for parent in params[name].when:
            visit(parent)
        visiting.pop()
        ordered[name] = params[name]

    for name in params:
        visit(name)
    return ordered


def _check_point(space: SearchSpace, point: dict, where: str) -> None:
    """Check a (possibly partial) point: sampled keys, values inside their distributions, conditions hold."""
    chosen: dict[str, Any] = {}
    for key in point:
        if key not in space.sampled_names:
            raise SearchSpaceError(
                f"{where}.{key}: not a sampled parameter (sampled: {', '.join(space.sampled_names)})"
            )
    for name, param in space.parameters.items():
        value = param.value if param.distribution == "constant" else point.get(name)
        if name not in point and param.distribution != "constant":
            continue  # Optuna samples what a point leaves out
        if not param.is_active(chosen) and param.when and all(p in chosen for p in param.when):
            if param.distribution != "constant":
                raise SearchSpaceError(
                    f"{where}.{name}: given, but inactive under this point (when {param.when})"
                )
            continue
        if not param.contains(value):
            raise SearchSpaceError(f"{where}.{name}: {value!r} is outside {_describe(param)}")
        chosen[name] = value


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file (format: module docstring).

    Raises:
        SearchSpaceError: malformed YAML (with the line), an unknown top-level field or parameter (not a
            ``TrainConfig`` key), an unknown distribution, bad bounds (low >= high, loguniform low <= 0), a
            categorical without choices, a value ``TrainConfig``/``HeatmapLoss`` rejects, a paper value
            outside its distribution, or a condition on an unknown parameter. The message names file and key.
    """
    path = Path(path)
    data = _read_yaml_mapping(path)
    for key in data:
        if key not in _SPACE_FIELDS:
            raise SearchSpaceError(
                f"{path}: {key}: unknown top-level field (known: {', '.join(_SPACE_FIELDS)})"
            )
    metric = data.get("metric", DEFAULT_METRIC)
    if not isinstance(metric, str) or not metric:
        raise SearchSpaceError(
            f"{path}: metric: expected a metric name such as {DEFAULT_METRIC}, got {metric!r}"
        )
    mode = data.get("mode", DEFAULT_MODE)
    if mode not in ("min", "max"):
        raise SearchSpaceError(f"{path}: mode: expected min or max, got {mode!r}")
    raw_params = data.get("parameters")
    if not isinstance(raw_params, dict) or not raw_params:
        raise SearchSpaceError(
            f"{path}: parameters: expected a non-empty mapping of dotted keys, got {raw_params!r}"
        )
    params = {name: _parse_parameter(path, name, spec) for name, spec in raw_params.items()}
    params = _order_by_conditions(path, params)
    space = SearchSpace(path=str(path), parameters=params, metric=metric, mode=mode)

    # The paper point must be well defined: a paper value whose condition depends on a sampled parent
    # without a paper value could not be placed.
    for name, param in params.items():
        if param.has_paper:
            for parent in param.when:
                parent_param = params[parent]
                if parent_param.distribution == "categorical" and not parent_param.has_paper:
                    raise SearchSpaceError(
                        f"{path}: parameters.{name}.paper: its condition depends on {parent!r}, "
                        f"which has no paper value"
                    )
    raw_points = data.get("points_to_evaluate", [])
    if not isinstance(raw_points, list):
        raise SearchSpaceError(f"{path}: points_to_evaluate: expected a list of mappings, got {raw_points!r}")
    for i, point in enumerate(raw_points):
        if not isinstance(point, dict):
            raise SearchSpaceError(f"{path}: points_to_evaluate[{i}]: expected a mapping, got {point!r}")
        _check_point(space, point, f"{path}: points_to_evaluate[{i}]")
        space.extra_points.append(dict(point))
    return space


# ------------------------------------------------------------------------------------------------------------
# Ablation arms


@dataclass
class AblationArm:
    """One row of the paper's ablation: what to override and what the paper reports for it."""

    key: str  # "a".."f" as in Table 2, or a short id
    name: str  # e.g. "mse", "fowkal": run names and MLflow tags
    label: str  # the paper's wording, e.g. "(f) KAL + FWAHR = FoWKAL"
    overrides: dict[str, Any]  # dotted TrainConfig keys, at least loss.variant
    paper: dict[str, float]  # subset of PAPER_METRICS (percent)
    table: str  # "2" or "3"


def load_ablation_arms(path: str | Path) -> list[AblationArm]:
    """Read and validate an ablation file: ``arms:`` a list of mappings with the :class:`AblationArm` fields.

    Raises:
        SearchSpaceError: malformed YAML (with the line), an unknown field, a duplicate key or name, an
            unknown loss variant (listing the known ones), an override key or value ``TrainConfig`` rejects,
            or a paper metric that is unknown or not a percentage. The message names file, arm and key.
    """
    path = Path(path)
    data = _read_yaml_mapping(path)
    for key in data:
        if key not in _ARMS_FILE_FIELDS:
            raise SearchSpaceError(
                f"{path}: {key}: unknown top-level field (known: {', '.join(_ARMS_FILE_FIELDS)})"
            )
    raw_arms = data.get("arms")
    if not isinstance(raw_arms, list) or not raw_arms:
        raise SearchSpaceError(f"{path}: arms: expected a non-empty list of arms, got {raw_arms!r}")
    arms: list[AblationArm] = []
    for i, raw in enumerate(raw_arms):
        where = f"{path}: arms[{i}]"
        if not isinstance(raw, dict):
            raise SearchSpaceError(f"{where}: expected a mapping, got {raw!r}")
        if isinstance(raw.get("key"), str):
            where = f"{path}: arms[{i}] (key {raw['key']!r})"
        for key in raw:
            if key not in _ARM_FIELDS:
                raise SearchSpaceError(f"{where}.{key}: unknown field (known: {', '.join(_ARM_FIELDS)})")
        for key in ("key", "name", "label"):
            value = raw.get(key)
            if not isinstance(value, str) or not value.strip():
                raise SearchSpaceError(f"{where}.{key}: expected a non-empty string, got {value!r}")
        arm_key, name = raw["key"], raw["name"]
        if not all(ch.isalnum() or ch in "_-" for ch in arm_key) or len(arm_key) > 16:
            raise SearchSpaceError(
                f"{where}.key: expected a short id of letters, digits, _ or -, got {arm_key!r}"
            )
        table = str(raw.get("table")) if isinstance(raw.get("table"), int | str) else raw.get("table")
        if table not in PAPER_TABLES:
            raise SearchSpaceError(
                f"{where}.table: expected one of {', '.join(PAPER_TABLES)}, got {raw.get('table')!r}"
            )

        overrides = raw.get("overrides")
        if not isinstance(overrides, dict) or "loss.variant" not in overrides:
            raise SearchSpaceError(
                f"{where}.overrides: expected a mapping with at least loss.variant, got {overrides!r}"
            )
        for key in overrides:
            if key not in CONFIG_KEYS:
                raise SearchSpaceError(f"{where}.overrides.{key}: {_unknown_key_message(str(key))}")
        variant = overrides["loss.variant"]
        if variant not in KNOWN_LOSS_VARIANTS:
            raise SearchSpaceError(
                f"{where}.overrides.loss.variant: unknown loss variant {variant!r} "
                f"(known: {', '.join(KNOWN_LOSS_VARIANTS)})"
            )
        try:
            _check_config_values(overrides)
        except ValueError as err:
            raise SearchSpaceError(f"{where}.overrides: {overrides!r} is not a valid config ({err})") from err

        paper = raw.get("paper")
        if not isinstance(paper, dict) or "wholebody_AP" not in paper:
            raise SearchSpaceError(
                f"{where}.paper: expected a mapping with at least wholebody_AP, got {paper!r}"
            )
        for metric, value in paper.items():
            if metric not in PAPER_METRICS:
                raise SearchSpaceError(
                    f"{where}.paper.{metric}: unknown metric (known: {', '.join(PAPER_METRICS)}), "
                    f"got {value!r}"
                )
            if not _is_number(value) or not 0 <= value <= 100:
                raise SearchSpaceError(
                    f"{where}.paper.{metric}: expected a percentage in [0, 100], got {value!r}"
                )
        for other in arms:
            if other.key == arm_key:
                raise SearchSpaceError(f"{where}.key: duplicate arm key {arm_key!r}")
            if other.name == name:
                raise SearchSpaceError(f"{where}.name: duplicate arm name {name!r}")
        arms.append(
            AblationArm(
                key=arm_key,
                name=name,
                label=raw["label"],
                overrides=dict(overrides),
                paper={metric: float(value) for metric, value in paper.items()},
                table=table,
            )
        )
    return arms


__all__ = [
    "AblationArm",
    "CONFIG_KEYS",
    "DEFAULT_METRIC",
    "DEFAULT_MODE",
    "DISTRIBUTIONS",
    "KNOWN_LOSS_VARIANTS",
    "PAPER_METRICS",
    "Parameter",
    "SearchSpace",
    "SearchSpaceError",
    "apply_overrides",
    "load_ablation_arms",
    "load_search_space",
]
