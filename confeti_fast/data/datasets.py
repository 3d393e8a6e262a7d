"""Readers for the GTA5, Cityscapes and SYNTHIA layouts (docs/method.md §1).

A dataset is a list of (image, label) file pairs plus the id table of its kind; `load(i)`
returns the RGB image and its trainId label, checking that their sizes match.
"""
from pathlib import Path

from ..errors import ConfetiError
from .io import read_rgb, read_train_ids

LAYOUTS = {
    "gta5": "<root>/images/*.png with <root>/labels/*.png of the same name",
    "synthia": "<root>/RGB/*.png with <root>/GT/LABELS/*.png of the same name (16-bit)",
    "cityscapes": "<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png with "
                  "<root>/gtFine/<split>/<city>/*_gtFine_labelIds.png",
}


def _require_dir(path, kind):
    if not path.is_dir():
        raise ConfetiError(f"{kind} data folder {path} not found; expected layout {LAYOUTS[kind]}")


class SegDataset:
    """File pairs of one split. `labels` is False for target training data read without labels."""

    def __init__(self, kind, root, samples, split=None):
        self.kind, self.root, self.samples, self.split = kind, Path(root), samples, split
        if not samples:
            where = f"split '{split}' of " if split else ""
            raise ConfetiError(f"{where}{kind} data at {root} has no images; expected layout {LAYOUTS[kind]}")

    def __len__(self):
        return len(self.samples)

    def load_image(self, index):
        return read_rgb(self.samples[index][0])

    def load_label(self, index):
        return read_train_ids(self.samples[index][1], self.kind)

    def load(self, index):
        """(image (H, W, 3) uint8 RGB, label (H, W) uint8 trainIds) of sample `index`."""
        image_path, label_path = self.samples[index]
        image, label = self.load_image(index), self.load_label(index)
        if image.shape[:2] != label.shape:
            raise ConfetiError(
                f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label {label_path} "
                f"is {label.shape[1]}x{label.shape[0]}"
            )
        return image, label

    def name(self, index):
        return Path(self.samples[index][0]).name


def _paired_flat(kind, root, image_dir, label_dir):
    _require_dir(image_dir, kind)
    _require_dir(label_dir, kind)
    samples = []
    for image_path in sorted(image_dir.glob("*.png")):
        label_path = label_dir / image_path.name
        if not label_path.is_file():
            raise ConfetiError(f"image {image_path} has no label: {label_path} not found")
        samples.append((str(image_path), str(label_path)))
    return SegDataset(kind, root, samples)


def gta5(root):
    root = Path(root)
    return _paired_flat("gta5", root, root / "images", root / "labels")


def synthia(root):
    root = Path(root)
    return _paired_flat("synthia", root, root / "RGB", root / "GT" / "LABELS")


def cityscapes(root, split):
    root = Path(root)
    image_root, label_root = root / "leftImg8bit" / split, root / "gtFine" / split
    _require_dir(image_root, "cityscapes")
    _require_dir(label_root, "cityscapes")
    samples = []
    for image_path in sorted(image_root.glob("*/*_leftImg8bit.png")):
        stem = image_path.name[: -len("_leftImg8bit.png")]
        label_path = label_root / image_path.parent.name / f"{stem}_gtFine_labelIds.png"
        if not label_path.is_file():
            raise ConfetiError(f"image {image_path} has no label: {label_path} not found")
        samples.append((str(image_path), str(label_path)))
    return SegDataset("cityscapes", root, samples, split)


def build_dataset(side_cfg, split="train"):
    """The dataset a config's `source` or `target` section describes, for `split`.

    GTA5 and SYNTHIA have one split: their whole folder is the training set. A section with
    `generate: "demo"` names the embedded demo pair, which is generated on first use into the
    folder above its root.
    """
    kind, root = side_cfg["type"], side_cfg["root"]
    if side_cfg.get("generate") == "demo":
        from .demo import ensure_demo

        ensure_demo(Path(root).parent)
    if kind == "cityscapes":
        return cityscapes(root, split)
    if split != "train":
        raise ConfetiError(f"{kind} has no '{split}' split: evaluation runs on the Cityscapes target")
    return gta5(root) if kind == "gta5" else synthia(root)
