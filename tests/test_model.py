"""Pose model: shapes, KAF range, all parameters in use, local pretrained weights and their errors."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from trainer.topdown.model import PretrainedWeightsError, build_pose_model, load_backbone_weights

# Every test here trains or runs a model: one torch thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_pose_model("hrnet_w18_small", with_kaf=True)


def test_heatmaps_at_quarter_resolution_and_kaf_shape(small_model):
    images = torch.randn(2, 3, 64, 96)  # H=64, W=96
    heatmaps, kaf = small_model.eval()(images)
    assert heatmaps.shape == (2, 133, 16, 24)
    assert kaf.shape == (2, 133)


def test_without_kaf_head_returns_none():
    model = build_pose_model("hrnet_w18_small", num_keypoints=17, with_kaf=False)
    heatmaps, kaf = model(torch.randn(1, 3, 64, 64))
    assert heatmaps.shape == (1, 17, 16, 16)
    assert kaf is None
    assert model.kaf_head is None


def test_kaf_in_unit_interval_even_for_extreme_inputs(small_model):
    with torch.no_grad():
        # documented initialisation: every lambda starts at 0.5 (near-zero last layer, zero bias), as the
        # first training step sees it (train mode: batch statistics)
        _, kaf_start = small_model.train()(torch.randn(3, 3, 64, 64))
        assert torch.allclose(kaf_start, torch.full_like(kaf_start, 0.5), atol=0.02)
        small_model.eval()
        # large weights and inputs saturate the sigmoid but never leave [0, 1]
        small_model.kaf_head.fc.weight.normal_(std=50.0)
        _, kaf = small_model(1e3 * torch.randn(3, 3, 64, 64))
    assert bool(((kaf >= 0) & (kaf <= 1)).all())
    assert float(kaf.min()) < 0.1 and float(kaf.max()) > 0.9  # the range is actually exercised


def test_every_parameter_gets_a_gradient():
    # DDP without find_unused_parameters needs this: the pruned last-stage fuse layers are gone.
    model = build_pose_model("hrnet_w18_small", with_kaf=True)
    heatmaps, kaf = model(torch.randn(2, 3, 64, 64))
    (heatmaps.square().mean() + kaf.mean()).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


@pytest.mark.parametrize(
    ("backbone", "channels"), [("hrnet_w18_small", 16), ("hrnet_w32", 32), ("hrnet_w48", 48)]
)
def test_backbones_take_the_stride4_branch(backbone, channels):
    model = build_pose_model(backbone)
    assert model.heatmap_head.in_channels == channels
    assert model.backbone.feature_info.reduction() == [4]


def test_unknown_backbone_and_bad_keypoint_count():
    with pytest.raises(ValueError, match="resnet50"):
        build_pose_model("resnet50")
    with pytest.raises(ValueError, match="num_keypoints"):
        build_pose_model("hrnet_w18_small", num_keypoints=0)


def _seeded_backbone_init(seed: int) -> dict[str, torch.Tensor]:
    """timm's random init of the backbone, built as build_pose_model builds it (same seed, same draws)."""
    torch.manual_seed(seed)
    net = timm.create_model(
        "hrnet_w18_small", pretrained=False, features_only=True, feature_location="", out_indices=(1,)
    )
    return net.state_dict()


def test_never_downloads(monkeypatch):
    """Nothing reaches the network while a model is built, and its weights are the seeded random init."""
    import socket

    import timm.models._builder as builder

    attempts = []

    def refuse(name):
        def refused(*args, **kwargs):
            attempts.append(name)  # kept even where the caller swallows the error
            raise ConnectionRefusedError(f"test_never_downloads: {name} refused")

        return refused

    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.socket.connect_ex"))
    monkeypatch.setattr(builder, "load_pretrained", refuse("timm load_pretrained"))
    torch.manual_seed(0)
    model = build_pose_model("hrnet_w18_small")
    other_seed = _seeded_backbone_init(1)
    assert attempts == [], attempts
    monkeypatch.undo()

    built = model.backbone.state_dict()
    reference = _seeded_backbone_init(0)
    assert len(built) > 100 and set(built) <= set(reference)
    for key, value in built.items():
        assert torch.equal(value, reference[key]), key
    # Weights drawn from the seed, not read from anywhere: another seed gives other convolution weights.
    conv_keys = [k for k in built if k.endswith(".weight") and built[k].ndim == 4]
    assert conv_keys and all(not torch.equal(built[k], other_seed[k]) for k in conv_keys)


def _imagenet_checkpoint() -> dict[str, torch.Tensor]:
    """The layout of a timm ImageNet hrnet_w18_small checkpoint (classification head included)."""
    torch.manual_seed(1)
    return {
        k: v.clone() for k, v in timm.create_model("hrnet_w18_small", pretrained=False).state_dict().items()
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_round_trip(tmp_path, suffix):
    state = _imagenet_checkpoint()
    path = tmp_path / f"w18{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)  # wrapped, as training checkpoints often are
    model = build_pose_model("hrnet_w18_small", pretrained_path=path)
    loaded = model.backbone.state_dict()
    assert len(loaded) > 100
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    # and the weights really differ from a fresh initialisation
    fresh = build_pose_model("hrnet_w18_small").backbone.state_dict()
    assert not torch.equal(fresh["conv1.weight"], loaded["conv1.weight"])


def test_pretrained_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(PretrainedWeightsError, match="nope.safetensors.*does not exist"):
        build_pose_model("hrnet_w18_small", pretrained_path=path)


def test_pretrained_wrong_architecture_names_file_and_keys(tmp_path):
    state = {k: v for k, v in timm.create_model("hrnet_w32", pretrained=False).state_dict().items()}
    path = tmp_path / "w32.pth"
    torch.save(state, path)
    with pytest.raises(PretrainedWeightsError) as info:
        build_pose_model("hrnet_w18_small", pretrained_path=path)
    message = str(info.value)
    assert "w32.pth" in message and "hrnet_w18_small" in message
    assert "shape mismatches" in message and "layer1.0.conv1.weight" in message


def test_pretrained_missing_and_unexpected_keys(tmp_path):
    state = _imagenet_checkpoint()
    del state["conv1.weight"]
    state["some_other_net.weight"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    model = build_pose_model("hrnet_w18_small")
    with pytest.raises(PretrainedWeightsError) as info:
        load_backbone_weights(model, path)
    message = str(info.value)
    assert "missing keys" in message and "conv1.weight" in message
    assert "unexpected keys" in message and "some_other_net.weight" in message


def test_pretrained_unreadable_or_unknown_suffix(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedWeightsError, match="garbage.pth"):
        build_pose_model("hrnet_w18_small", pretrained_path=bad)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"")
    with pytest.raises(PretrainedWeightsError, match="unknown suffix '.npz'"):
        build_pose_model("hrnet_w18_small", pretrained_path=odd)
