"""A small procedural domain pair for demos and tests: a game-like source in the GTA5 layout
and a photo-like target in the Cityscapes layout, generated deterministically in seconds.

Every image is made in two steps:
1. sample a *scene*: a street seen by a pinhole camera over flat ground. Objects are painted
   into a z-buffer (so occlusion needs no drawing order), giving per-pixel instance ids,
   depth, metric surface coordinates (u, v) for textures and "part" codes (glass, tyres,
   lamps, ...). The label map is the class of each pixel's instance.
2. *render* that scene in the GAME or the REAL style. Styles differ only in appearance
   (colour statistics, textures, lighting, camera effects), never in labels.

Each image has its own random generator, seeded by (seed, domain, index), so any image can
be regenerated alone and the same seed always gives byte-identical files. Only numpy
arithmetic is used per pixel (no transcendental functions, no OpenCV), so the output does
not depend on SIMD code paths.

    python -m confeti_fast.data.demo [--root data/demo] [--seed 0] [--force]
"""
import argparse
import json
import math
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfetiError, run_cli
from .labels import CITYSCAPES_LABEL_IDS, CLASSES, PALETTE

GENERATOR_VERSION = 1
DEFAULT_COUNTS = {"source": 300, "train": 200, "val": 60}
DEFAULT_ROOT = "data/demo"
SOURCE_SIZE = (320, 180)  # (W, H): GTA5's 16:9 frames, scaled down
TARGET_SIZE = (320, 160)  # Cityscapes' 2:1 frames, scaled down
CITIES = {"train": ("aldenport", "brimholt", "corvale"), "val": ("dunmere", "eastwick")}
DOMAINS = ("source", "train", "val")  # the index of each is part of its images' seeds
# `.complete` (version, seed, counts) is written last; `.demo` marks a folder as ours to replace
MARKER, OWNER = ".complete", ".demo"
PNG_LEVEL = 6

ID = dict(zip(CLASSES, CITYSCAPES_LABEL_IDS))  # class name -> Cityscapes labelId
UNLABELED, EGO_VEHICLE, RAIL_TRACK = 0, 1, 10  # ids real labels have too; all map to ignore

# Every RARE_EVERY-th image of a set is given one rare class, in turn, so that a set of
# 60 images holds all of them; otherwise they are as rare as their sampling rates make them.
RARE = ("train", "motorcycle", "bicycle", "rider", "bus", "truck")
RARE_EVERY = 10

# Part codes: regions of an object that a style colours on their own (labels ignore them).
BODY, DARK, GLASS, LAMP, MARK, SKIN, ALT = range(7)
SKY_DEPTH = 1e5


# ------------------------------------------------------------------------- numeric helpers

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


# --------------------------------------------------------------------------------- scene

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


@dataclass
class Street:
    road: float    # half width of the road (m)
    walk: dict     # sidewalk width on each side (-1 left, +1 right)
    verge: dict    # terrain strip between the sidewalk and the building line


def sample_scene(width, height, rng, rare=None, ego_hood=False):
    """Sample one street scene. `rare` names a rare class it must contain; `ego_hood` adds
    the camera car's bonnet at the bottom (labelId 1), as Cityscapes frames have."""
    sc = Scene(width, height, rng)
    street = Street(
        road=rng.uniform(3.5, 6.5),
        walk={s: (rng.uniform(2.0, 5.0) if rng.random() < 0.9 else 0.0) for s in (-1, 1)},
        verge={s: (rng.uniform(1.0, 7.0) if rng.random() < 0.45 else 0.0) for s in (-1, 1)},
    )
    has_train = rng.random() < 0.02
    rail_z = rng.uniform(18, 45) if has_train and rng.random() < 0.5 else None
    _sky(sc)
    _ground(sc, street, rail_z)
    _skyline(sc)
    for side in (-1, 1):
        _roadside(sc, street, side)
    _traffic(sc, street, tram=has_train and rail_z is None)
    if rail_z is not None:  # a train passing a level crossing
        _vehicle(sc, "train", rng.uniform(-12, 12), rail_z, side_view=True, facing=rng.choice((-1, 1)))
    _pedestrians(sc, street)
    _cyclists(sc, street)
    _clutter(sc, street)
    if rare:
        _ensure_visible(sc, street, rare)
    if ego_hood:
        _ego_hood(sc)
    return sc


# ----------------------------------------------------------------------- background stuff

def _sky(sc):
    sid = sc.add(ID["sky"], "sky")
    # u, v: viewing direction (per focal length), for the sky gradient and clouds
    sc.paint((slice(None), slice(None)), np.ones((sc.h, sc.w), bool), sid, SKY_DEPTH,
             (sc.xs - sc.x_v) / sc.f, (sc.y_h - sc.ys) / sc.f)


def _ground(sc, st, rail_z):
    """Road, sidewalks (with curbs), terrain beyond, lane markings; a rail band if any."""
    rng = sc.rng
    r0 = math.floor(sc.y_h + 0.5)
    win = (slice(r0, sc.h), slice(None))
    ys, xs = sc.ys[win], sc.xs[win]
    z = sc.cam_h * sc.f / np.maximum(ys - sc.y_h, 0.05)
    x = (xs - sc.x_v) * z / sc.f
    a = np.abs(x)
    walk = np.where(x < 0, st.walk[-1], st.walk[1])
    road, walk_id, terrain = sc.add(ID["road"], "road"), sc.add(ID["sidewalk"], "sidewalk"), \
        sc.add(ID["terrain"], "terrain")
    on_road, on_walk = a < st.road, (a >= st.road) & (a < st.road + walk)
    inst = np.where(on_road, road, np.where(on_walk, walk_id, terrain))
    # markings are kept at least a pixel wide so they stay visible in the distance
    line = np.maximum(0.07, 0.6 * z / sc.f)
    marks = (a < line) & (np.mod(z, 9.0) < 3.5) if rng.random() < 0.8 else np.zeros_like(on_road)
    marks |= np.abs(a - (st.road - 0.3)) < line
    if rng.random() < 0.25:  # a zebra crossing
        zc = rng.uniform(8, 25)
        marks |= (np.abs(z - zc - 1.5) < 1.5) & (np.mod(x, 1.0) < 0.5)
    part = np.where(on_road & marks, MARK, np.where(on_walk & (a < st.road + 0.2), ALT, BODY))
    if rail_z is not None:  # Cityscapes' "rail track" (ignored) across the road, steel rails
        band = np.abs(z - rail_z) < 1.3
        inst = np.where(band, sc.add(RAIL_TRACK, "rail"), inst)
        rail = np.abs(np.abs(z - rail_z) - 0.72) < 0.06 + 0.6 * z * z / (sc.cam_h * sc.f)
        part = np.where(band, np.where(rail, MARK, BODY), part)
    sc.paint(win, np.ones(z.shape, bool), inst, z, x, z, part.astype(np.uint8))


