"""Arms files for one's own ablation: ``paper`` and ``table`` are optional, and validated when given."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from orchestrator.reports import report
from orchestrator.sweeps.ablation_arms import SearchSpaceError, load_ablation_arms

OWN = """\
description: my own arms
arms:
  - {key: a, name: mse, label: (a) MSE, overrides: {loss.variant: mse}}
  - {key: k, name: kal, label: (k) KAL tau 0.1, overrides: {loss.variant: kal, loss.tau: 0.1}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "arms.yaml"
    path.write_text(text)
    return path


def _record_without_runs(arms) -> report.SweepRecord:
    """An ablation's record as the report reads it back (the parent's arms.json), with no child runs yet."""
    return report.SweepRecord(
        parent_run_id="p",
        name="arms",
        kind="ablate",
        status="FINISHED",
        metric="val/wholebody_AP",
        mode="max",
        children=[],
        arms=[asdict(a) for a in arms],
    )


def test_own_arms_need_neither_paper_nor_table(tmp_path):
    arms = load_ablation_arms(write(tmp_path, OWN))
    assert [(a.key, a.paper, a.table) for a in arms] == [("a", {}, None), ("k", {}, None)]
    assert arms[1].overrides == {"loss.variant": "kal", "loss.tau": 0.1}
    # What the sweep logs as the parent's arms.json reads back as arms without paper numbers: no paper column.
    rows = report.ablation_rows(_record_without_runs(arms))
    assert [row.paper for row in rows] == [{}, {}]
    assert "paper" not in report.ablation_markdown(rows).lower()


def test_the_delta_column_names_the_arm_it_is_taken_against():
    """Arms without an (a), as the KAPAO files: the delta is to the first arm, and the header says so."""
    arms = load_ablation_arms(Path(__file__).parents[1] / "search_spaces" / "kapao_bbox.yaml")
    rows = report.ablation_rows(_record_without_runs(arms))
    assert report.baseline_row(rows).key == arms[0].key == "b010"
    assert "Δ AP vs (b010)" in report.ablation_markdown(rows) and "(a)" not in report.ablation_markdown(rows)


def test_the_papers_arms_keep_their_numbers_and_tables():
    arms = load_ablation_arms(Path(__file__).parents[1] / "search_spaces" / "ablation_paper.yaml")
    assert all(arm.table in ("2", "3") and "wholebody_AP" in arm.paper for arm in arms)


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        ("paper: {body_AP: 70.0}", ["arms[0]", "paper", "wholebody_AP", "or no paper field"]),
        ("paper: {wholebody_AP: 58.2, elbow_AP: 3.0}", ["arms[0]", "paper.elbow_AP"]),
        ("paper: {wholebody_AP: 582}", ["arms[0]", "paper.wholebody_AP", "582"]),
        ("paper: null", ["arms[0]", "paper", "None"]),
        ("table: '4'", ["arms[0]", "table", "'4'", "or no table field"]),
        ("table: null", ["arms[0]", "table", "None"]),
    ],
)
def test_paper_and_table_are_validated_when_given(tmp_path, extra, fragments):
    text = f"arms:\n  - {{key: a, name: mse, label: (a) MSE, overrides: {{loss.variant: mse}}, {extra}}}\n"
    path = write(tmp_path, text)
    with pytest.raises(SearchSpaceError) as err:
        load_ablation_arms(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_the_ambiguities_file_crosses_kaf_mode_and_fwahr_condition_on_fowkal():
    from pathlib import Path

    from orchestrator.sweeps.ablation_arms import load_ablation_arms

    path = Path(__file__).resolve().parents[1] / "search_spaces" / "ablation_ambiguities.yaml"
    arms = load_ablation_arms(path)
    assert arms[0].key == "a" and arms[0].overrides == {"loss.variant": "mse"}
    crossed = {(a.overrides["loss.kaf_mode"], a.overrides["loss.fwahr_condition"]) for a in arms[1:]}
    assert crossed == {(m, c) for m in ("literal", "uncertainty") for c in ("pred", "target")}
    assert all(a.overrides["loss.variant"] == "fowkal" for a in arms[1:])
