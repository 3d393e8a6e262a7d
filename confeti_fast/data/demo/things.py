"""Countable "things": vehicles, pedestrians, cyclists and their riders; plus unlabelled
street clutter and the camera car's bonnet."""
import numpy as np

from .scene import ALT, BODY, DARK, EGO_VEHICLE, GLASS, ID, LAMP, SKIN, UNLABELED
from .shapes import _box, _disc, _segment

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
