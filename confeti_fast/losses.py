"""The segmentation-side losses of docs/method.md §3 (the contrast and PatchNCE live in `ops`)."""
import torch
import torch.nn.functional as F

from .data.labels import IGNORE_INDEX
from .models import upsample_logits
from .runtime import constant


def seg_ce(logits, labels, weight=None):
    """Cross-entropy as mmseg computes it: per pixel (0 where ignored), times an optional pixel
    weight, averaged over ALL pixels of the label, ignored ones included."""
    logits = upsample_logits(logits, labels.shape[-2:]).float()
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    if weight is not None:
        loss = loss * weight
    return loss.mean()


def present_classes(labels, num_classes):
    """(B, K) multi-hot float of the classes present in each label (255 excluded)."""
    flat = labels.reshape(labels.shape[0], -1)
    onehot = torch.zeros(labels.shape[0], num_classes + 1, device=labels.device)
    onehot.scatter_(1, flat.clamp(max=num_classes), 1.0)
    return onehot[:, :num_classes]


def cam_loss(cam, labels):
    """BCE-with-logits between the image scores (global mean of the CAM conv) and the classes
    present in the label."""
    scores = cam.float().mean(dim=(2, 3))
    return F.binary_cross_entropy_with_logits(scores, present_classes(labels, cam.shape[1]))


def downscale_label_ratio(labels, size, min_ratio, num_classes):
    """Majority label of each cell when the label is downscaled to `size` (h, w); cells whose
    majority class covers less than `min_ratio` of the cell become 255 (DAFormer)."""
    height, width = labels.shape[-2:]
    fh, fw = height // size[0], width // size[1]
    onehot = F.one_hot(labels.clamp(max=num_classes), num_classes + 1).permute(0, 3, 1, 2).float()
    share = F.avg_pool2d(onehot[:, :num_classes], (fh, fw))
    ratio, majority = share.max(1)
    majority[ratio < min_ratio] = IGNORE_INDEX
    return majority


def feature_distance(student_features, imnet_features, labels, thing_classes, num_classes, min_ratio=0.75):
    """Mean L2 distance between student and ImageNet layer-4 features over the cells whose
    downscaled label is a thing class. 0 when no cell is (DAFormer's mean would be NaN)."""
    cells = downscale_label_ratio(labels, student_features.shape[-2:], min_ratio, num_classes)
    mask = torch.isin(cells, constant(thing_classes, cells.device))
    dist = torch.norm(student_features.float() - imnet_features.float(), dim=1, p=2)
    # a masked mean (no boolean indexing: that would sync the host)
    return (dist * mask).sum() / mask.sum().clamp_min(1)


def nearest_downsample(labels, size):
    """Labels resized to `size` (h, w) by nearest neighbour, as the contrast uses them."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
