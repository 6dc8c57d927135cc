"""Top-down whole-body pose model: a timm HRNet backbone, a heatmap head and the optional KAF head.

The estimator of the paper (Fig. 2): HRNet (Sun et al. 2019) whose highest-resolution (stride 4) branch
feeds a 1x1 convolution to K heatmaps, plus, for the KAL/FoWKAL losses, a head that predicts the
keypoint-wise adaptive factors lambda in [0, 1]^K (Eq. 6) per sample.

Backbone details. timm's ``features_only=True, feature_location=''`` HRNet returns the raw branch outputs
(no "incre" channel-increase modules): index 0 is the stride-2 stem, indices 1-4 the four branches at
strides 4, 8, 16, 32 with the base width's channels (16 for ``hrnet_w18_small``, 32 for ``hrnet_w32``, 48
for ``hrnet_w48``). We take index 1 only. timm builds the last stage with multi-scale outputs; the fuse
layers that compute the three lower-resolution outputs of the last module would then be unused, which both
wastes compute and breaks DistributedDataParallel (unused parameters). We drop them, which gives exactly
the top-down pose HRNet (last module with ``multi_scale_output=False``). The dropped keys are accepted (and
ignored) when loading ImageNet weights, like the classification head's keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.datasets.keypoints import NUM_KEYPOINTS
from trainer.pretrained import PretrainedWeightsError, check_fits, read_state_dict  # noqa: F401 - raised here

SUPPORTED_BACKBONES: tuple[str, ...] = ("hrnet_w32", "hrnet_w18_small", "hrnet_w48")

# Keys of timm's ImageNet classification checkpoints that the feature backbone does not have.
_CLASSIFICATION_HEAD_PREFIXES: tuple[str, ...] = (
    "incre_modules.",
    "downsamp_modules.",
    "final_layer.",
    "classifier.",
)


class KafHead(nn.Module):
    """Keypoint-wise adaptive factors lambda in [0, 1]^K from the stride-4 features (paper Fig. 2, Eq. 6).

    The paper draws a head beside the heatmap head but does not specify its layers. Our choice: one 3x3
    convolution with stride 2 (C -> ``hidden_channels``) + BatchNorm + ReLU to mix neighbourhoods at a cost
    far below the backbone's, global average pooling (lambda is one number per keypoint and sample, not per
    pixel), a linear layer to K and a sigmoid. The linear layer starts with near-zero weights and zero bias so
    that every lambda starts at 0.5, halfway between MSE and AWing, and the loss, not the initialisation,
    decides where each keypoint goes.
    """

    def __init__(self, in_channels: int, num_keypoints: int, hidden_channels: int = 128) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden_channels)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(hidden_channels, num_keypoints)
        nn.init.normal_(self.fc.weight, std=0.001)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(features)))
        x = self.pool(x).flatten(1)
        return torch.sigmoid(self.fc(x))


class PoseModel(nn.Module):
    """HRNet backbone -> stride-4 branch -> 1x1 conv heatmaps (+ KAF head).

    ``forward(images [B,3,H,W])`` returns ``(heatmaps [B,K,H/4,W/4], kaf [B,K] in [0,1] or None)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        backbone_name: str,
        feature_channels: int,
        num_keypoints: int,
        with_kaf: bool,
        pruned_backbone_keys: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_name = backbone_name
        self.feature_channels = feature_channels
        self.num_keypoints = num_keypoints
        self.with_kaf = with_kaf
        self.pruned_backbone_keys = pruned_backbone_keys
        self.heatmap_head = nn.Conv2d(feature_channels, num_keypoints, kernel_size=1)
        # Small initial heatmaps, as the top-down HRNet heads are usually initialised.
        nn.init.normal_(self.heatmap_head.weight, std=0.001)
        nn.init.zeros_(self.heatmap_head.bias)
        self.kaf_head = KafHead(feature_channels, num_keypoints) if with_kaf else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = self.backbone(images)[0]  # the stride-4 branch
        heatmaps = self.heatmap_head(features)
        kaf = self.kaf_head(features) if self.kaf_head is not None else None
        return heatmaps, kaf


def build_pose_model(
    backbone: str = "hrnet_w32",
    num_keypoints: int = NUM_KEYPOINTS,
    with_kaf: bool = False,
    pretrained_path: str | Path | None = None,
) -> PoseModel:
    """Build the top-down pose model; ``pretrained_path`` names a local ImageNet backbone weights file.

    Never downloads anything: timm is called with ``pretrained=False`` and the weights, if any, come from
    ``pretrained_path`` (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``weights_only=True``).
    """
    if backbone not in SUPPORTED_BACKBONES:
        raise ValueError(f"backbone={backbone!r} is not supported; choose one of {SUPPORTED_BACKBONES}")
    if not isinstance(num_keypoints, int) or num_keypoints <= 0:
        raise ValueError(f"num_keypoints must be a positive int, got {num_keypoints!r}")
    import timm  # here, not at the top: timm (and the torchvision it loads) costs seconds at every start

    net = timm.create_model(
        backbone, pretrained=False, features_only=True, feature_location="", out_indices=(1,)
    )
    keys_before = set(net.state_dict())
    last_module = net.stage4[-1]
    # Keep only the stride-4 output of the last module (see the module docstring).
    last_module.fuse_layers = last_module.fuse_layers[:1]
    pruned = frozenset(keys_before - set(net.state_dict()))
    feature_channels = int(net.feature_info.channels()[0])
    model = PoseModel(net, backbone, feature_channels, num_keypoints, with_kaf, pruned)
    if pretrained_path is not None:
        load_backbone_weights(model, pretrained_path)
    return model


def load_backbone_weights(model: PoseModel, path: str | Path) -> None:
    """Load ImageNet weights for ``model.backbone`` from a local file; raise if anything does not fit.

    Every backbone tensor must be present with the right shape. Keys of the classification head and of the
    pruned last-stage fuse layers are ignored; any other extra key is an error (likely another architecture).
    """
    path = Path(path)
    state = read_state_dict(path)
    expected = model.backbone.state_dict()
    unexpected = [
        k
        for k in state
        if k not in expected
        and k not in model.pruned_backbone_keys
        and not k.startswith(_CLASSIFICATION_HEAD_PREFIXES)
    ]
    check_fits(path, model.backbone_name, state, expected, unexpected)
    model.backbone.load_state_dict({k: state[k] for k in expected}, strict=True)
