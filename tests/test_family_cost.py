"""The inference cost of a model as both families measure it (``ExperimentFamily.latency_probe`` timed by
``trainer.latency.inference_cost``; issue 20): random-init small models on a tiny synthetic val set, and the
report's cost arithmetic (``orchestrator.reports.cost_tables``) on runs of known length and resources."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.datasets.sources import resolve_datasets
from trainer.families import family_of
from trainer.latency import COST_METRICS, count_flops, inference_cost

REPO = Path(__file__).resolve().parents[1]
SETS = ["data.synthetic_train_images=2", "data.synthetic_val_images=3"]
CONFIGS = {
    "topdown_heatmap": (
        "smoke.yaml",
        ["data.pipeline.input_size=[32,64]", "data.pipeline.heatmap_size=[8,16]"],
    ),
    "kapao": ("smoke_kapao.yaml", ["data.input_size=128"]),
}


def _family_setup(name: str, tmp_path):
    config, extra = CONFIGS[name]
    cfg = load_config(REPO / "configs" / config, [*SETS, *extra, f"data.synthetic_dir={tmp_path / 'synth'}"])
    family = family_of(cfg)
    paths = resolve_datasets(cfg.data)
    dataset = family.eval_dataset(cfg, paths["val_ann"], paths["val_images"], det_file=paths["val_det"])
    return cfg, family, dataset


def test_count_flops_is_two_per_multiply_add():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.zeros(1, 3, 10, 12)
    assert count_flops(conv, lambda model, x: model(x), x) == 2 * 3 * 8 * 9 * 10 * 12


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_latency_probe_of_each_family(name, tmp_path, one_torch_thread):
    cfg, family, dataset = _family_setup(name, tmp_path)
    torch.manual_seed(0)
    model = family.build_model(cfg, pretrained=False)

    probe = family.latency_probe(cfg, dataset, images=2)
    assert len(probe.inputs) == 2
    if family.predicts_per_box:  # an image's input is its person crops, at the crop size
        sample_images, _ = dataset.sample_ids
        first = sorted(set(sample_images.tolist()))[:2]
        assert [len(x) for x in probe.inputs] == [int((sample_images == i).sum()) for i in first]
        assert all(tuple(x.shape[1:]) == (3, 64, 32) for x in probe.inputs)
    else:  # one whole letterboxed image at the family's input size
        assert all(tuple(x.shape) == (1, 3, 128, 128) for x in probe.inputs)

    cost = inference_cost(model, probe)
    assert set(cost) == set(COST_METRICS)
    assert cost["cost/params"] == sum(p.numel() for p in model.parameters())
    inputs = sum(len(x) for x in probe.inputs) / 2
    assert cost["cost/inputs_per_image"] == inputs
    assert cost["cost/flops_per_image"] == pytest.approx(cost["cost/flops_per_input"] * inputs)
    assert cost["cost/flops_per_input"] == count_flops(model, probe.forward, probe.inputs[0][:1])
    for setting in ("b1", "batched"):
        forward, post = cost[f"latency/forward_ms_{setting}"], cost[f"latency/post_ms_{setting}"]
        assert forward > 0 and post > 0
        assert cost[f"latency/total_ms_{setting}"] == pytest.approx(forward + post)
    assert cost["latency/batch_images"] == 2 and cost["latency/on_gpu"] == 0 and cost["latency/threads"] == 1
    if family.predicts_per_box:  # every crop's pose survives OKS-NMS on distinct synthetic people
        assert 0 < cost["latency/poses_per_image"] <= inputs
    # Image ids asked for explicitly, in their order (what bench/kapao.py --latency does).
    ids = dataset.sample_ids[0] if family.predicts_per_box else dataset.image_ids
    first, second = sorted(set(ids.tolist()))[:2]
    again = family.latency_probe(cfg, dataset, image_ids=[second, first])
    assert torch.equal(again.inputs[0], probe.inputs[1]) and torch.equal(again.inputs[1], probe.inputs[0])


def test_both_families_probe_the_same_images(tmp_path):
    """On one synthetic val set both families pick the same images (the smallest ids)."""
    _, topdown, boxes = _family_setup("topdown_heatmap", tmp_path)
    _, _, images = _family_setup("kapao", tmp_path)
    box_images, _ = boxes.sample_ids
    assert sorted(set(box_images.tolist()))[:3] == sorted(images.image_ids.tolist())[:3]
    with pytest.raises(ValueError, match="not in the data set"):
        topdown.latency_probe(None, boxes, image_ids=[10**9])


def _child(arm, seed, *, hours, workers=1, gpu=False, status="FINISHED", metrics=None, family=None):
    from orchestrator.reports.records import ChildRecord

    return ChildRecord(
        run_id=f"{arm}{seed}",
        name=f"{arm}-s{seed}",
        status=status,
        trial_id="t",
        arm_key=arm,
        seed=seed,
        metrics={},
        params={"num_workers": str(workers), "use_gpu": str(gpu)},
        last_metrics=dict(metrics or {}),
        family=family,
        start_time=1_000,
        end_time=1_000 + int(hours * 3.6e6),
        epoch_means={"throughput/img_per_s": 10.0 * (seed + 1), "time/epoch_s": 5.0},
    )


def test_cost_rows_from_run_records():
    from orchestrator.reports.cost_tables import (
        cost_rows,
        detector_note,
        inference_cost_table,
        training_cost_table,
    )
    from orchestrator.reports.records import SweepRecord
    from orchestrator.runs.resources import CPUS_PER_WORKER, TRIAL_CPUS

    latency = {"latency/forward_ms_b1": 8.0, "latency/post_ms_b1": 2.0, "latency/total_ms_b1": 10.0}
    td = {"cost/params": 2e6, "cost/flops_per_image": 3e9, "cost/flops_per_input": 1e9, **latency}
    td["cost/inputs_per_image"] = 3.0
    kp = {"cost/params": 4e6, "cost/flops_per_image": 5e9, "cost/flops_per_input": 5e9, **latency}
    kp["cost/inputs_per_image"] = 1.0
    children = [
        _child("td", 0, hours=0.5, metrics=td, family="topdown_heatmap"),
        _child("td", 1, hours=1.5, metrics={**td, "cost/params": 4e6}, family="topdown_heatmap"),
        _child("kp", 0, hours=1.0, workers=2, gpu=True, metrics=kp, family="kapao"),
        _child("kp", 1, hours=2.0, workers=2, gpu=True, status="FAILED", family="kapao"),
    ]
    arms = [{"key": "td", "name": "t", "label": "top-down"}, {"key": "kp", "name": "k", "label": "KAPAO"}]
    record = SweepRecord("p", "s", "ablate", "FINISHED", "val/wholebody_AP", "max", children, arms=arms)
    td_row, kp_row = cost_rows(record)
    assert td_row.inference["cost/params"] == 3e6 and td_row.measured == 2  # the mean of the two seeds
    assert td_row.training["throughput/img_per_s"] == 15.0
    assert td_row.cpu_hours == pytest.approx(2.0 * (TRIAL_CPUS + CPUS_PER_WORKER)) and td_row.gpu_hours == 0
    # The failed run spent its hours too; only the finished one is in the means.
    assert kp_row.ended == 2 and kp_row.measured == 1 and kp_row.training["throughput/img_per_s"] == 10.0
    assert kp_row.gpu_hours == pytest.approx(3.0 * 2) and kp_row.wall_hours == pytest.approx(3.0)
    _, table = inference_cost_table([td_row, kp_row])
    assert table[0][3] == "3.00" and table[0][4] == "3.00 (3 inputs × 1.000)" and table[1][4] == "5.00"
    assert table[0][5] == "8.0 / 2.0 / 10.0 (20% post)"
    _, table = training_cost_table([td_row, kp_row])
    assert table[1][5:] == ["3", f"{3.0 * (TRIAL_CPUS + 2 * CPUS_PER_WORKER):.3g}", "6"]
    note = detector_note([td_row, kp_row])
    assert "NOT included for top-down" in note and "KAPAO" in note
    assert detector_note([kp_row]) is None
