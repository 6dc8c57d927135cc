"""Search-space and ablation-arm files: loading, validation errors, Optuna define-by-run, overrides."""

from __future__ import annotations

import pickle
import re
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest

from orchestrator.sweeps.ablation_arms import load_ablation_arms
from orchestrator.sweeps.space import SearchSpaceError, load_search_space
from trainer.config import ConfigError, TrainConfig, apply_overrides, config_from_dict, config_to_dict

REPO = Path(__file__).resolve().parents[1]
FOWKAL_SPACE = REPO / "search_spaces" / "fowkal_loss.yaml"
ABLATION_ARMS = REPO / "search_spaces" / "ablation_paper.yaml"
PAPER_FILE = REPO.parent / "shared" / "reference" / "fowkal_paper.md"

# The paper's values (Sec. "Weighted Foreground Heatmap Loss": tau = 0.01, gamma from Luo et al. 2021 = 0.01;
# AWing values of Wang et al. 2019; KAL's regulariser added with weight 1; Eq. 9 as printed gates on p-hat).
PAPER_LOSS_VALUES = {
    "loss.tau": 0.01,
    "loss.gamma": 0.01,
    "loss.fwahr_condition": "pred",
    "loss.reg_weight": 1.0,
    "loss.omega": 14.0,
    "loss.theta": 0.5,
    "loss.epsilon": 1.0,
    "loss.alpha": 2.1,
}

# Tables 2 and 3 (and Table 1 for AR), typed in by hand: whole-body AP, AR, body, foot, face, hand AP.
PAPER_ARMS = {
    "mse": ("a", "2", {"wholebody_AP": 58.2, "wholebody_AR": 67.1, "body_AP": 69.4, "foot_AP": 56.5,
                       "face_AP": 73.6, "hand_AP": 50.3}),
    "awing": ("b", "2", {"wholebody_AP": 57.9, "body_AP": 67.6, "foot_AP": 52.4, "face_AP": 76.8,
                         "hand_AP": 50.9}),
    "heuristic": ("c", "2", {"wholebody_AP": 58.7, "body_AP": 70.2, "foot_AP": 58.6, "face_AP": 76.5,
                             "hand_AP": 48.4}),
    "kal": ("d", "2", {"wholebody_AP": 58.4, "body_AP": 71.8, "foot_AP": 73.4, "face_AP": 69.6,
                       "hand_AP": 45.8}),
    "heuristic_fwahr": ("e", "2", {"wholebody_AP": 61.2, "body_AP": 71.1, "foot_AP": 69.0, "face_AP": 76.4,
                                   "hand_AP": 53.2}),
    "fowkal": ("f", "2", {"wholebody_AP": 61.6, "wholebody_AR": 71.1, "body_AP": 72.7, "foot_AP": 74.2,
                          "face_AP": 73.8, "hand_AP": 53.5}),
    "heuristic_wahr": (None, "3", {"wholebody_AP": 59.6}),
    "kal_wahr": (None, "3", {"wholebody_AP": 59.5}),
}  # fmt: skip

FWAHR_VARIANTS = {"heuristic_fwahr", "fowkal"}
WAHR_FAMILY = {"heuristic_wahr", "heuristic_fwahr", "kal_wahr", "fowkal"}


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# A space that samples the variant, so the conditions matter.
VARIANT_SPACE = """
    parameters:
      loss.variant: {distribution: categorical, choices: [mse, kal, heuristic_fwahr, fowkal], paper: fowkal}
      loss.tau:
        distribution: loguniform
        low: 1.0e-4
        high: 1.0
        paper: 0.01
        when: {loss.variant: [heuristic_fwahr, fowkal]}
      loss.reg_weight:
        {distribution: uniform, low: 0.5, high: 2.0, paper: 1.0, when: {loss.variant: [kal, fowkal]}}
      loss.fwahr_condition: {distribution: categorical, choices: [pred, target], when: {loss.variant: fowkal}}
      epochs: {distribution: int, low: 2, high: 64, log: true, paper: 8}
      seed: 3
"""


# ------------------------------------------------------------------------------------------------------------
# The shipped files


