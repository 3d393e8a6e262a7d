"""DeepLabV2 segmentor: ResNetV1c backbone + DLV2 (ASPP-sum) head, logits at stride 8.

Everything here is plain convolutions / BatchNorm / element-wise ops, so the model runs
unchanged in `channels_last` memory format and under bf16 autocast (no `.view` on
possibly non-contiguous tensors).
"""
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfetiError
from .weights import load_imagenet_backbone
from .resnet import ARCH_SETTINGS, ResNetV1c


class DLV2Head(nn.Module):
    """Four parallel dilated 3x3 convs (with bias) on the layer4 features, outputs summed."""

    def __init__(self, in_channels, num_classes, dilations=(6, 12, 18, 24)):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.dilations = tuple(dilations)
        self.aspp_modules = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in self.dilations
        )
        self.init_weights()

    def init_weights(self):
        for conv in self.aspp_modules:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        out = self.aspp_modules[0](x)
        for conv in self.aspp_modules[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    """DeepLabV2 with a ResNetV1c backbone. `forward(x)` returns logits at stride 8."""

    def __init__(self, depth=101, num_classes=19, dilations=(6, 12, 18, 24)):
        super().__init__()
        self.depth = depth
        self.num_classes = num_classes
        self.backbone = ResNetV1c(depth)
        self.decode_head = DLV2Head(self.backbone.out_channels, num_classes, dilations)

    @property
    def feature_channels(self):
        """Channels of the layer4 features `extract_features` returns (2048 or 512)."""
        return self.backbone.out_channels

    def extract_features(self, x):
        """Layer4 features (B x C x ceil(H/8) x ceil(W/8))."""
        return self.backbone(x)[-1]

    def decode(self, features):
        """Logits (B x K x h x w) from layer4 features."""
        return self.decode_head(features)

    def forward(self, x):
        return self.decode(self.extract_features(x))


def upsample_logits(logits, size):
    """Bilinear upsampling (align_corners=False) of B x K x h x w logits to `size` (H, W)."""
    size = tuple(int(s) for s in size[-2:])
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def build_segmentor(model_cfg, num_classes, verbose=True):
    """Build a `DeepLabV2` from the config's `model` dict, e.g. {"depth": 101, "pretrained": path}.

    With `pretrained` set to a local OpenMMLab ResNetV1c ImageNet checkpoint, the backbone is
    loaded from it and the load report (missing/unexpected keys) is printed (`verbose`) and
    kept as `model.pretrained_report`; `None` leaves the random init.
    """
    if not isinstance(model_cfg, dict):
        raise ConfetiError(f"model config must be a dict, got {model_cfg!r}")
    depth = model_cfg.get("depth", 101)
    if depth not in ARCH_SETTINGS:
        raise ConfetiError(f"model.depth must be one of {', '.join(map(str, ARCH_SETTINGS))}, got {depth!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfetiError(f"num_classes must be a positive integer, got {num_classes!r}")
    dilations = tuple(model_cfg.get("head_dilations", (6, 12, 18, 24)))
    model = DeepLabV2(depth, num_classes, dilations)
    model.pretrained_report = None
    pretrained = model_cfg.get("pretrained")
    if pretrained:
        report = load_imagenet_backbone(model.backbone, Path(pretrained).expanduser())
        model.pretrained_report = report
        if verbose:
            print(report, flush=True)
    return model