def _skyline(sc):
    """Far buildings and trees along the horizon, so the street does not end in bare sky."""
    rng = sc.rng
    for label, z, chance in ((ID["building"], rng.uniform(300, 450), 0.8),
                             (ID["vegetation"], rng.uniform(200, 300), 0.7)):
        if rng.random() >= chance:
            continue
        half = sc.w * z / sc.f  # wider than the view
        hit = sc.sprite(0, z, -half, half, 0, 60)
        if hit is None:
            continue
        win, lx, lh = hit
        knots = np.arange(-half, half + 12, 12.0)
        if label == ID["building"]:  # flat roofs of varying height, with gaps
            heights = np.where(rng.random(knots.size) < 0.8, rng.uniform(8, 45, knots.size), 0)
            profile = heights[np.clip(np.searchsorted(knots, lx[0]), 0, knots.size - 1)]
        else:  # rolling tree tops
            profile = np.interp(lx[0], knots, rng.uniform(6, 22, knots.size))
        inst = sc.add(label, "skyline")
        sc.paint(win, lh < profile[None, :], inst, z, lx, lh)


def _roadside(sc, st, side):
    rng = sc.rng
    edge = st.road + st.walk[side]          # outer edge of the sidewalk
    line = edge + st.verge[side]            # where the buildings stand
    if rng.random() < 0.8:
        _buildings(sc, side, line)
    else:
        _tree_line(sc, side, line + rng.uniform(3, 25))
    _barriers(sc, side, edge, line)
    if rng.random() < 0.55:
        _tree_row(sc, side, st)
    if rng.random() < 0.85:
        _pole_row(sc, side, st)


def _buildings(sc, side, line):
    """Blocks of facades along the street, each with an end wall towards the camera."""
    rng = sc.rng
    z = rng.uniform(0.5, 6)
    while z < 250:
        length = rng.uniform(8, 35)
        if rng.random() > 0.12:  # otherwise a gap between blocks
            x = side * (line + rng.uniform(0, 3))
            height = 5 + 25 * rng.random() ** 2  # mostly low, a few tall
            bid = sc.add(ID["building"], "building", face=side)
            sc.facade(bid, x, z, z + length, 0, height)
            hit = sc.sprite(x + side * 15, z, -15, 15, 0, height)
            if hit is not None:
                win, lx, lh = hit
                end = sc.add(ID["building"], "building", colour_of=bid)  # shaded on its own
                sc.paint(win, np.ones(lx.shape, bool), end, z, lx, lh)
        z += length


def _tree_line(sc, side, line):
    """Open land: a wood along the road, its top uneven."""
    rng = sc.rng
    knots = np.arange(0, 400, 4.0)
    tops = rng.uniform(7, 16, knots.size)
    inst = sc.add(ID["vegetation"], "wood", face=side)
    sc.facade(inst, side * line, 1, 400, 0, lambda z: np.interp(z, knots, tops))


def _barriers(sc, side, edge, line):
    """Walls, fences and hedges along the sidewalk's outer edge or the building line."""
    rng = sc.rng
    for _ in range(rng.integers(0, 4)):
        kind = rng.choice(("wall", "fence", "hedge"), p=(0.35, 0.45, 0.2))
        z0 = rng.uniform(1, 60)
        x = side * (rng.choice((edge, line)) + 0.2)
        label = ID["vegetation"] if kind == "hedge" else ID[kind]
        inst = sc.add(label, kind, face=side)
        sc.facade(inst, x, z0, z0 + rng.uniform(5, 35), 0, rng.uniform(0.8, 2.6))


def _tree_row(sc, side, st):
    rng = sc.rng
    if st.verge[side] > 2:
        x = side * (st.road + st.walk[side] + st.verge[side] / 2)
    else:
        x = side * (st.road + max(st.walk[side] - 0.8, 0.5))
    z, spacing = rng.uniform(2, 12), rng.uniform(6, 16)
    while z < 120:
        _tree(sc, x + rng.uniform(-0.3, 0.3), z)
        z += spacing * rng.uniform(0.8, 1.2)


def _tree(sc, x, z):
    """A trunk and a crown; both are vegetation, like in Cityscapes."""
    rng = sc.rng
    trunk_h, rx, ry = rng.uniform(1.5, 3.5), rng.uniform(1.4, 3.2), rng.uniform(1.5, 3.0)
    hit = sc.sprite(x, z, -rx - 1, rx + 1, 0, trunk_h + 2.2 * ry)
    if hit is None:
        return
    win, lx, lh = hit
    cy = trunk_h + 0.9 * ry
    d = ((lx / rx) ** 2 + ((lh - cy) / ry) ** 2) + 0.8 * (sc.roughness[win] - 0.5)
    crown = d < 1
    trunk = (np.abs(lx) < max(0.15, 0.5 * sc.pixel(z))) & (lh < cy)
    inst = sc.add(ID["vegetation"], "tree")
    sc.paint(win, crown | trunk, inst, z, lx, lh, np.where(crown, BODY, DARK).astype(np.uint8))


def _pole_row(sc, side, st):
    rng = sc.rng
    x = side * (st.road + 0.5 if st.walk[side] > 0.8 else st.road + st.walk[side] + 0.4)
    z, spacing = rng.uniform(3, 15), rng.uniform(12, 30)
    while z < 150:
        attach = rng.choice(("none", "sign", "light", "both"), p=(0.3, 0.35, 0.2, 0.15))
        _pole(sc, x, z, side, attach)
        z += spacing * rng.uniform(0.7, 1.3)