def test_fowkal_space_loads_with_paper_values_first():
    space = load_search_space(FOWKAL_SPACE)
    assert space.metric == "val/wholebody_AP"
    assert space.mode == "max"
    assert space.parameters["loss.variant"].distribution == "constant"
    assert space.parameters["loss.variant"].value == "fowkal"
    assert set(space.sampled_names) == set(PAPER_LOSS_VALUES)
    points = space.points_to_evaluate()
    assert points[0] == PAPER_LOSS_VALUES
    # The trainer's defaults are documented as the paper's: the first point must agree with them too.
    defaults = config_to_dict(TrainConfig())["loss"]
    assert {key: defaults[key.split(".")[1]] for key in PAPER_LOSS_VALUES} == PAPER_LOSS_VALUES


def test_fowkal_space_paper_point_becomes_the_paper_config():
    space = load_search_space(FOWKAL_SPACE)
    trial = optuna.trial.FixedTrial(space.points_to_evaluate()[0])
    constants = space.optuna_define_by_run(trial)
    assert constants == {"loss.variant": "fowkal"}
    overrides = space.to_overrides({**space.points_to_evaluate()[0], **constants})
    cfg = config_from_dict(apply_overrides(config_to_dict(TrainConfig()), overrides))
    assert cfg.loss.variant == "fowkal"
    assert (cfg.loss.tau, cfg.loss.gamma, cfg.loss.omega, cfg.loss.theta) == (0.01, 0.01, 14.0, 0.5)
    assert (cfg.loss.epsilon, cfg.loss.alpha, cfg.loss.reg_weight) == (1.0, 2.1, 1.0)
    assert cfg.loss.fwahr_condition == "pred"


def test_ablation_arms_load_with_the_papers_numbers():
    arms = load_ablation_arms(ABLATION_ARMS)
    assert [arm.name for arm in arms] == list(PAPER_ARMS)
    for arm in arms:
        key, table, paper = PAPER_ARMS[arm.name]
        if key is not None:
            assert arm.key == key
        assert arm.table == table
        assert arm.overrides["loss.variant"] == arm.name
        assert arm.paper == paper, arm.name
        assert arm.label
    assert len({arm.key for arm in arms}) == len(arms)
    assert "FoWKAL" in arms[5].label and arms[5].label.startswith("(f)")


def test_ablation_numbers_match_the_paper_text():
    if not PAPER_FILE.is_file():
        pytest.skip(f"paper text not found at {PAPER_FILE} (only in the project workspace)")
    text = PAPER_FILE.read_text()
    arms = {arm.key: arm for arm in load_ablation_arms(ABLATION_ARMS)}
    # Table 2 rows: "(b)<tab><tab>$\checkmark$<tabs>57.9<tab>67.6<tab>52.4<tab>76.8<tab>50.9"
    for key in "abcdef":
        row = re.search(rf"^\({key}\)\D*?([\d.]+)\t([\d.]+)\t([\d.]+)\t([\d.]+)\t([\d.]+)\s*$", text, re.M)
        assert row is not None, key
        expected = dict(
            zip(
                ("wholebody_AP", "body_AP", "foot_AP", "face_AP", "hand_AP"),
                map(float, row.groups()),
                strict=True,
            )
        )
        assert {k: arms[key].paper[k] for k in expected} == expected
    # Table 3 rows and Table 1's AR for the baseline (HRNet-w32+DARK) and FoWKAL.
    by_name = {arm.name: arm for arm in arms.values()}
    for label, name in (("Heuristic + WAHR", "heuristic_wahr"), ("KAL + WAHR", "kal_wahr")):
        row = re.search(rf"^{re.escape(label)}\t([\d.]+)", text, re.M)
        assert row is not None and by_name[name].paper["wholebody_AP"] == float(row.group(1))
    for label, name in (
        ("HRNet-w32+DARK (Zhang et al. 2020)", "mse"),
        ("HRNet-w32+DARK+FoWKAL (Ours)", "fowkal"),
    ):
        row = re.search(rf"^{re.escape(label)}\t([\d.]+)\t([\d.]+)", text, re.M)
        assert row is not None
        assert by_name[name].paper["wholebody_AP"] == float(row.group(1))
        assert by_name[name].paper["wholebody_AR"] == float(row.group(2))


