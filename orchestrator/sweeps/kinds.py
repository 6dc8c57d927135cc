"""The sweep kinds, ``fowkal tune`` and ``fowkal ablate``: one small object each, holding what differs.

The sweep engine (``sweep_settings.py``, ``sweep.py``, ``trial.py``, ``progress.py``) asks a sweep's kind
(``SweepSettings.sweep_kind``, ``SweepPlan.sweep_kind``, or :func:`get_sweep_kind`) instead of testing its
name. The names ``"tune"`` and ``"ablate"`` stay what is stored: ``SweepSettings.kind`` and
``SweepPlan.kind`` (plain, picklable strings, in Tune's saved experiment state), the ``fowkal.sweep_kind``
tag of the parent and child runs, and the sweep names.

What differs: the definition file (``--space`` search space or ``--arms`` ablation arms) and its loader, the
metric and mode, the trial budget (``--samples`` or ``--seeds``) and which settings define the experiment,
each trial's config overrides, run name and progress label, the parent run's params, tags, description and
definition artifact, how Tune runs the trials (TPE + ASHA, or the arm x seed grid run to the end) and the
results written at the end (the best config, or the per-arm means).

Adding a sweep kind: a class here with :class:`SweepKind`'s attributes and methods, its object in
:data:`SWEEP_KIND_OBJECTS`, its command in ``cli.py`` and its Tune set-up in ``sweep_tune.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator import tracking

if TYPE_CHECKING:
    from orchestrator.sweeps.ablation_arms import AblationArm
    from orchestrator.sweeps.settings import SweepSettings
    from orchestrator.sweeps.space import SearchSpace
    from orchestrator.sweeps.trial import SweepPlan
    from trainer.config import TrainConfig

# An ablation compares its arms on the whole-body AP (a search space names its own metric).
ABLATION_METRIC = "val/wholebody_AP"


@dataclass
class SweepDefinition:
    """A definition file, loaded and checked: the search space or the arms, and what the sweep optimises."""

    metric: str
    mode: str
    space: SearchSpace | None = None
    arms: list[AblationArm] = field(default_factory=list)


class SweepKind(Protocol):
    """What the sweep engine asks a kind (see the module docstring)."""

    name: str  # "tune" / "ablate": the stored kind (SweepSettings.kind, tags, sweep names)
    title: str  # the parent run's description and the report say "Sweep ..." / "Ablation ..."
    default_experiment: str  # the MLflow experiment when --experiment is not given
    definition_flag: str  # the flag of the definition file: "--space" / "--arms"
    definition_field: str  # SweepSettings' field of it: "space_path" / "arms_path"
    definition_artifact: str  # the parent run's JSON of the definition (space summary / arms)
    budget_flag: str  # the flag of the trial budget: "--samples" / "--seeds"
    budget_field: str  # SweepSettings' field of it: "samples" / "seeds"
    identity_fields: tuple[str, ...]  # SweepSettings' fields that define the experiment (its name)
    early_stopping: bool  # ASHA stops trials early (so --grace-period must be below the epochs)
    parent_config_tags: bool  # the parent run carries the base config's tags (family, loss variant)

    def load(self, path, config: TrainConfig) -> SweepDefinition:
        """Read and check the definition file against the base config."""

    def check_points(self, plan: SweepPlan) -> list[tuple[dict, str]]:
        """Trial configs to build before Ray starts (a bad combination fails early), each with its label."""

    def trial_overrides(self, plan: SweepPlan, trial_config: dict) -> dict[str, Any]:
        """Dotted ``TrainConfig`` overrides of a trial (what Tune hands it: ``trial_config``)."""

    def trial_arm(self, plan: SweepPlan, trial_config: dict) -> AblationArm | None:
        """The ablation arm a trial runs, or None."""

    def run_name(self, plan: SweepPlan, trial_config: dict, experiment_tag: str = "") -> str:
        """A trial's readable child-run name."""

    def progress_label(self, plan: SweepPlan, trial_config: dict, experiment_tag: str = "") -> str:
        """A trial's row label in the sweep's console table."""

    def total_trials(self, plan: SweepPlan, settings: SweepSettings, seed_values: list[int]) -> int:
        """How many trials the sweep runs."""

    def param_space(self, plan: SweepPlan, seed_values: list[int]) -> dict:
        """``Tuner(param_space=...)``."""

    def parent_params(self, plan: SweepPlan, settings: SweepSettings, seed_values: list[int]) -> dict:
        """The parent run's ``sweep.*`` parameters."""

    def parent_tags(self, plan: SweepPlan) -> dict[str, str]:
        """The parent run's tags of this kind alone."""

    def definition_json(self, plan: SweepPlan) -> str:
        """The text of :attr:`definition_artifact`."""

    def describe(self, plan: SweepPlan, settings: SweepSettings) -> str:
        """What runs, for the parent run's description: trials and where they come from."""

    def results(self, plan: SweepPlan, record, client, out_dir: Path) -> tuple[str, Path | None]:
        """This kind's results, logged to the parent run: (the console's table, the best config's file or
        None). ``record`` is ``report.load_sweep`` of the parent."""


