"""The family seam: the registry, family-checked config keys, and a second family trained by the shared loop
without any change outside its own code (a toy family registered for the test, built from the top-down
family's parts under another name and another loss section)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import trainer.families as families
from trainer.config import (
    ConfigError,
    apply_overrides,
    config_digest,
    config_from_dict,
    config_keys,
    config_to_dict,
    load_config,
)
from trainer.topdown.family import TopDownHeatmapFamily, TopDownTraining
from trainer.topdown.losses import LossConfig


def test_registry_lists_the_top_down_family_and_names_the_known_ones_for_an_unknown_name():
    assert families.get_family("topdown_heatmap") is families.FAMILIES["topdown_heatmap"]
    with pytest.raises(
        families.UnknownFamilyError, match=r"unknown family 'nope' \(known: .*topdown_heatmap"
    ):
        families.get_family("nope")
    with pytest.raises(ConfigError, match=r"<dict>: family: unknown family 'nope'"):
        config_from_dict({"family": "nope"})


def test_a_config_without_family_is_the_top_down_family_and_keeps_its_digest():
    plain = config_from_dict({"name": "x", "loss": {"variant": "mse"}})
    assert plain.family == "topdown_heatmap"
    explicit = config_from_dict({"name": "x", "family": "topdown_heatmap", "loss": {"variant": "mse"}})
    assert config_digest(plain) == config_digest(explicit)
    # The digest of a config written before families: the same dict without the family key.
    values = config_to_dict(plain)
    values.pop("family")
    assert config_digest(values) == config_digest(plain)


@dataclass
class ToyLossConfig:
    """A loss section with other keys than the top-down family's ``loss``."""

    scale: float = 1.0

    def validate(self) -> None:
        if self.scale <= 0:
            from trainer.topdown.losses import LossSettingError

            raise LossSettingError("scale", "scale must be positive")


class ToyTraining(TopDownTraining):
    def __init__(self, cfg, device):
        scaled = dataclass_replace_loss(cfg)
        super().__init__(scaled, device)
        self.scale = cfg.loss.scale
        self.loss_parts = (*self.loss_parts, "unscaled")

    def step(self, model, batch, device, amp_dtype, channels_last):
        total, parts = super().step(model, batch, device, amp_dtype, channels_last)
        return total * self.scale, {**parts, "unscaled": total.detach()}


def dataclass_replace_loss(cfg):
    import copy

    cfg = copy.copy(cfg)
    cfg.loss = LossConfig(variant="mse")
    return cfg


class ToyFamily(TopDownHeatmapFamily):
    name = "toy"
    sections = {**TopDownHeatmapFamily.sections, "loss": ToyLossConfig}
    sweep_conditions = {}
    arm_key = None
    heatmap_eval_sweep = False

    def validate(self, cfg, check, fail):
        check(cfg.loss.scale > 0, "loss.scale", cfg.loss.scale, "a positive number")

    def run_label(self, cfg):
        return f"toy{cfg.loss.scale:g}"

    def run_tags(self, cfg):
        return {"toy_scale": str(cfg.loss.scale)}

    def has_kaf_head(self, cfg):
        return False

    def describe_model(self, cfg):
        return f"toy backbone {cfg.model.backbone!r}"

    def training(self, cfg, model, device):
        return ToyTraining(cfg, device)


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(families.FAMILIES, "toy", ToyFamily())
    config_keys.cache_clear()
    yield families.FAMILIES["toy"]
    config_keys.cache_clear()


def test_keys_are_checked_against_the_config_family(toy_family, tmp_path):
    assert "loss.scale" in config_keys("toy") and "loss.variant" not in config_keys("toy")
    with pytest.raises(ConfigError, match=r"'loss.variant'.*family 'topdown_heatmap'"):
        config_from_dict({"family": "toy", "loss": {"variant": "mse"}})
    with pytest.raises(
        ConfigError, match=r"'loss.variant' is a key of family 'topdown_heatmap', not of family 'toy'"
    ):
        apply_overrides({"family": "toy"}, {"loss.variant": "mse"})
    with pytest.raises(ConfigError, match=r"loss.scale: expected a positive number, got -1.0"):
        config_from_dict({"family": "toy", "loss": {"scale": -1.0}})
    # --set family=toy is applied before the other overrides, whatever their order.
    path = tmp_path / "c.yaml"
    path.write_text("name: c\n")
    cfg = load_config(path, ["loss.scale=2", "family=toy"])
    assert (cfg.family, cfg.loss.scale) == ("toy", 2.0)
    with pytest.raises(ConfigError, match=r"--set\): override 'loss.tau': .*family 'topdown_heatmap'"):
        load_config(path, ["family=toy", "loss.tau=1"])


