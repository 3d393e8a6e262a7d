"""Pixel-to-prototype contrast (docs/method.md §5): its switch and its CPU fast path.

fused: `confeti_fast.kernels.contrast` (Triton) on CUDA, `pixel_proto_contrast_cpu` below on
other devices; reference: `reference.pixel_proto_contrast`.
"""
import math

import torch
import torch.nn.functional as F

from .. import reference
from .switch import choose, load_fused
from ..reference import IGNORE_INDEX
from ..sampling import sample_kept_pixels

NAME = "pixel_proto_contrast"


def fused(device_type):
    """(implementation, None) or (None, why it is missing) for tensors on `device_type`."""
    if device_type != "cuda":
        return pixel_proto_contrast_cpu, None
    return load_fused("contrast", "pixel_proto_contrast")


def implementation(device_type="cpu"):
    return choose(NAME, device_type, fused)


def pixel_proto_contrast(feats, *args, **kwargs):
    return implementation(feats.device.type)(feats, *args, **kwargs)


pixel_proto_contrast.__doc__ = reference.pixel_proto_contrast.__doc__


def pixel_proto_contrast_cpu(feats, labels, prototypes, tau=0.1, num_samples=4096, sample_idx=None,
                             ce_weight=0.5, reg_weight=2.0):
    """`reference.pixel_proto_contrast` by the cheapest plain-PyTorch path, what "fused" runs
    off CUDA: it normalizes only the sampled rows and never builds a normalized copy of the
    whole map (the regulariser's mean is one weighted contraction). Same semantics as the
    reference, and it traces under `torch.compile(fullgraph=True)`: no host syncs, no
    data-dependent shapes once the sample indices are given."""
    protos = prototypes.detach().float()
    num_classes = protos.shape[0]
    batch, _, height, width = feats.shape
    flat_labels = labels.reshape(-1)
    kept = flat_labels != IGNORE_INDEX
    if sample_idx is None:
        sample_idx = sample_kept_pixels(flat_labels, num_samples)
    # sampled rows straight from (B, D, h, w), whatever its memory layout
    image, pixel = sample_idx // (height * width), sample_idx % (height * width)
    rows = feats[image, :, pixel // width, pixel % width].float()
    logits = F.normalize(rows, dim=1) @ protos.t() / tau
    sample_labels = flat_labels[sample_idx]
    ce_sum = F.cross_entropy(logits, sample_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    loss_ce = ce_weight * ce_sum / (sample_labels != IGNORE_INDEX).sum().clamp_min(1)

    x = feats.float()
    inv_norm = x.norm(dim=1).clamp_min(1e-12).reciprocal()  # F.normalize's eps
    num_kept = kept.sum()
    pixel_weight = inv_norm * kept.reshape(batch, height, width) / num_kept.clamp_min(1)
    mean_v = torch.einsum("bdhw,bhw->d", x, pixel_weight)
    log_probs = F.log_softmax(mean_v @ protos.t() / tau, dim=0)
    loss_reg = reg_weight * log_probs.sum() / (num_classes * math.log(num_classes))
    anything_kept = num_kept > 0
    return (torch.where(anything_kept, loss_ce, loss_ce * 0.0),
            torch.where(anything_kept, loss_reg, loss_reg * 0.0))
