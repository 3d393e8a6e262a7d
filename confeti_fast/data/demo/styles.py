"""The two looks a scene is rendered in: GAME (the source) and REAL (the target). They differ
only in appearance, never in labels."""
from dataclasses import dataclass


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
