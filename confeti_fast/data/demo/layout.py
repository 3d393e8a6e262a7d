"""The street's layout (road, sidewalk and verge widths) and the order in which a scene's
stuff and things are sampled (the order fixes the random stream, hence the images)."""
from dataclasses import dataclass

from .scene import Scene
from .stuff import _ground, _roadside, _sky, _skyline
from .things import _clutter, _cyclists, _ego_hood, _ensure_visible, _pedestrians, _traffic, _vehicle


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