def _pole(sc, x, z, side, attach):
    """A pole, maybe with an arm over the road, carrying a traffic sign and/or light."""
    rng = sc.rng
    height = rng.uniform(2.6, 4) if attach == "sign" else rng.uniform(3.5, 8)
    arm = rng.uniform(2, 4.5) if attach in ("light", "both") and rng.random() < 0.35 else 0.0
    hit = sc.sprite(x, z, -5, 5, 0, height + 0.3)
    if hit is None:
        return
    win, lx, lh = hit
    px = sc.pixel(z)
    r = max(0.09, 0.5 * px)  # at least a pixel wide
    mask = (np.abs(lx) < r) & (lh < height)
    out = -side  # towards the road
    if arm:
        reach = out * lx
        mask |= (reach > -r) & (reach < arm) & (lh > height - 2 * r) & (lh < height)
    sc.paint(win, mask, sc.add(ID["pole"], "pole"), z, lx, lh)
    if attach in ("light", "both"):
        cx = out * arm if arm else out * 0.3
        _traffic_light(sc, win, lx, lh, z - 0.05, cx, height - 0.6 if arm else height - 0.5, px)
    if attach in ("sign", "both"):
        _traffic_sign(sc, win, lx, lh, z - 0.05, out * 0.35, height - 0.5 if attach == "sign"
                      else height - 1.9, px)


def _traffic_sign(sc, win, lx, lh, z, cx, cy, px):
    rng = sc.rng
    s = max(rng.uniform(0.3, 0.45), 1.2 * px)
    shape = int(rng.integers(4))
    dx, dy = lx - cx, lh - cy
    if shape == 0:      # round
        mask = dx * dx + dy * dy < s * s
    elif shape == 1:    # rectangular
        mask = (np.abs(dx) < s) & (np.abs(dy) < 0.7 * s)
    elif shape == 2:    # diamond
        mask = np.abs(dx) + np.abs(dy) < s
    else:               # triangle, point up
        mask = (dy > -0.5 * s) & (np.abs(dx) < 0.58 * (s - dy))
    inst = sc.add(ID["traffic sign"], "sign", shape=shape)
    sc.paint(win, mask, inst, z, lx, lh)


def _traffic_light(sc, win, lx, lh, z, cx, cy, px):
    rng = sc.rng
    hw, hh = max(0.18, px), max(0.5, 1.5 * px)
    housing = (np.abs(lx - cx) < hw) & (np.abs(lh - cy) < hh)
    lit = int(rng.integers(3))  # red, amber or green lamp lit
    lamp = _disc(lx, lh, cx, cy + (1 - lit) * 0.6 * hh, 0.7 * hw)
    inst = sc.add(ID["traffic light"], "light", lamp=("red", "amber", "green")[lit])
    sc.paint(win, housing, inst, z, lx, lh, np.where(lamp, LAMP, BODY).astype(np.uint8))


# ---------------------------------------------------------------------------- things

# width, length, height, cabin base (None: a box), ground clearance, wheel radius (m)
VEHICLES = {
    "car": (1.8, 4.4, 1.5, 0.9, 0.22, 0.32),
    "truck": (2.45, 7.5, 3.4, None, 0.5, 0.5),
    "bus": (2.55, 11.5, 3.1, None, 0.35, 0.5),
    "train": (2.8, 36.0, 3.8, None, 0.7, 0.42),
}


def _traffic(sc, st, tram):
    """Moving vehicles in the lanes (seen end-on) and cars parked along the curbs (sideways)."""
    rng = sc.rng
    near = sc.z_near * 1.05
    moving = ["car"] * rng.poisson(3.0) + ["truck"] * rng.poisson(0.15) + ["bus"] * rng.poisson(0.06)
    if tram:  # Cityscapes' "train" is mostly trams in the street
        moving.append("train")
    for name in moving:
        x = rng.uniform(-st.road + 1.3, st.road - 1.3)
        _vehicle(sc, name, x, rng.uniform(near + 1, 70), side_view=False, facing=1)
    for side in (-1, 1):
        if rng.random() < 0.5:
            z = rng.uniform(near, 15)
            while z < 60:
                _vehicle(sc, "car", side * (st.road - 1.0), z, side_view=True, facing=-side)
                z += rng.uniform(4.8, 12)


def _vehicle(sc, name, x, z, side_view, facing):
    width, length, height, cabin, clear, wheel = VEHICLES[name]
    half = (length if side_view else width) / 2
    hit = sc.sprite(x, z, -half, half, 0, height)
    if hit is None:
        return
    win, lx, lh = hit
    lx = lx * facing  # the front is towards +lx
    shape, glass, dark, lamp = (_side_view if side_view else _end_view)(
        name, lx, lh, half, height, cabin, clear, wheel)
    part = np.select([glass, dark, lamp], [GLASS, DARK, LAMP], BODY).astype(np.uint8)
    inst = sc.add(ID[name], name, lamp="white" if side_view or sc.rng.random() < 0.5 else "red")
    sc.paint(win, shape, inst, z, lx, lh, part)


def _side_view(name, lx, lh, half, height, cabin, clear, wheel):
    """Masks (shape, glass, dark, lamp) of a vehicle seen from its side."""
    ax = np.abs(lx)
    if cabin:  # a car: lower body and a cabin with a slanted windscreen
        t = (lh - cabin) / (height - cabin)
        body = (ax < half) & (lh >= clear) & (lh < cabin)
        rear, front = -0.3 * half - 0.9 + 0.45 * t, 0.45 * half - 0.6 * t  # cabin ends, by height
        cab = (lh >= cabin) & (lh < height) & (lx > rear) & (lx < front)
        shape = body | cab
        glass = cab & (lh > cabin + 0.08) & (lh < height - 0.08) & (lx > rear + 0.15) \
            & (lx < front - 0.15) & (np.abs(lx + 0.1) > 0.06)  # two side windows
        axles = (-half + 0.85, half - 0.85)
    else:
        shape = (ax < half) & (lh >= clear) & (lh < height)
        if name == "truck":  # lower cab in front of the cargo box
            shape &= (lx < half - 2.3) | (lh < height - 0.5)
            glass = (lx > half - 1.1) & (lh > 1.9) & (lh < height - 0.8)
            axles = (-half + 1.0, -half + 2.3, half - 1.4)
        else:  # bus, train: a band of windows
            pitch = 1.7
            sill = 1.3 if name == "bus" else 1.9
            glass = (lh > sill) & (lh < height - 0.5) & (np.mod(lx, pitch) < 1.35) & (ax < half - 0.3)
            axles = (-half + 2.0, half - 2.5) if name == "bus" else \
                tuple(np.arange(-half + 2, half - 1, 5.0))
        glass = glass & shape
    dark = np.zeros_like(shape)
    for a in axles:
        dark |= _disc(lx, lh, a, wheel, wheel)
    shape |= dark
    lamp = shape & ~dark & (lx > half - 0.15) & (lh > clear + 0.3) & (lh < clear + 0.5)
    return shape, glass & ~dark, dark, lamp


