"""The family seam changed nothing for the top-down family: the smoke config trained for 2 epochs with a
fixed seed gives the per-epoch losses, KAF statistics and val metrics recorded before the seam
(tests/data/smoke_topdown_before_seam.json, written by commit 213d9a5 with this recipe), and ``fowkal eval``'s
``evaluate_model`` of the checkpoint that commit wrote (tests/data/smoke_topdown_epoch2.pt) gives the same
numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.checkpoint import load_checkpoint_model
from trainer.config import config_to_dict, load_config, resolve_paths
from trainer.evaluation.model_eval import evaluate_model
from trainer.loop import dataset_paths, train_loop_per_worker

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests" / "data" / "smoke_topdown_before_seam.json").read_text())
TIMINGS = ("time/epoch_s", "throughput/img_per_s")
# Reported since the fixture was recorded: the smoke data hold no bad image and no empty box.
DATA_COUNTS = ("data/bad_images", "data/dropped_instances")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _assert_same(actual: dict, expected: dict, where: str) -> None:
    assert set(actual) == set(expected), f"{where}: keys differ: {set(actual) ^ set(expected)}"
    for key, value in expected.items():
        # float64 sums of float32 steps on one thread: equal up to rounding of the summation order.
        assert actual[key] == pytest.approx(value, rel=1e-6, abs=1e-9), f"{where}: {key}"


@pytest.mark.slow
def test_smoke_training_gives_the_recorded_epochs(tmp_path):
    recipe = FIXTURE["recipe"]
    overrides = [
        *recipe["overrides"],
        f"output_dir={tmp_path / 'run'}",
        f"data.synthetic_dir={tmp_path / 'synth'}",
    ]
    cfg = resolve_paths(load_config(ROOT / recipe["config"], overrides))
    rows: list[dict] = []
    train_loop_per_worker(config_to_dict(cfg), report_fn=lambda metrics, _: rows.append(dict(metrics)))
    assert len(rows) == len(FIXTURE["epochs"])
    for row, expected in zip(rows, FIXTURE["epochs"], strict=True):
        assert [row[k] for k in DATA_COUNTS] == [0, 0]
        _assert_same(
            {k: v for k, v in row.items() if k not in TIMINGS + DATA_COUNTS},
            expected,
            f"epoch {expected['epoch']}",
        )


def test_eval_of_a_checkpoint_written_before_the_seam(tmp_path):
    loaded = load_checkpoint_model(ROOT / FIXTURE["checkpoint"])
    assert loaded.epoch == 2
    loaded.config.data.synthetic_dir = str(tmp_path / "synth")
    from trainer.loop import resolve_datasets

    resolve_datasets(loaded.config.data)
    paths = dataset_paths(loaded.config.data)
    outcome = evaluate_model(loaded, paths["val_ann"], paths["val_images"], workers=0, progress=False)
    _assert_same(outcome.metrics, FIXTURE["checkpoint_eval_on_synthetic_val"], "fowkal eval")
