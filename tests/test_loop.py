"""Training loop: the lr schedule, a tiny plain run end to end, resume after a kill, non-finite loss."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import trainer.loop as loop
from trainer.config import OptimConfig, TrainConfig, config_from_dict, config_to_dict
from trainer.loop import resolve_datasets, train_loop_per_worker
from trainer.topdown.schedule import lr_decay_epochs, lr_factor

REQUIRED_METRICS = (
    "epoch",
    "train/loss",
    "train/loss_body",
    "train/loss_foot",
    "train/loss_face",
    "train/loss_hand",
    "kaf/body_mean",
    "kaf/body_std",
    "kaf/foot_mean",
    "kaf/foot_std",
    "kaf/face_mean",
    "kaf/face_std",
    "kaf/hand_mean",
    "kaf/hand_std",
    "time/epoch_s",
    "throughput/img_per_s",
)
VAL_METRICS = (
    "val/wholebody_AP",
    "val/wholebody_AR",
    "val/body_AP",
    "val/foot_AP",
    "val/face_AP",
    "val/hand_AP",
)


# Every test here trains or runs a model: one torch thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- schedule


def test_warmup_matches_hand_computation():
    optim = OptimConfig()  # 500 iterations from 0.001
    assert lr_factor(0, 100, 210, optim) == pytest.approx(0.001)
    # halfway: 1 - 0.5 * 0.999
    assert lr_factor(250, 100, 210, optim) == pytest.approx(0.5005)
    assert lr_factor(499, 100, 210, optim) == pytest.approx(1 - (1 / 500) * 0.999)
    assert lr_factor(500, 100, 210, optim) == 1.0


def test_step_decay_at_170_and_200_of_210_epochs():
    optim = OptimConfig()
    per_epoch = 10
    assert lr_decay_epochs(210, optim) == [170, 200]
    assert lr_factor(170 * per_epoch - 1, per_epoch, 210, optim) == 1.0
    assert lr_factor(170 * per_epoch, per_epoch, 210, optim) == pytest.approx(0.1)
    assert lr_factor(200 * per_epoch - 1, per_epoch, 210, optim) == pytest.approx(0.1)
    assert lr_factor(200 * per_epoch, per_epoch, 210, optim) == pytest.approx(0.01)
    # scaled to a shorter run: 21 epochs -> 17 and 20
    assert lr_decay_epochs(21, optim) == [17, 20]
    no_warmup = OptimConfig(warmup_iters=0)
    assert lr_factor(17 * per_epoch - 1, per_epoch, 21, no_warmup) == 1.0
    assert lr_factor(17 * per_epoch, per_epoch, 21, no_warmup) == pytest.approx(0.1)


def test_warmup_and_decay_compose():
    optim = OptimConfig(warmup_iters=100, warmup_ratio=0.01, lr_decay_at=(0.5,))
    # epoch 1 of 2 at 60 iterations per epoch: iteration 80 is past the milestone and still warming up
    expected = (1 - (1 - 80 / 100) * (1 - 0.01)) * 0.1
    assert lr_factor(80, 60, 2, optim) == pytest.approx(expected)


def test_lambda_lr_per_iteration_gives_factor_times_base():
    """The loop's LambdaLR stepped once per iteration: iteration i trains with base_lr * lr_factor(i)."""
    optim = OptimConfig(warmup_iters=5, lr_decay_at=(0.5,))
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, 4, 4, optim))
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warm = [5e-4 * (1 - (1 - i / 5) * 0.999) for i in range(5)]
    assert seen[:5] == pytest.approx(warm)
    assert seen[5:8] == pytest.approx([5e-4] * 3)
    assert seen[8:] == pytest.approx([5e-5] * 4)  # epoch 2 of 4 starts at iteration 8


# ---------------------------------------------------------------------------------------------- data