def test_an_override_to_another_family_keeps_the_shared_settings_and_drops_the_old_sections(toy_family):
    base = config_to_dict(
        config_from_dict(
            {"epochs": 7, "data": {"kind": "synthetic", "val_batch_size": 5}, "loss": {"variant": "kal"}}
        )
    )
    switched = config_from_dict(apply_overrides(base, {"family": "toy", "loss.scale": 2.0}))
    assert (switched.family, switched.epochs, switched.loss.scale) == ("toy", 7, 2.0)
    assert (switched.data.kind, switched.data.val_batch_size) == ("synthetic", 5)
    # The same family: nothing is dropped.
    same = config_from_dict(apply_overrides(base, {"family": "topdown_heatmap"}))
    assert same.loss.variant == "kal"


@pytest.mark.usefixtures("one_torch_thread")
def test_the_shared_loop_and_checkpoint_reader_run_a_registered_family(toy_family, tmp_path):
    from trainer.checkpoint import load_checkpoint_model
    from trainer.loop import train_loop_per_worker

    values = {
        "name": "toy",
        "family": "toy",
        "output_dir": str(tmp_path / "run"),
        "epochs": 1,
        "batch_size": 2,
        "eval_interval": 1,
        "data": {
            "kind": "synthetic",
            "synthetic_dir": str(tmp_path / "synth"),
            "synthetic_train_images": 2,
            "synthetic_val_images": 1,
            "loader_workers": 0,
            "val_batch_size": 4,
            "pipeline": {"input_size": [64, 64], "heatmap_size": [16, 16]},
        },
        "model": {"backbone": "hrnet_w18_small"},
        "loss": {"scale": 3.0},
    }
    metrics = train_loop_per_worker(values)
    assert metrics["epoch"] == 1 and "val/wholebody_AP" in metrics
    assert set(k for k in metrics if k.startswith("train/loss_")) == {
        "train/loss_body",
        "train/loss_foot",
        "train/loss_face",
        "train/loss_hand",
        "train/loss_unscaled",
    }
    # The toy's total is 3x the MSE loss: the family's step and loss parts, not the top-down ones, trained.
    assert metrics["train/loss"] == pytest.approx(3.0 * metrics["train/loss_unscaled"], rel=1e-6)
    loaded = load_checkpoint_model(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert loaded.config.family == "toy" and loaded.label == "toy (toy3)"


def test_every_registered_family_has_every_attribute_the_protocol_names():
    """The shared code asks a family through ``ExperimentFamily``; a family missing one of its methods fails
    only when a command reaches that question (e.g. a sweep's description), so check them all here."""
    wanted = {name for name in vars(families.ExperimentFamily) if not name.startswith("_")}
    wanted |= set(families.ExperimentFamily.__annotations__)
    for name, family in families.FAMILIES.items():
        missing = sorted(attr for attr in wanted if not hasattr(family, attr))
        assert not missing, f"family {name!r} lacks {missing}"


@pytest.mark.parametrize("config_path", ["configs/smoke.yaml", "configs/smoke_kapao.yaml"])
def test_a_sweep_description_asks_the_config_family_for_its_model_and_learning_rate(config_path):
    from orchestrator.sweeps.settings import SweepSettings
    from orchestrator.sweeps.sweep import sweep_description

    config = load_config(config_path)

    class Plan:  # what the ablate kind's describe reads
        arms = ()
        seeds = 1

    text = sweep_description("ablate", config, SweepSettings(), Plan())
    model, learning_rate = families.family_of(config).describe_recipe(config)
    assert f"Model: {model}, {config.epochs} epochs" in text and learning_rate in text
