"""What an evaluation writes: prediction pictures and the PNGs the Cityscapes scripts read."""
from pathlib import Path

import numpy as np

from ..data.labels import colorize
from ..errors import ConfetiError
from ..errors import writing


def overlay_image(image, pred):
    """The prediction in the Cityscapes palette blended half and half over the image."""
    return (0.5 * image.astype(np.float32) + 0.5 * colorize(pred).astype(np.float32)).round().astype(np.uint8)


def _output_name(dataset, index):
    """(sub folder, file name) of sample `index`: Cityscapes keeps its city folders and the
    image's name (`<city>_<seq>_<frame>_leftImg8bit.png`)."""
    image_path = Path(dataset.samples[index][0])
    name = image_path.stem + ".png"
    sub = image_path.parent.name if getattr(dataset, "kind", None) == "cityscapes" else ""
    return sub, name


def write_png(array, path):
    """Save a uint8 (H, W) array as an 8-bit grey ('L') PNG, or (H, W, 3) as RGB."""
    from PIL import Image

    array = np.ascontiguousarray(array, dtype=np.uint8)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)


def show_image(image, pred, label):
    """Side by side: the image, the prediction blended over it, the coloured ground truth."""
    return np.concatenate([image, overlay_image(image, pred), colorize(label)], axis=1)


def _is_within(path, folder):
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _check_output_dirs(show_dir, label_id_dir, train_id_dir):
    """The official evaluator matches `<city>_<seq>_<frame>*.png` anywhere under its results
    folder, so nothing else may be written inside the labelId folder."""
    if label_id_dir is None:
        return
    label_id_dir = Path(label_id_dir)
    for other, flag in ((show_dir, "--show-dir"), (train_id_dir, "--train-id-dir")):
        if other is not None and (_is_within(Path(other), label_id_dir) or _is_within(label_id_dir, Path(other))):
            raise ConfetiError(
                f"{flag} {other} and --label-id-dir {label_id_dir} must be separate folders: the "
                f"Cityscapes evaluator would find two predictions per image")
