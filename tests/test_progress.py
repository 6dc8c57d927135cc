"""The sweep's console: one table, one line per finished trial, no repeats."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.sweeps.ablation_arms import load_ablation_arms
from orchestrator.sweeps.progress import SweepProgress, format_duration
from orchestrator.sweeps.trial import SweepPlan

ARMS = Path(__file__).resolve().parents[1] / "search_spaces" / "ablation_paper.yaml"


@dataclass
class FakeTrial:
    trial_id: str
    config: dict
    status: str = "RUNNING"
    last_result: dict = field(default_factory=dict)
    experiment_tag: str = ""


def _plan() -> SweepPlan:
    return SweepPlan(
        kind="ablate",
        sweep_id="s",
        sweep_dir="/tmp/s",
        base_config={},
        tracking_uri="",
        experiment_id="",
        parent_run_id="",
        metric="val/wholebody_AP",
        mode="max",
        arms={arm.key: arm for arm in load_ablation_arms(ARMS)},
    )


def test_table_and_one_line_per_finished_trial():
    lines: list[str] = []
    progress = SweepProgress(_plan(), epochs=4, concurrency=2, interval_s=3600, print_fn=lines.append)
    a = FakeTrial("t1", {"arm": "a", "seed": 0})
    f = FakeTrial("t2", {"arm": "f", "seed": 0}, status="PENDING")
    a.last_result = {"epoch": 2, "val/wholebody_AP": 2.0, "time/epoch_s": 10.0}  # percent
    progress.report([a, f], done=False)
    assert len(lines) == 1
    table = lines[0]
    assert "(a) MSE (baseline) s0" in table and "(f) KAL + FWAHR = FoWKAL s0" in table
    assert "wholebody_AP (%)" in table  # the unit in the header
    assert "2/4" in table and "2.00 (2)" in table and "20s" in table  # 2 epochs x 10 s left
    # Epoch 3 without evaluation: the last and best AP stay those of epoch 2; throttled, no new table.
    a.last_result = {"epoch": 3, "time/epoch_s": 10.0}
    progress.report([a, f], done=False)
    assert len(lines) == 1
    a.status, a.last_result = "TERMINATED", {"epoch": 4, "val/wholebody_AP": 1.5, "time/epoch_s": 10.0}
    progress.report([a, f], done=False)
    progress.report([a, f], done=False)
    ended = [line for line in lines if line.startswith("(a)")]
    assert ended == ["(a) MSE (baseline) s0: finished after epoch 4, best val/wholebody_AP 2.00 at epoch 2"]
    f.status, f.last_result = "ERROR", {"epoch": 1}
    progress.report([a, f], done=True)
    assert any("FoWKAL s0: failed" in line for line in lines)
    assert "2/2 trials done" in lines[-1]


def test_time_left_counts_trials_tune_has_not_created_yet():
    lines: list[str] = []
    progress = SweepProgress(_plan(), epochs=4, concurrency=1, print_fn=lines.append, total_trials=3)
    a = FakeTrial("t1", {"arm": "a", "seed": 0}, last_result={"epoch": 3, "time/epoch_s": 5.0})
    progress.report([a], done=True)
    # 1 epoch of this trial and 2 trials x 4 epochs not created yet, 5 s each, one at a time: 45 s.
    assert lines[-1].splitlines()[-1] == "0/3 trials done; about 45s left"


def test_format_duration():
    assert [format_duration(s) for s in (5, 125, 3720, None)] == ["5s", "2m05s", "1h02m", "?"]
