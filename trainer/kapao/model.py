"""The KAPAO network: timm ``cs3darknet`` backbone, a stride-64 stage, the YOLOv5-P6 PAN neck, the head.

Layout (YOLOv5-P6 as in the authors' ``models/yolov5{s,m,l}6.yaml``, with YOLOv5 v6's backbone tail):

    images [B,3,H,W]
      -> timm cs3darknet_{s,m,l} (features_only)   C3 (stride 8), C4 (16), C5 (32)
      -> stride-64 stage: Conv 3x3/2 + C3 + SPPF   C6 (64)
      -> PAN neck, top-down:  C6 -1x1-> L6 -up-> cat C5 -> C3 -1x1-> L5 -up-> cat C4 -> C3 -1x1-> L4
                              -up-> cat C3 -> C3 = P3
                   bottom-up: P3 -3x3/2-> cat L4 -> C3 = P4 -3x3/2-> cat L5 -> C3 = P5
                              -3x3/2-> cat L6 -> C3 = P6
      -> head: per stride a 1x1 conv to 3 * No channels, reshaped to [B, 3, H/s, W/s, No], No = 3K + 6

Channels. YOLOv5 scales the yaml channels by the width multiple (s 0.50, m 0.75, l 1.0, rounded up to a
multiple of 8) and the C3 repeats by the depth multiple (s 0.33, m 0.67, l 1.0). The neck's outputs P3..P6
have 256w/512w/768w/1024w channels (s: 128/256/384/512, m: 192/384/576/768, l: 256/512/768/1024), as in
the authors' yaml. timm's cs3darknet is the YOLOv5 (P5) backbone, whose stride-32 stage has 1024w channels
(s 512, m 768, l 1024) where YOLOv5-P6 has 768w; we keep timm's stage so that its ImageNet weights load, and
the neck simply reads the wider C5 (one C3 input and the stride-64 stage's first conv grow). The channels at
strides 8 and 16 (256w, 512w) are the same in both. ``build_kapao_model`` checks timm's channels against
these numbers so that a timm change cannot silently alter the network.

Differences from the authors' KAPAO (YOLOv5 v5.0 P6): timm's stem (two 3x3 convs instead of Focus), timm's
stage depths (s 1/3/4/1 ... l 3/6/9/3 instead of 3/9/9/3 scaled), C5 width above, and the stride-64 tail of
YOLOv5 v6 (Conv, C3, SPPF) instead of v5.0's (Conv, SPP, C3 without shortcut). At K = 17 the model has
13.22 / 37.33 / 80.83 M parameters against the paper's 12.6 / 35.8 / 77.0 M (+4-5%, mostly the wider C5;
the same blocks in the authors' layout give 12.56 / 35.76 / 77.05 M); at K = 133, 14.56 / 39.34 / 83.51 M.

The model takes images as they come (no normalisation inside). timm's ImageNet weights were trained on
ImageNet mean/std-normalised inputs; the data pipeline decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.datasets.keypoints import NUM_KEYPOINTS
from trainer.kapao.anchors import ANCHORS_PER_STRIDE, P6_ANCHORS, STRIDES, outputs_per_anchor
from trainer.pretrained import PretrainedWeightsError, check_fits, read_state_dict  # noqa: F401 - raised here

KAPAO_SIZES: tuple[str, ...] = ("s", "m", "l")

# The input must be divisible by the coarsest stride so that the top-down path's 2x upsampling lands exactly
# on the finer maps.
INPUT_MULTIPLE = STRIDES[-1]

# Keys of timm's ImageNet classification checkpoints that the feature backbone does not have.
_CLASSIFICATION_HEAD_PREFIXES: tuple[str, ...] = ("head.",)

# YOLOv5 sets every BatchNorm to eps 1e-3, momentum 0.03 (utils/torch_utils.py ``initialize_weights``). We do
# that for our own layers; the timm backbone keeps timm's BatchNorm, whose ImageNet statistics were made
# with timm's eps.
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.03


@dataclass(frozen=True)
class KapaoSizeSpec:
    """One KAPAO size: the timm backbone and YOLOv5's depth and width multiples (the authors' yaml files)."""

    backbone: str
    depth_multiple: float
    width_multiple: float

    def width(self, channels: int) -> int:
        """YOLOv5's ``make_divisible(c * width, 8)``: scale, then round up to a multiple of 8."""
        return int(math.ceil(channels * self.width_multiple / 8) * 8)

    def depth(self, repeats: int) -> int:
        """YOLOv5's ``max(round(n * depth), 1)``."""
        return max(round(repeats * self.depth_multiple), 1)


