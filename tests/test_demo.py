"""The procedural demo domain pair (confeti_fast.data.demo).

Expectations are stated independently of the generator: the files are read back with the
real dataset readers, and sizes, ids and statistics are checked against fixed numbers.
"""
import json
import re

import numpy as np
import pytest

from confeti_fast.data import demo
from confeti_fast.data.datasets import cityscapes, gta5
from confeti_fast.data.io import read_label_ids
from confeti_fast.errors import ConfetiError

SMALL = {"source": 6, "train": 4, "val": 4}
ROAD, SIDEWALK, VEGETATION, SKY = 0, 1, 8, 10
IGNORE = 255
RARE_TRAIN_IDS = (12, 14, 15, 16, 17, 18)  # rider, truck, bus, train, motorcycle, bicycle


def _files(root):
    """{relative path: bytes} of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load_all(dataset):
    return [dataset.load(i) for i in range(len(dataset))]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small") / "demo"
    stats = demo.generate_demo(root, seed=0, counts=SMALL, progress=False)
    return root, stats


@pytest.fixture(scope="module")
def sixty(tmp_path_factory):
    """60 source and 60 target val images: the size of the default val set."""
    root = tmp_path_factory.mktemp("sixty") / "demo"
    demo.generate_demo(root, seed=0, counts={"source": 60, "train": 0, "val": 60}, progress=False)
    return _load_all(gta5(root / "gta5")), _load_all(cityscapes(root / "cityscapes", "val"))


def test_default_counts():
    assert demo.DEFAULT_COUNTS == {"source": 300, "train": 200, "val": 60}


def test_layout_read_by_the_real_readers(small):
    root, stats = small
    source = gta5(root / "gta5")
    train, val = cityscapes(root / "cityscapes", "train"), cityscapes(root / "cityscapes", "val")
    assert (len(source), len(train), len(val)) == (6, 4, 4)
    for dataset, (height, width) in ((source, (180, 320)), (train, (160, 320)), (val, (160, 320))):
        for i in range(len(dataset)):
            image, label = dataset.load(i)
            assert image.shape == (height, width, 3) and image.dtype == np.uint8
            assert label.shape == (height, width)
            ids = np.unique(read_label_ids(dataset.samples[i][1]))
            assert set(ids.tolist()) <= set(range(34)), ids  # Cityscapes labelIds 0..33
            assert set(np.unique(label).tolist()) <= set(range(19)) | {IGNORE}

    # GTA5 labels are palette PNGs, Cityscapes labels 8-bit grey; both store the labelId
    from PIL import Image
    with Image.open(source.samples[0][1]) as img:
        assert img.mode == "P"
        palette = img.getpalette()
        assert palette[7 * 3:7 * 3 + 3] == [128, 64, 128]  # labelId 7 (road) in road's colour
    with Image.open(val.samples[0][1]) as img:
        assert img.mode == "L"

    assert [p.name for p in sorted((root / "gta5" / "images").iterdir())][:2] == ["00000.png", "00001.png"]
    pattern = re.compile(r"^([a-z]+)_(\d{6})_(\d{6})_leftImg8bit\.png$")
    cities = {}
    for split, dataset in (("train", train), ("val", val)):
        names = [re.match(pattern, dataset.name(i)) for i in range(len(dataset))]
        assert all(names), [dataset.name(i) for i in range(len(dataset))]
        cities[split] = {m.group(1) for m in names}
        for image_path, _ in dataset.samples:
            assert image_path.split("/")[-2] == re.match(pattern, image_path.split("/")[-1]).group(1)
    assert len(cities["train"]) >= 2 and len(cities["val"]) >= 2
    assert not cities["train"] & cities["val"]

    assert stats["images"] == 14
    assert stats["seconds"] > 0
    assert stats["bytes"] == sum(len(b) for b in _files(root).values())
    assert json.loads((root / ".complete").read_text())["counts"] == SMALL


def test_same_seed_is_byte_identical_and_other_seeds_differ(small, tmp_path):
    root, _ = small
    again = demo.generate_demo(tmp_path / "again", seed=0, counts=SMALL, progress=False, workers=2)
    assert _files(tmp_path / "again") == _files(root)  # in worker processes, too
    assert again["bytes"] == small[1]["bytes"]

    other = tmp_path / "other"
    demo.generate_demo(other, seed=1, counts=SMALL, progress=False)
    a, b = _files(root), _files(other)
    assert a.keys() == b.keys()
    images = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != b[k] for k in images) == len(images)


def test_each_image_is_independent_of_the_others(small, tmp_path):
    """Image i does not depend on how many images are generated."""
    root, _ = small
    fewer = tmp_path / "fewer"
    demo.generate_demo(fewer, seed=0, counts={"source": 2, "train": 1, "val": 1}, progress=False)
    reference = _files(root)
    for name, data in _files(fewer).items():
        if name.endswith(".png"):
            assert reference[name] == data, name


def test_street_layout(small):
    root, _ = small
    images = _load_all(gta5(root / "gta5")) + _load_all(cityscapes(root / "cityscapes", "train")) \
        + _load_all(cityscapes(root / "cityscapes", "val"))
    top = np.concatenate([label[: label.shape[0] // 10].ravel() for _, label in images])
    counts = np.bincount(top, minlength=256)
    assert counts.argmax() == SKY
    assert counts[SKY] / top.size > 0.35

    bottom = np.concatenate([label[-label.shape[0] // 10:].ravel() for _, label in images])
    bottom = bottom[bottom != IGNORE]  # the target's ego-vehicle bonnet
    assert np.isin(bottom, [ROAD, SIDEWALK]).mean() > 0.8

    # perspective: the road narrows upwards (summed over images: cars may hide some of it)
    def road_width(fraction):
        return sum((label[int(fraction * label.shape[0])] == ROAD).sum() for _, label in images)

    assert road_width(0.85) > 1.3 * road_width(0.65) > 0


def test_all_classes_appear_and_rare_classes_are_rare(sixty):
    source, val = sixty
    for images in (source, val):
        labels = np.stack([label for _, label in images])
        present = set(np.unique(labels).tolist()) - {IGNORE}
        assert present == set(range(19))
        pixels = np.bincount(labels.ravel(), minlength=256)[:19] / labels.size
        images_with = np.array([(labels == c).any(axis=(1, 2)).sum() for c in range(19)])
        for c in RARE_TRAIN_IDS:
            assert pixels[c] < 0.01, (c, pixels[c])
            assert images_with[c] <= len(images) // 2, (c, images_with[c])
        assert pixels[ROAD] > 0.2 and pixels[13] > 0.02  # road, car: common
    # the source is labelled almost everywhere ("only a little" unlabelled)
    source_labels = np.stack([label for _, label in source])
    assert (source_labels == IGNORE).mean() < 0.02


def _class_mean(images, train_id):
    pixels = np.concatenate([image[label == train_id] for image, label in images])
    return pixels.astype(float).mean(axis=0)


def _interior(label, train_id, r=2):
    """Pixels of a class whose whole (2r+1)^2 neighbourhood has that class."""
    m = label == train_id
    out = m.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out &= np.roll(np.roll(m, dy, 0), dx, 1)
    out[:r], out[-r:], out[:, :r], out[:, -r:] = False, False, False, False
    return out


def _flat_noise(image, label, train_id):
    """Mean |Laplacian| of the grey image inside a flat region (sensor noise shows here)."""
    g = image.astype(float).mean(axis=2)
    lap = np.abs(4 * g - np.roll(g, 1, 0) - np.roll(g, -1, 0) - np.roll(g, 1, 1) - np.roll(g, -1, 1))
    m = _interior(label, train_id)
    return lap[m].mean() if m.sum() > 50 else None


def _edge_sharpness(image, label):
    """Across horizontal label boundaries: the 1-pixel step over the 3-pixel step.
    About 1 for a sharp edge, lower for a blurred one."""
    g = image.astype(float).mean(axis=2)
    edge = label[:, 1:-2] != label[:, 2:-1]
    edge &= (label[:, :-3] == label[:, 1:-2]) & (label[:, 2:-1] == label[:, 3:])
    step1, step3 = np.abs(g[:, 2:-1] - g[:, 1:-2])[edge], np.abs(g[:, 3:] - g[:, :-3])[edge]
    strong = step3 > 20
    return step1[strong].sum() / step3[strong].sum()


def test_domain_gap(small):
    root, _ = small
    source = _load_all(gta5(root / "gta5"))
    target = [pair for split in ("train", "val")
              for pair in _load_all(cityscapes(root / "cityscapes", split))]
    for train_id in (ROAD, VEGETATION, SKY):
        gap = np.abs(_class_mean(source, train_id) - _class_mean(target, train_id)).max()
        assert gap > 25, (train_id, gap)

    # a colour-only classifier (nearest source class mean) fails on the target
    means = np.array([_class_mean(source, c) if any((label == c).any() for _, label in source) else [1e9] * 3
                      for c in range(19)])

    def colour_accuracy(images):
        pixels = np.concatenate([image[label != IGNORE] for image, label in images])[::5].astype(float)
        truth = np.concatenate([label[label != IGNORE] for _, label in images])[::5]
        guess = ((pixels[:, None, :] - means[None]) ** 2).sum(axis=2).argmin(axis=1)
        return (guess == truth).mean()

    assert colour_accuracy(source) > colour_accuracy(target) + 0.3

    # the target is noisier in flat regions and blurrier at edges
    src_noise = [n for image, label in source if (n := _flat_noise(image, label, SKY)) is not None]
    tgt_noise = [n for image, label in target if (n := _flat_noise(image, label, SKY)) is not None]
    assert src_noise and tgt_noise
    assert np.mean(tgt_noise) > 2 * np.mean(src_noise) + 1
    src_sharp = np.mean([_edge_sharpness(image, label) for image, label in source])
    tgt_sharp = np.mean([_edge_sharpness(image, label) for image, label in target])
    assert src_sharp > 0.9 and tgt_sharp < src_sharp - 0.15

    # blur and noise touch only the images: labels hold valid ids only, nothing interpolated
    for _, label in source + target:
        assert set(np.unique(label).tolist()) <= set(range(19)) | {IGNORE}


TINY = {"source": 2, "train": 1, "val": 1}


def test_ensure_demo_generates_only_when_missing_or_incomplete(tmp_path):
    root = tmp_path / "demo"
    assert demo.ensure_demo(root, counts=TINY, progress=False) == root
    assert (root / ".complete").is_file()
    assert len(gta5(root / "gta5")) == 2

    sentinel = root / "gta5" / "sentinel.txt"  # disappears whenever the data is regenerated
    sentinel.write_text("x")
    demo.ensure_demo(root, counts=TINY, progress=False)
    assert sentinel.exists()

    (root / ".complete").unlink()  # as after an interrupted generation
    demo.ensure_demo(root, counts=TINY, progress=False)
    assert not sentinel.exists() and (root / ".complete").is_file()

    sentinel.write_text("x")
    next((root / "cityscapes" / "gtFine" / "val").rglob("*.png")).unlink()  # a missing file
    demo.ensure_demo(root, counts=TINY, progress=False)
    assert not sentinel.exists()
    assert len(cityscapes(root / "cityscapes", "val")) == 1

    sentinel.write_text("x")
    demo.ensure_demo(root, counts={"source": 3, "train": 1, "val": 1}, progress=False)  # other counts
    assert not sentinel.exists() and len(gta5(root / "gta5")) == 3


def test_interrupted_generation_is_redone(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    real_write, calls = demo.files._write, []  # patched where generate_demo looks it up

    def failing_write(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(*args)

    monkeypatch.setattr(demo.files, "_write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        demo.generate_demo(root, counts=TINY, progress=False, workers=1)
    assert not (root / ".complete").exists()
    monkeypatch.setattr(demo.files, "_write", real_write)

    demo.ensure_demo(root, counts=TINY, progress=False)
    assert (root / ".complete").is_file()
    assert len(gta5(root / "gta5")) == 2 and len(cityscapes(root / "cityscapes", "val")) == 1


def test_refuses_to_overwrite_foreign_data_and_bad_counts(tmp_path):
    root = tmp_path / "data"
    (root / "gta5" / "images").mkdir(parents=True)
    (root / "gta5" / "images" / "real.png").write_bytes(b"not ours")
    with pytest.raises(ConfetiError, match="refusing"):
        demo.generate_demo(root, counts=TINY, progress=False)
    assert (root / "gta5" / "images" / "real.png").exists()
    with pytest.raises(ConfetiError, match="unknown set"):
        demo.generate_demo(tmp_path / "x", counts={"target": 3}, progress=False)
    with pytest.raises(ConfetiError, match="non-negative"):
        demo.generate_demo(tmp_path / "x", counts={"source": -1}, progress=False)


def test_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo.files, "DEFAULT_COUNTS", dict(TINY))
    root = tmp_path / "demo"
    assert demo.main(["--root", str(root), "--quiet"]) == 0
    assert "4 images" in capsys.readouterr().out
    assert demo.main(["--root", str(root), "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    sentinel = root / "gta5" / "sentinel.txt"
    sentinel.write_text("x")
    assert demo.main(["--root", str(root), "--quiet", "--force"]) == 0
    assert not sentinel.exists()


def test_ideal_translation_is_the_same_scene_in_the_target_look():
    index = demo.held_out_sources(2)[1]
    assert index == demo.DEFAULT_COUNTS["source"] + 1  # after every source image a run trains on
    source, ideal, labels = demo.make_ideal_translation(index)
    image, image_labels = demo.make_image("source", index)
    assert np.array_equal(source, image) and np.array_equal(labels, image_labels)  # x_s as the runs' files
    assert ideal.shape == source.shape and not np.array_equal(ideal, source)
    # the target's look: per class, the mean colour is nearer the target images' than the source's is
    # (classes whose palettes differ between the looks; objects such as cars draw from both palettes)
    targets = [demo.make_image("train", i) for i in range(8)]
    for index in demo.held_out_sources(4):
        source, ideal, labels = demo.make_ideal_translation(index)
        for label_id in (11, 21, 23):  # building, vegetation, sky
            target_mean = np.concatenate([image[ids == label_id] for image, ids in targets]).mean(0)
            ideal_mean, source_mean = ideal[labels == label_id].mean(0), source[labels == label_id].mean(0)
            assert np.abs(ideal_mean - target_mean).sum() < np.abs(source_mean - target_mean).sum(), label_id
    # the scene has no ego hood: it is the source scene
    assert not (labels == demo.EGO_VEHICLE).any()
