"""Writing the demo pair to disk in the GTA5 and Cityscapes layouts, and the markers that say
whether a folder holds a complete demo of this generator version, seed and counts."""
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ...errors import ConfetiError
from ..labels import CITYSCAPES_LABEL_IDS, PALETTE
from .images import DOMAINS, make_image

GENERATOR_VERSION = 1
DEFAULT_COUNTS = {"source": 300, "train": 200, "val": 60}
DEFAULT_ROOT = "data/demo"
CITIES = {"train": ("aldenport", "brimholt", "corvale"), "val": ("dunmere", "eastwick")}
# `.complete` (version, seed, counts) is written last; `.demo` marks a folder as ours to replace
MARKER, OWNER = ".complete", ".demo"
PNG_LEVEL = 6


def held_out_sources(count):
    """The indices of `count` demo source images after the ones written to disk: scenes no run
    trains on, for judging the style transfer."""
    first = DEFAULT_COUNTS["source"]
    return range(first, first + count)


def _label_palette():
    """A 'P' palette colouring each Cityscapes labelId like its trainId (others black)."""
    palette = np.zeros((256, 3), np.uint8)
    palette[list(CITYSCAPES_LABEL_IDS)] = PALETTE
    return palette.ravel().tolist()


def _paths(root, domain, index):
    """(image path, label path) of image `index` of `domain`."""
    if domain == "source":
        name = f"{index:05d}.png"
        return root / "gta5" / "images" / name, root / "gta5" / "labels" / name
    cities = CITIES[domain]
    city = cities[index % len(cities)]
    stem = f"{city}_{index // len(cities):06d}_{19:06d}"  # Cityscapes keeps frame 19 of each sequence
    cs = root / "cityscapes"
    return (cs / "leftImg8bit" / domain / city / f"{stem}_leftImg8bit.png",
            cs / "gtFine" / domain / city / f"{stem}_gtFine_labelIds.png")


def _write(root, domain, index, seed):
    image, label = make_image(domain, index, seed)
    image_path, label_path = _paths(root, domain, index)
    for path in (image_path, label_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(image_path, compress_level=PNG_LEVEL)
    label_img = Image.fromarray(label)
    if domain == "source":  # GTA5 ships palette PNGs whose pixel values are the labelIds
        label_img.putpalette(_label_palette())
    label_img.save(label_path, compress_level=PNG_LEVEL)


def _check_counts(counts):
    merged = dict(DEFAULT_COUNTS)
    for key, value in (counts or {}).items():
        if key not in DEFAULT_COUNTS:
            raise ConfetiError(f"demo counts: unknown set '{key}', expected some of {sorted(DEFAULT_COUNTS)}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfetiError(f"demo counts: '{key}' must be a non-negative integer, got {value!r}")
        merged[key] = value
    return merged


def _marker(seed, counts):
    return {"version": GENERATOR_VERSION, "seed": seed, "counts": counts}


def _folder_size(root):
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def _clear(root):
    """Remove a previous demo from `root`; refuse to touch data the generator did not write."""
    ours = (root / MARKER).exists() or (root / OWNER).exists()
    folders = [root / "gta5", root / "cityscapes"]
    if not ours and any(f.exists() for f in folders):
        raise ConfetiError(f"{root} holds gta5/ or cityscapes/ data without the demo generator's "
                           f"{OWNER} or {MARKER} marker; refusing to overwrite it (choose another root)")
    (root / OWNER).write_text("written by confeti_fast.data.demo; regenerated at will\n")
    (root / MARKER).unlink(missing_ok=True)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _write_job(job):
    _write(*job)


def _run_jobs(jobs, workers, progress):
    """Write every image, in worker processes when there are enough images to pay for them
    (images are independent, so the files do not depend on the number of workers)."""
    from tqdm import tqdm

    if workers is None:
        workers = min(os.cpu_count() or 1, 4) if len(jobs) >= 64 else 1
    bar = tqdm(total=len(jobs), desc="demo data", unit="img", disable=not progress)
    with bar:
        if workers <= 1:
            for job in jobs:
                _write_job(job)
                bar.update()
            return
        # spawn, not fork: the caller may hold threads (e.g. torch's) that fork would copy badly
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_job, jobs, chunksize=4):
                bar.update()


def generate_demo(root=DEFAULT_ROOT, seed=0, counts=None, progress=True, workers=None):
    """Write the demo domain pair under `root` (replacing an earlier one) and return stats
    (root, seed, counts, images, seconds, bytes).

    `counts` overrides DEFAULT_COUNTS per set ('source', 'train', 'val'). The marker
    `root/.complete` is written last, so an interrupted run is detected and redone.
    `workers`: processes to render with (default: up to 4 CPUs for 64 images or more).
    """
    counts, root = _check_counts(counts), Path(root)
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    _clear(root)
    jobs = [(root, domain, i, seed) for domain in DOMAINS for i in range(counts[domain])]
    _run_jobs(jobs, workers, progress)
    (root / MARKER).write_text(json.dumps(_marker(seed, counts), sort_keys=True) + "\n")
    return {"root": str(root), "seed": seed, "counts": counts, "images": len(jobs),
            "seconds": time.perf_counter() - start, "bytes": _folder_size(root)}


def is_complete(root=DEFAULT_ROOT, seed=0, counts=None):
    """Whether `root` holds a finished demo of this generator version, seed and counts."""
    counts, root = _check_counts(counts), Path(root)
    try:
        if json.loads((root / MARKER).read_text()) != _marker(seed, counts):
            return False
    except (OSError, ValueError):
        return False
    found = {"source": [root / "gta5" / "images", root / "gta5" / "labels"],
             "train": [], "val": []}
    for split in ("train", "val"):
        found[split] = [root / "cityscapes" / "leftImg8bit" / split, root / "cityscapes" / "gtFine" / split]
    return all(len(list(folder.rglob("*.png"))) == counts[domain]
               for domain, folders in found.items() for folder in folders)


def ensure_demo(root=DEFAULT_ROOT, seed=0, counts=None, progress=True):
    """Generate the demo under `root` unless a complete one is there; returns `root`."""
    if not is_complete(root, seed, counts):
        generate_demo(root, seed, counts, progress)
    return Path(root)
