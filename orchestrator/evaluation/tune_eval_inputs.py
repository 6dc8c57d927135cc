"""What ``fowkal tune-eval`` checks and derives before Ray starts: the evaluation search space (a key
that is not an evaluation setting, or a metric that is not an evaluation metric, is an error naming it),
the checkpoint config's own settings and the first point (the defaults, which must lie in the space), the
lowest detection score and every blur kernel a trial can ask for (what the heatmap cache and the decoding
pass must hold), the detection file, and that every starting point gives a valid config.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator.evaluation.tune_eval_trial import DEFAULT_METRIC, EVAL_PREFIX
from orchestrator.sweeps.definition_file import SearchSpaceError
from orchestrator.sweeps.space import SearchSpace, load_search_space
from trainer.families import get_family


class TuneEvalError(ValueError):
    """Bad input to ``fowkal tune-eval``, found before Ray starts; names the file, key or value."""


def metric_names() -> tuple[str, ...]:
    """Every metric a trial reports: ``eval/<part>_<stat>`` for ``evaluate_wholebody``'s keys."""
    parts = ("body", "foot", "face", "lefthand", "righthand", "wholebody")
    stats = ("AP", "AP50", "AP75", "AP_M", "AP_L", "AR", "AR50", "AR75", "AR_M", "AR_L")
    names = [f"{EVAL_PREFIX}{part}_{stat}" for part in parts for stat in stats]
    return tuple(names + [f"{EVAL_PREFIX}hand_{stat}" for stat in ("AP", "AP50", "AP75", "AR")])


def load_eval_space(path: str | os.PathLike) -> SearchSpace:
    """A search space over evaluation settings only (those its family's ``eval_sweep`` sweeps; the space's
    ``family`` field, default the top-down family); its metric an ``eval/`` metric (``val/X`` reads as
    ``eval/X``, the same number on the evaluated set). ``SearchSpaceError`` names the file and the key."""
    space = load_search_space(path)
    sweep = get_family(space.family).eval_sweep
    if sweep is None:
        raise SearchSpaceError(f"{path}: family: fowkal tune-eval cannot sweep family {space.family!r}")
    for name in space.parameters:
        if name not in sweep.setting_keys:
            raise SearchSpaceError(
                f"{path}: parameters.{name}: not an evaluation setting; fowkal tune-eval sweeps only what "
                f"acts after the network ({', '.join(sweep.setting_keys)})"
            )
    metric = space.metric
    if metric.startswith("val/"):
        metric = EVAL_PREFIX + metric[len("val/") :]
    if metric not in metric_names():
        raise SearchSpaceError(
            f"{path}: metric: {space.metric!r} is not an evaluation metric (e.g. {DEFAULT_METRIC}, "
            "eval/hand_AP)"
        )
    return replace(space, metric=metric)


def lowest_det_score_thr(space: SearchSpace, base: float) -> float:
    """The lowest ``data.det_score_thr`` a trial can ask for: the cache must hold those boxes."""
    param = space.parameters.get("data.det_score_thr")
    if param is None:
        return float(base)
    candidates = [base]
    if param.distribution == "constant":
        candidates.append(param.value)
    elif param.distribution == "categorical":
        candidates.extend(param.choices)
    else:
        candidates.append(param.low)
    candidates += [p["data.det_score_thr"] for p in space.extra_points if "data.det_score_thr" in p]
    return float(min(candidates))


def blur_kernels(space: SearchSpace, base: int) -> tuple[int, ...]:
    """Every ``eval.blur_kernel`` a trial can ask for (odd values of an int range), with the base one."""
    param = space.parameters.get("eval.blur_kernel")
    values = {int(base)}
    if param is not None and param.distribution == "constant":
        values.add(int(param.value))
    elif param is not None and param.distribution == "categorical":
        values.update(int(c) for c in param.choices)
    elif param is not None and param.distribution == "int":
        values.update(k for k in range(int(param.low), int(param.high) + 1) if k % 2 == 1)
    return tuple(sorted(values))


def base_settings(config) -> dict[str, Any]:
    """The checkpoint config's evaluation settings by dotted key (its family's ``eval_sweep``)."""
    from trainer.families import family_of

    return family_of(config).eval_sweep.base_settings(config)


def space_reach(space: SearchSpace, settings: dict[str, Any]) -> dict[str, tuple]:
    """Per setting, the values a trial can ask for: the base value, the extra points' and the parameter's
    (a constant, the choices, every integer of an int range, the two ends of a continuous range). What a
    family's cache must be able to answer (``EvalSweep.build_cache``)."""
    reach = {name: [value] for name, value in settings.items()}
    for name, param in space.parameters.items():
        values = reach.setdefault(name, [])
        if param.distribution == "constant":
            values.append(param.value)
        elif param.distribution == "categorical":
            values.extend(param.choices)
        elif param.distribution == "int":
            values.extend(range(int(param.low), int(param.high) + 1))
        else:
            values.extend([param.low, param.high])
    for point in space.extra_points:
        for name, value in point.items():
            reach.setdefault(name, []).append(value)
    return {name: tuple(dict.fromkeys(values)) for name, values in reach.items()}


def defaults_point(space: SearchSpace, settings: dict[str, Any], path) -> dict[str, Any]:
    """The first point to evaluate: the config's own values of the sampled parameters (they must lie in
    the space, or the gain over the defaults could not be measured)."""
    point = {}
    for name in space.sampled_names:
        param = space.parameters[name]
        value = settings[name]
        if param.distribution in ("uniform", "loguniform") and isinstance(value, int):
            value = float(value)
        if not param.contains(value):
            raise SearchSpaceError(
                f"{path}: parameters.{name}: the checkpoint's value {value!r} (the first trial, the "
                f"defaults) lies outside the space; widen it to include {value!r}"
            )
        point[name] = value
    return point


def check_det_file(det_file) -> None:
    """The detection file is read now (``DatasetError`` names file, entry and field) so that a bad one
    fails before Ray, not in every trial."""
    from trainer.topdown.data import DatasetError, load_detections

    if det_file is None:
        return
    if not Path(det_file).is_file():
        raise TuneEvalError(f"detection file {str(det_file)!r} does not exist (--det-file)")
    try:
        load_detections(det_file)
    except DatasetError as err:
        raise TuneEvalError(f"--det-file: {err}") from err


def file_digest(path: Path) -> str:
    """The first 12 hex digits of the file's SHA-256 (a checkpoint in the sweep's name)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def trial_settings_for(space: SearchSpace, settings: dict[str, Any], point: dict, config=None) -> None:
    """Check that ``point`` on ``settings`` gives a valid config (the same rules as ``fowkal eval --set``) of
    ``config`` (default: a default ``TrainConfig``)."""
    from trainer.config import TrainConfig, apply_overrides, config_from_dict, config_to_dict

    values = {**settings, **space.to_overrides({**point}, ignore_unknown=True)}
    base = config_to_dict(TrainConfig() if config is None else config)
    config_from_dict(apply_overrides(base, values), source="first trials")


__all__ = [
    "TuneEvalError",
    "base_settings",
    "blur_kernels",
    "check_det_file",
    "defaults_point",
    "file_digest",
    "load_eval_space",
    "lowest_det_score_thr",
    "metric_names",
    "space_reach",
    "trial_settings_for",
]
