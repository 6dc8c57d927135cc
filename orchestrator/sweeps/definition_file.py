"""Reading the declarative files of ``search_spaces/`` (search spaces, ablation arms): strict YAML, and
the checks both kinds share. Errors are :class:`SearchSpaceError` naming the file, the key and the value.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from trainer.config import ConfigError, apply_overrides, config_from_dict, config_to_dict
from trainer.families import DEFAULT_FAMILY, UnknownFamilyError, get_family


@functools.cache
def _default_config(family: str) -> dict:
    return config_to_dict(config_from_dict({"family": family}))


def definition_family(path: Path, where: str, value: Any) -> str:
    """A ``family`` field of a definition file (default ``topdown_heatmap``), checked against the registry."""
    name = DEFAULT_FAMILY if value is None else value
    try:
        get_family(name)
    except UnknownFamilyError as err:
        raise SearchSpaceError(f"{path}: {where}: {err}") from err
    return name


class SearchSpaceError(ValueError):
    """An invalid search-space or ablation file (or override); the message names file, key and value."""


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


def read_yaml_mapping(path: Path, known_fields: tuple[str, ...]) -> dict:
    """The file's top-level mapping; a missing file, malformed YAML, a duplicate key or a top-level field
    not in ``known_fields`` is a ``SearchSpaceError`` naming the file (and the line or the field)."""
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
    for key in data:
        if key not in known_fields:
            raise SearchSpaceError(
                f"{path}: {key}: unknown top-level field (known: {', '.join(known_fields)})"
            )
    return data


def check_config_values(overrides: Mapping[str, Any], family: str = DEFAULT_FAMILY) -> None:
    """Raise ValueError if ``overrides`` (dotted key -> value) on ``family``'s defaults are not a valid
    TrainConfig (which includes the family's own range checks, e.g. the loss's)."""
    family = overrides.get("family", family)
    try:
        config_from_dict(apply_overrides(_default_config(family), overrides), "TrainConfig")
    except ConfigError as err:
        raise ValueError(str(err)) from err


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def number_hint(value: Any) -> str:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (YAML reads 1e-3 as a string: write 1.0e-3)"
    return ""
