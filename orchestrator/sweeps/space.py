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
``trainer.topdown.losses.HeatmapLoss``) and raises :class:`SearchSpaceError` naming the file, the dotted key
and the
value. :meth:`SearchSpace.optuna_define_by_run` is the define-by-run function for
``ray.tune.search.optuna.OptunaSearch(space=...)``: it suggests the sampled parameters (Optuna parameter
names are the dotted keys; Ray unflattens on ``/`` only, so they reach the trial unchanged) and returns the
constants, which Ray merges into the trial's config. :meth:`SearchSpace.to_overrides` turns that config
into dotted-key overrides and ``trainer.config.apply_overrides`` applies them to a ``config_to_dict`` dict.

A ``when:`` condition on ``loss.variant`` may list variants or name properties of the variant table
(``trainer.topdown.losses.LOSS_VARIANTS``): ``when: {loss.variant: {needs_kaf: true}}``,
``{weighting: [wahr, fwahr]}`` or ``{uses_awing: true}``, so a new variant joins the conditions by its line
in that table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.sweeps.definition_file import (
    SearchSpaceError,
    check_config_values,
    definition_family,
    is_number,
    number_hint,
    read_yaml_mapping,
)
from trainer.config import config_keys, unknown_key_message
from trainer.families import get_family

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
_SPACE_FIELDS = ("family", "metric", "mode", "parameters", "points_to_evaluate")
# A value a walk's pick function returns for a parameter it leaves out.
_UNSET = object()


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
        return is_number(value) and self.low <= value <= self.high


