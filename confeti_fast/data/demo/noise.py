"""Noise and blur for the generator. Only numpy arithmetic is used per pixel (no transcendental
functions, no OpenCV), so images do not depend on SIMD code paths."""
import math

import numpy as np


def _value_noise(rng, shape, cell):
    """Smooth noise in [0, 1] with features about `cell` pixels large (bilinear-smoothstep)."""
    h, w = shape
    grid = rng.random((h // cell + 2, w // cell + 2), dtype=np.float32)

    def axis(n):
        t = (np.arange(n, dtype=np.float32) + 0.5) / cell
        i = t.astype(np.int64)
        t -= i
        return i, t * t * (3 - 2 * t)  # smoothstep hides the grid's creases

    iy, ty = axis(h)
    ix, tx = axis(w)
    rows = grid[iy] * (1 - ty)[:, None] + grid[iy + 1] * ty[:, None]
    return rows[:, ix] * (1 - tx) + rows[:, ix + 1] * tx


def _fractal(rng, shape, cells):
    """Sum of value-noise octaves, centred on 0 (roughly within [-0.5, 0.5])."""
    weights = [0.5 ** i for i in range(len(cells))]
    total = sum(w * _value_noise(rng, shape, c) for w, c in zip(weights, cells))
    return total / sum(weights) - 0.5


def _blur(img, sigma):
    """Separable Gaussian blur of an (H, W, C) float image, edges repeated."""
    r = max(1, math.ceil(2 * sigma))
    k = np.array([math.exp(-0.5 * (i / sigma) ** 2) for i in range(-r, r + 1)], np.float32)
    k /= k.sum()
    h, w = img.shape[:2]
    pad = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="edge")
    img = sum(k[i] * pad[i:i + h] for i in range(2 * r + 1))
    pad = np.pad(img, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * pad[:, i:i + w] for i in range(2 * r + 1))
