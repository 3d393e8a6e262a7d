"""The reference ops: plain PyTorch, written to read like docs/method.md §4, §5 and §6.

These are the contract the fused kernels are tested against; they favour clarity over speed
(the prototype update materializes the upsampled feature map, as the authors' code did).
"""
import math

import torch
import torch.nn.functional as F

from .data.labels import IGNORE_INDEX
from .sampling import sample_kept_pixels


def _flatten_pixels(maps):
    """(B, C, h, w) -> (B*h*w, C), rows in (b, y, x) order."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def pixel_proto_contrast(feats, labels, prototypes, tau=0.1, num_samples=4096, sample_idx=None,
                         ce_weight=0.5, reg_weight=2.0):
    """Pixel-to-prototype contrast and its regulariser (docs/method.md §5).

    feats: (B, D, h, w) raw projection; labels: (B, h, w) int64 at feature resolution, 255
    ignored; prototypes: (K, D), detached here. `sample_idx` are flat indices into B*h*w, used
    as given (samples at ignored pixels are skipped: the CE is the mean over the others); when
    None, `num_samples` kept pixels are drawn uniformly without replacement.
    Returns (loss_ce, loss_reg); both are 0 (with a graph) when every pixel is ignored.
    """
    protos = prototypes.detach().float()
    num_classes = protos.shape[0]
    v = F.normalize(_flatten_pixels(feats).float(), dim=1)
    flat_labels = labels.reshape(-1)
    kept = flat_labels != IGNORE_INDEX
    if not bool(kept.any()):
        zero = feats.sum() * 0.0
        return zero.float(), zero.float()
    if sample_idx is None:
        sample_idx = sample_kept_pixels(flat_labels, num_samples)
    logits = v[sample_idx] @ protos.t() / tau
    loss_ce = ce_weight * F.cross_entropy(logits, flat_labels[sample_idx], ignore_index=IGNORE_INDEX)
    mean_v = v[kept].mean(0)
    log_probs = F.log_softmax(mean_v @ protos.t() / tau, dim=0)
    loss_reg = reg_weight * log_probs.sum() / (num_classes * math.log(num_classes))
    return loss_ce, loss_reg


def _selection_inputs(cam, labels, valid):
    """(weights (B*H*W, K) or None, flat labels, keep mask) as docs/method.md §4 defines them."""
    size = labels.shape[-2:]
    weights = None
    if cam is not None:
        weights = _flatten_pixels(F.interpolate(cam.float(), size=size, mode="bilinear", align_corners=True))
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    if valid is not None:
        keep &= valid.reshape(-1).bool()
    return weights, flat_labels, keep


def select_top_k(weights, flat_labels, keep, top_k):
    """The per-class selection of docs/method.md §4.

    For every class present among the kept pixels, in increasing order: (c, chosen, w, n) with
    `chosen` the flat indices (b, y, x) of the `top_k` largest weights, best first (ties to the
    lower index), `w` their weights, `n` the number of candidates. weights None: all 1.
    """
    out = []
    for c in torch.unique(flat_labels[keep]).tolist():
        candidates = (keep & (flat_labels == c)).nonzero().squeeze(1)  # ascending flat index
        if weights is None:
            w = torch.ones(candidates.numel(), device=flat_labels.device)
        else:
            w = weights[candidates, c]
        # A stable descending sort keeps equal weights in ascending index order: ties go low.
        order = torch.sort(w, descending=True, stable=True).indices[:top_k]
        out.append((c, candidates[order], w[order], candidates.numel()))
    return out


@torch.no_grad()
def proto_selection(cam, labels, valid=None, top_k=32):
    """`select_top_k` from the raw inputs of `proto_ema_update` (cam upsampled the same way)."""
    return select_top_k(*_selection_inputs(cam, labels, valid), top_k)


@torch.no_grad()
def proto_class_stats(feats, cam, labels, valid=None, num_classes=None, top_k=32):
    """Per-class statistics of docs/method.md §4's selection on this rank's batch.

    Returns weighted_sum (K, D) float32 = sum of w * v over the kept pixels (v the feature
    upsampled there), weight_sum (K,) float32 = sum of the kept w, kept (K,) int64 = how many
    were kept; zeros for absent classes. `num_classes` defaults to cam.shape[1].
    """
    if num_classes is None:
        if cam is None:
            raise ValueError("proto_class_stats: num_classes is required when cam is None")
        num_classes = cam.shape[1]
    size = labels.shape[-2:]
    v = _flatten_pixels(F.interpolate(feats.float(), size=size, mode="bilinear", align_corners=True))
    weighted_sum = torch.zeros(num_classes, v.shape[1], device=v.device)
    weight_sum = torch.zeros(num_classes, device=v.device)
    kept = torch.zeros(num_classes, dtype=torch.int64, device=v.device)
    for c, chosen, w, _ in select_top_k(*_selection_inputs(cam, labels, valid), top_k):
        weighted_sum[c] = (w[:, None] * v[chosen]).sum(0)
        weight_sum[c] = w.sum()
        kept[c] = chosen.numel()
    return weighted_sum, weight_sum, kept


@torch.no_grad()
def proto_ema_apply(prototypes, counts, weighted_sum, weight_sum, kept, momentum=0.999):
    """The EMA of docs/method.md §4 from (possibly cross-rank summed) class statistics, in place."""
    for c in (kept > 0).nonzero().squeeze(1).tolist():  # increasing class order
        n = int(counts[c])
        alpha = 1.0 if n == 0 else min(1.0 - 1.0 / (n + 1), 1.0 - momentum)
        counts[c] += kept[c]
        if float(weight_sum[c]) == 0.0:
            continue  # the count still grows
        mu = F.normalize(weighted_sum[c] / weight_sum[c], dim=0)
        prototypes[c] = ((1.0 - alpha) * prototypes[c].float() + alpha * mu).to(prototypes.dtype)
    prototypes.copy_(F.normalize(prototypes.float(), dim=1).to(prototypes.dtype))
    return prototypes, counts


@torch.no_grad()
def proto_ema_update(prototypes, counts, feats, cam, labels, valid=None, momentum=0.999, top_k=32,
                     reduce=None):
    """EMA update of the prototype table (docs/method.md §4), in place on `prototypes` (K, D) and `counts` (K,).

    feats: (B, D, h, w) teacher projection; cam: (B, K, h, w) or None (weights 1); labels:
    (B, H, W); valid: optional (B, H, W) bool. Features and CAM are upsampled bilinearly with
    align_corners=True to H x W; for each present class in increasing order the `top_k`
    largest weights are kept (ties to the lower flat index (b, y, x)).

    reduce: optional callable, `reduce(weighted_sum, weight_sum, kept)`, that sums this rank's
    class statistics across ranks in place (e.g. with torch.distributed.all_reduce) before the
    EMA, so that every rank ends with the same table.
    """
    stats = proto_class_stats(feats, cam, labels, valid, prototypes.shape[0], top_k)
    if reduce is not None:
        reduce(*stats)
    return proto_ema_apply(prototypes, counts, *stats, momentum=momentum)


def patch_nce(q_layers, k_layers, batch_size, tau=0.07):
    """PatchNCE (docs/method.md §6) averaged over layers.

    Each layer gives q and k as (B*P, C), rows grouped by image. Per image, logits q k^T / tau
    (P x P) with the diagonal as the target, negatives only from the same image; k is detached.
    """
    losses = []
    for q, k in zip(q_layers, k_layers):
        q = q.float().reshape(batch_size, -1, q.shape[-1])
        k = k.detach().float().reshape(batch_size, -1, k.shape[-1])
        logits = torch.bmm(q, k.transpose(1, 2)) / tau
        target = torch.arange(q.shape[1], device=q.device).expand(batch_size, -1)
        losses.append(F.cross_entropy(logits.reshape(-1, q.shape[1]), target.reshape(-1)))
    return torch.stack(losses).mean()