def _end_view(name, lx, lh, half, height, cabin, clear, wheel):
    """Masks (shape, glass, dark, lamp) of a vehicle seen from behind or in front."""
    ax = np.abs(lx)
    top = cabin or height
    shape = (ax < half) & (lh >= clear) & (lh < top)
    if cabin:  # a car's cabin narrows upwards
        t = (lh - cabin) / (height - cabin)
        cab = (lh >= cabin) & (lh < height) & (ax < half - 0.1 - 0.3 * t)
        glass = cab & (lh > cabin + 0.08) & (lh < height - 0.1) & (ax < half - 0.25 - 0.3 * t)
        shape |= cab
        lamp_h = cabin - 0.3
    else:
        # a bus's or tram's big end window; a truck's cargo box has none
        glass = (ax < half - 0.2) & (lh > 1.85) & (lh < height - 0.35) & (name != "truck")
        lamp_h = 0.75
    dark = (ax > half - 0.4) & (ax < half - 0.05) & (lh < clear + 0.1)  # tyres under the body
    shape |= dark
    lamp = (ax > half - 0.45) & (ax < half - 0.1) & (lh > lamp_h) & (lh < lamp_h + 0.16)
    return shape, glass, dark, lamp & ~glass


def _pedestrians(sc, st):
    rng = sc.rng
    for _ in range(rng.poisson(4)):
        side = rng.choice((-1, 1))
        z = rng.uniform(sc.z_near * 1.1, 40)
        if rng.random() < 0.1:  # crossing the road
            x = rng.uniform(-st.road, st.road)
        else:
            room = st.walk[side] or st.verge[side] or 0.8
            x = side * (st.road + rng.uniform(0.3, max(room - 0.3, 0.4)))
        _person(sc, x, z)


def _person(sc, x, z):
    rng = sc.rng
    h = rng.uniform(1.55, 1.9)
    hit = sc.sprite(x, z, -0.5, 0.5, 0, h)
    if hit is None:
        return
    win, lx, lh = hit
    r = 0.5 * sc.pixel(z)  # limbs stay at least a pixel wide
    stride = rng.uniform(-0.22, 0.22)
    head = _disc(lx, lh, 0, h - 0.12, max(0.11, r))
    head |= _segment(lx, lh, (0, 0.8 * h), (0, h - 0.1), max(0.05, r))  # neck
    torso = _segment(lx, lh, (0, 0.56 * h), (0, 0.78 * h), max(0.18, r))
    arms = (_segment(lx, lh, (-0.2, 0.8 * h), (-0.24 - 0.3 * stride, 0.48 * h), max(0.05, r))
            | _segment(lx, lh, (0.2, 0.8 * h), (0.24 + 0.3 * stride, 0.48 * h), max(0.05, r)))
    legs = (_segment(lx, lh, (-0.08, 0.53 * h), (-0.08 - stride, 0.03), max(0.07, r))
            | _segment(lx, lh, (0.08, 0.53 * h), (0.08 + stride, 0.03), max(0.07, r)))
    part = np.select([head, legs & ~torso], [SKIN, ALT], BODY).astype(np.uint8)
    sc.paint(win, head | torso | arms | legs, sc.add(ID["person"], "person"), z, lx, lh, part)


# wheel base / 2, wheel radius, tyre thickness, saddle (x, h), handlebar (x, h) (m)
CYCLES = {
    "bicycle": (0.55, 0.34, 0.04, (-0.2, 0.95), (0.42, 1.05)),
    "motorcycle": (0.72, 0.32, 0.1, (-0.2, 0.85), (0.45, 1.05)),
}


def _cyclists(sc, st):
    """Riders on bicycles and motorcycles near the curb, and a few parked bicycles."""
    rng = sc.rng
    for kind in ["bicycle"] * rng.poisson(0.12) + ["motorcycle"] * rng.poisson(0.05):
        side = rng.choice((-1, 1))
        z = rng.uniform(sc.z_near * 1.2, 45)
        _cycle(sc, kind, side * (st.road - 0.8), z, rng.choice((-1, 1)), rider=True)
    for _ in range(rng.poisson(0.1)):
        side = rng.choice((-1, 1))
        z = rng.uniform(sc.z_near * 1.2, 30)
        _cycle(sc, "bicycle", side * (st.road + 0.6), z, rng.choice((-1, 1)), rider=False)


def _cycle(sc, kind, x, z, facing, rider):
    base, wheel, tyre, saddle, bar = CYCLES[kind]
    hit = sc.sprite(x, z, -1.1, 1.1, 0, 1.95)
    if hit is None:
        return
    win, lx, lh = hit
    lx = lx * facing
    r = 0.5 * sc.pixel(z)
    t = max(tyre, r)
    tyres = np.zeros(lx.shape, bool)
    for cx in (-base, base):
        d = np.sqrt((lx - cx) ** 2 + (lh - wheel) ** 2)
        tyres |= (d < wheel) & (d > wheel - 2 * t)
    rear, front, crank = (-base, wheel), (base, wheel), (0.0, 0.3)
    head = (bar[0] - 0.05, bar[1] - 0.15)
    w = max(0.03, r)
    if kind == "bicycle":  # a diamond frame
        frame = np.zeros(lx.shape, bool)
        for p, q in ((rear, crank), (crank, saddle), (saddle, head), (crank, head),
                     (rear, saddle), (head, front), (head, bar)):
            frame |= _segment(lx, lh, p, q, w)
    else:  # engine and tank between the wheels, a fork, hubs
        frame = ((((lx - 0.05) / 0.55) ** 2 + ((lh - 0.55) / 0.25) ** 2 < 1)
                 | _disc(lx, lh, 0.15, 0.8, max(0.16, r)) | _box(lx, lh, -0.55, 0.0, 0.72, 0.9)
                 | _segment(lx, lh, head, front, max(0.05, r)) | _segment(lx, lh, head, bar, w)
                 | _disc(lx, lh, -base, wheel, 0.12) | _disc(lx, lh, base, wheel, 0.12))
    sc.paint(win, frame | tyres, sc.add(ID[kind], kind), z, lx, lh,
             np.where(tyres & ~frame, DARK, BODY).astype(np.uint8))
    if rider:
        _rider(sc, win, lx, lh, z - 0.1, saddle, bar, r)


