"""Ablation arms (``search_spaces/ablation_*.yaml``): the rows of an ablation and what the paper reports.

An ablation file lists arms, each overriding dotted ``TrainConfig`` keys on top of the ``--config`` file
(at least the key its family names as an arm's point: ``loss.variant`` for the top-down family). An arm's
``family`` (default: the top-down family) is the family whose keys its overrides are; it is set on the
trial's config as ``family``. The paper's arms also carry its numbers (``paper``) and table (``table``) for
the report; both are optional, so one's own arms need neither (the report then has no paper column)::

    description: FoWKAL paper, Table 2
    arms:
      - key: a
        name: mse
        label: (a) MSE (baseline)
        table: "2"
        overrides: {loss.variant: mse}
        paper: {wholebody_AP: 58.2, body_AP: 69.4}

``load_ablation_arms`` validates everything before any Ray work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.sweeps.definition_file import (
    SearchSpaceError,
    check_config_values,
    definition_family,
    is_number,
    read_yaml_mapping,
)
from trainer.config import config_keys, unknown_key_message
from trainer.families import DEFAULT_FAMILY, get_family

# Numbers an ablation arm may carry from the paper (Table 1 gives whole-body AR for two arms only).
PAPER_METRICS: tuple[str, ...] = ("wholebody_AP", "wholebody_AR", "body_AP", "foot_AP", "face_AP", "hand_AP")
PAPER_TABLES: tuple[str, ...] = ("2", "3")
_ARM_FIELDS = ("key", "name", "label", "family", "table", "overrides", "paper")
_ARMS_FILE_FIELDS = ("description", "arms")


@dataclass
class AblationArm:
    """One row of the paper's ablation: what to override and what the paper reports for it."""

    key: str  # "a".."f" as in Table 2, or a short id
    name: str  # e.g. "mse", "fowkal": run names and MLflow tags
    label: str  # the paper's wording, e.g. "(f) KAL + FWAHR = FoWKAL"
    overrides: dict[str, Any]  # dotted TrainConfig keys (with ``family`` when the arm names one)
    paper: dict[str, float] = field(default_factory=dict)  # subset of PAPER_METRICS (percent); {}: none
    table: str | None = None  # "2" or "3"; None: not one of the paper's rows


def load_ablation_arms(path: str | Path) -> list[AblationArm]:
    """Read and validate an ablation file: ``arms:`` a list of mappings with the :class:`AblationArm` fields.

    Raises:
        SearchSpaceError: malformed YAML (with the line), an unknown field, a duplicate key or name, an
            unknown loss variant (listing the known ones), an override key or value ``TrainConfig`` rejects,
            or a paper metric that is unknown or not a percentage. The message names file, arm and key.
    """
    path = Path(path)
    data = read_yaml_mapping(path, _ARMS_FILE_FIELDS)
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
        if "table" in raw and table not in PAPER_TABLES:
            raise SearchSpaceError(
                f"{where}.table: expected one of {', '.join(PAPER_TABLES)} (or no table field), "
                f"got {raw.get('table')!r}"
            )

        overrides = raw.get("overrides")
        if not isinstance(overrides, dict):
            raise SearchSpaceError(f"{where}.overrides: expected a mapping of dotted keys, got {overrides!r}")
        overrides = dict(overrides)
        if "family" in raw:  # the arm's family is set on its trials' configs
            if overrides.setdefault("family", raw["family"]) != raw["family"]:
                raise SearchSpaceError(f"{where}.overrides.family: differs from the arm's family field")
        family_name = definition_family(path, f"arms[{i}].family", overrides.get("family", DEFAULT_FAMILY))
        family = get_family(family_name)
        if family.arm_key is not None and family.arm_key not in overrides:
            raise SearchSpaceError(
                f"{where}.overrides: expected a mapping with at least {family.arm_key}, got {overrides!r}"
            )
        for key in overrides:
            if key not in config_keys(family_name):
                raise SearchSpaceError(
                    f"{where}.overrides.{key}: {unknown_key_message(str(key), family_name)}"
                )
        known = family.sweep_conditions.get(family.arm_key or "", (None,))[0]
        if known is not None and overrides[family.arm_key] not in known:
            raise SearchSpaceError(
                f"{where}.overrides.{family.arm_key}: unknown {family.arm_key} "
                f"{overrides[family.arm_key]!r} (known: {', '.join(known)})"
            )
        try:
            check_config_values(overrides, family_name)
        except ValueError as err:
            raise SearchSpaceError(f"{where}.overrides: {overrides!r} is not a valid config ({err})") from err

        # The paper's numbers are optional; given, they hold at least whole-body AP (the table's delta).
        paper = raw.get("paper", {})
        if not isinstance(paper, dict) or ("paper" in raw and "wholebody_AP" not in paper):
            raise SearchSpaceError(
                f"{where}.paper: expected a mapping with at least wholebody_AP (or no paper field), "
                f"got {paper!r}"
            )
        for metric, value in paper.items():
            if metric not in PAPER_METRICS:
                raise SearchSpaceError(
                    f"{where}.paper.{metric}: unknown metric (known: {', '.join(PAPER_METRICS)}), "
                    f"got {value!r}"
                )
            if not is_number(value) or not 0 <= value <= 100:
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


__all__ = ["AblationArm", "PAPER_METRICS", "PAPER_TABLES", "SearchSpaceError", "load_ablation_arms"]
