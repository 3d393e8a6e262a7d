"""ClassMix and the strong augmentation of the mixed image (docs/method.md §3 step 4, as in DACS).

All randomness comes from an explicit `torch.Generator`, so a training step is a pure
function of its seed (exact resume needs no hidden RNG state).
"""
import math

import torch
import torch.nn.functional as F

from .labels import IGNORE_INDEX
from .normalization import denormalize, normalize


def _uniform(gen, low=0.0, high=1.0):
    return low + (high - low) * torch.rand((), generator=gen).item()


def class_mix_masks(source_labels, gen):
    """Per image, a mask of half (rounded up) of the classes present in its own label, drawn
    uniformly. Fixed shapes and no host sync: every class value gets a random key, absent ones
    (and 255) the largest, and the classes whose key ranks within half the present count win."""
    flat = source_labels.reshape(source_labels.shape[0], -1).long()
    values = 256  # label values are 0..255, 255 ignored
    present = torch.zeros(flat.shape[0], values, dtype=torch.bool, device=flat.device)
    present.scatter_(1, flat, True)
    present[:, IGNORE_INDEX] = False
    keys = torch.rand(flat.shape[0], values, generator=gen, dtype=torch.float64).to(flat.device, non_blocking=True)
    rank = keys.masked_fill(~present, 2.0).argsort(dim=1).argsort(dim=1)
    chosen = present & (rank < ((present.sum(1, keepdim=True) + 1) // 2))
    return chosen.gather(1, flat).reshape(source_labels.shape)


def mix(mask, source, target):
    """M * source + (1 - M) * target for images (B, C, H, W) or maps (B, H, W)."""
    if source.dim() == 4:
        mask = mask[:, None]
    return torch.where(mask, source, target)


def _grey(rgb):
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]


def _rgb_to_hsv(rgb):
    r, g, b = rgb
    maxc, _ = rgb.max(0)
    minc, _ = rgb.min(0)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, ((g - b) / safe) % 6,
                      torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return hue, sat, maxc


def _hsv_to_rgb(hue, sat, val):
    k = torch.stack([(5 + hue * 6) % 6, (3 + hue * 6) % 6, (1 + hue * 6) % 6])
    return val - val * sat * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def color_jitter(rgb, strength, gen):
    """Brightness, contrast, saturation and hue jitter of one (3, H, W) image in [0, 1], each
    factor drawn in [1 - s, 1 + s] (hue: a shift in [-s, s] of a turn), in a random order."""
    ops = torch.randperm(4, generator=gen).tolist()
    for op in ops:
        if op == 0:
            rgb = rgb * _uniform(gen, 1 - strength, 1 + strength)
        elif op == 1:
            rgb = (rgb - _grey(rgb).mean()) * _uniform(gen, 1 - strength, 1 + strength) + _grey(rgb).mean()
        elif op == 2:
            grey = _grey(rgb)
            rgb = (rgb - grey) * _uniform(gen, 1 - strength, 1 + strength) + grey
        else:
            hue, sat, val = _rgb_to_hsv(rgb)
            rgb = _hsv_to_rgb((hue + _uniform(gen, -strength, strength)) % 1.0, sat, val)
        rgb = rgb.clamp(0, 1)
    return rgb


def blur_kernel_size(side):
    """Odd kernel of about 10% of the side (DACS): ceil(0.1 side), minus 1 when even."""
    size = math.ceil(0.1 * side)
    return size if size % 2 else size - 1


def gaussian_blur(image, sigma):
    """Separable Gaussian blur of (C, H, W) with reflect padding; kernel ~10% of each side."""
    out = image[None]
    for dim, side in ((2, image.shape[1]), (3, image.shape[2])):
        size = blur_kernel_size(side)
        if size < 2:
            continue
        x = torch.arange(size, dtype=image.dtype, device=image.device) - (size - 1) / 2
        kernel = torch.exp(-(x ** 2) / (2 * sigma ** 2))
        kernel = kernel / kernel.sum()
        shape = (1, 1, size, 1) if dim == 2 else (1, 1, 1, size)
        pad = (0, 0, size // 2, size // 2) if dim == 2 else (size // 2, size // 2, 0, 0)
        channels = out.shape[1]
        out = F.conv2d(F.pad(out, pad, mode="reflect"), kernel.view(shape).expand(channels, 1, *shape[2:]),
                       groups=channels)
    return out[0]


def strong_augment(images, mean, std, gen, jitter_strength=0.2, jitter_prob=0.2, blur=True):
    """Colour jitter (when a per-iteration draw exceeds `jitter_prob`) and Gaussian blur (when
    a draw exceeds 0.5, sigma ~ U(0.15, 1.15)) of normalized images (B, 3, H, W)."""
    jitter_draw, blur_draw = _uniform(gen), _uniform(gen)
    out = []
    for image in images:
        if jitter_draw > jitter_prob:
            image = normalize(color_jitter(denormalize(image, mean, std) / 255.0, jitter_strength, gen) * 255.0,
                              mean, std)
        if blur and blur_draw > 0.5:
            image = gaussian_blur(image, _uniform(gen, 0.15, 1.15))
        out.append(image)
    return torch.stack(out)
