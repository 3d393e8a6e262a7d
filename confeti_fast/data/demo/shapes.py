"""Masks of simple shapes in a sprite's local metric coordinates (lx across, lh up), from which
stuff and things are drawn."""
import numpy as np


def _segment(lx, lh, p, q, r):
    """Pixels within r of the segment p-q (local metric coordinates)."""
    dx, dy = q[0] - p[0], q[1] - p[1]
    t = np.clip(((lx - p[0]) * dx + (lh - p[1]) * dy) / (dx * dx + dy * dy), 0, 1)
    ex, ey = lx - p[0] - t * dx, lh - p[1] - t * dy
    return ex * ex + ey * ey < r * r


def _disc(lx, lh, cx, cy, r):
    return (lx - cx) ** 2 + (lh - cy) ** 2 < r * r


def _box(lx, lh, x0, x1, h0, h1):
    return (lx >= x0) & (lx < x1) & (lh >= h0) & (lh < h1)
