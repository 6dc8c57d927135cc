"""Exact resume with ``data.loader_workers=0``: the main-process augmentation generator of
``WholeBodyTopDownDataset`` travels in the checkpoint, so a run killed after epoch 1 and resumed ends with
the weights of an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import trainer.loop as loop
from trainer.config import config_from_dict
from trainer.loop import train_loop_per_worker
from trainer.topdown.data import WholeBodyTopDownDataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synth")


def _config(out: Path, synth_dir: Path):
    return config_from_dict(
        {
            "name": "exact",
            "output_dir": str(out),
            "epochs": 2,
            "batch_size": 4,
            "eval_interval": 2,
            "data": {
                "kind": "synthetic",
                "synthetic_dir": str(synth_dir),
                "synthetic_train_images": 6,
                "synthetic_val_images": 2,
                "loader_workers": 0,
                "val_batch_size": 8,
                "pipeline": {"input_size": [64, 64], "heatmap_size": [16, 16]},
            },
            "model": {"backbone": "hrnet_w18_small"},
            "loss": {"variant": "mse"},
            "optim": {"lr": 1e-3, "warmup_iters": 3},
        }
    )


class _Killed(RuntimeError):
    pass


def test_resume_with_main_process_loading_matches_the_uninterrupted_run(tmp_path, synth_dir):
    reference = _config(tmp_path / "a", synth_dir)
    losses_a = []
    train_loop_per_worker(reference, report_fn=lambda m, d: losses_a.append(m["train/loss"]))

    resumed = _config(tmp_path / "b", synth_dir)

    def kill_after_first_epoch(metrics, checkpoint_dir):
        raise _Killed("killed after epoch 1")

    with pytest.raises(_Killed):
        train_loop_per_worker(resumed, report_fn=kill_after_first_epoch)
    after_kill = loop.load_training_checkpoint(Path(resumed.output_dir) / "checkpoints" / "latest.pt")
    assert after_kill["epoch"] == 1
    losses_b = []
    train_loop_per_worker(resumed, report_fn=lambda m, d: losses_b.append(m["train/loss"]))
    # Same augmentations in epoch 2: the same loss to float precision, and the same final weights.
    assert losses_b[0] == pytest.approx(losses_a[1], rel=1e-6, abs=0)
    final_a = loop.load_training_checkpoint(Path(reference.output_dir) / "checkpoints" / "latest.pt")
    final_b = loop.load_training_checkpoint(Path(resumed.output_dir) / "checkpoints" / "latest.pt")
    for key, value in final_a["model"].items():
        torch.testing.assert_close(final_b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_generator_state_round_trips(tmp_path, synth_dir):
    cfg = _config(tmp_path, synth_dir)
    paths = loop.resolve_datasets(cfg.data)
    make = lambda: WholeBodyTopDownDataset(  # noqa: E731
        paths["train_ann"], paths["train_images"], config=cfg.data.pipeline, train=True
    )
    first = make()
    assert first.generator_state() is None  # never drawn from: nothing to save
    first[0]
    state = first.generator_state()
    assert isinstance(state, str)
    expected = first._generator().random(4)
    second = make()
    second.restore_generator_state(state)
    np.testing.assert_array_equal(second._generator().random(4), expected)
    with pytest.raises(ValueError, match="augmentation generator state"):
        second.restore_generator_state("{not json")
