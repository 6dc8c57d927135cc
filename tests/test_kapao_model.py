"""The KAPAO network (trainer/kapao/model.py): shapes, gradients, backbone weights, no network, sizes."""

from __future__ import annotations

import math
import socket

import pytest
import timm
import torch

from trainer.kapao.anchors import P6_ANCHORS, STRIDES, outputs_per_anchor
from trainer.kapao.model import (
    KAPAO_SIZES,
    PretrainedWeightsError,
    build_kapao_model,
    load_backbone_weights,
)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """2 shared cores: one torch thread avoids OpenMP oversubscription."""


@pytest.mark.parametrize(("num_keypoints", "height", "width"), [(17, 128, 192), (133, 256, 256)])
def test_output_shapes(num_keypoints, height, width):
    model = build_kapao_model("s", num_keypoints=num_keypoints).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, height, width))
    no = 3 * num_keypoints + 6
    assert [tuple(o.shape) for o in outputs] == [(2, 3, height // s, width // s, no) for s in STRIDES]
    assert model.num_keypoints == num_keypoints
    assert model.num_outputs == no == outputs_per_anchor(num_keypoints)
    assert model.strides == STRIDES
    assert all(torch.isfinite(o).all() for o in outputs)


def test_head_layout_is_anchor_major_with_outputs_last():
    """output[b, a, y, x, j] is channel a * No + j of the stride's 1x1 conv (the authors' view + permute)."""
    model = build_kapao_model("s", num_keypoints=17).eval()
    captured = []
    model.head.convs[1].register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 128, 128))
    raw = captured[0]  # [1, 3 * 57, 8, 8]
    no = model.num_outputs
    for a, j, y, x in [(0, 0, 0, 0), (1, 4, 3, 5), (2, 56, 7, 1), (2, 5, 2, 2)]:
        assert outputs[1][0, a, y, x, j] == raw[0, a * no + j, y, x]


def test_anchors_buffer_follows_the_model_but_not_the_state_dict():
    model = build_kapao_model("s", num_keypoints=17)
    assert tuple(model.anchors.shape) == (4, 3, 2)
    assert model.anchors.tolist() == [[list(map(float, wh)) for wh in level] for level in P6_ANCHORS]
    assert not any("anchors" in key for key in model.state_dict())
    assert model.to(torch.float64).anchors.dtype == torch.float64  # a buffer: moves/casts with the model


def test_bias_priors_as_yolov5():
    """Objectness prior log(8 / (640 / s)^2), class prior log(0.6 / (K + 1 - 0.99)), on top of PyTorch's
    default bias, which is uniform in +-1/sqrt(fan_in)."""
    k = 17
    model = build_kapao_model("s", num_keypoints=k)
    for conv, stride in zip(model.head.convs, STRIDES, strict=True):
        bias = conv.bias.detach().view(3, 3 * k + 6)
        bound = 1.0 / math.sqrt(conv.in_channels)
        obj_prior = math.log(8.0 / (640.0 / stride) ** 2)
        cls_prior = math.log(0.6 / (k + 1 - 0.99))
        assert (bias[:, 4] - obj_prior).abs().max() <= bound
        assert (bias[:, 5 : 5 + k + 1] - cls_prior).abs().max() <= bound
        assert bias[:, :4].abs().max() <= bound  # box
        assert bias[:, 5 + k + 1 :].abs().max() <= bound  # keypoint offsets: no prior
    # Exactly, from zero biases.
    for conv in model.head.convs:
        torch.nn.init.zeros_(conv.bias)
    model.head.reset_biases()
    for conv, stride in zip(model.head.convs, STRIDES, strict=True):
        bias = conv.bias.detach().view(3, 3 * k + 6).double()
        expected = torch.zeros_like(bias)
        expected[:, 4] = math.log(8.0 / (640.0 / stride) ** 2)
        expected[:, 5 : 5 + k + 1] = math.log(0.6 / (k + 1 - 0.99))
        torch.testing.assert_close(bias, expected, rtol=0, atol=1e-6)


def test_gradients_reach_every_parameter_including_the_backbone():
    model = build_kapao_model("s", num_keypoints=17).train()
    outputs = model(torch.randn(2, 3, 64, 128))
    sum(o.float().pow(2).mean() for o in outputs).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient (unused; breaks DDP): {no_grad[:5]}"
    stem = model.backbone.stem_conv1.conv.weight.grad
    assert stem is not None and stem.abs().sum() > 0


@pytest.mark.parametrize("height_width", [(100, 128), (128, 96)])
def test_input_not_a_multiple_of_64_names_the_size(height_width):
    h, w = height_width
    model = build_kapao_model("s", num_keypoints=17)
    with pytest.raises(ValueError, match=f"{h}x{w}"):
        model(torch.zeros(1, 3, h, w))