def _tiny_config(tmp_path: Path, synth_dir: Path, **changes) -> TrainConfig:
    values = {
        "name": "tiny",
        "output_dir": str(tmp_path / "run"),
        "epochs": 2,
        "batch_size": 4,
        "eval_interval": 1,
        "data": {
            "kind": "synthetic",
            "synthetic_dir": str(synth_dir),
            "synthetic_train_images": 6,
            "synthetic_val_images": 2,
            "loader_workers": 1,
            "val_batch_size": 8,
            "pipeline": {"input_size": [64, 64], "heatmap_size": [16, 16]},
        },
        "model": {"backbone": "hrnet_w18_small"},
        "loss": {"variant": "fowkal"},
        "optim": {"lr": 1e-3, "warmup_iters": 3},
    }
    values.update(changes)
    return config_from_dict(values)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synth")


def test_synthetic_sets_are_generated_once_with_different_seeds(tmp_path, synth_dir):
    cfg = _tiny_config(tmp_path, synth_dir)
    paths = resolve_datasets(cfg.data)
    train = json.loads(Path(paths["train_ann"]).read_text())
    val = json.loads(Path(paths["val_ann"]).read_text())
    assert len(train["images"]) == 6 and len(val["images"]) == 2
    assert train["annotations"][0]["keypoints"] != val["annotations"][0]["keypoints"]
    assert Path(paths["train_images"], train["images"][0]["file_name"]).is_file()
    stamp = Path(paths["train_ann"]).stat().st_mtime_ns
    assert resolve_datasets(cfg.data) == paths
    assert Path(paths["train_ann"]).stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not [p for p in Path(synth_dir).iterdir() if p.name.startswith(".")]  # no scratch left


# ---------------------------------------------------------------------------------------------- training


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_plain_run_writes_metrics_checkpoints_and_kaf_history(tmp_path, synth_dir):
    cfg = _tiny_config(tmp_path, synth_dir)
    reported = []
    last = train_loop_per_worker(config_to_dict(cfg), report_fn=lambda m, d: reported.append((dict(m), d)))

    out = Path(cfg.output_dir)
    lines = _read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in lines] == [1, 2]
    assert [m["epoch"] for m, _ in reported] == [1, 2]
    assert reported[-1][1] == str(out / "checkpoints")
    assert last == lines[-1]
    for metrics in lines:
        for key in REQUIRED_METRICS + VAL_METRICS + ("train/loss_reg",):
            assert key in metrics, key
            assert math.isfinite(metrics[key]), key
        for key in VAL_METRICS:
            assert metrics[key] == -1 or 0 <= metrics[key] <= 100  # percent
        for part in ("body", "foot", "face", "hand"):
            assert 0 <= metrics[f"kaf/{part}_mean"] <= 1
        assert metrics["throughput/img_per_s"] > 0
    # one train/loss is the mean of iteration totals, which for the kal family add up from the parts
    parts_sum = sum(lines[0][f"train/loss_{p}"] for p in ("body", "foot", "face", "hand", "reg"))
    assert lines[0]["train/loss"] == pytest.approx(parts_sum, rel=1e-5)

    latest = loop.load_training_checkpoint(out / "checkpoints" / "latest.pt")
    assert latest["epoch"] == 2
    assert set(latest) >= {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "best_ap",
        "config",
        "kaf_history",
    }
    assert latest["config"] == config_to_dict(cfg)
    assert (out / "checkpoints" / "best.pt").is_file()
    assert latest["best_ap"] == max(m["val/wholebody_AP"] for m in lines)
    history = np.load(out / "kaf_history.npy")
    assert history.shape == (2, 133)
    # the history is the per-keypoint epoch mean: its part means are the reported kaf/<part>_mean
    assert float(history[1, 23:91].mean()) == pytest.approx(lines[1]["kaf/face_mean"], abs=1e-6)
    assert torch.equal(latest["kaf_history"], torch.from_numpy(history))


class _Killed(RuntimeError):
    pass


