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


def make_image(domain, index, seed=0):
    """The (RGB image, labelId map) of image `index` of `domain` ('source', 'train', 'val')."""
    seeds = np.random.SeedSequence([seed, DOMAINS.index(domain), index]).spawn(2)
    scene_rng, look_rng = (np.random.default_rng(s) for s in seeds)
    width, height = SOURCE_SIZE if domain == "source" else TARGET_SIZE
    scene = sample_scene(width, height, scene_rng, rare=_rare_class(index), ego_hood=domain != "source")
    return render(scene, GAME if domain == "source" else REAL, look_rng), scene.label
