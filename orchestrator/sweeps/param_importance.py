"""Optuna's fANOVA importances of a sweep's sampled parameters: the one computation behind ``fowkal
report`` (``report_tables.param_importances``) and ``fowkal tune-eval``'s summary
(``tune_eval.parameter_importances``).

A fresh study is rebuilt from the scored trials (``optuna.trial.create_trial`` with the space's distributions
and each trial's score), so it works for finished, resumed and stopped sweeps alike. The parameters are
described as the parent run's ``search_space.json`` describes them (``distribution``, ``low``, ``high``,
``log``, ``choices``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

logger = logging.getLogger(__name__)

FANOVA_SEED = 0  # the evaluator's forest; fixed, so that a report and a tune-eval summary agree


def optuna_distribution(info: Mapping):
    """The Optuna distribution of one sampled parameter of ``search_space.json``; None for a constant."""
    import optuna

    if info["distribution"] in ("uniform", "loguniform"):
        return optuna.distributions.FloatDistribution(
            float(info["low"]), float(info["high"]), log=bool(info["log"])
        )
    if info["distribution"] == "int":
        return optuna.distributions.IntDistribution(
            int(info["low"]), int(info["high"]), log=bool(info["log"])
        )
    if info["distribution"] == "categorical":
        return optuna.distributions.CategoricalDistribution(list(info["choices"]))
    return None


def fanova_importances(
    parameters: Mapping[str, Mapping],
    sampled_names: Iterable[str],
    trials: Iterable[tuple[Mapping, float]],
    mode: str,
    seed: int = FANOVA_SEED,
) -> dict[str, float]:
    """Importances (summing to 1, largest first) of ``sampled_names`` over ``trials``, each (sampled values,
    score), in the given order; {} when fewer than two trials fit the space or no parameter varied.

    ``parameters``: name -> description (``search_space.json``'s ``parameters``). A trial value outside its
    distribution (the space edited since) leaves that trial out.
    """
    import optuna

    distributions = {}
    for name in sampled_names:
        info = parameters.get(name)
        distribution = optuna_distribution(info) if info is not None else None
        if distribution is not None:
            distributions[name] = distribution
    created = []
    for values, score in trials:
        params = {k: v for k, v in values.items() if k in distributions}
        try:
            created.append(
                optuna.trial.create_trial(
                    params=params, distributions={k: distributions[k] for k in params}, value=score
                )
            )
        except ValueError:
            continue
    if len(created) < 2:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    study.add_trials(created)
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError, ZeroDivisionError) as err:  # e.g. all scores equal
        logger.warning("no parameter importances: %s", err)
        return {}
    return {name: float(value) for name, value in importances.items()}


__all__ = ["FANOVA_SEED", "fanova_importances", "optuna_distribution"]