def test_resume_continues_at_next_epoch_with_identical_state(tmp_path, synth_dir):
    # Reference: two epochs without interruption.
    reference = _tiny_config(tmp_path / "a", synth_dir, eval_interval=2)
    train_loop_per_worker(reference)

    # Same run killed right after epoch 1 was checkpointed ...
    resumed = _tiny_config(tmp_path / "b", synth_dir, eval_interval=2)

    def kill_after_first_epoch(metrics, checkpoint_dir):
        raise _Killed(f"killed after epoch {metrics['epoch']}")

    with pytest.raises(_Killed):
        train_loop_per_worker(resumed, report_fn=kill_after_first_epoch)
    latest = Path(resumed.output_dir) / "checkpoints" / "latest.pt"
    after_kill = loop.load_training_checkpoint(latest)
    assert after_kill["epoch"] == 1

    # ... and restarted: it must start at epoch 2 from exactly the saved optimiser state.
    loaded_states = []
    original_load = torch.optim.Adam.load_state_dict

    def spy(self, state_dict):
        loaded_states.append(copy.deepcopy(state_dict))  # Adam keeps (and later updates) the tensors
        return original_load(self, state_dict)

    epochs_seen = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.Adam, "load_state_dict", spy)
        train_loop_per_worker(resumed, report_fn=lambda m, d: epochs_seen.append(m["epoch"]))
    assert epochs_seen == [2]
    assert len(loaded_states) == 1
    saved = after_kill["optimizer"]["state"]
    assert loaded_states[0]["state"].keys() == saved.keys()
    for index, entry in saved.items():
        for name, value in entry.items():
            assert torch.equal(loaded_states[0]["state"][index][name], value)
    assert [m["epoch"] for m in _read_jsonl(Path(resumed.output_dir) / "metrics.jsonl")] == [1, 2]

    # The resumed run ends where the uninterrupted one does: same weights, same optimiser moments
    # (the RNG states in the checkpoint make the shuffling and augmentation identical).
    final_a = loop.load_training_checkpoint(Path(reference.output_dir) / "checkpoints" / "latest.pt")
    final_b = loop.load_training_checkpoint(latest)
    assert final_b["epoch"] == 2
    for key, value in final_a["model"].items():
        torch.testing.assert_close(final_b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for index, entry in final_a["optimizer"]["state"].items():
        for name, value in entry.items():
            torch.testing.assert_close(
                final_b["optimizer"]["state"][index][name], value, rtol=1e-5, atol=1e-6
            )
    assert final_b["scheduler"]["last_epoch"] == final_a["scheduler"]["last_epoch"]


def test_non_finite_loss_stops_with_epoch_and_iteration(tmp_path, synth_dir, monkeypatch):
    import trainer.topdown.family as topdown_family

    class NanLoss(topdown_family.HeatmapLoss):
        def forward(self, *args, **kwargs):
            total, parts = super().forward(*args, **kwargs)
            return total * float("nan"), parts

    monkeypatch.setattr(topdown_family, "HeatmapLoss", NanLoss)
    cfg = _tiny_config(tmp_path, synth_dir, epochs=1)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss nan at epoch 1, iteration 1/"):
        train_loop_per_worker(cfg)
    assert not (Path(cfg.output_dir) / "checkpoints" / "latest.pt").exists()


def test_diverging_kal_run_reports_the_non_finite_loss(tmp_path, synth_dir):
    # lr 1e30 makes the KAF head's output NaN within the first iterations: the error must be the loop's
    # non-finite-loss message, not the loss's input check on the KAF range.
    cfg = _tiny_config(tmp_path, synth_dir, epochs=1, optim={"lr": 1e30, "warmup_iters": 0})
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at epoch 1, iteration \d+/"):
        train_loop_per_worker(cfg)


def test_too_small_training_set_is_a_clear_error(tmp_path, synth_dir):
    cfg = _tiny_config(tmp_path, synth_dir, batch_size=64)
    with pytest.raises(ValueError, match=r"fewer than batch_size \(64\)"):
        train_loop_per_worker(cfg)


def test_progress_lines_do_not_go_through_print(monkeypatch, capsys):
    # Ray Train replaces builtins.print in its workers with one that logs and echoes: a line printed there
    # reached the driver twice. The loop's lines bypass print.
    import builtins

    def patched_print(*args, **kwargs):
        raise AssertionError("progress went through print")

    monkeypatch.setattr(builtins, "print", patched_print)
    loop.say("[fowkal] epoch=1")
    assert capsys.readouterr().out == "[fowkal] epoch=1\n"
