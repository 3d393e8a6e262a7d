"""The Scene: a pinhole camera over flat ground and the z-buffer that objects are painted into,
with the label ids and part codes their pixels carry."""
import math

import numpy as np

from ..labels import CITYSCAPES_LABEL_IDS, CLASSES
from .noise import _value_noise

ID = dict(zip(CLASSES, CITYSCAPES_LABEL_IDS))  # class name -> Cityscapes labelId
UNLABELED, EGO_VEHICLE, RAIL_TRACK = 0, 1, 10  # ids real labels have too; all map to ignore

# Part codes: regions of an object that a style colours on their own (labels ignore them).
BODY, DARK, GLASS, LAMP, MARK, SKIN, ALT = range(7)
SKY_DEPTH = 1e5


class Scene:
    """A street under a pinhole camera, painted object by object into a z-buffer.

    Per pixel: `inst` (object id, 0 = nothing), `depth` (metres), `u`, `v` (metric surface
    coordinates: ground X/Z, facade depth/height, or an object's local x/height) and `part`.
    `objects[i]` describes object i (its labelId, kind and attributes styles may use).
    """

    def __init__(self, width, height, rng):
        self.w, self.h, self.rng = width, height, rng
        self.f = width * rng.uniform(0.6, 0.8)          # focal length (px): ~70 deg field of view
        self.cam_h = rng.uniform(1.3, 1.7)              # camera height above the road (m)
        self.y_h = height * rng.uniform(0.4, 0.5)       # horizon row
        self.x_v = width * rng.uniform(0.42, 0.58)      # vanishing point column
        self.z_near = self.cam_h * self.f / (height - self.y_h)  # depth of the bottom row
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
        self.ys, self.xs = ys, xs
        shape = (height, width)
        self.inst = np.zeros(shape, np.int32)
        self.part = np.zeros(shape, np.uint8)
        self.depth = np.full(shape, np.inf, np.float32)
        self.u = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.objects = [dict(label=UNLABELED, kind="none", face=0)]
        self.roughness = _value_noise(rng, shape, 3)    # roughens blob outlines (tree crowns)

    def add(self, label, kind=None, face=0, **attrs):
        """Register an object; returns its instance id. `face`: -1/+1 for a surface along
        the left/right of the street, 0 for one facing the camera (for shading)."""
        self.objects.append(dict(label=label, kind=kind, face=face, **attrs))
        return len(self.objects) - 1

    def paint(self, win, mask, inst, z, u, v, part=BODY):
        """Paint `mask` (over window `win`) where it is nearer than what is there already."""
        zbuf = self.depth[win]
        m = mask & (z < zbuf)
        for target, value in ((zbuf, z), (self.inst[win], inst), (self.u[win], u),
                              (self.v[win], v), (self.part[win], part)):
            target[m] = value if np.ndim(value) == 0 else np.broadcast_to(value, m.shape)[m]

    def pixel(self, z):
        """Size of one pixel (m) on a camera-facing plane at depth z."""
        return z / self.f

    def sprite(self, x, z, x0, x1, h0, h1):
        """The window over a camera-facing plane at lateral x and depth z that covers
        [x0, x1] (m, around x) by [h0, h1] (m above the ground), with the local metric
        coordinates (lx, lh) of its pixels; None when it is off screen or behind the camera."""
        if z <= 0.5:
            return None
        s = self.f / z
        cx, gy = self.x_v + x * s, self.y_h + self.cam_h * s
        c0, c1 = max(0, math.floor(cx + x0 * s)), min(self.w, math.ceil(cx + x1 * s) + 1)
        r0, r1 = max(0, math.floor(gy - h1 * s)), min(self.h, math.ceil(gy - h0 * s) + 1)
        if c0 >= c1 or r0 >= r1:
            return None
        win = (slice(r0, r1), slice(c0, c1))
        return win, (self.xs[win] - cx) / s, (gy - self.ys[win]) / s

    def facade(self, inst, x, z0, z1, h0, top):
        """Paint a vertical plane parallel to the street at lateral x (< 0: left), from depth
        z0 to z1 and height h0 to `top` (metres; a number or a function of depth)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            zc = x * self.f / (self.xs[0] - self.x_v)  # depth of the plane in each column
        cols = np.nonzero((zc >= z0) & (zc <= z1))[0]
        if cols.size == 0:
            return
        c0, c1 = cols[0], cols[-1] + 1
        zc = zc[c0:c1]
        height = self.cam_h - (self.ys[:, c0:c1] - self.y_h) * zc / self.f  # on the plane
        h1 = top(zc) if callable(top) else top
        mask = (height >= h0) & (height < h1)
        self.paint((slice(None), slice(c0, c1)), mask, inst, zc[None, :], zc[None, :], height)

    @property
    def label(self):
        """The labelId map: each pixel's object class."""
        table = np.array([o["label"] for o in self.objects], np.uint8)
        return table[self.inst]