def _rider(sc, win, lx, lh, z, saddle, bar, r):
    """A seated rider, leaning forward to the handlebar (in front of the cycle)."""
    hip = (saddle[0], saddle[1] + 0.1)
    shoulder = (hip[0] + 0.25, hip[1] + 0.55)
    knee = (hip[0] + 0.4, hip[1] - 0.2)
    torso = _segment(lx, lh, hip, shoulder, max(0.16, r))
    head = _disc(lx, lh, shoulder[0] + 0.08, shoulder[1] + 0.22, max(0.11, r))
    arm = _segment(lx, lh, shoulder, bar, max(0.05, r))
    legs = _segment(lx, lh, hip, knee, max(0.08, r)) | _segment(lx, lh, knee, (0.05, 0.3), max(0.07, r))
    part = np.select([head, legs & ~torso], [SKIN, ALT], BODY).astype(np.uint8)
    sc.paint(win, torso | head | arm | legs, sc.add(ID["rider"], "rider"), z, lx, lh, part)


def _ensure_visible(sc, st, rare):
    """Add the image's rare class near the camera until it shows (a nearer object may hide it)."""
    rng = sc.rng
    for _ in range(4):
        if (sc.label == ID[rare]).any():
            return
        z = rng.uniform(sc.z_near + 2, 25)
        if rare in ("truck", "bus", "train"):
            _vehicle(sc, rare, rng.uniform(-st.road + 1.3, st.road - 1.3), z, side_view=False, facing=1)
        else:
            kind = rng.choice(("bicycle", "motorcycle")) if rare == "rider" else rare
            _cycle(sc, kind, rng.choice((-1, 1)) * (st.road - 0.8), z, rng.choice((-1, 1)), rider=True)


def _clutter(sc, st):
    """Unlabelled street furniture (bins, boxes): real label maps have a little of it."""
    rng = sc.rng
    for side in (-1, 1):
        if st.walk[side] > 0 and rng.random() < 0.35:
            z = rng.uniform(sc.z_near * 1.1, 40)
            x = side * (st.road + rng.uniform(0.3, st.walk[side]))
            half, height = rng.uniform(0.2, 0.4), rng.uniform(0.6, 1.2)
            hit = sc.sprite(x, z, -half, half, 0, height)
            if hit is not None:
                win, lx, lh = hit
                sc.paint(win, _box(lx, lh, -half, half, 0, height), sc.add(UNLABELED, "clutter"),
                         z, lx, lh)


def _ego_hood(sc):
    """The camera car's bonnet along the bottom edge, in front of everything."""
    depth = sc.h * sc.rng.uniform(0.04, 0.09)
    t = (sc.xs - sc.w / 2) / (sc.w / 2)
    mask = sc.ys > sc.h - depth * (1 - 0.6 * t * t)
    sc.paint((slice(None), slice(None)), mask, sc.add(EGO_VEHICLE, "ego"), 0.0,
             t, (sc.h - sc.ys) / depth)


# ----------------------------------------------------------------------------- rendering

@dataclass(frozen=True)
class Style:
    """How a scene looks. Keys of `colours`: class names, plus object kinds that differ
    from their class ("trunk", "trousers", "skin", "rail", "clutter", "ego")."""
    colours: dict
    jitter: tuple         # spread of an object's colour around its palette entry: (relative
                          # brightness std, per-channel RGB std; small, to keep the hue)
    sky: tuple            # (zenith, horizon) colours
    clouds: float         # cloud cover strength
    glass: tuple
    tyre: tuple
    marks: tuple          # road paint
    windows: tuple        # (dark pane, bright pane) colours of building windows
    fence: str            # "slats" or "mesh"
    grain: float          # fine per-pixel surface texture
    texture: float        # strength of class textures (asphalt, leaves, grass, facades)
    shade: float          # brightness of the facade side facing away from the sun
    gloss: float          # vertical lightness gradient on vehicles
    haze: float           # how much distance fades towards the horizon colour
    exposure: float       # per-image exposure spread (photos only; 0 = off)
    white_balance: float  # per-image spread of channel gains
    saturation: tuple     # per-image saturation factor range
    vignette: float       # light lost in the corners
    blur: tuple           # Gaussian blur sigma range (px), (0, 0) = sharp
    noise: tuple          # sensor noise sigma range (grey levels)


LAMPS = {"red": (255, 50, 40), "amber": (255, 180, 20), "green": (60, 255, 120), "white": (255, 250, 220)}
SKIN_TONES = ((224, 172, 140), (198, 134, 96), (141, 85, 56), (240, 200, 170))

GAME = Style(  # a game engine: clean saturated flat colours, sharp edges, no camera
    colours={
        "road": [(72, 72, 84), (64, 62, 76), (82, 80, 90)],
        "sidewalk": [(182, 172, 162), (196, 186, 172)],
        "building": [(200, 122, 84), (224, 202, 150), (116, 142, 200), (178, 84, 70), (160, 160, 172),
                     (234, 224, 200), (140, 184, 160)],
        "wall": [(200, 188, 150), (172, 164, 140)],
        "fence": [(156, 118, 80), (112, 122, 134)],
        "pole": [(124, 124, 130), (92, 98, 112)],
        "traffic light": [(40, 42, 36), (66, 76, 40)],
        "traffic sign": [(232, 40, 40), (40, 84, 224), (244, 222, 40), (242, 242, 242)],
        "vegetation": [(44, 152, 40), (62, 172, 52), (36, 132, 58)],
        "terrain": [(152, 180, 70), (174, 164, 92)],
        "sky": [(90, 160, 240)],
        "person": [(204, 40, 40), (40, 92, 204), (244, 204, 40), (40, 164, 84), (232, 232, 232),
                   (40, 40, 40)],
        "rider": [(204, 40, 40), (40, 92, 204), (244, 204, 40), (40, 40, 40)],
        "car": [(204, 30, 30), (30, 72, 194), (244, 204, 30), (236, 236, 236), (28, 28, 32), (40, 154, 62),
                (234, 122, 20)],
        "truck": [(222, 222, 222), (234, 122, 30), (60, 92, 164)],
        "bus": [(238, 182, 30), (60, 122, 204), (204, 40, 40)],
        "train": [(184, 30, 30), (60, 60, 204), (204, 204, 204)],
        "motorcycle": [(30, 30, 30), (204, 20, 20), (20, 60, 204)],
        "bicycle": [(40, 40, 184), (30, 30, 30), (204, 204, 40)],
        "trunk": [(110, 70, 30)], "trousers": [(40, 50, 120), (30, 30, 30), (120, 90, 60)],
        "skin": SKIN_TONES, "rail": [(120, 104, 90)], "clutter": [(60, 124, 60), (104, 104, 104)],
        "ego": [(30, 30, 40)],
    },
    jitter=(0.05, 3), sky=((56, 128, 236), (168, 208, 252)), clouds=0.0,
    glass=(96, 156, 208), tyre=(26, 26, 28), marks=(244, 244, 236),
    windows=((110, 166, 222), (186, 224, 250)), fence="slats",
    grain=0.015, texture=0.25, shade=0.8, gloss=0.1, haze=0.15,
    exposure=0.0, white_balance=0.0, saturation=(1.0, 1.0), vignette=0.0, blur=(0, 0), noise=(0, 0),
)

