"""The training pipeline of docs/method.md §1: resize, crop (cat_max_ratio rule), flip, normalize.

Resizing follows mmcv/mmseg, which the authors used: OpenCV bilinear for images, nearest
for labels, and `img_scale` as a keep-ratio bound (the image is scaled by the largest
factor that fits it inside the (long, short) box).
"""
import numpy as np
import torch

from .labels import IGNORE_INDEX
from .normalization import IMAGENET_MEAN, IMAGENET_STD, normalize



def keep_ratio_size(width, height, scale):
    """The (width, height) that mmcv's keep-ratio rescale gives an image for `scale` (w, h)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(width, height), short_edge / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize(image, label, scale):
    """Resize an image (bilinear) and its label (nearest) to fit `scale` (w, h), keeping the ratio.
    (OpenCV is imported only when a resize is needed: images already at scale need no cv2.)"""
    height, width = image.shape[:2]
    size = keep_ratio_size(width, height, scale)
    if size != (width, height):
        import cv2

        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        if label is not None:
            label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    return image, label


def _crop_box(height, width, crop_h, crop_w, rng):
    top = int(rng.integers(0, max(height - crop_h, 0) + 1))
    left = int(rng.integers(0, max(width - crop_w, 0) + 1))
    return top, left


def dominant_class_ratio(label):
    """Share of the most frequent class among the non-ignored pixels; 1.0 for 0 or 1 classes."""
    values, counts = np.unique(label, return_counts=True)
    counts = counts[values != IGNORE_INDEX]
    if len(counts) <= 1:
        return 1.0
    return counts.max() / counts.sum()


def random_crop(image, label, crop_size, rng, cat_max_ratio=1.0, max_redraws=10):
    """A random crop of `crop_size` (h, w); while one class covers `cat_max_ratio` or more of the
    crop (or only one class is left), the box is re-drawn, at most `max_redraws` times (mmseg)."""
    crop_h, crop_w = crop_size
    height, width = image.shape[:2]
    top, left = _crop_box(height, width, crop_h, crop_w, rng)
    if cat_max_ratio < 1.0 and label is not None:
        for _ in range(max_redraws):
            if dominant_class_ratio(label[top:top + crop_h, left:left + crop_w]) < cat_max_ratio:
                break
            top, left = _crop_box(height, width, crop_h, crop_w, rng)
    image = image[top:top + crop_h, left:left + crop_w]
    if label is not None:
        label = label[top:top + crop_h, left:left + crop_w]
    return image, label


def pad_to(image, label, size):
    """Pad at the bottom/right to at least `size` (h, w): 0 for the image, 255 for the label."""
    pad_h, pad_w = max(size[0] - image.shape[0], 0), max(size[1] - image.shape[1], 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        if label is not None:
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    return image, label


def to_input(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 tensor, ImageNet-normalized."""
    return normalize(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float(), mean, std)


def train_transform(image, label, rng, scale, crop_size, cat_max_ratio, flip_prob, mean, std):
    """One training sample: resize, crop, flip, normalize. Returns (image tensor, label tensor or None)."""
    image, label = resize(image, label, scale)
    image, label = random_crop(image, label, crop_size, rng, cat_max_ratio)
    if rng.random() < flip_prob:
        image = image[:, ::-1]
        label = None if label is None else label[:, ::-1]
    image, label = pad_to(image, label, crop_size)
    label_tensor = None if label is None else torch.from_numpy(np.ascontiguousarray(label)).long()
    return to_input(image, mean, std), label_tensor