@dataclass
class SearchSpace:
    """A validated search space (see the module docstring for the file format)."""

    path: str
    parameters: dict[str, Parameter]  # in sampling order: condition parents before their children
    family: str = "topdown_heatmap"  # the experiment family whose keys the parameters are
    metric: str = DEFAULT_METRIC
    mode: str = DEFAULT_MODE
    extra_points: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sampled_names(self) -> tuple[str, ...]:
        """Dotted keys Optuna samples (all but the constants)."""
        return tuple(name for name, p in self.parameters.items() if p.distribution != "constant")

    def walk(self, pick: Callable[[str, Parameter], Any]) -> dict[str, Any]:
        """The values of one point: the parameters in sampling order, each active one set to its constant
        or to ``pick(name, param)`` (``_UNSET`` leaves it out). The one "is this parameter active" walk."""
        chosen: dict[str, Any] = {}
        for name, param in self.parameters.items():
            if not param.is_active(chosen):
                continue
            value = param.value if param.distribution == "constant" else pick(name, param)
            if value is not _UNSET:
                chosen[name] = value
        return chosen

    def _inactive_given(
        self, chosen: Mapping[str, Any], given: Mapping[str, Any], partial: bool = False
    ) -> list[str]:
        """Sampled parameters present in ``given`` whose condition does not hold under ``chosen``; with
        ``partial``, only those whose condition parents are all known (a partial point may omit them)."""
        return [
            name
            for name, param in self.parameters.items()
            if name in given
            and name not in chosen
            and param.distribution != "constant"
            and (not partial or all(parent in chosen for parent in param.when))
        ]

    def optuna_define_by_run(self, trial: Any) -> dict[str, Any] | None:
        """Define-by-run function for ``OptunaSearch(space=...)``: suggest the active parameters.

        ``trial`` is an ``optuna.trial.Trial`` (or ``FixedTrial``, or Ray's wrapper around one). Returns the
        active constants (Ray merges them into the trial config) or None when there are none. Does no work
        besides the suggestions, as Ray requires.
        """

        def suggest(name: str, param: Parameter) -> Any:
            if param.distribution == "categorical":
                return trial.suggest_categorical(name, list(param.choices))
            if param.distribution == "int":
                return trial.suggest_int(name, param.low, param.high, log=param.log)
            return trial.suggest_float(name, param.low, param.high, log=param.distribution == "loguniform")

        chosen = self.walk(suggest)
        constants = {n: v for n, v in chosen.items() if self.parameters[n].distribution == "constant"}
        return constants or None

    def paper_point(self) -> dict[str, Any]:
        """The paper's values of the sampled parameters that are active under them (empty if none given)."""
        chosen = self.walk(lambda name, param: param.paper if param.has_paper else _UNSET)
        return {n: v for n, v in chosen.items() if self.parameters[n].distribution != "constant"}

    def points_to_evaluate(self) -> list[dict[str, Any]]:
        """``OptunaSearch(points_to_evaluate=...)``: the paper's values first, then the file's extra ones."""
        paper = self.paper_point()
        points = [paper] if paper else []
        return points + [dict(p) for p in self.extra_points]

    def to_overrides(self, sampled: Mapping[str, Any], *, ignore_unknown: bool = False) -> dict[str, Any]:
        """Dotted ``TrainConfig`` key -> value for one trial, ready for ``trainer.config.apply_overrides``.

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

        def take(name: str, param: Parameter) -> Any:
            if name not in plain:
                raise SearchSpaceError(f"{self.path}: {name}: missing from the sampled values {plain}")
            value = plain[name]
            if param.distribution == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            if not param.contains(value):
                raise SearchSpaceError(
                    f"{self.path}: {name}: sampled value {value!r} is outside {_describe(param)}"
                )
            return value

        overrides = self.walk(take)
        for name in self._inactive_given(overrides, plain):
            raise SearchSpaceError(
                f"{self.path}: {name}: got {plain[name]!r} but the parameter is inactive here "
                f"(when {self.parameters[name].when})"
            )
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


def _parse_parameter(path: Path, name: Any, spec: Any, family: str) -> Parameter:
    where = f"{path}: parameters.{name}"
    if not isinstance(name, str) or name not in config_keys(family):
        raise SearchSpaceError(f"{where}: {unknown_key_message(str(name), family)}")

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
            check_config_values({name: value}, family)
        except ValueError as err:
            floats = (
                " (uniform and loguniform sample floats)" if distribution in ("uniform", "loguniform") else ""
            )
            raise fail(key, value, f"not a valid value for {name}{floats} ({err})") from err

    when = _parse_when(where, spec.get("when"), family)
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
            elif not is_number(bound):
                raise fail(key, bound, f"expected a finite number{number_hint(bound)}")
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
                "paper", paper, f"the paper's value must lie in {_describe(param)}{number_hint(paper)}"
            )
    return param


def _parse_when(where: str, when: Any, family: str) -> dict[str, tuple[Any, ...]]:
    """``{parent: value or [values]}``; for a key of the family's ``sweep_conditions`` (the top-down family's
    ``loss.variant``) also ``{property: value(s)}`` of its table (``needs_kaf``, ``weighting``,
    ``uses_awing``), expanded here to the values that have them."""
    conditions = get_family(family).sweep_conditions
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise SearchSpaceError(f"{where}.when: expected a mapping parameter -> allowed values, got {when!r}")
    parsed = {}
    for parent, allowed in when.items():
        if isinstance(allowed, dict):
            if parent not in conditions:
                raise SearchSpaceError(
                    f"{where}.when.{parent}: only {' / '.join(conditions) or 'no key'} takes properties, "
                    f"got {allowed!r}"
                )
            table, properties = conditions[parent]
            unknown = [key for key in allowed if key not in properties]
            if unknown or not allowed:
                raise SearchSpaceError(
                    f"{where}.when.{parent}: unknown properties {unknown or allowed!r} "
                    f"(known: {', '.join(properties)})"
                )
            values = tuple(value for value, spec in table.items() if _has_properties(spec, allowed))
            if not values:
                raise SearchSpaceError(f"{where}.when.{parent}: no value of {parent} has {allowed!r}")
        else:
            values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if not values:
            raise SearchSpaceError(f"{where}.when.{parent}: expected at least one value, got {allowed!r}")
        parsed[str(parent)] = values
    return parsed


def _has_properties(spec: Any, wanted: dict[str, Any]) -> bool:
    """Whether a table entry has every property of ``wanted`` (a value, or a list of accepted values)."""
    for name, accepted in wanted.items():
        options = accepted if isinstance(accepted, list | tuple) else (accepted,)
        if getattr(spec, name) not in options:
            return False
    return True


def _order_by_conditions(path: Path, params: dict[str, Parameter], family: str) -> dict[str, Parameter]:
    conditions = get_family(family).sweep_conditions
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
                if parent in conditions and value not in conditions[parent][0]:
                    known = ", ".join(conditions[parent][0])
                    raise SearchSpaceError(f"{where}: unknown {parent} {value!r} (known: {known})")
                try:
                    check_config_values({parent: value}, family)
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
    for key in point:
        if key not in space.sampled_names:
            raise SearchSpaceError(
                f"{where}.{key}: not a sampled parameter (sampled: {', '.join(space.sampled_names)})"
            )

    def take(name: str, param: Parameter) -> Any:
        if name not in point:
            return _UNSET  # Optuna samples what a point leaves out
        if not param.contains(point[name]):
            raise SearchSpaceError(f"{where}.{name}: {point[name]!r} is outside {_describe(param)}")
        return point[name]

    chosen = space.walk(take)
    for name in space._inactive_given(chosen, point, partial=True):
        raise SearchSpaceError(
            f"{where}.{name}: given, but inactive under this point (when {space.parameters[name].when})"
        )


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file (format: module docstring).

    Raises:
        SearchSpaceError: malformed YAML (with the line), an unknown top-level field or parameter (not a
            ``TrainConfig`` key), an unknown distribution, bad bounds (low >= high, loguniform low <= 0), a
            categorical without choices, a value ``TrainConfig``/``HeatmapLoss`` rejects, a paper value
            outside its distribution, or a condition on an unknown parameter. The message names file and key.
    """
    path = Path(path)
    data = read_yaml_mapping(path, _SPACE_FIELDS)
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
    family = definition_family(path, "family", data.get("family"))
    params = {name: _parse_parameter(path, name, spec, family) for name, spec in raw_params.items()}
    params = _order_by_conditions(path, params, family)
    space = SearchSpace(path=str(path), parameters=params, family=family, metric=metric, mode=mode)

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


__all__ = [
    "DEFAULT_METRIC",
    "DEFAULT_MODE",
    "DISTRIBUTIONS",
    "Parameter",
    "SearchSpace",
    "SearchSpaceError",
    "load_search_space",
]
