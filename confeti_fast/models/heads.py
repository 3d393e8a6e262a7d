"""The auxiliary heads on layer-4 features (docs/method.md §2) and the network that bundles them."""
import torch.nn as nn

from .deeplabv2 import build_segmentor


class CAMHead(nn.Module):
    """1x1 conv, no bias. Its map is ReLU(conv); its image score the global average of conv."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 1, bias=False)

    def forward(self, features):
        return self.conv(features)


def projection_head(in_channels, dim=512):
    """The contrastive projection h: 1x1 conv, no bias (raw, not normalized)."""
    return nn.Conv2d(in_channels, dim, 1, bias=False)


def reg_proj(dim=512):
    """reg_proj of the prototypical semantic consistency: 1x1 conv with bias."""
    return nn.Conv2d(dim, dim, 1, bias=True)


class ConfetiNet(nn.Module):
    """Segmentor plus CAM head and projection: what the student and the EMA teacher hold."""

    def __init__(self, model_cfg, num_classes, proj_dim=512, verbose=True):
        super().__init__()
        self.segmentor = build_segmentor(model_cfg, num_classes, verbose=verbose)
        channels = self.segmentor.feature_channels
        self.cam_head = CAMHead(channels, num_classes)
        self.proj_head = projection_head(channels, proj_dim)

    def forward(self, x):
        """dict(features, logits at stride 8, cam (pre-ReLU), proj (raw))."""
        features = self.segmentor.extract_features(x)
        return {
            "features": features,
            "logits": self.segmentor.decode(features),
            "cam": self.cam_head(features),
            "proj": self.proj_head(features),
        }

    def head_modules(self):
        """Modules trained at 10x the backbone's learning rate."""
        return [self.segmentor.decode_head, self.cam_head, self.proj_head]