def test_bad_size_and_keypoints():
    with pytest.raises(ValueError, match="'xl'"):
        build_kapao_model("xl")
    with pytest.raises(ValueError, match="num_keypoints"):
        build_kapao_model("s", num_keypoints=0)


def _seeded_timm_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A timm classification model (with its head.fc) as an ImageNet checkpoint would hold it."""
    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False)
    # BatchNorm running statistics start at 0/1: make them distinctive too.
    for key, value in net.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            value.copy_(torch.rand_like(value) + 0.5)
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("fmt", ["safetensors", "pth_wrapped"])
def test_pretrained_backbone_loads_timm_weights(tmp_path, fmt):
    state = _seeded_timm_state("cs3darknet_s", seed=3)
    assert any(k.startswith("head.fc.") for k in state)  # the classification head is in the file
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "cs3darknet_s.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "cs3darknet_s.pth"
        torch.save({"state_dict": state, "epoch": 10}, path)
    model = build_kapao_model("s", num_keypoints=17, pretrained_path=path)
    loaded = model.backbone.state_dict()
    compared = 0
    for key, value in state.items():
        if key.startswith("head."):
            continue
        feature_key = key.replace("stem.", "stem_", 1).replace("stages.", "stages_", 1)
        assert torch.equal(loaded[feature_key], value), key
        compared += 1
    assert compared == len(loaded)  # every backbone tensor came from the file
    # A whole KapaoModel's weights (e.g. a training checkpoint) also fit: their backbone.* part is taken.
    whole = tmp_path / "kapao_s.pt"
    torch.save({"model": model.state_dict()}, whole)
    again = build_kapao_model("s", num_keypoints=133, pretrained_path=whole)
    for key, value in again.backbone.state_dict().items():
        assert torch.equal(value, loaded[key]), key


def test_pretrained_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(PretrainedWeightsError, match="nope.safetensors"):
        build_kapao_model("s", pretrained_path=missing)

    state = _seeded_timm_state("cs3darknet_s", seed=0)
    state["stages.1.mystery.weight"] = torch.zeros(3)
    wrong_key = tmp_path / "wrong_key.pt"
    torch.save(state, wrong_key)
    with pytest.raises(PretrainedWeightsError, match=r"wrong_key\.pt(.|\n)*stages\.1\.mystery\.weight"):
        build_kapao_model("s", pretrained_path=wrong_key)

    model = build_kapao_model("s")
    other = tmp_path / "cs3darknet_m.pth"
    torch.save(_seeded_timm_state("cs3darknet_m", seed=0), other)
    with pytest.raises(PretrainedWeightsError, match=r"cs3darknet_m\.pth(.|\n)*shape mismatches"):
        load_backbone_weights(model, other)


def test_construction_opens_no_network_connection(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "backbone.safetensors"
    save_file(_seeded_timm_state("cs3darknet_s", seed=1), str(path))
    calls = []

    def refuse(self, address):
        calls.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    build_kapao_model("s", num_keypoints=133, pretrained_path=path)
    build_kapao_model("l", num_keypoints=17)
    assert calls == []


# Paper Table 1 / the authors' README: KAPAO-S/M/L parameters at K = 17 (COCO).
PAPER_PARAMS_K17 = {"s": 12.6e6, "m": 35.8e6, "l": 77.0e6}


@pytest.mark.parametrize("size", KAPAO_SIZES)
def test_parameter_counts_near_the_papers(size):
    """Within 8% of the paper at K = 17, and the K = 133 head grows by exactly 3 x 348 x (sum C + 4).

    Tolerance: the same blocks in the authors' own (YOLOv5 v5.0 P6) layout give 12.56 / 35.76 / 77.05 M,
    i.e. the paper's numbers; our timm backbone has a wider stride-32 stage (1024w instead of 768w channels)
    and shallower stride-8 stage, measured +4.9 / +4.3 / +5.0 %. 8% keeps a margin for that and still fails
    on a wrong width (about +-30%), depth or missing block.
    """
    p17 = sum(p.numel() for p in build_kapao_model(size, num_keypoints=17).parameters())
    model = build_kapao_model(size, num_keypoints=133)
    p133 = sum(p.numel() for p in model.parameters())
    assert abs(p17 / PAPER_PARAMS_K17[size] - 1) < 0.08, (size, p17)
    # Each head conv has (C + 1) x 3 x No parameters; No grows from 57 to 405.
    head_inputs = sum(conv.in_channels + 1 for conv in model.head.convs)
    assert p133 - p17 == head_inputs * 3 * (405 - 57)