REAL = Style(  # a car camera: muted, hue-shifted colours, rich textures, lighting, optics, noise
    colours={
        "road": [(130, 124, 118), (118, 116, 114), (142, 134, 124)],
        "sidewalk": [(152, 146, 140), (136, 132, 134), (162, 152, 140)],
        "building": [(134, 126, 118), (152, 140, 126), (110, 112, 118), (164, 152, 140), (126, 106, 94),
                     (98, 98, 102)],
        "wall": [(142, 136, 128), (120, 118, 112)],
        "fence": [(112, 108, 100), (132, 124, 110)],
        "pole": [(98, 100, 106), (132, 132, 128)],
        "traffic light": [(32, 34, 32), (52, 52, 48)],
        "traffic sign": [(190, 64, 60), (62, 92, 170), (202, 190, 84), (202, 202, 196)],
        "vegetation": [(84, 102, 54), (72, 92, 50), (98, 110, 64)],
        "terrain": [(130, 128, 88), (142, 132, 100)],
        "sky": [(200, 206, 214)],
        "person": [(62, 62, 72), (112, 100, 90), (42, 46, 62), (152, 140, 130), (92, 42, 42)],
        "rider": [(62, 62, 72), (42, 46, 62), (112, 100, 90)],
        "car": [(172, 174, 178), (42, 42, 46), (212, 212, 214), (52, 62, 92), (112, 42, 42), (122, 122, 126)],
        "truck": [(192, 192, 188), (152, 112, 72)],
        "bus": [(202, 192, 152), (92, 112, 142)],
        "train": [(172, 172, 166), (192, 82, 72)],
        "motorcycle": [(42, 42, 46), (132, 42, 42)],
        "bicycle": [(62, 62, 72), (122, 122, 132)],
        "trunk": [(70, 58, 46)], "trousers": [(40, 44, 60), (30, 30, 32), (90, 80, 70)],
        "skin": SKIN_TONES, "rail": [(104, 96, 90)], "clutter": [(72, 82, 72), (96, 96, 96)],
        "ego": [(40, 42, 48)],
    },
    jitter=(0.1, 4), sky=((176, 190, 210), (214, 218, 222)), clouds=0.6,
    glass=(46, 52, 60), tyre=(30, 30, 30), marks=(204, 204, 194),
    windows=((38, 42, 50), (156, 162, 168)), fence="mesh",
    grain=0.05, texture=1.0, shade=0.7, gloss=0.25, haze=0.3,
    exposure=0.2, white_balance=0.035, saturation=(0.6, 0.9), vignette=0.35, blur=(0.4, 0.8),
    noise=(1.5, 3.5),
)

CLASS_NAME = {label: name for name, label in ID.items()}


def _object_colours(scene, style, rng):
    """Per-object colour tables: body, secondary (ALT), dark parts, skin, lamps."""
    n = len(scene.objects)
    body, alt, dark, skin, lamp = (np.zeros((n, 3), np.float32) for _ in range(5))

    def pick(key):
        options = style.colours[key]
        return np.array(options[rng.integers(len(options))], np.float32)

    for i, obj in enumerate(scene.objects):
        kind = obj["kind"]
        key = kind if kind in style.colours else CLASS_NAME.get(obj["label"], "clutter")
        body[i] = pick(key) * (1 + rng.normal(0, style.jitter[0])) + rng.normal(0, style.jitter[1], 3)
        if "colour_of" in obj:  # another face of an earlier object
            body[i] = body[obj["colour_of"]]
        alt[i] = pick("trousers") if kind in ("person", "rider") else body[i] * 0.8
        dark[i] = pick("trunk") if kind == "tree" else style.tyre
        skin[i] = pick("skin")
        lamp[i] = LAMPS[obj.get("lamp") or "white"]
    return body, alt, dark, skin, lamp


def _stripes(coord, period, duty, footprint):
    """1 on the first `duty` of each period of `coord`, else 0; fades to the mean (duty)
    where a period spans under ~4 pixels, so distant patterns do not alias."""
    on = (np.mod(coord, period) < duty * period).astype(np.float32)
    vis = np.clip(period / (footprint + 1e-6) / 2 - 1, 0, 1)
    return vis * on + (1 - vis) * duty


def _footprints(scene):
    """How far u moves per pixel across, and v per pixel down (for anti-aliasing)."""
    fu = np.abs(np.diff(scene.u, axis=1, append=scene.u[:, -1:]))
    fv = np.abs(np.diff(scene.v, axis=0, append=scene.v[-1:]))
    return np.minimum(fu, 50), np.minimum(fv, 50)


def render(scene, style, rng):
    """An (H, W, 3) uint8 picture of `scene` in `style`."""
    label, inst, part = scene.label, scene.inst, scene.part
    body, alt, dark, skin, lamp = _object_colours(scene, style, rng)
    img = body[inst]
    for code, table in ((ALT, alt), (DARK, dark), (SKIN, skin), (LAMP, lamp)):
        m = part == code
        img[m] = table[inst[m]]
    img[part == GLASS] = style.glass
    img[part == MARK] = style.marks
    fine = rng.standard_normal(label.shape, dtype=np.float32)
    mid = _fractal(rng, label.shape, (2, 4, 8))
    broad = _fractal(rng, label.shape, (10, 20))
    fu, fv = _footprints(scene)
    _sky_colour(img, scene, style, label == ID["sky"], broad, mid)
    _textures(img, scene, style, rng, label, fine, mid, broad, fu, fv)
    img *= _shading(scene, style, rng, label)[..., None]
    # distance fades towards the horizon colour (not the sky itself)
    z = np.where(label == ID["sky"], 0, np.minimum(scene.depth, 1e4))
    fade = (style.haze * z / (z + 150))[..., None]
    img = img * (1 - fade) + np.array(style.sky[1], np.float32) * fade
    return _camera(img, scene, style, rng)


