"""Rare Class Sampling (docs/method.md §1, as in DAFormer).

Per-image class pixel counts over the source set are computed once, with a progress bar,
and cached as JSON beside the data (or in ~/.cache/confeti_fast when that folder is
read-only). P(c) = softmax((1 - f_c) / T) over the classes that occur. The statistics cover
the dataset's index as checked (under data.bad_samples=skip, the pairs kept): the cache's
fingerprint lists every label in order, so it is never reused for another index.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import ConfetiError
from .check import BadSampleError
from .labels import NUM_CLASSES

CACHE_NAME = ".confeti_rcs_stats.json"
CACHE_VERSION = 1


def _fingerprint(dataset):
    digest = hashlib.sha1(dataset.kind.encode())
    for _, label_path in dataset.samples:
        digest.update(os.path.basename(label_path).encode())
        digest.update(str(os.path.getsize(label_path)).encode())
    return digest.hexdigest()


def _cache_paths(dataset):
    digest = hashlib.sha1(str(dataset.root.resolve()).encode()).hexdigest()[:16]
    fallback = Path.home() / ".cache" / "confeti_fast" / f"rcs-{digest}.json"
    return [dataset.root / CACHE_NAME, fallback]


def compute_class_counts(dataset, progress=True):
    """(N, K) int64 pixel counts of every trainId in every label of `dataset` (255 excluded)."""
    from tqdm import tqdm

    counts = np.zeros((len(dataset), NUM_CLASSES), dtype=np.int64)
    for i in tqdm(range(len(dataset)), desc=f"RCS class statistics ({dataset.root})",
                  disable=not progress, unit="img"):
        try:
            label = dataset.load_label(i)
        except BadSampleError as err:
            if getattr(dataset, "bad_samples", "error") != "skip":
                raise
            # A body damaged behind a valid header: no counts, so RCS never draws it.
            print(f"RCS class statistics: cannot read {err.path} ({err.reason}); counted as empty "
                  f"(data.bad_samples=skip)", flush=True)
            continue
        counts[i] = np.bincount(label.ravel(), minlength=256)[:NUM_CLASSES]
    return counts


def class_counts(dataset, progress=True):
    """Cached per-image class counts; recomputed when the label files change."""
    fingerprint = _fingerprint(dataset)
    for path in _cache_paths(dataset):
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if cached.get("version") == CACHE_VERSION and cached.get("fingerprint") == fingerprint:
            return np.asarray(cached["counts"], dtype=np.int64)
    counts = compute_class_counts(dataset, progress)
    payload = json.dumps({"version": CACHE_VERSION, "fingerprint": fingerprint, "counts": counts.tolist()})
    for path in _cache_paths(dataset):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(payload)
            tmp.replace(path)
            break
        except OSError:
            continue
    return counts


def class_probabilities(total_counts, temperature):
    """RCS sampling probability of each class that occurs: softmax((1 - f_c) / T).

    Returns (classes, probabilities); classes with no pixels at all are not sampled.
    """
    total_counts = np.asarray(total_counts, dtype=np.float64)
    classes = np.flatnonzero(total_counts > 0)
    freq = total_counts[classes] / total_counts[classes].sum()
    logits = (1.0 - freq) / temperature
    probs = np.exp(logits - logits.max())
    return classes, probs / probs.sum()


class RareClassSampler:
    """Draws (class, source image index) pairs: a class by P(c), then an image that holds more
    than `min_pixels` of it. Classes without such an image are left out (DAFormer asserts)."""

    def __init__(self, counts, temperature=0.01, min_pixels=3000, min_crop_ratio=0.5):
        counts = np.asarray(counts)
        self.min_crop_pixels = min_pixels * min_crop_ratio
        self.images_with_class = {c: np.flatnonzero(counts[:, c] > min_pixels) for c in range(counts.shape[1])}
        usable = counts.sum(0) * np.array([len(self.images_with_class[c]) > 0 for c in range(counts.shape[1])])
        if not usable.any():
            raise ConfetiError(f"rare class sampling: no source image has more than {min_pixels} pixels of any class "
                               f"(lower rcs.min_pixels or disable rcs)")
        self.classes, self.probabilities = class_probabilities(usable, temperature)

    def draw(self, rng):
        c = int(rng.choice(self.classes, p=self.probabilities))
        return c, int(rng.choice(self.images_with_class[c]))