@dataclass(frozen=True)
class TuneKind:
    """``fowkal tune``: Optuna TPE + ASHA over a search space; the best trial's config is written out."""

    name: str = "tune"
    title: str = "Sweep"
    default_experiment: str = "fowkal-tune"
    definition_flag: str = "--space"
    definition_field: str = "space_path"
    definition_artifact: str = tracking.SPACE_ARTIFACT
    budget_flag: str = "--samples"
    budget_field: str = "samples"
    identity_fields: tuple[str, ...] = ("search_seed", "grace_period", "reduction_factor")
    early_stopping: bool = True
    parent_config_tags: bool = True

    def load(self, path, config: TrainConfig) -> SweepDefinition:
        from orchestrator.sweeps.definition_file import SearchSpaceError
        from orchestrator.sweeps.space import load_search_space

        space = load_search_space(path)
        if space.family != config.family:
            raise SearchSpaceError(
                f"{path}: family: the space's keys are of family {space.family!r}, the config "
                f"is of family {config.family!r} (set family: {config.family} in the space file)"
            )
        return SweepDefinition(metric=space.metric, mode=space.mode, space=space)

    def check_points(self, plan: SweepPlan) -> list[tuple[dict, str]]:
        space = _space(plan)
        constants = {name: p.value for name, p in space.parameters.items() if p.distribution == "constant"}
        return [
            ({**constants, **point}, f"points_to_evaluate[{i}]")
            for i, point in enumerate(space.points_to_evaluate())
        ]

    def trial_overrides(self, plan: SweepPlan, trial_config: dict) -> dict[str, Any]:
        return _space(plan).to_overrides(trial_config, ignore_unknown=True)

    def trial_arm(self, plan: SweepPlan, trial_config: dict) -> AblationArm | None:
        return None

    def run_name(self, plan: SweepPlan, trial_config: dict, experiment_tag: str = "") -> str:
        """``tpe-017``: the sweep's 17th trial (Tune's experiment tag starts with the trial's index)."""
        head = str(experiment_tag).split("_", 1)[0]
        index = int(head) if head.isdigit() else 0
        return f"tpe-{index:03d}"

    def progress_label(self, plan: SweepPlan, trial_config: dict, experiment_tag: str = "") -> str:
        return self.run_name(plan, trial_config, experiment_tag)

    def total_trials(self, plan: SweepPlan, settings: SweepSettings, seed_values: list[int]) -> int:
        return settings.samples

    def param_space(self, plan: SweepPlan, seed_values: list[int]) -> dict:
        return {}  # OptunaSearch's define-by-run function is the space

    def parent_params(self, plan: SweepPlan, settings: SweepSettings, seed_values: list[int]) -> dict:
        return {"sweep.samples": settings.samples, "sweep.search_seed": settings.search_seed}

    def parent_tags(self, plan: SweepPlan) -> dict[str, str]:
        return {tracking.TAG_SAMPLED: json.dumps(list(_space(plan).sampled_names))}

    def definition_json(self, plan: SweepPlan) -> str:
        return json.dumps(space_summary(_space(plan)), indent=1)

    def describe(self, plan: SweepPlan, settings: SweepSettings) -> str:
        return f"{settings.samples} trials of Optuna TPE + ASHA over {settings.space_path}"

    def results(self, plan: SweepPlan, record, client, out_dir: Path) -> tuple[str, Path | None]:
        """The top trials' table; the best trial's config as ``best_config.yaml`` (it must load in ``fowkal
        train``), its metric and a tag naming it on the parent run."""
        import yaml

        from orchestrator.reports import report
        from trainer.config import apply_overrides, config_from_dict

        table = report.sweep_markdown(record, top=10)
        best = report.best_child(record)
        if best is None:
            return table, None
        run_name = best.name
        values = apply_overrides(plan.base_config, self.trial_overrides(plan, best.sampled))
        values["output_dir"] = str(Path(plan.base_config["output_dir"]) / "best" / plan.sweep_id)
        config_from_dict(values, source=f"best config ({run_name})")  # must load in fowkal train
        best_path = out_dir / "best_config.yaml"
        header = (
            f"# Best config of sweep {plan.sweep_id} (MLflow run {best.run_id}, {run_name}): "
            f"{plan.metric} = {best.score:.4f}\n# fowkal train --config {best_path}\n"
        )
        best_path.write_text(header + yaml.safe_dump(values, sort_keys=False))
        client.log_artifact(plan.parent_run_id, str(best_path))
        client.log_metric(plan.parent_run_id, f"best/{plan.metric}", float(best.score))
        best_values = {f"best/{k}": v for k, v in best.metrics.items() if k.startswith("val/")}
        best_values.pop(f"best/{plan.metric}", None)
        if best_values:
            tracking.log_epoch_metrics(plan.parent_run_id, best_values, 0, client=client)
        client.set_tag(plan.parent_run_id, tracking.TAG_BEST_RUN, f"{run_name} ({best.run_id})")
        return table, best_path


