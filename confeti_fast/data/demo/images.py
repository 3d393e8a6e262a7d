"""One (image, labelId map) pair from (seed, domain, index): each image has its own random
generators, so any image can be regenerated alone."""
import numpy as np

from .layout import sample_scene
from .rendering import render
from .styles import GAME, REAL

SOURCE_SIZE = (320, 180)  # (W, H): GTA5's 16:9 frames, scaled down
TARGET_SIZE = (320, 160)  # Cityscapes' 2:1 frames, scaled down
DOMAINS = ("source", "train", "val")  # the index of each is part of its images' seeds

# Every RARE_EVERY-th image of a set is given one rare class, in turn, so that a set of
# 60 images holds all of them; otherwise they are as rare as their sampling rates make them.
RARE = ("train", "motorcycle", "bicycle", "rider", "bus", "truck")
RARE_EVERY = 10


def _rare_class(index):
    if index % RARE_EVERY:
        return None
    return RARE[(index // RARE_EVERY) % len(RARE)]


def _scene_and_looks(domain, index, seed, looks):
    """The scene of image `index` of `domain` and one random generator per look. Children of a
    SeedSequence depend only on their position, so asking for a third look leaves the scene
    and the first look as they are."""
    seeds = np.random.SeedSequence([seed, DOMAINS.index(domain), index]).spawn(1 + looks)
    scene_rng, *look_rngs = (np.random.default_rng(s) for s in seeds)
    width, height = SOURCE_SIZE if domain == "source" else TARGET_SIZE
    scene = sample_scene(width, height, scene_rng, rare=_rare_class(index), ego_hood=domain != "source")
    return scene, look_rngs


def make_image(domain, index, seed=0):
    """The (RGB image, labelId map) of image `index` of `domain` ('source', 'train', 'val')."""
    scene, (look_rng,) = _scene_and_looks(domain, index, seed, looks=1)
    return render(scene, GAME if domain == "source" else REAL, look_rng), scene.label


def make_ideal_translation(index, seed=0):
    """Source image `index` and the same scene rendered in the target's look (the ideal
    translation G(x_s) would give: same layout, the target's colours, textures and camera, no
    ego hood since the scene has none), with its labelId map: (source, ideal, labels)."""
    scene, (game_rng, real_rng) = _scene_and_looks("source", index, seed, looks=2)
    return render(scene, GAME, game_rng), render(scene, REAL, real_rng), scene.label