# ------------------------------------------------------------------------------------------------------------
# Validation errors


BAD_SPACES = {
    "unknown parameter": (
        "parameters:\n  loss.tua: {distribution: uniform, low: 0.1, high: 1.0}\n",
        ["loss.tua", "loss.tau"],
    ),
    "low >= high": (
        "parameters:\n  loss.omega: {distribution: uniform, low: 20.0, high: 10.0}\n",
        ["loss.omega", "20.0", "10.0"],
    ),
    "loguniform low <= 0": (
        "parameters:\n  loss.tau: {distribution: loguniform, low: 0.0, high: 1.0}\n",
        ["loss.tau", "low", "0.0"],
    ),
    "unknown distribution": (
        "parameters:\n  loss.tau: {distribution: gaussian, low: 0.1, high: 1.0}\n",
        ["loss.tau", "gaussian"],
    ),
    "categorical without choices": (
        "parameters:\n  loss.fwahr_condition: {distribution: categorical, choices: []}\n",
        ["loss.fwahr_condition", "choices"],
    ),
    "condition on unknown parameter": (
        "parameters:\n  loss.tau:\n"
        "    {distribution: loguniform, low: 0.001, high: 1.0, when: {loss.varaint: [fowkal]}}\n",
        ["loss.tau", "loss.varaint"],
    ),
    "condition on unknown variant": (
        "parameters:\n  loss.variant: {distribution: categorical, choices: [kal, fowkal]}\n"
        "  loss.tau: {distribution: loguniform, low: 0.001, high: 1.0, when: {loss.variant: [fowkall]}}\n",
        ["loss.tau", "fowkall"],
    ),
    "condition cycle": (
        "parameters:\n  loss.variant:\n"
        "    {distribution: categorical, choices: [kal, fowkal], when: {loss.kaf_mode: literal}}\n"
        "  loss.kaf_mode: {distribution: categorical, choices: [literal], when: {loss.variant: fowkal}}\n",
        ["loss.variant", "cycle"],
    ),
    "unknown variant constant": (
        "parameters:\n  loss.variant: fowkall\n",
        ["loss.variant", "fowkall"],
    ),
    "value the loss rejects": (
        "parameters:\n  loss.tau: {distribution: uniform, low: 0.0, high: 1.0}\n",
        ["loss.tau", "low", "0.0"],
    ),
    "categorical choice the config rejects": (
        "parameters:\n  loss.fwahr_condition: {distribution: categorical, choices: [pred, both]}\n",
        ["loss.fwahr_condition", "both"],
    ),
    "float distribution on an int field": (
        "parameters:\n  epochs: {distribution: uniform, low: 2, high: 9}\n",
        ["epochs", "low", "2.0", "sample floats"],
    ),
    "int distribution with float bounds": (
        "parameters:\n  epochs: {distribution: int, low: 2.5, high: 9}\n",
        ["epochs", "low", "2.5"],
    ),
    "paper value outside the bounds": (
        "parameters:\n  loss.theta: {distribution: uniform, low: 0.1, high: 0.9, paper: 1.5}\n",
        ["loss.theta", "paper", "1.5"],
    ),
    "number written as a YAML 1.1 string": (
        "parameters:\n  loss.tau: {distribution: loguniform, low: 1e-4, high: 1.0}\n",
        ["loss.tau", "low", "1e-4", "1.0e-3"],
    ),
    "unknown field of a parameter": (
        "parameters:\n  loss.theta: {distribution: uniform, lo: 0.1, high: 0.9}\n",
        ["loss.theta", "lo"],
    ),
    "unknown top-level field": ("parameter:\n  loss.theta: 0.5\n", ["parameter"]),
    "bad mode": ("mode: maximise\nparameters:\n  loss.theta: 0.5\n", ["mode", "maximise"]),
    "malformed YAML": (
        "parameters:\n  loss.theta: {distribution: uniform, low: 0.1\n  loss.tau: 0.1\n",
        ["line 3"],
    ),
    "duplicate key": (
        "parameters:\n  loss.tau: 0.1\n  loss.gamma: 0.01\n  loss.tau: 0.2\n",
        ["loss.tau", "line 4"],
    ),
    "point with a parameter not in the space": (
        "parameters:\n  loss.theta: {distribution: uniform, low: 0.1, high: 0.9}\n"
        "points_to_evaluate:\n  - {loss.omega: 14.0}\n",
        ["points_to_evaluate[0]", "loss.omega"],
    ),
    "point outside the bounds": (
        "parameters:\n  loss.theta: {distribution: uniform, low: 0.1, high: 0.9}\n"
        "points_to_evaluate:\n  - {loss.theta: 0.95}\n",
        ["points_to_evaluate[0]", "loss.theta", "0.95"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_bad_search_space_names_file_and_key(tmp_path, case):
    text, expected = BAD_SPACES[case]
    path = write(tmp_path, text, name=f"bad_{case.replace(' ', '_')}.yaml")
    with pytest.raises(SearchSpaceError) as err:
        load_search_space(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, (case, message)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SearchSpaceError, match="nope.yaml"):
        load_search_space(path)


ARM = "  - {{key: a, name: x, label: '(a) X', table: '2', overrides: {overrides}, paper: {paper}}}\n"


def arms_file(
    tmp_path: Path, overrides: str = "{loss.variant: mse}", paper: str = "{wholebody_AP: 58.2}"
) -> Path:
    return write(tmp_path, "arms:\n" + ARM.format(overrides=overrides, paper=paper), name="arms.yaml")


def test_ablation_unknown_variant_is_named_with_the_known_ones(tmp_path):
    path = arms_file(tmp_path, overrides="{loss.variant: focal}")
    with pytest.raises(SearchSpaceError) as err:
        load_ablation_arms(path)
    message = str(err.value)
    assert str(path) in message and "loss.variant" in message and "'focal'" in message
    for variant in (
        "mse",
        "awing",
        "heuristic",
        "kal",
        "heuristic_wahr",
        "heuristic_fwahr",
        "kal_wahr",
        "fowkal",
    ):
        assert variant in message


@pytest.mark.parametrize(
    ("overrides", "paper", "expected"),
    [
        ("{loss.tau: 0.1}", "{wholebody_AP: 58.2}", ["overrides", "loss.variant"]),
        ("{loss.variant: mse, loss.tua: 0.1}", "{wholebody_AP: 58.2}", ["loss.tua"]),
        ("{loss.variant: fowkal, loss.tau: -1.0}", "{wholebody_AP: 58.2}", ["tau", "-1.0"]),
        ("{loss.variant: mse}", "{wholebody_AP: 58.2, elbow_AP: 3.0}", ["paper.elbow_AP"]),
        ("{loss.variant: mse}", "{wholebody_AP: 582}", ["paper.wholebody_AP", "582"]),
        ("{loss.variant: mse}", "{body_AP: 58.2}", ["paper", "wholebody_AP"]),
    ],
)
def test_bad_ablation_arm_names_file_and_key(tmp_path, overrides, paper, expected):
    path = arms_file(tmp_path, overrides=overrides, paper=paper)
    with pytest.raises(SearchSpaceError) as err:
        load_ablation_arms(path)
    message = str(err.value)
    assert str(path) in message and "arms[0]" in message
    for fragment in expected:
        assert fragment in message, message


def test_ablation_duplicate_keys_and_bad_table(tmp_path):
    arm = (
        "  - {key: a, name: %s, label: L, table: %s, "
        "overrides: {loss.variant: mse}, paper: {wholebody_AP: 1.0}}\n"
    )
    path = write(tmp_path, "arms:\n" + arm % ("x", "2") + arm % ("y", "2"), name="dup.yaml")
    with pytest.raises(SearchSpaceError, match=r"arms\[1\].*duplicate arm key 'a'"):
        load_ablation_arms(path)
    path = write(tmp_path, "arms:\n" + arm % ("x", "4"), name="table.yaml")
    with pytest.raises(SearchSpaceError, match=r"table.yaml.*arms\[0\].*table.*4"):
        load_ablation_arms(path)
    # An integer table number is accepted and normalised to the string form.
    path = write(tmp_path, "arms:\n" + arm % ("x", "3"), name="int_table.yaml")
    assert load_ablation_arms(path)[0].table == "3"


# ------------------------------------------------------------------------------------------------------------
# Define-by-run


def test_fixed_trial_respects_conditions(tmp_path):
    space = load_search_space(write(tmp_path, VARIANT_SPACE))
    # mse: tau, reg_weight, fwahr_condition are not asked for (FixedTrial raises on a missing asked value).
    trial = optuna.trial.FixedTrial({"loss.variant": "mse", "epochs": 4})
    assert space.optuna_define_by_run(trial) == {"seed": 3}
    assert space.to_overrides({"loss.variant": "mse", "epochs": 4, "seed": 3}) == {
        "loss.variant": "mse",
        "epochs": 4,
        "seed": 3,
    }
    # fowkal: tau is asked for, so a FixedTrial without it fails.
    with pytest.raises(ValueError, match="loss.tau"):
        space.optuna_define_by_run(optuna.trial.FixedTrial({"loss.variant": "fowkal", "epochs": 4}))
    params = {"loss.variant": "kal", "loss.reg_weight": 1.5, "epochs": 16}
    space.optuna_define_by_run(optuna.trial.FixedTrial(params))
    assert space.to_overrides(params) == {**params, "seed": 3}  # constant added


def test_study_ask_samples_within_bounds_and_conditions(tmp_path):
    space = load_search_space(write(tmp_path, VARIANT_SPACE))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen_variants = set()
    for _ in range(80):
        trial = study.ask()
        constants = space.optuna_define_by_run(trial)
        params = trial.params
        variant = params["loss.variant"]
        seen_variants.add(variant)
        assert constants == {"seed": 3}
        assert variant in {"mse", "kal", "heuristic_fwahr", "fowkal"}
        assert ("loss.tau" in params) == (variant in FWAHR_VARIANTS)
        assert ("loss.reg_weight" in params) == (variant in {"kal", "fowkal"})
        assert ("loss.fwahr_condition" in params) == (variant == "fowkal")
        if "loss.tau" in params:
            assert 1e-4 <= params["loss.tau"] <= 1.0
        if "loss.reg_weight" in params:
            assert 0.5 <= params["loss.reg_weight"] <= 2.0
        if "loss.fwahr_condition" in params:
            assert params["loss.fwahr_condition"] in ("pred", "target")
        assert isinstance(params["epochs"], int) and 2 <= params["epochs"] <= 64
        overrides = space.to_overrides({**params, **constants})
        cfg = config_from_dict(apply_overrides(config_to_dict(TrainConfig()), overrides))
        assert cfg.loss.variant == variant and cfg.epochs == params["epochs"] and cfg.seed == 3
        study.tell(trial, float(params["epochs"]))
    assert seen_variants == {"mse", "kal", "heuristic_fwahr", "fowkal"}


def test_fowkal_space_samples_within_its_bounds():
    space = load_search_space(FOWKAL_SPACE)
    bounds = {name: (p.low, p.high) for name, p in space.parameters.items() if p.low is not None}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=1))
    for _ in range(15):
        trial = study.ask()
        assert space.optuna_define_by_run(trial) == {"loss.variant": "fowkal"}
        assert set(trial.params) == set(PAPER_LOSS_VALUES)  # fowkal activates every parameter
        for name, (low, high) in bounds.items():
            assert low <= trial.params[name] <= high
        study.tell(trial, 0.0)


def test_fowkal_space_conditions_with_a_sampled_variant(tmp_path):
    # The shipped file's `when:` clauses, exercised by sampling the variant instead of fixing it.
    variants = ["mse", "awing", "heuristic", "kal", "heuristic_wahr", "heuristic_fwahr", "kal_wahr", "fowkal"]
    text = FOWKAL_SPACE.read_text().replace(
        "  loss.variant: fowkal\n",
        f"  loss.variant: {{distribution: categorical, choices: [{', '.join(variants)}], paper: fowkal}}\n",
    )
    assert text != FOWKAL_SPACE.read_text()
    space = load_search_space(write(tmp_path, text))
    assert space.points_to_evaluate()[0] == {"loss.variant": "fowkal", **PAPER_LOSS_VALUES}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(64):
        trial = study.ask()
        assert space.optuna_define_by_run(trial) is None  # no constants left
        params = trial.params
        variant = params["loss.variant"]
        seen.add(variant)
        assert ("loss.tau" in params) == (variant in FWAHR_VARIANTS)
        assert ("loss.fwahr_condition" in params) == (variant in FWAHR_VARIANTS)
        assert ("loss.gamma" in params) == (variant in WAHR_FAMILY)
        assert ("loss.reg_weight" in params) == (variant in {"kal", "kal_wahr", "fowkal"})
        for name in ("loss.omega", "loss.theta", "loss.epsilon", "loss.alpha"):
            assert (name in params) == (variant != "mse")
        study.tell(trial, 0.0)
    assert seen == set(variants)


def test_paper_point_skips_inactive_parameters(tmp_path):
    space = load_search_space(write(tmp_path, VARIANT_SPACE.replace("paper: fowkal", "paper: kal")))
    # variant kal: tau's condition fails, reg_weight's holds; fwahr_condition has no paper value.
    assert space.points_to_evaluate() == [{"loss.variant": "kal", "loss.reg_weight": 1.0, "epochs": 8}]


def test_extra_points_follow_the_paper_point(tmp_path):
    text = textwrap.dedent(VARIANT_SPACE) + "points_to_evaluate:\n  - {loss.variant: mse, epochs: 32}\n"
    space = load_search_space(write(tmp_path, text))
    points = space.points_to_evaluate()
    assert points[0] == {"loss.variant": "fowkal", "loss.tau": 0.01, "loss.reg_weight": 1.0, "epochs": 8}
    assert points[1] == {"loss.variant": "mse", "epochs": 32}
    bad = textwrap.dedent(VARIANT_SPACE) + "points_to_evaluate:\n  - {loss.variant: mse, loss.tau: 0.1}\n"
    with pytest.raises(SearchSpaceError, match=r"points_to_evaluate\[0\]\.loss\.tau.*inactive"):
        load_search_space(write(tmp_path, bad, name="bad_point.yaml"))


def test_to_overrides_rejects_bad_samples(tmp_path):
    space = load_search_space(write(tmp_path, VARIANT_SPACE))
    with pytest.raises(SearchSpaceError, match=r"loss\.tau.*outside"):
        space.to_overrides({"loss.variant": "fowkal", "loss.tau": 3.0, "loss.reg_weight": 1.0,
                            "loss.fwahr_condition": "pred", "epochs": 4})  # fmt: skip
    with pytest.raises(SearchSpaceError, match=r"loss\.tau.*inactive"):
        space.to_overrides({"loss.variant": "mse", "loss.tau": 0.1, "epochs": 4})
    with pytest.raises(SearchSpaceError, match=r"epochs.*missing"):
        space.to_overrides({"loss.variant": "mse"})
    with pytest.raises(SearchSpaceError, match="arm"):
        space.to_overrides({"loss.variant": "mse", "epochs": 4, "arm": "a"})
    # Unrelated Tune config keys can be skipped; numpy scalars become Python numbers.
    overrides = space.to_overrides(
        {"loss.variant": np.str_("mse"), "epochs": np.int64(4), "arm": "a"}, ignore_unknown=True
    )
    assert overrides == {"loss.variant": "mse", "epochs": 4, "seed": 3}
    assert type(overrides["epochs"]) is int


def test_define_by_run_survives_pickling():
    # OptunaSearch pickles its space (Tuner checkpoints / --resume): the bound method must round-trip.
    space = load_search_space(FOWKAL_SPACE)
    restored = pickle.loads(pickle.dumps(space.optuna_define_by_run))
    trial = optuna.trial.FixedTrial(PAPER_LOSS_VALUES)
    assert restored(trial) == {"loss.variant": "fowkal"}


def test_ray_optuna_search_suggests_the_paper_point_first():
    # The real consumer, without starting Ray: OptunaSearch.suggest runs the define-by-run function locally.
    pytest.importorskip("ray.tune.search.optuna")
    import ray
    from ray.tune.search.optuna import OptunaSearch

    space = load_search_space(FOWKAL_SPACE)
    searcher = OptunaSearch(
        space=space.optuna_define_by_run,
        metric=space.metric,
        mode=space.mode,
        points_to_evaluate=space.points_to_evaluate(),
        seed=0,
    )
    first = searcher.suggest("trial_0")
    assert first == {**PAPER_LOSS_VALUES, "loss.variant": "fowkal"}
    second = searcher.suggest("trial_1")
    assert second != first and space.to_overrides(second)["loss.variant"] == "fowkal"
    assert not ray.is_initialized()


# ------------------------------------------------------------------------------------------------------------
# apply_overrides


def test_apply_overrides_updates_nested_dict_without_mutating():
    base = config_to_dict(TrainConfig())
    before = config_to_dict(TrainConfig())
    result = apply_overrides(
        base, {"loss.tau": 0.2, "optim.lr": 1e-3, "data.pipeline.sigma": 3.0, "epochs": 7}
    )
    assert base == before
    assert result["loss"]["tau"] == 0.2 and result["optim"]["lr"] == 1e-3 and result["epochs"] == 7
    assert result["data"]["pipeline"]["sigma"] == 3.0
    # Every other leaf is untouched.
    result["loss"]["tau"], result["optim"]["lr"], result["epochs"] = (
        before["loss"]["tau"],
        before["optim"]["lr"],
        210,
    )
    result["data"]["pipeline"]["sigma"] = before["data"]["pipeline"]["sigma"]
    assert result == before


def test_apply_overrides_creates_missing_sections_and_rejects_unknown_keys():
    assert apply_overrides({"name": "smoke"}, {"loss.variant": "mse"}) == {
        "name": "smoke",
        "loss": {"variant": "mse"},
    }
    with pytest.raises(ConfigError, match=r"'loss\.tua'.*loss\.tau"):
        apply_overrides({}, {"loss.tua": 0.1})
    with pytest.raises(ConfigError, match="'loss' is a section.*loss.variant"):
        apply_overrides({}, {"loss": {"tau": 0.1}})


# ------------------------------------------------------------------------------------------------------------
# Conditions by variant property


def test_when_may_name_variant_properties_instead_of_lists(tmp_path):
    from trainer.topdown.losses import LOSS_VARIANTS

    space = load_search_space(FOWKAL_SPACE)
    when = {name: p.when.get("loss.variant") for name, p in space.parameters.items() if p.when}
    # The shipped space names properties; they expand to the variant table's rows that have them.
    assert set(when["loss.tau"]) == {"heuristic_fwahr", "fowkal"}
    assert set(when["loss.gamma"]) == {"heuristic_wahr", "heuristic_fwahr", "kal_wahr", "fowkal"}
    assert set(when["loss.reg_weight"]) == {v for v, spec in LOSS_VARIANTS.items() if spec.needs_kaf}
    assert set(when["loss.omega"]) == set(LOSS_VARIANTS) - {"mse"}

    path = tmp_path / "space.yaml"
    path.write_text(
        textwrap.dedent(
            """
            parameters:
              loss.variant: {distribution: categorical, choices: [mse, kal, fowkal], paper: fowkal}
              loss.reg_weight:
                distribution: loguniform
                low: 0.1
                high: 10.0
                paper: 1.0
                when: {loss.variant: {needs_kaf: true}}
            """
        )
    )
    space = load_search_space(path)
    assert space.to_overrides({"loss.variant": "mse"}) == {"loss.variant": "mse"}
    assert space.to_overrides({"loss.variant": "kal", "loss.reg_weight": 2.0})["loss.reg_weight"] == 2.0
    path.write_text(path.read_text().replace("needs_kaf: true", "needs_kfa: true"))
    with pytest.raises(SearchSpaceError, match=r"needs_kfa.*needs_kaf, uses_awing|needs_kfa.*known"):
        load_search_space(path)
