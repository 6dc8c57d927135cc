"""Config files: the shipped YAMLs, overrides, round trips and errors naming the file and the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    flatten_config,
    load_config,
    resolve_paths,
)
from trainer.topdown.schedule import lr_decay_epochs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_paper_config_is_the_papers_recipe():
    cfg = load_config(CONFIGS / "paper_hrnet_w32_fowkal.yaml")
    assert cfg.model.backbone == "hrnet_w32"
    assert cfg.data.kind == "coco_wholebody"
    assert cfg.data.pipeline.input_size == (192, 256) and cfg.data.pipeline.heatmap_size == (48, 64)
    assert cfg.data.pipeline.sigma == 2.0
    assert (cfg.batch_size, cfg.num_workers, cfg.use_gpu, cfg.epochs) == (32, 8, True, 210)
    assert cfg.loss.variant == "fowkal" and cfg.loss.tau == 0.01
    assert (cfg.optim.lr, cfg.optim.warmup_iters, cfg.optim.warmup_ratio) == (5e-4, 500, 0.001)
    assert lr_decay_epochs(cfg.epochs, cfg.optim) == [170, 200]
    assert cfg.flip_test


def test_smoke_config_is_small_and_synthetic():
    cfg = load_config(CONFIGS / "smoke.yaml")
    assert cfg.data.kind == "synthetic"
    assert cfg.model.backbone == "hrnet_w18_small"
    assert cfg.model.pretrained_path is None
    width, height = cfg.data.pipeline.input_size
    assert width * height <= 128 * 96
    assert cfg.data.pipeline.heatmap_size == (width // 4, height // 4)
    assert not cfg.use_gpu


def test_defaults_round_trip_through_dict():
    cfg = TrainConfig()
    as_dict = config_to_dict(cfg)
    assert as_dict["data"]["pipeline"]["input_size"] == [192, 256]  # tuples become lists (YAML/JSON)
    assert config_from_dict(as_dict) == cfg


def test_missing_keys_take_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, "epochs: 3\nloss: {variant: mse}\n"))
    assert cfg.epochs == 3 and cfg.loss.variant == "mse"
    assert cfg.optim.lr == TrainConfig().optim.lr


def test_overrides_parse_yaml_values(tmp_path):
    path = _write(tmp_path, "epochs: 3\noptim: {lr: 0.001}\n")
    cfg = load_config(
        path,
        [
            "optim.lr=2e-3",
            "loss.variant=kal",
            "optim.grad_clip=1",  # int accepted for a float
            "data.pipeline.input_size=[64, 96]",  # a section absent from the file
            "data.pipeline.heatmap_size=[16, 24]",
            "model.pretrained_path=null",
            "use_gpu=true",
            "name=a=b",  # only the first '=' splits
        ],
    )
    assert cfg.optim.lr == 2e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.loss.variant == "kal"
    assert cfg.optim.grad_clip == 1.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.data.pipeline.input_size == (64, 96)
    assert cfg.model.pretrained_path is None
    assert cfg.use_gpu is True
    assert cfg.name == "a=b"
    assert cfg.epochs == 3


def test_unknown_key_in_file_names_file_and_dotted_key(tmp_path):
    path = _write(tmp_path, "data:\n  pipline: {sigma: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "'data.pipline'" in str(info.value)
    with pytest.raises(ConfigError, match=r"'data\.pipeline\.sigmaa'"):
        load_config(_write(tmp_path, "data:\n  pipeline: {sigmaa: 2}\n"))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("epochs: ten\n", "epochs"),
        ("epochs: 2.5\n", "epochs"),
        ("epochs: true\n", "epochs"),  # a bool is not an int
        ("use_gpu: 1\n", "use_gpu"),
        ("optim: {lr: fast}\n", "optim.lr"),
        ("optim: 3\n", "optim"),
        ("data: {pipeline: {input_size: [96]}}\n", "data.pipeline.input_size"),
        ("model: {pretrained_path: 5}\n", "model.pretrained_path"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert f"{key}:" in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lrr=1", "optim.lrr"),
        ("epochs.x=1", "epochs"),
        ("nonsense=1", "nonsense"),
    ],
)
def test_bad_override_keys(tmp_path, override, key):
    path = _write(tmp_path, "epochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert "--set" in str(info.value) and f"'{key}'" in str(info.value)


def test_override_without_equals_and_bad_value_type(tmp_path):
    path = _write(tmp_path, "epochs: 3\n")
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_config(path, ["epochs"])
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        load_config(path, ["batch_size=big"])


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"loss": {"variant": "l1"}}, "loss.variant"),
        ({"loss": {"tau": -1.0}}, "loss.tau"),
        ({"loss": {"kaf_mode": "free"}}, "loss.kaf_mode"),
        ({"model": {"backbone": "resnet50"}}, "model.backbone"),
        ({"amp": "fp8"}, "amp"),
        ({"eval": {"flip_mode": "diagonal"}}, "eval.flip_mode"),
        ({"epochs": 0}, "epochs"),
        ({"data": {"kind": "mpii"}}, "data.kind"),
        (
            {"data": {"pipeline": {"input_size": [100, 128], "heatmap_size": [25, 32]}}},
            "data.pipeline.input_size",
        ),
        (
            {"data": {"pipeline": {"input_size": [96, 128], "heatmap_size": [48, 64]}}},
            "data.pipeline.heatmap_size",
        ),
        ({"data": {"pipeline": {"scale_range": [1.5, 0.5]}}}, "data.pipeline"),
        ({"data": {"kind": "synthetic", "synthetic_val_seed": 0}}, "data.synthetic_val_seed"),
        ({"optim": {"lr_decay_at": [0.9, 0.5]}}, "optim.lr_decay_at"),
        ({"optim": {"warmup_ratio": 0.0}}, "optim.warmup_ratio"),
        ({"optim": {"grad_clip": 0.0}}, "optim.grad_clip"),
    ],
)
def test_bad_values_name_the_key(values, key):
    with pytest.raises(ConfigError) as info:
        config_from_dict(values, source="cfg.yaml")
    assert str(info.value).startswith(f"cfg.yaml: {key}:"), str(info.value)


def test_missing_or_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "epochs: [1,\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_flatten_config_gives_dotted_scalars():
    flat = flatten_config(TrainConfig())
    assert flat["loss.variant"] == "fowkal"
    assert flat["optim.lr"] == 5e-4
    assert flat["data.pipeline.input_size"] == "192,256"
    assert flat["model.pretrained_path"] is None
    assert all(v is None or isinstance(v, str | int | float | bool) for v in flat.values())

    # every leaf of the nested dict appears exactly once
    def count_leaves(node) -> int:
        return sum(count_leaves(v) for v in node.values()) if isinstance(node, dict) else 1

    assert len(flat) == count_leaves(config_to_dict(TrainConfig()))


def test_resolve_paths_makes_relative_paths_absolute(tmp_path):
    cfg = config_from_dict(
        {
            "output_dir": "runs/x",
            "data": {"val_det_file": "/abs/det.json"},
            "model": {"pretrained_path": "w.pth"},
        }
    )
    resolved = resolve_paths(cfg, tmp_path)
    assert resolved.output_dir == str(tmp_path / "runs" / "x")
    assert resolved.data.train_ann_file == str(tmp_path / cfg.data.train_ann_file)
    assert resolved.data.val_det_file == "/abs/det.json"  # already absolute: unchanged
    assert resolved.model.pretrained_path == str(tmp_path / "w.pth")
    assert cfg.output_dir == "runs/x"  # the input is not modified


def test_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads 5e-4 (no dot) as a string; a float field accepts it anyway.
    cfg = load_config(_write(tmp_path, "optim: {lr: 5e-4}\n"), ["loss.tau=1E-2"])
    assert cfg.optim.lr == 5e-4 and cfg.loss.tau == 0.01
    with pytest.raises(ConfigError, match="optim.lr: expected a number"):
        load_config(_write(tmp_path, "optim: {lr: 5e-4x}\n"))