def _sky_colour(img, scene, style, sky, broad, mid):
    zenith, horizon = (np.array(c, np.float32) for c in style.sky)
    t = np.clip(scene.v[sky] / 0.6, 0, 1)[:, None]  # v: elevation over the horizon
    colour = horizon + (zenith - horizon) * t
    if style.clouds:  # bright, soft-edged clouds where the broad noise is high
        cover = np.clip((broad[sky] + 0.3 * mid[sky]) * 3 * style.clouds + 0.1, 0, 1)[:, None]
        colour = colour * (1 - cover) + np.float32(236) * cover
    img[sky] = colour


def _textures(img, scene, style, rng, label, fine, mid, broad, fu, fv):
    """Class textures; in the REAL style (texture = 1) all are stronger than in GAME."""
    k = style.texture
    light = 1 + style.grain * np.where(label == ID["sky"], 0, fine)  # fine grain on surfaces
    light += np.select(
        [label == ID["road"], label == ID["vegetation"], label == ID["terrain"],
         label == ID["sidewalk"], label == ID["wall"], label == ID["building"]],
        [k * (0.08 * fine + 0.35 * broad),              # asphalt grain and patches
         k * (1.1 * mid + 0.3 * broad),                 # leaves: dark gaps, bright tips
         k * (0.6 * mid + 0.4 * broad),                 # grass and soil
         k * 0.2 * broad, k * 0.4 * broad, k * 0.25 * broad], 0)
    walk = label == ID["sidewalk"]  # paving slabs on the ground coordinates (u=x, v=z)
    joints = 2 - _stripes(scene.u[walk], 0.6, 0.9, fu[walk]) - _stripes(scene.v[walk], 0.6, 0.9, fv[walk])
    light[walk] *= 1 - 0.12 * joints * (0.5 + k * 0.5)
    img *= light[..., None]
    _fences(img, scene, style, label == ID["fence"], fu, fv)
    _windows(img, scene, style, rng, label == ID["building"], fu, fv)


def _fences(img, scene, style, fence, fu, fv):
    u, v, foot = scene.u[fence], scene.v[fence], fu[fence] + fv[fence]
    if style.fence == "slats":  # wooden slats with dark gaps
        gaps = 1 - _stripes(u, 0.25, 0.7, fu[fence])
    else:  # wire mesh: diagonal light wires over a darker see-through
        gaps = 1 - np.maximum(_stripes(u + v, 0.35, 0.2, foot), _stripes(u - v, 0.35, 0.2, foot))
    img[fence] *= (1 - 0.5 * gaps)[:, None]


def _windows(img, scene, style, rng, building, fu, fv):
    """A grid of windows on facades (u: along the wall, v: height), shop fronts below."""
    if not building.any():
        return
    u, v = scene.u[building], scene.v[building]
    pu, pv = rng.uniform(2.6, 4.0), rng.uniform(2.8, 3.4)
    upper = _stripes(u, pu, 0.55, fu[building]) * _stripes(v - 0.9, pv, 0.5, fv[building]) * (v > 3.5)
    shops = _stripes(u, 2 * pu, 0.8, fu[building]) * ((v > 0.4) & (v < 2.8))
    cover = np.maximum(upper, shops)[:, None]
    # each pane its own mix of dark glass and reflection, from a hash of its grid cell
    cell = (np.floor(u / pu).astype(np.int64) * 73856093) ^ (np.floor(v / pv).astype(np.int64) * 19349663) \
        ^ (scene.inst[building].astype(np.int64) * 83492791)
    mix = (np.mod(cell, 997) / 996.0).astype(np.float32)[:, None]
    dark, bright = (np.array(c, np.float32) for c in style.windows)
    pane = dark + (bright - dark) * mix
    img[building] = img[building] * (1 - cover) + pane * cover


def _shading(scene, style, rng, label):
    """Sun-lit and shaded facade sides, glossy vehicle bodies."""
    sunny = rng.choice((-1, 1))
    face = np.array([o["face"] for o in scene.objects], np.int8)[scene.inst]
    shade = np.where(face == 0, 0.9, np.where(face == sunny, 1.0, style.shade)).astype(np.float32)
    vehicle = np.isin(label, [ID[n] for n in ("car", "truck", "bus", "train")])
    gloss = 1 + style.gloss * (np.clip(scene.v / 1.5, 0, 1) - 0.5)
    return np.where(vehicle, gloss, shade).astype(np.float32)


def _camera(img, scene, style, rng):
    """Exposure, white balance, saturation, vignetting, blur, gamma and sensor noise."""
    h, w = img.shape[:2]
    grey = img.mean(axis=2, keepdims=True)
    img = grey + rng.uniform(*style.saturation) * (img - grey)
    if style.exposure:
        gain = rng.uniform(1 - style.exposure, 1 + style.exposure) \
            * (1 + rng.normal(0, style.white_balance, 3))
        nx, ny = (scene.xs - w / 2) / (w / 2), (scene.ys - h / 2) / (h / 2)
        across = 1 + rng.uniform(-0.15, 0.15) * nx  # uneven light across the frame
        falloff = 1 - style.vignette * (nx * nx + ny * ny) / 2
        img = img * (gain.astype(np.float32) * (across * falloff)[..., None])
    sigma = rng.uniform(*style.blur)
    if sigma > 0:
        img = _blur(img, sigma)
    if style.exposure:  # a camera response curve through a lookup table
        g = rng.uniform(0.85, 1.15)
        lut = np.array([255 * (i / 1023) ** g for i in range(1024)], np.float32)
        img = lut[np.clip(img * (1023 / 255), 0, 1023).astype(np.int64)]
    sd = rng.uniform(*style.noise)
    if sd > 0:
        img = img + sd * rng.standard_normal(img.shape, dtype=np.float32) \
            + (sd / 2) * rng.standard_normal(img.shape[:2], dtype=np.float32)[..., None]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ datasets

