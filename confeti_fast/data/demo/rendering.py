"""Rendering a Scene in a Style: object colours, class textures, shading, haze and the camera
(exposure, blur, response curve, sensor noise)."""
import numpy as np

from .noise import _blur, _fractal
from .scene import ALT, DARK, GLASS, ID, LAMP, MARK, SKIN
from .styles import LAMPS

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