SIZE_SPECS: dict[str, KapaoSizeSpec] = {
    "s": KapaoSizeSpec("cs3darknet_s", 0.33, 0.50),
    "m": KapaoSizeSpec("cs3darknet_m", 0.67, 0.75),
    "l": KapaoSizeSpec("cs3darknet_l", 1.0, 1.0),
}

# timm's cs3darknet stages at strides 8, 16, 32 (index 0 is the stride-2 stem, 1 the stride-4 stage).
_BACKBONE_OUT_INDICES = (2, 3, 4)


# ----------------------------------------------------------------------------------------------------------
# YOLOv5 building blocks (models/common.py of YOLOv5: Conv, Bottleneck, C3, SPPF), written anew.


class ConvBnAct(nn.Module):
    """Conv (no bias) + BatchNorm + SiLU, 'same' padding: YOLOv5's ``Conv``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 then 3x3 conv at constant width, with a residual connection when ``shortcut``."""

    def __init__(self, channels: int, shortcut: bool) -> None:
        super().__init__()
        self.conv1 = ConvBnAct(channels, channels, 1)
        self.conv2 = ConvBnAct(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.shortcut else y


class C3(nn.Module):
    """CSP bottleneck, 3 convs: half the width goes through ``repeats`` bottlenecks, half bypasses them."""

    def __init__(self, in_channels: int, out_channels: int, repeats: int, shortcut: bool) -> None:
        super().__init__()
        hidden = out_channels // 2
        self.conv1 = ConvBnAct(in_channels, hidden, 1)
        self.conv2 = ConvBnAct(in_channels, hidden, 1)
        self.blocks = nn.Sequential(*(Bottleneck(hidden, shortcut) for _ in range(repeats)))
        self.conv3 = ConvBnAct(2 * hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.cat((self.blocks(self.conv1(x)), self.conv2(x)), dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max pools equal SPP's parallel 5/9/13 pools."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5) -> None:
        super().__init__()
        hidden = in_channels // 2
        self.conv1 = ConvBnAct(in_channels, hidden, 1)
        self.pool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)
        self.conv2 = ConvBnAct(4 * hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.conv2(torch.cat((x, y1, y2, self.pool(y2)), dim=1))


# ----------------------------------------------------------------------------------------------------------
# KAPAO parts


class Stride64Stage(nn.Module):
    """YOLOv5-P6's backbone tail (v6 yaml layers 9-11): Conv 3x3/2 -> C3 (shortcut) -> SPPF."""

    def __init__(self, in_channels: int, spec: KapaoSizeSpec) -> None:
        super().__init__()
        out = spec.width(1024)
        self.down = ConvBnAct(in_channels, out, 3, stride=2)
        self.c3 = C3(out, out, spec.depth(3), shortcut=True)
        self.sppf = SPPF(out, out)
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sppf(self.c3(self.down(x)))


class PanNeck(nn.Module):
    """YOLOv5-P6's head (yaml layers 12-32): a top-down path, then a bottom-up path, outputs P3..P6.

    Concatenation order as the yaml's ``Concat`` ([path, lateral]). All C3 blocks of the neck have no
    residual shortcut (``C3, [c, False]``).
    """

    def __init__(self, in_channels: tuple[int, int, int, int], spec: KapaoSizeSpec) -> None:
        super().__init__()
        c3_in, c4_in, c5_in, c6_in = in_channels
        c256, c512, c768, c1024 = (spec.width(c) for c in (256, 512, 768, 1024))
        n = spec.depth(3)
        # top-down
        self.lateral6 = ConvBnAct(c6_in, c768, 1)  # layer 12
        self.top_down5 = C3(c768 + c5_in, c768, n, shortcut=False)  # layer 15
        self.lateral5 = ConvBnAct(c768, c512, 1)  # layer 16
        self.top_down4 = C3(c512 + c4_in, c512, n, shortcut=False)  # layer 19
        self.lateral4 = ConvBnAct(c512, c256, 1)  # layer 20
        self.out3 = C3(c256 + c3_in, c256, n, shortcut=False)  # layer 23: P3/8
        # bottom-up
        self.down3 = ConvBnAct(c256, c256, 3, stride=2)  # layer 24
        self.out4 = C3(c256 + c256, c512, n, shortcut=False)  # layer 26: P4/16
        self.down4 = ConvBnAct(c512, c512, 3, stride=2)  # layer 27
        self.out5 = C3(c512 + c512, c768, n, shortcut=False)  # layer 29: P5/32
        self.down5 = ConvBnAct(c768, c768, 3, stride=2)  # layer 30
        self.out6 = C3(c768 + c768, c1024, n, shortcut=False)  # layer 32: P6/64
        self.out_channels: tuple[int, ...] = (c256, c512, c768, c1024)

    def forward(
        self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor, c6: torch.Tensor
    ) -> list[torch.Tensor]:
        l6 = self.lateral6(c6)
        l5 = self.lateral5(self.top_down5(torch.cat((_upsample2(l6), c5), dim=1)))
        l4 = self.lateral4(self.top_down4(torch.cat((_upsample2(l5), c4), dim=1)))
        p3 = self.out3(torch.cat((_upsample2(l4), c3), dim=1))
        p4 = self.out4(torch.cat((self.down3(p3), l4), dim=1))
        p5 = self.out5(torch.cat((self.down4(p4), l5), dim=1))
        p6 = self.out6(torch.cat((self.down5(p5), l6), dim=1))
        return [p3, p4, p5, p6]


def _upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class DetectHead(nn.Module):
    """Per stride a 1x1 conv to A * No channels; output ``[B, A, H/s, W/s, No]``, raw (no sigmoid).

    Channel order per anchor (facts file, "Network"): x, y, w, h, objectness, K + 1 class scores (class 0 is
    the person pose object, class k + 1 keypoint k), 2K pose keypoint offsets (x0, y0, x1, y1, ...).
    """

    def __init__(self, in_channels: tuple[int, ...], num_keypoints: int) -> None:
        super().__init__()
        self.num_anchors = ANCHORS_PER_STRIDE
        self.num_outputs = outputs_per_anchor(num_keypoints)
        self.num_classes = num_keypoints + 1
        self.convs = nn.ModuleList(nn.Conv2d(c, self.num_anchors * self.num_outputs, 1) for c in in_channels)
        self.reset_biases()

    @torch.no_grad()
    def reset_biases(self) -> None:
        """YOLOv5's ``_initialize_biases``: start objectness and class scores at sensible prior probabilities.

        As in RetinaNet (Lin et al. 2017, "Focal Loss", Sec. 3.3, "prior probability for the rare class"):
        with zero-ish biases every one of the ~100k anchors would start at p = 0.5, and the BCE of the
        overwhelming number of empty anchors would dominate and destabilise the first iterations. YOLOv5
        assumes ~8 objects per 640x640 image spread over the (640 / s)^2 cells of stride s, so the
        objectness bias becomes log(8 / (640 / s)^2) (sigmoid of it ~ that ratio), and the class bias
        log(0.6 / (nc - 0.99)) with nc = K + 1 classes, which the authors' Model keeps as ``nc`` (the 2K
        offsets are not classes). The box and keypoint-offset biases keep PyTorch's default.
        """
        for conv, stride in zip(self.convs, STRIDES, strict=True):
            bias = conv.bias.view(self.num_anchors, self.num_outputs)
            bias[:, 4] += math.log(8.0 / (640.0 / stride) ** 2)
            bias[:, 5 : 5 + self.num_classes] += math.log(0.6 / (self.num_classes - 0.99))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for conv, x in zip(self.convs, features, strict=True):
            y = conv(x)
            b, _, h, w = y.shape
            # [B, A*No, H, W] -> [B, A, No, H, W] -> [B, A, H, W, No]; the conv's channels are anchor-major.
            # A view, not a contiguous copy: each output (objectness above all) stays one plane per anchor,
            # which decoding scans, and a copy would cost 165 MB per image at 1280 with K = 133.
            outputs.append(y.view(b, self.num_anchors, self.num_outputs, h, w).permute(0, 1, 3, 4, 2))
        return outputs


class KapaoModel(nn.Module):
    """timm cs3darknet -> stride-64 stage -> PAN neck -> detect head.

    ``forward(images [B,3,H,W])`` with H, W multiples of 64 returns 4 raw tensors ``[B, 3, H/s, W/s, 3K+6]``
    for s = 8, 16, 32, 64. ``anchors`` ``[4, 3, 2]`` (w, h in input pixels) is a non-persistent buffer: it
    follows ``.to(device)`` but is not saved in the state dict, as it is a constant of
    ``trainer.kapao.anchors`` (a checkpoint can then never carry stale anchors).
    """

    anchors: torch.Tensor

    def __init__(
        self, size: str, backbone: nn.Module, backbone_channels: tuple[int, int, int], num_keypoints: int
    ):
        super().__init__()
        spec = SIZE_SPECS[size]
        self.size = size
        self.backbone_name = spec.backbone
        self.num_keypoints = num_keypoints
        self.num_outputs = outputs_per_anchor(num_keypoints)
        self.strides: tuple[int, ...] = STRIDES
        self.backbone = backbone
        self.stage64 = Stride64Stage(backbone_channels[-1], spec)
        self.neck = PanNeck((*backbone_channels, self.stage64.out_channels), spec)
        self.head = DetectHead(self.neck.out_channels, num_keypoints)
        self.register_buffer("anchors", torch.tensor(P6_ANCHORS, dtype=torch.float32), persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:
            raise ValueError(
                f"input size {h}x{w} (HxW) is not a multiple of {INPUT_MULTIPLE} (the coarsest stride); "
                "pad or resize the images, e.g. letterbox to a multiple of 64"
            )
        c3, c4, c5 = self.backbone(images)
        c6 = self.stage64(c5)
        return self.head(self.neck(c3, c4, c5, c6))


def build_kapao_model(
    size: str = "s", num_keypoints: int = NUM_KEYPOINTS, pretrained_path: str | Path | None = None
) -> KapaoModel:
    """Build KAPAO-S/M/L for K keypoints; ``pretrained_path`` names a local ImageNet backbone weights file.

    Never downloads anything: timm is called with ``pretrained=False`` and the weights, if any, come from
    ``pretrained_path`` (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``weights_only=True``).
    """
    if size not in SIZE_SPECS:
        raise ValueError(f"size={size!r} is not a KAPAO size; choose one of {KAPAO_SIZES}")
    if not isinstance(num_keypoints, int) or isinstance(num_keypoints, bool) or num_keypoints <= 0:
        raise ValueError(f"num_keypoints must be a positive int, got {num_keypoints!r}")
    spec = SIZE_SPECS[size]
    import timm  # here, not at the top: timm (and the torchvision it loads) costs seconds at every start

    backbone = timm.create_model(
        spec.backbone, pretrained=False, features_only=True, out_indices=_BACKBONE_OUT_INDICES
    )
    channels = tuple(int(c) for c in backbone.feature_info.channels())
    reductions = tuple(int(r) for r in backbone.feature_info.reduction())
    expected = tuple(spec.width(c) for c in (256, 512, 1024))
    if reductions != STRIDES[:3] or channels != expected:
        raise RuntimeError(
            f"timm {timm.__version__} {spec.backbone}: features at strides {reductions} with channels "
            f"{channels}, expected strides {STRIDES[:3]} with channels {expected} "
            f"(the YOLOv5 backbone at width {spec.width_multiple})"
        )
    model = KapaoModel(size, backbone, channels, num_keypoints)  # type: ignore[arg-type]
    if pretrained_path is not None:
        load_backbone_weights(model, pretrained_path)
    return model


# ----------------------------------------------------------------------------------------------------------
# Pretrained backbone weights from a local file


def _feature_net_key(key: str, top_level: set[str]) -> str:
    """Map a timm classification-model key to the features_only model's spelling.

    timm's ``FeatureListNet`` flattens the top-level sequentials: ``stem.conv1.x`` becomes ``stem_conv1.x``
    and ``stages.0.x`` becomes ``stages_0.x``. Keys already in that spelling are kept.
    """
    first, _, rest = key.partition(".")
    if first in top_level:
        return key
    second, _, tail = rest.partition(".")
    joined = f"{first}_{second}"
    return f"{joined}.{tail}" if joined in top_level and tail else key


def load_backbone_weights(model: KapaoModel, path: str | Path) -> None:
    """Load ImageNet weights for ``model.backbone`` (timm cs3darknet) from a local file; raise on misfit.

    Accepts timm's classification checkpoint (its ``head.*`` keys are ignored), a features_only backbone's
    state dict, or a whole KapaoModel's (its ``backbone.*`` part). Every backbone tensor must be present with
    the right shape, except BatchNorm ``num_batches_tracked`` counters (bookkeeping, absent from some
    exports: the model's own are kept). Any other extra key is an error (likely another architecture).
    """
    path = Path(path)
    raw = read_state_dict(path)
    top_level = {name for name, _ in model.backbone.named_children()}
    expected = model.backbone.state_dict()
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in raw.items():
        mapped = _feature_net_key(key, top_level)
        if mapped in expected:
            state[mapped] = value
        elif not key.startswith(_CLASSIFICATION_HEAD_PREFIXES):
            unexpected.append(key)
    counters = [k for k in expected if k.endswith("num_batches_tracked")]
    check_fits(path, model.backbone_name, state, expected, unexpected, optional=counters)
    model.backbone.load_state_dict(state, strict=False)
