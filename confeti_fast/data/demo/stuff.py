"""Background "stuff" classes: sky, road, sidewalk, terrain, skyline, buildings, woods,
walls, fences, hedges, trees, and poles with their traffic signs and lights."""
import math

import numpy as np

from .scene import ALT, BODY, DARK, ID, LAMP, MARK, RAIL_TRACK, SKY_DEPTH
from .shapes import _disc


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
