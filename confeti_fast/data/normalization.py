"""The one place images cross between 0..255 RGB and the segmentor's normalized input
(docs/method.md §1: ImageNet mean and std per channel, on the 0..255 scale).

Every other range (CUT's [-1, 1], the pictures' uint8, the jitter's [0, 1]) goes through
these two functions, so a change of statistics or of rounding happens in one place.
"""
from ..runtime import constant

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _channel_stats(x, mean, std):
    """mean and std as (3, 1, 1) tensors of x's dtype on x's device (they broadcast over a
    leading batch dimension too)."""
    return (constant(mean, x.device, x.dtype).view(3, 1, 1), constant(std, x.device, x.dtype).view(3, 1, 1))


def normalize(rgb, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """0..255 RGB (3, H, W) or (B, 3, H, W), floating -> the segmentor's input."""
    mean, std = _channel_stats(rgb, mean, std)
    return (rgb - mean) / std


def denormalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The segmentor's input (3, H, W) or (B, 3, H, W) -> 0..255 RGB, unclamped."""
    mean, std = _channel_stats(x, mean, std)
    return x * std + mean
