"""Every config and sweep definition the project ships loads, and every trial it defines builds a valid config
on the config its header (or the README) pairs it with: a typo in a shipped file fails here, not an hour into
a user's cluster run. No Ray, no MLflow: the checks ``fowkal tune`` / ``fowkal ablate`` make before they
start anything, plus the corners of each tuned range."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from orchestrator.sweeps.kinds import get_sweep_kind
from orchestrator.sweeps.sweep import _validate_trial_configs
from orchestrator.sweeps.trial import SweepPlan, trial_train_config
from trainer.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SPACES = REPO / "search_spaces"

# (sweep kind, definition file, the configs it is run on)
SWEEPS = [
    ("ablate", "ablation_paper.yaml", ["smoke.yaml", "paper_hrnet_w32_fowkal.yaml"]),
    ("ablate", "ablation_ambiguities.yaml", ["smoke.yaml", "paper_hrnet_w32_fowkal.yaml"]),
    ("ablate", "families.yaml", ["smoke.yaml"]),
    ("ablate", "kapao_bbox.yaml", ["smoke_kapao.yaml", "kapao_wholebody_s.yaml"]),
    ("tune", "fowkal_loss.yaml", ["smoke.yaml", "paper_hrnet_w32_fowkal.yaml"]),
    ("tune", "kapao_loss.yaml", ["smoke_kapao.yaml", "kapao_wholebody_s.yaml"]),
]
# Inference-time spaces (`fowkal tune-eval`): their own loader, run end to end by test_tune_eval.py and
# test_kapao_tune_eval.py.
EVAL_SPACES = {"eval_space.yaml", "kapao_eval_space.yaml"}
CASES = [(kind, space, config) for kind, space, configs in SWEEPS for config in configs]


def test_every_shipped_sweep_definition_is_checked_here():
    shipped = {path.name for path in SPACES.glob("*.yaml")}
    assert shipped == {space for _, space, _ in SWEEPS} | EVAL_SPACES


@pytest.mark.parametrize("name", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.name and cfg.epochs >= 1


def _plan(kind: str, space_file: str, config_file: str) -> SweepPlan:
    config = load_config(CONFIGS / config_file)
    definition = get_sweep_kind(kind).load(SPACES / space_file, config)
    return SweepPlan(
        kind=kind,
        sweep_id="check",
        sweep_dir="/nonexistent/sweep",
        base_config=config_to_dict(config),
        tracking_uri="sqlite:////nonexistent/mlflow.db",
        experiment_id="",
        parent_run_id="",
        metric=definition.metric,
        mode=definition.mode,
        space=definition.space,
        arms={arm.key: arm for arm in definition.arms},
    )


@pytest.mark.parametrize(("kind", "space", "config"), CASES, ids=[f"{s}-on-{c}" for _, s, c in CASES])
def test_every_trial_of_a_shipped_sweep_builds_a_valid_config(kind, space, config):
    plan = _plan(kind, space, config)
    _validate_trial_configs(plan, space)  # what the command checks before Ray: every arm, or the first points
    if kind == "ablate":
        assert plan.arms
        return
    # Every corner of the tuned ranges (lows and highs, each categorical choice), as TPE may sample them.
    params = {n: p for n, p in plan.space.parameters.items() if p.distribution != "constant"}
    options = [p.choices if p.distribution == "categorical" else (p.low, p.high) for p in params.values()]
    corners = list(itertools.product(*options))
    assert corners
    for values in corners:
        chosen = dict(zip(params, values, strict=True))
        point = plan.space.walk(lambda name, _param, chosen=chosen: chosen[name])
        trial = trial_train_config(plan, point, "corner")
        for name, value in point.items():
            holder = trial
            *sections, key = name.split(".")
            for section in sections:
                holder = getattr(holder, section)
            assert getattr(holder, key) == value, (name, value)
