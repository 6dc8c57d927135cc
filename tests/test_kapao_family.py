"""The KAPAO family through the shared code: config keys, the training loop, checkpoints, optimiser, EMA and
``evaluate_model``, on a tiny synthetic data set (input 128, 4 training images, 2 validation images)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from trainer.checkpoint import EvalError, load_checkpoint_model
from trainer.config import ConfigError, config_from_dict, config_to_dict, load_config
from trainer.datasets.sources import resolve_datasets
from trainer.evaluation.model_eval import evaluate_model
from trainer.families import get_family
from trainer.kapao.family import EVAL_SETTING_KEYS, KAPAO, KapaoTraining
from trainer.kapao.optim import KapaoSchedule, cosine_factor, scaled_weight_decay
from trainer.loop import train_loop_per_worker


def tiny_config(tmp_path, **top) -> dict:
    values = {
        "name": "tiny-kapao",
        "family": "kapao",
        "epochs": 1,
        "batch_size": 2,
        "eval_interval": 1,
        "output_dir": str(tmp_path / "run"),
        "data": {
            "kind": "synthetic",
            "synthetic_dir": str(tmp_path / "synthetic"),
            "synthetic_train_images": 4,
            "synthetic_val_images": 2,
            "loader_workers": 0,
            "val_batch_size": 2,
            "input_size": 128,
        },
        "model": {"size": "s", "keypoints": "wholebody"},
        "optim": {"warmup_min_iters": 2},
    }
    values.update(top)
    return values


def test_registered_and_keys_told_apart(tmp_path):
    assert get_family("kapao") is KAPAO
    cfg = config_from_dict(tiny_config(tmp_path))
    assert cfg.data.input_size == 128 and cfg.model.keypoints == "wholebody"
    assert "eval.tau_fd" in EVAL_SETTING_KEYS
    assert KAPAO.run_label(cfg) == "kapao-s-wb"
    bad = tiny_config(tmp_path)
    bad["loss"] = {"variant": "fowkal"}
    with pytest.raises(ConfigError, match="topdown_heatmap"):
        config_from_dict(bad)
    for key, value in (("kp_bbox", 0.7), ("input_size", 100)):
        bad = tiny_config(tmp_path)
        bad["data"][key] = value
        with pytest.raises(ConfigError, match=rf"data\.{key}"):
            config_from_dict(bad)
    bad = tiny_config(tmp_path)
    bad["data"]["mosaic"] = 1.5
    with pytest.raises(ConfigError, match=r"data\.mosaic"):
        config_from_dict(bad)
    for section, key, value in (("loss", "anchor_t", 0.5), ("eval", "tau_bp", 0.0), ("model", "size", "xl")):
        bad = tiny_config(tmp_path)
        bad.setdefault(section, {})[key] = value
        with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
            config_from_dict(bad)


def test_smoke_config_loads():
    cfg = load_config("configs/smoke_kapao.yaml")
    assert cfg.family == "kapao" and cfg.data.kind == "synthetic"


def test_optimizer_groups_schedule_and_ema(tmp_path, one_torch_thread):
    # A config written for 8 Ray Train workers, trained here in one process (python -m trainer): the step's
    # batch is this process's 8 images, so accumulation and decay follow 8, not 8 x 8.
    cfg = config_from_dict(tiny_config(tmp_path, batch_size=8, num_workers=8))
    model = KAPAO.build_model(cfg)
    optimizer, scheduler, accumulate = KAPAO.build_optimizer(cfg, model, iters_per_epoch=10)
    assert accumulate == 8  # round(64 / 8)
    assert len(optimizer.param_groups) == 3
    decays = [group["weight_decay"] for group in optimizer.param_groups]
    assert decays[0] == 0 and decays[2] == 0
    assert decays[1] == pytest.approx(5e-4 * 8 * 8 / 64) == scaled_weight_decay(cfg.optim, 8)
    biases = {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
    assert {id(p) for p in optimizer.param_groups[2]["params"]} == biases
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    # Warm-up start: lr 0 (bias lr 0.1), momentum 0.8.
    assert scheduler.get_last_lr()[1] == 0.0 and scheduler.get_last_lr()[2] == pytest.approx(0.1)
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.8)

    # Past the warm-up: cosine per epoch, momentum 0.937; the state dict round-trips.
    schedule = KapaoSchedule(optimizer, cfg.optim, epochs=4, iters_per_epoch=10, accumulate=1)
    schedule.warmup_iters = 0
    for _ in range(25):  # 2.5 epochs of optimiser steps
        schedule.step()
    assert schedule.get_last_lr()[1] == pytest.approx(0.01 * cosine_factor(2, 4, 0.2))
    assert optimizer.param_groups[1]["momentum"] == pytest.approx(0.937)
    other = KapaoSchedule(optimizer, cfg.optim, epochs=4, iters_per_epoch=10, accumulate=1)
    other.load_state_dict(schedule.state_dict())
    assert other.steps_done == 25

    # EMA: a copy with the same keys, and different from the raw weights after a step.
    training = KAPAO.training(cfg, model, torch.device("cpu"))
    assert isinstance(training, KapaoTraining)
    ema = training.eval_model(model)
    assert ema is not model and set(ema.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)
    training.after_optimizer_step(model)
    assert training.ema.updates == 1
    raw, averaged = model.state_dict(), ema.state_dict()
    key = next(k for k, v in raw.items() if v.dtype.is_floating_point and v.ndim == 4)
    assert not torch.equal(raw[key], averaged[key])
    d = 0.9999 * (1 - math.exp(-1 / 2000))
    assert torch.allclose(averaged[key], d * (raw[key] - 0.01) + (1 - d) * raw[key], atol=1e-6)


def test_train_loop_checkpoint_and_evaluate(tmp_path, one_torch_thread):
    values = tiny_config(tmp_path)
    metrics = train_loop_per_worker(values)
    for part in ("box", "obj", "cls", "kps"):
        assert math.isfinite(metrics[f"train/loss_{part}"])
    # An untrained model's arg-max class is almost never the pose class: no results (-1) is an answer.
    assert metrics["val/wholebody_AP"] == -1 or 0 <= metrics["val/wholebody_AP"] <= 100
    # The authors' fitness, 0.1 AP50 + 0.9 AP, here of the whole-body numbers.
    expected = 0.1 * metrics["val/wholebody_AP50"] + 0.9 * metrics["val/wholebody_AP"]
    assert metrics["val/kapao_fitness"] == pytest.approx(expected)
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    assert latest.is_file() and (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    state = torch.load(latest, weights_only=False)
    assert set(state["raw_model"]) == set(state["model"])
    # 2 iterations (4 images / batch 2), accumulate round(64 / 2) = 32: one optimiser step, at epoch end.
    assert state["ema_updates"] == 1 and state["scheduler"] == {"steps_done": 1}

    # Resume for a second epoch: the raw weights come back from "raw_model", the EMA from "model".
    resumed = train_loop_per_worker({**values, "epochs": 2})
    assert resumed["epoch"] == 2
    state2 = torch.load(latest, weights_only=False)
    assert state2["ema_updates"] == 2 and state2["scheduler"] == {"steps_done": 2}
    assert any(not torch.equal(state2["raw_model"][k], state2["model"][k]) for k in state2["model"])
    # The authors' best.pt rule: an epoch whose fitness equals the best so far replaces it. Untrained, both
    # epochs score the same (no results, or AP 0): the tie goes to epoch 2.
    assert resumed["val/kapao_fitness"] == metrics["val/kapao_fitness"]
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=False)
    assert best["epoch"] == 2

    loaded = load_checkpoint_model(latest)
    assert type(loaded.model).__name__ == "KapaoModel"
    assert loaded.config.family == "kapao"

    # Make every anchor a confident pose object, so that the evaluator scores real results.
    with torch.no_grad():
        for conv in loaded.model.head.convs:
            bias = conv.bias.view(3, -1)
            bias[:, 4] += 10.0
            bias[:, 5] += 20.0
    paths = resolve_datasets(config_from_dict(values).data)
    outcome = evaluate_model(
        loaded, paths["val_ann"], paths["val_images"], gpus=0, progress=False, batch_size=2, workers=0
    )
    assert 0 <= outcome.metrics["wholebody/AP"] <= 1
    assert outcome.results and all(len(r["keypoints"]) == 17 * 3 for r in outcome.results)
    det_file = tmp_path / "dets.json"
    det_file.write_text("[]")
    with pytest.raises(EvalError, match="detects people itself"):
        evaluate_model(loaded, paths["val_ann"], paths["val_images"], det_file=det_file, gpus=0)
    assert config_to_dict(loaded.config)["model"]["keypoints"] == "wholebody"


def test_a_checkpoint_of_the_other_family_is_a_named_error(tmp_path):
    """Top-down weights beside a KAPAO config.yaml (e.g. a run's artifacts mixed up): the error names the
    checkpoint and the family whose model it does not fit, before any data is read."""
    top_down = config_from_dict({"model": {"backbone": "hrnet_w18_small"}})
    weights = get_family("topdown_heatmap").build_model(top_down, pretrained=False).state_dict()
    checkpoint = tmp_path / "best_checkpoint" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    torch.save({"model": weights}, checkpoint)
    kapao = config_to_dict(config_from_dict({"family": "kapao"}))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(kapao))
    with pytest.raises(EvalError, match=r"checkpoint\.pt' does not fit the kapao family's KAPAO-S"):
        load_checkpoint_model(checkpoint)


def test_the_kept_checkpoint_is_chosen_by_the_predicted_keypoints_ap():
    """The authors' fitness 0.1 AP50 + 0.9 AP, of whole-body AP for a whole-body model and of body (COCO
    keypoint) AP for `model.keypoints: body`, whose whole-body AP is ~0 (no face or hand keypoints)."""
    metrics = {"val/wholebody_AP": 0.5, "val/wholebody_AP50": 1.0, "val/body_AP": 20.0, "val/body_AP50": 40.0}
    wholebody = load_config("configs/smoke_kapao.yaml")
    body = load_config("configs/smoke_kapao.yaml", ["model.keypoints=body"])
    assert KAPAO.selection_score(metrics, wholebody) == pytest.approx(0.1 * 1.0 + 0.9 * 0.5)
    assert KAPAO.selection_score(metrics, body) == pytest.approx(0.1 * 40.0 + 0.9 * 20.0)
    assert "body/AP50" in KAPAO.val_metrics and KAPAO.selection_score({}, body) is None
