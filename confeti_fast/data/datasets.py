"""Readers for the GTA5, Cityscapes and SYNTHIA layouts (docs/method.md §1).

A dataset is a list of (image, label) file pairs plus the id table of its kind; `load(i)`
returns the RGB image and its trainId label, checking that their sizes match. Every pair is
checked when a dataset is built (data/check: all bad pairs at once, then `bad_samples`
"error" refuses them and "skip" leaves them out); a file that fails to read later raises
`BadSampleError` naming it.
"""
from pathlib import Path

from ..errors import ConfetiError
from .check import READ_ERRORS, BadSampleError, check_datasets, read_failure
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
    """File pairs of one split. `bad_samples` is the data.bad_samples policy it was checked
    under; `left_out` the (path, reason) of the pairs the check left out under "skip"."""

    def __init__(self, kind, root, samples, split=None, bad_samples="error"):
        self.kind, self.root, self.samples, self.split = kind, Path(root), samples, split
        self.bad_samples, self.left_out = bad_samples, []
        if not samples:
            where = f"split '{split}' of " if split else ""
            raise ConfetiError(f"{where}{kind} data at {root} has no images; expected layout {LAYOUTS[kind]}")

    def __len__(self):
        return len(self.samples)

    @staticmethod
    def _read(reader, path, *args):
        # Any failure to read one file is a BadSampleError naming it, which the loader can
        # replace under data.bad_samples=skip (a file may turn bad after the start-up check).
        try:
            return reader(path, *args)
        except BadSampleError:
            raise
        except READ_ERRORS as err:
            raise BadSampleError(path, read_failure(err, path)) from None

    def load_image(self, index):
        return self._read(read_rgb, self.samples[index][0])

    def load_label(self, index):
        return self._read(read_train_ids, self.samples[index][1], self.kind)

    def load(self, index):
        """(image (H, W, 3) uint8 RGB, label (H, W) uint8 trainIds) of sample `index`."""
        image_path, label_path = self.samples[index]
        image, label = self.load_image(index), self.load_label(index)
        if image.shape[:2] != label.shape:
            raise BadSampleError(label_path, f"is {label.shape[1]}x{label.shape[0]} but its image {image_path} "
                                             f"is {image.shape[1]}x{image.shape[0]}")
        return image, label

    def name(self, index):
        return Path(self.samples[index][0]).name


def _checked(dataset, check=False, bad_samples="error", report=None, progress=True, quiet=False):
    """`dataset`, after the start-up check (data/check) under the `bad_samples` policy if
    `check`; `report` is the file listing the bad pairs (None: beside the data). The readers
    below check only when asked (the check writes its cache beside the data); `build_dataset`,
    what a run starts with, always does unless told check=False."""
    dataset.bad_samples = bad_samples
    if check:
        check_datasets([dataset], bad_samples, report, progress=progress, quiet=quiet)
    return dataset


def _paired_flat(kind, root, image_dir, label_dir, options):
    _require_dir(image_dir, kind)
    _require_dir(label_dir, kind)
    # A missing label stays in the list: the check reports every bad pair at once.
    samples = [(str(p), str(label_dir / p.name)) for p in sorted(image_dir.glob("*.png"))]
    return _checked(SegDataset(kind, root, samples), **options)


def gta5(root, **options):
    """`options`: those of `_checked` (check, bad_samples, report, progress, quiet)."""
    root = Path(root)
    return _paired_flat("gta5", root, root / "images", root / "labels", options)


def synthia(root, **options):
    root = Path(root)
    return _paired_flat("synthia", root, root / "RGB", root / "GT" / "LABELS", options)


def cityscapes(root, split, **options):
    root = Path(root)
    image_root, label_root = root / "leftImg8bit" / split, root / "gtFine" / split
    _require_dir(image_root, "cityscapes")
    _require_dir(label_root, "cityscapes")
    samples = []
    for image_path in sorted(image_root.glob("*/*_leftImg8bit.png")):
        stem = image_path.name[: -len("_leftImg8bit.png")]
        label_path = label_root / image_path.parent.name / f"{stem}_gtFine_labelIds.png"
        samples.append((str(image_path), str(label_path)))
    return _checked(SegDataset("cityscapes", root, samples, split), **options)


def build_dataset(side_cfg, split="train", **options):
    """The dataset a config's `source` or `target` section describes, for `split`, checked
    at start-up (`options`: check, bad_samples, report, progress, quiet; see `_checked`).

    GTA5 and SYNTHIA have one split: their whole folder is the training set. A section with
    `generate: "demo"` names the embedded demo pair, which is generated on first use into the
    folder above its root.
    """
    options.setdefault("check", True)
    kind, root = side_cfg["type"], side_cfg["root"]
    if side_cfg.get("generate") == "demo":
        from .demo import ensure_demo

        ensure_demo(Path(root).parent)
    if kind == "cityscapes":
        return cityscapes(root, split, **options)
    if split != "train":
        raise ConfetiError(f"{kind} has no '{split}' split: evaluation runs on the Cityscapes target")
    return gta5(root, **options) if kind == "gta5" else synthia(root, **options)
