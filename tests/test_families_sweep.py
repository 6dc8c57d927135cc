"""One ablation whose arms are of different families (issue 18): a top-down MSE arm and a KAPAO arm, trained
on the same synthetic data with the same epochs, scored by the same evaluator, reported side by side."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import tracking

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"

ARMS = """\
description: the two families on the same images
arms:
  - {key: td, name: mse, label: top-down MSE, overrides: {loss.variant: mse}}
  - key: kp
    name: kapao
    label: KAPAO-S
    family: kapao
    overrides: {data.input_size: 64, optim.nominal_batch: 4, optim.warmup_min_iters: 2}
"""


@pytest.fixture(autouse=True)
def _shutdown_ray_at_end():
    yield
    from orchestrator.runs.ray_utils import shutdown_ray

    shutdown_ray()


@pytest.mark.slow
def test_an_ablation_mixes_arms_of_two_families(tmp_path):
    from orchestrator.reports.report import child_runs, write_report
    from orchestrator.sweeps.sweep import run_sweep
    from trainer.config import load_config

    assert SMOKE.is_file(), f"{SMOKE} is missing"
    arms = tmp_path / "arms.yaml"
    arms.write_text(ARMS)
    sets = {
        "output_dir": tmp_path / "out",
        "data.synthetic_dir": tmp_path / "synth",
        "epochs": 2,
        "eval_interval": 1,
        "batch_size": 4,
        "data.synthetic_train_images": 8,
        "data.synthetic_val_images": 2,
        "data.loader_workers": 0,
        "flip_test": "false",
        "data.pipeline.input_size": "[64,64]",
        "data.pipeline.heatmap_size": "[16,16]",
    }
    config = load_config(SMOKE, [f"{k}={v}" for k, v in sets.items()])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(
        "ablate", config, arms_path=arms, seeds=1, tracking_uri=uri, verbose=0, print_fn=lambda _: None
    )
    client = tracking.make_client(uri)
    parent = client.get_run(outcome.parent_run_id)
    children = {r.info.run_name: r for r in child_runs(client, parent.info.experiment_id, parent.info.run_id)}
    assert sorted(children) == ["kp-kapao-s0", "td-mse-s0"]
    td, kp = children["td-mse-s0"], children["kp-kapao-s0"]
    assert td.info.status == kp.info.status == "FINISHED"
    assert td.data.tags[tracking.TAG_FAMILY] == "topdown_heatmap" and td.data.params["loss.variant"] == "mse"
    assert kp.data.tags[tracking.TAG_FAMILY] == "kapao" and kp.data.params["model.size"] == "s"
    # The shared settings of --config carried over to the KAPAO arm: the same data, epochs and batch.
    for key in ("data.synthetic_dir", "data.synthetic_train_images", "epochs", "batch_size", "seed"):
        assert kp.data.params[key] == td.data.params[key], key
    assert "loss.variant" not in kp.data.params and "data.pipeline.input_size" not in kp.data.params
    # The same evaluator's numbers for both, and each a complete run.
    for run in (td, kp):
        assert "val/wholebody_AP" in run.data.metrics and tracking.last_epoch(client, run.info.run_id) == 2
        assert {"config.yaml", "best_checkpoint", "last_checkpoint"} <= {
            a.path for a in client.list_artifacts(run.info.run_id)
        }
    assert {"train/loss_box", "train/loss_kps", "val/kapao_fitness"} <= set(kp.data.metrics)

    md_path, _ = write_report(outcome.sweep_id, tracking_uri=uri, out_dir=tmp_path / "report", print_fn=print)
    text = md_path.read_text()
    assert "top-down MSE" in text and "KAPAO-S" in text, text
