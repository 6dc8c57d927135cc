"""What a ``fowkal tune-eval`` leaves when its trials are done: the scored trials (each trial's settings and
score, the defaults' trial marked), Optuna's parameter importances over them (``param_importance``, the
computation ``fowkal report`` uses), ``best_eval.yaml`` (the best settings and the ``fowkal eval --set`` line
that applies them) and ``summary.md`` (best, defaults, gain, the top trials, the importances).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.evaluation.tune_eval_trial import EvalSweepPlan
from orchestrator.reports.records import BEST_EVAL_FILE
from orchestrator.sweeps.param_importance import fanova_importances
from orchestrator.sweeps.space import SearchSpace

SUMMARY_FILE = "summary.md"
# The per-part rows of the summary's gain table (and of the held-out check): AP of each part, whole-body AR.
PART_AP_METRICS = (
    "eval/wholebody_AP",
    "eval/body_AP",
    "eval/foot_AP",
    "eval/face_AP",
    "eval/lefthand_AP",
    "eval/righthand_AP",
    "eval/hand_AP",
    "eval/wholebody_AR",
)


def scored_trials(
    results: list[dict], settings: dict[str, Any], space: SearchSpace, defaults: dict[str, Any]
) -> list[dict]:
    """The trials that reported the sweep's metric, in Tune's order: per trial ``name``, ``run_id``,
    ``values`` (every setting, dotted), ``sampled`` (the sampled ones), ``score``, ``metrics`` (all it
    reported) and ``is_default`` (its sampled values are the checkpoint's own)."""
    scored = []
    for result in results:
        if space.metric not in result["metrics"]:
            continue
        values = dict(settings)
        values.update(space.to_overrides(result["config"], ignore_unknown=True))
        sampled = {name: values[name] for name in space.sampled_names}
        scored.append(
            {
                "name": result["name"],
                "run_id": result["run_id"],
                "values": values,
                "sampled": sampled,
                "score": float(result["metrics"][space.metric]),
                "metrics": dict(result["metrics"]),
                "is_default": sampled == defaults,
            }
        )
    return scored


def parameter_importances(
    space: SearchSpace, trials: list[tuple[dict, float]], mode: str
) -> dict[str, float]:
    """Optuna's (fANOVA) importances of the sampled parameters over the scored trials, in their order; {}
    when fewer than two trials, or no parameter varied."""
    from orchestrator.sweeps.kinds import space_summary as _space_summary  # the parent's search_space.json

    return fanova_importances(_space_summary(space)["parameters"], space.sampled_names, trials, mode)


def _settings_yaml(values: dict[str, Any]) -> dict:
    nested: dict[str, dict] = {}
    for key, value in values.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return nested


def write_results(
    plan: EvalSweepPlan,
    scored: list[dict],
    defaults: dict[str, Any],
    importances: dict[str, float],
    source_args: str,
    holdout: dict[str, Any] | None = None,
) -> tuple[Path | None, Path]:
    """``best_eval.yaml`` and ``summary.md`` in the sweep directory; ``scored`` holds per trial ``name``,
    ``run_id``, ``values`` (all settings, dotted), ``score`` and ``metrics``. ``holdout`` (``--holdout``): the
    parts' sizes and the ``eval/*`` metrics of ``tuned/best``, ``tuned/defaults``, ``held_out/best``,
    ``held_out/defaults``."""
    import yaml

    out = Path(plan.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    sign = 1 if plan.mode == "max" else -1
    ranked = sorted(scored, key=lambda t: -sign * t["score"])
    default_trial = next((t for t in scored if t.get("is_default")), None)
    lines = [f"# fowkal tune-eval {plan.sweep_id}", ""]
    best_path = None
    if ranked:
        best = ranked[0]
        gain = best["score"] - default_trial["score"] if default_trial else None
        set_args = " ".join(f"--set {k}={v}" for k, v in best["values"].items())
        header = (
            f"# Best evaluation settings of tune-eval {plan.sweep_id} (MLflow run {best['run_id']}, "
            f"{best['name']}): {plan.metric} = {best['score']:.2f}%"
            + (f" (defaults {default_trial['score']:.2f}%, gain {gain:+.2f} points)" if default_trial else "")
            + f"\n# fowkal eval {source_args} {set_args}\n"
        )
        best_path = out / BEST_EVAL_FILE
        best_path.write_text(header + yaml.safe_dump(_settings_yaml(best["values"]), sort_keys=False))
        lines += [
            f"Best {plan.metric}: **{best['score']:.2f}%** ({best['name']}); defaults "
            + (
                f"{default_trial['score']:.2f}% ({default_trial['name']}), gain **{gain:+.2f}** points."
                if default_trial
                else "not scored."
            ),
            "",
            f"Apply: `fowkal eval {source_args} {set_args}`",
            "",
        ]
    names = list(plan.space.sampled_names)
    lines += ["| trial | " + " | ".join(names) + f" | {plan.metric} (%) |", "|---" * (len(names) + 2) + "|"]
    for trial in ranked[:10] + (
        [default_trial] if default_trial and default_trial not in ranked[:10] else []
    ):
        mark = " (defaults)" if trial.get("is_default") else ""
        cells = [
            str(trial["values"][n])
            if not isinstance(trial["values"][n], float)
            else f"{trial['values'][n]:.4g}"
            for n in names
        ]
        lines.append(f"| {trial['name']}{mark} | " + " | ".join(cells) + f" | {trial['score']:.2f} |")
    if ranked and default_trial:
        lines += ["", _gain_table(default_trial, ranked[0])]
    if holdout:
        lines += ["", _holdout_table(holdout, plan.metric)]
    shorts = [t for t in scored if t.get("metrics", {}).get("eval/cache_short_images", 0) > 0]
    if shorts:
        lines += [
            "",
            f"**Warning**: in {len(shorts)} trial(s) some images ran out of cached candidates before their "
            "poses were decided (`eval/cache_short_images`): those scores may differ from `fowkal eval`'s; "
            "rebuild the cache deeper.",
        ]
    lines += ["", "Parameter importances (Optuna, fANOVA):", ""]
    if importances:
        lines += ["| parameter | importance |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in importances.items()]
    else:
        lines.append("(fewer than two scored trials, or nothing varied)")
    summary = out / SUMMARY_FILE
    summary.write_text("\n".join(lines) + "\n")
    return best_path, summary


def _cell(metrics: dict, name: str) -> str:
    value = metrics.get(name)
    return "n/a" if value is None or value < 0 else f"{value:.2f}"


def _gain_table(default_trial: dict, best: dict) -> str:
    """Per part: the defaults' and the best trial's AP (whole-body AR too) and the gain, in points."""
    lines = [
        "Gain over the defaults per part (AP in percent; n/a: no labelled ground truth, or no result):",
        "",
        "| metric | defaults | best | gain |",
        "|---|---|---|---|",
    ]
    for name in PART_AP_METRICS:
        old, new = default_trial["metrics"].get(name), best["metrics"].get(name)
        gain = f"{new - old:+.2f}" if old is not None and new is not None and old >= 0 and new >= 0 else "n/a"
        lines.append(
            f"| {name} | {_cell(default_trial['metrics'], name)} | {_cell(best['metrics'], name)} | {gain} |"
        )
    return "\n".join(lines)


def _holdout_table(holdout: dict[str, Any], metric: str) -> str:
    """The held-out check: the best settings and the defaults on the tuned part and on the held-out part."""
    lines = [
        f"Held-out check (--holdout {holdout['fraction']:g}): the trials scored {holdout['tuned_images']} "
        f"images (the tuned part); the best settings and the defaults scored once on the other "
        f"{holdout['held_out_images']} (the held-out part). {metric} and each part's AP, in percent:",
        "",
        "| metric | tuned part: defaults | tuned part: best | held-out part: defaults | held-out part: best "
        "| held-out gain |",
        "|---|---|---|---|---|---|",
    ]
    empty: dict = {}
    for name in dict.fromkeys([metric, *PART_AP_METRICS]):
        cells = [_cell(holdout.get(key, empty), name) for key in
                 ("tuned/defaults", "tuned/best", "held_out/defaults", "held_out/best")]  # fmt: skip
        old = holdout.get("held_out/defaults", empty).get(name)
        new = holdout.get("held_out/best", empty).get(name)
        gain = f"{new - old:+.2f}" if old is not None and new is not None and old >= 0 and new >= 0 else "n/a"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {gain} |")
    return "\n".join(lines)


__all__ = ["PART_AP_METRICS", "SUMMARY_FILE", "parameter_importances", "scored_trials", "write_results"]
