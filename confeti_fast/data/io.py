"""Reading images and label maps, with errors that name the file."""
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ConfetiError
from .labels import cityscapes_to_train_ids, synthia_to_train_ids

_PIL_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise ConfetiError(f"file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except _PIL_ERRORS as err:
        raise ConfetiError(f"cannot read image {path} (corrupt or not an image): {err}") from None


def read_rgb(path):
    """An RGB image as an (H, W, 3) uint8 array."""
    return np.array(_open(path).convert("RGB"))


def read_label_ids(path):
    """An 8-bit label map (grey or palette PNG: the pixel value is the class id) as (H, W) uint8."""
    img = _open(path)
    if img.mode not in ("L", "P"):
        raise ConfetiError(f"label {path} must be an 8-bit grey or palette PNG, found mode {img.mode}")
    return np.array(img)


def read_synthia_ids(path):
    """The class ids of a SYNTHIA 16-bit multi-channel label PNG as (H, W) uint16.

    Pillow truncates 16-bit colour PNGs to their high byte, so OpenCV reads these. The class
    id is the first channel as stored in the file; OpenCV returns channels reversed (BGR[A]),
    so that is its index 2 for three or four channels.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise ConfetiError(f"file not found: {path}")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ConfetiError(f"cannot read SYNTHIA label {path} (corrupt or not a PNG)")
    if raw.ndim == 2:
        return raw
    if raw.shape[2] not in (3, 4):
        raise ConfetiError(f"SYNTHIA label {path} has {raw.shape[2]} channels, expected 3 or 4")
    return np.ascontiguousarray(raw[:, :, 2])


def read_train_ids(path, kind):
    """Read a label file of dataset `kind` ('gta5', 'cityscapes', 'synthia') as trainIds."""
    if kind == "synthia":
        return synthia_to_train_ids(read_synthia_ids(path))
    return cityscapes_to_train_ids(read_label_ids(path))
