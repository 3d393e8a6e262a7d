"""The contrast's pixel samplers: flat indices into (B, h, w) labels, ignored pixels (255) left out."""
import torch

from .data.labels import IGNORE_INDEX


def sample_kept_pixels(labels, num_samples, generator=None):
    """Up to `num_samples` flat indices of non-ignored pixels, uniformly without replacement."""
    kept = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    order = torch.randperm(kept.numel(), generator=generator)[:num_samples]
    return kept[order.to(kept.device)]


def sample_pixels(labels, num_samples, generator=None):
    """min(num_samples, pixel count) flat indices: a uniform draw without replacement among the
    kept pixels, without a host sync (fixed size, no nonzero). Each pixel gets a random key
    (float64, so ties are vanishingly rare), ignored pixels the largest; the smallest keys win.
    When fewer than `num_samples` pixels are kept, every kept pixel is drawn and ignored ones
    fill the rest: the contrast ops skip samples whose label is 255."""
    flat = labels.reshape(-1)
    keys = torch.rand(flat.numel(), generator=generator, dtype=torch.float64).to(flat.device, non_blocking=True)
    keys = keys.masked_fill(flat == IGNORE_INDEX, 2.0)
    return keys.topk(min(num_samples, flat.numel()), largest=False, sorted=True).indices
