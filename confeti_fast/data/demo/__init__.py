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

Modules, in the order an image is made: noise and shapes (pixel helpers), scene (the z-buffer,
label ids, part codes), stuff and things (what is painted), layout (the street and the order
of sampling), styles and rendering (the looks), images (one image pair from its seed), files
(the folders on disk, markers, generate/ensure), cli (the command line).
"""
# The names this package has always exported, wherever they now live. Tests that monkeypatch the
# generator (e.g. _write, DEFAULT_COUNTS) patch them in files.py, where they are looked up.
from .cli import main
from .files import (CITIES, DEFAULT_COUNTS, DEFAULT_ROOT, GENERATOR_VERSION, MARKER, OWNER, PNG_LEVEL,
                    ensure_demo, generate_demo, held_out_sources, is_complete)
from .images import DOMAINS, RARE, RARE_EVERY, SOURCE_SIZE, TARGET_SIZE, make_ideal_translation, make_image
from .layout import Street, sample_scene
from .rendering import CLASS_NAME, render
from .scene import ALT, BODY, DARK, EGO_VEHICLE, GLASS, ID, LAMP, MARK, RAIL_TRACK, SKIN, SKY_DEPTH, UNLABELED, Scene
from .styles import GAME, LAMPS, REAL, SKIN_TONES, Style
from .things import CYCLES, VEHICLES

__all__ = [
    "ALT", "BODY", "CITIES", "CLASS_NAME", "CYCLES", "DARK", "DEFAULT_COUNTS", "DEFAULT_ROOT", "DOMAINS",
    "EGO_VEHICLE", "GAME", "GENERATOR_VERSION", "GLASS", "ID", "LAMP", "LAMPS", "MARK", "MARKER", "OWNER",
    "PNG_LEVEL", "RAIL_TRACK", "RARE", "RARE_EVERY", "REAL", "SKIN", "SKIN_TONES", "SKY_DEPTH", "SOURCE_SIZE",
    "Scene", "Street", "Style", "TARGET_SIZE", "UNLABELED", "VEHICLES", "ensure_demo", "generate_demo",
    "held_out_sources", "is_complete", "main", "make_ideal_translation", "make_image", "render", "sample_scene",
]