def _label_palette():
    """A 'P' palette colouring each Cityscapes labelId like its trainId (others black)."""
    palette = np.zeros((256, 3), np.uint8)
    palette[list(CITYSCAPES_LABEL_IDS)] = PALETTE
    return palette.ravel().tolist()


def _rare_class(index):
    if index % RARE_EVERY:
        return None
    return RARE[(index // RARE_EVERY) % len(RARE)]


def _paths(root, domain, index):
    """(image path, label path) of image `index` of `domain`."""
    if domain == "source":
        name = f"{index:05d}.png"
        return root / "gta5" / "images" / name, root / "gta5" / "labels" / name
    cities = CITIES[domain]
    city = cities[index % len(cities)]
    stem = f"{city}_{index // len(cities):06d}_{19:06d}"  # Cityscapes keeps frame 19 of each sequence
    cs = root / "cityscapes"
    return (cs / "leftImg8bit" / domain / city / f"{stem}_leftImg8bit.png",
            cs / "gtFine" / domain / city / f"{stem}_gtFine_labelIds.png")


def make_image(domain, index, seed=0):
    """The (RGB image, labelId map) of image `index` of `domain` ('source', 'train', 'val')."""
    seeds = np.random.SeedSequence([seed, DOMAINS.index(domain), index]).spawn(2)
    scene_rng, look_rng = (np.random.default_rng(s) for s in seeds)
    width, height = SOURCE_SIZE if domain == "source" else TARGET_SIZE
    scene = sample_scene(width, height, scene_rng, rare=_rare_class(index), ego_hood=domain != "source")
    return render(scene, GAME if domain == "source" else REAL, look_rng), scene.label


def _write(root, domain, index, seed):
    image, label = make_image(domain, index, seed)
    image_path, label_path = _paths(root, domain, index)
    for path in (image_path, label_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(image_path, compress_level=PNG_LEVEL)
    label_img = Image.fromarray(label)
    if domain == "source":  # GTA5 ships palette PNGs whose pixel values are the labelIds
        label_img.putpalette(_label_palette())
    label_img.save(label_path, compress_level=PNG_LEVEL)


def _check_counts(counts):
    merged = dict(DEFAULT_COUNTS)
    for key, value in (counts or {}).items():
        if key not in DEFAULT_COUNTS:
            raise ConfetiError(f"demo counts: unknown set '{key}', expected some of {sorted(DEFAULT_COUNTS)}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfetiError(f"demo counts: '{key}' must be a non-negative integer, got {value!r}")
        merged[key] = value
    return merged


def _marker(seed, counts):
    return {"version": GENERATOR_VERSION, "seed": seed, "counts": counts}


def _folder_size(root):
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def _clear(root):
    """Remove a previous demo from `root`; refuse to touch data the generator did not write."""
    ours = (root / MARKER).exists() or (root / OWNER).exists()
    folders = [root / "gta5", root / "cityscapes"]
    if not ours and any(f.exists() for f in folders):
        raise ConfetiError(f"{root} holds gta5/ or cityscapes/ data without the demo generator's "
                           f"{OWNER} or {MARKER} marker; refusing to overwrite it (choose another root)")
    (root / OWNER).write_text("written by confeti_fast.data.demo; regenerated at will\n")
    (root / MARKER).unlink(missing_ok=True)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _write_job(job):
    _write(*job)


def _run_jobs(jobs, workers, progress):
    """Write every image, in worker processes when there are enough images to pay for them
    (images are independent, so the files do not depend on the number of workers)."""
    from tqdm import tqdm

    if workers is None:
        workers = min(os.cpu_count() or 1, 4) if len(jobs) >= 64 else 1
    bar = tqdm(total=len(jobs), desc="demo data", unit="img", disable=not progress)
    with bar:
        if workers <= 1:
            for job in jobs:
                _write_job(job)
                bar.update()
            return
        # spawn, not fork: the caller may hold threads (e.g. torch's) that fork would copy badly
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_job, jobs, chunksize=4):
                bar.update()


def generate_demo(root=DEFAULT_ROOT, seed=0, counts=None, progress=True, workers=None):
    """Write the demo domain pair under `root` (replacing an earlier one) and return stats
    (root, seed, counts, images, seconds, bytes).

    `counts` overrides DEFAULT_COUNTS per set ('source', 'train', 'val'). The marker
    `root/.complete` is written last, so an interrupted run is detected and redone.
    `workers`: processes to render with (default: up to 4 CPUs for 64 images or more).
    """
    counts, root = _check_counts(counts), Path(root)
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    _clear(root)
    jobs = [(root, domain, i, seed) for domain in DOMAINS for i in range(counts[domain])]
    _run_jobs(jobs, workers, progress)
    (root / MARKER).write_text(json.dumps(_marker(seed, counts), sort_keys=True) + "\n")
    return {"root": str(root), "seed": seed, "counts": counts, "images": len(jobs),
            "seconds": time.perf_counter() - start, "bytes": _folder_size(root)}


def is_complete(root=DEFAULT_ROOT, seed=0, counts=None):
    """Whether `root` holds a finished demo of this generator version, seed and counts."""
    counts, root = _check_counts(counts), Path(root)
    try:
        if json.loads((root / MARKER).read_text()) != _marker(seed, counts):
            return False
    except (OSError, ValueError):
        return False
    found = {"source": [root / "gta5" / "images", root / "gta5" / "labels"],
             "train": [], "val": []}
    for split in ("train", "val"):
        found[split] = [root / "cityscapes" / "leftImg8bit" / split, root / "cityscapes" / "gtFine" / split]
    return all(len(list(folder.rglob("*.png"))) == counts[domain]
               for domain, folders in found.items() for folder in folders)


def ensure_demo(root=DEFAULT_ROOT, seed=0, counts=None, progress=True):
    """Generate the demo under `root` unless a complete one is there; returns `root`."""
    if not is_complete(root, seed, counts):
        generate_demo(root, seed, counts, progress)
    return Path(root)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m confeti_fast.data.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if complete")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.force and is_complete(args.root, args.seed):
        print(f"{args.root}: demo data complete, nothing to do (--force regenerates it)")
        return 0
    stats = generate_demo(args.root, args.seed, progress=not args.quiet)
    print(f"{stats['root']}: {stats['images']} images in {stats['seconds']:.1f} s, "
          f"{stats['bytes'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