@dataclass(frozen=True)
class AblateKind:
    """``fowkal ablate``: every arm x seed, each run to the end; the arms' means are the result."""

    name: str = "ablate"
    title: str = "Ablation"
    default_experiment: str = "fowkal-ablate"
    definition_flag: str = "--arms"
    definition_field: str = "arms_path"
    definition_artifact: str = tracking.ARMS_ARTIFACT
    budget_flag: str = "--seeds"
    budget_field: str = "seeds"
    identity_fields: tuple[str, ...] = ("seeds",)
    early_stopping: bool = False
    parent_config_tags: bool = False  # the arms may change what the config's tags say (loss, family)

    def load(self, path, config: TrainConfig) -> SweepDefinition:
        from orchestrator.sweeps.ablation_arms import load_ablation_arms

        return SweepDefinition(metric=ABLATION_METRIC, mode="max", arms=load_ablation_arms(path))

    def check_points(self, plan: SweepPlan) -> list[tuple[dict, str]]:
        return [({"arm": key, "seed": int(plan.base_config["seed"])}, key) for key in plan.arms]

    def trial_overrides(self, plan: SweepPlan, trial_config: dict) -> dict[str, Any]:
        arm = plan.arms[trial_config["arm"]]
        return {**arm.overrides, "seed": int(trial_config["seed"])}

    def trial_arm(self, plan: SweepPlan, trial_config: dict) -> AblationArm | None:
        return plan.arms.get(trial_config.get("arm"))

    def run_name(self, plan: SweepPlan, trial_config: dict, experiment_tag: str = "") -> str:
        """``<arm key>-<arm name>-s<seed>``: sorts by the paper's letters."""
        arm = plan.arms[trial_config["arm"]]
        return f"{arm.key}-{arm.name}-s{int(trial_config['seed'])}"

    def progress_label(self, plan: SweepPlan, trial_config: dict, experiment_tag: str = "") -> str:
        """``<arm label> s<seed>``."""
        name = self.run_name(plan, trial_config, experiment_tag)
        arm = self.trial_arm(plan, trial_config)
        return name if arm is None else f"{arm.label} s{int(trial_config.get('seed', 0))}"

    def total_trials(self, plan: SweepPlan, settings: SweepSettings, seed_values: list[int]) -> int:
        return len(plan.arms) * len(seed_values)

    def param_space(self, plan: SweepPlan, seed_values: list[int]) -> dict:
        from ray import tune

        return {"arm": tune.grid_search(list(plan.arms)), "seed": tune.grid_search(seed_values)}

    def parent_params(self, plan: SweepPlan, settings: SweepSettings, seed_values: list[int]) -> dict:
        return {"sweep.seeds": json.dumps(seed_values), "sweep.arms": ",".join(plan.arms)}

    def parent_tags(self, plan: SweepPlan) -> dict[str, str]:
        return {}

    def definition_json(self, plan: SweepPlan) -> str:
        from dataclasses import asdict

        return json.dumps([asdict(arm) for arm in plan.arms.values()], indent=1)

    def describe(self, plan: SweepPlan, settings: SweepSettings) -> str:
        return f"{len(plan.arms)} arms x {settings.seeds} seed(s), arms from {settings.arms_path}"

    def results(self, plan: SweepPlan, record, client, out_dir: Path) -> tuple[str, Path | None]:
        """The ablation table; per arm, the mean over its finished seeds as the parent's metrics (percent, as
        the children's val/ metrics)."""
        from orchestrator.reports import report

        rows = report.ablation_rows(record)
        summary = {
            f"{row.key}-{row.name}/{metric}": value for row in rows for metric, value in row.mean.items()
        }
        if summary:
            tracking.log_epoch_metrics(plan.parent_run_id, summary, 0, client=client)
        return report.ablation_markdown(rows), None


TUNE = TuneKind()
ABLATE = AblateKind()
SWEEP_KIND_OBJECTS: dict[str, SweepKind] = {kind.name: kind for kind in (TUNE, ABLATE)}
SWEEP_KINDS = tuple(SWEEP_KIND_OBJECTS)  # the names: ("tune", "ablate")


def get_sweep_kind(name: str) -> SweepKind:
    """The kind called ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        return SWEEP_KIND_OBJECTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"kind must be one of {SWEEP_KINDS}, got {name!r}") from None


def space_summary(space: SearchSpace) -> dict:
    """JSON-able description of the space (for the report's importances: distributions of the params)."""
    params = {}
    for name, p in space.parameters.items():
        params[name] = {
            "distribution": p.distribution,
            "low": p.low,
            "high": p.high,
            "log": p.log or p.distribution == "loguniform",
            "choices": list(p.choices),
            "value": p.value,
        }
    return {"metric": space.metric, "mode": space.mode, "parameters": params}


def _space(plan: SweepPlan) -> SearchSpace:
    assert plan.space is not None, "a tune sweep's plan holds its search space"
    return plan.space


__all__ = [
    "ABLATE",
    "ABLATION_METRIC",
    "SWEEP_KINDS",
    "SWEEP_KIND_OBJECTS",
    "TUNE",
    "AblateKind",
    "SweepDefinition",
    "SweepKind",
    "TuneKind",
    "get_sweep_kind",
    "space_summary",
]
