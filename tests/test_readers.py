"""Each reader on files written in the real layouts, with labels whose expected trainIds come
from the SPEC table typed into test_labels."""
import numpy as np
import pytest
from PIL import Image

from confeti_fast.data import datasets, io
from confeti_fast.errors import ConfetiError
from pngwriter import write_png
from test_labels import CITYSCAPES, SYNTHIA


def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _expected(ids, table):
    return np.vectorize(lambda v: table.get(int(v), 255))(ids).astype(np.uint8)


def make_gta5(root, n=2, h=6, w=8):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    ids = []
    for i in range(n):
        Image.fromarray(_rgb(h, w, i)).save(root / "images" / f"{i:05d}.png")
        label = np.random.default_rng(10 + i).choice([0, 7, 8, 13, 26, 33, 34], (h, w)).astype(np.uint8)
        # Real GTA5 labels are palette PNGs: the palette index is the class id.
        img = Image.fromarray(label, mode="P")
        img.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
        img.save(root / "labels" / f"{i:05d}.png")
        ids.append(label)
    return ids


def make_cityscapes(root, split, cities=("aachen", "bonn"), per_city=2, h=6, w=8):
    ids = {}
    for c, city in enumerate(cities):
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        for k in range(per_city):
            stem = f"{city}_{k:06d}_000019"
            Image.fromarray(_rgb(h, w, 100 * c + k)).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            label = np.random.default_rng(c * 10 + k).choice([1, 7, 11, 23, 24, 31, 255], (h, w)).astype(np.uint8)
            write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label)
            ids[stem] = label
    return ids


def make_synthia(root, n=2, h=6, w=8, channels=3):
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    ids = []
    for i in range(n):
        Image.fromarray(_rgb(h, w, i)).save(root / "RGB" / f"{i:07d}.png")
        rng = np.random.default_rng(i)
        class_ids = rng.choice([0, 1, 2, 3, 8, 12, 13, 21, 22, 300, 1003], (h, w)).astype(np.uint16)
        # Second (and alpha) channels carry instance ids, which must not leak into the class.
        label = np.stack([class_ids] + [rng.integers(0, 65535, (h, w), dtype=np.uint16)
                                         for _ in range(channels - 1)], -1)
        write_png(root / "GT" / "LABELS" / f"{i:07d}.png", label, bit_depth=16)
        ids.append(class_ids)
    return ids


def test_gta5_reader(tmp_path):
    ids = make_gta5(tmp_path / "gta5")
    ds = datasets.gta5(tmp_path / "gta5")
    assert len(ds) == 2
    image, label = ds.load(1)
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(label, _expected(ids[1], CITYSCAPES))


def test_cityscapes_reader_pairs_by_city_and_stem(tmp_path):
    ids = make_cityscapes(tmp_path / "cs", "val")
    ds = datasets.cityscapes(tmp_path / "cs", "val")
    assert len(ds) == 4
    for i, (image_path, label_path) in enumerate(ds.samples):
        stem = image_path.split("/")[-1][: -len("_leftImg8bit.png")]
        assert label_path.endswith(f"{stem}_gtFine_labelIds.png")
        np.testing.assert_array_equal(ds.load(i)[1], _expected(ids[stem], CITYSCAPES))


@pytest.mark.parametrize("channels", [3, 4])
def test_synthia_16bit_multichannel_label(tmp_path, channels):
    ids = make_synthia(tmp_path / "synthia", channels=channels)
    np.testing.assert_array_equal(io.read_synthia_ids(tmp_path / "synthia" / "GT" / "LABELS" / "0000001.png"), ids[1])
    ds = datasets.synthia(tmp_path / "synthia")
    np.testing.assert_array_equal(ds.load(0)[1], _expected(ids[0], SYNTHIA))


def test_synthia_label_values_above_255_are_not_truncated(tmp_path):
    path = tmp_path / "l.png"
    write_png(path, np.full((2, 2, 3), 256 + 3, dtype=np.uint16), bit_depth=16)
    assert (io.read_synthia_ids(path) == 259).all()  # would be 1 or 3 if read as 8-bit


def test_build_dataset_dispatch(tmp_path):
    make_cityscapes(tmp_path / "cs", "train")
    ds = datasets.build_dataset({"type": "cityscapes", "root": str(tmp_path / "cs")}, "train")
    assert ds.kind == "cityscapes" and len(ds) == 4
    make_gta5(tmp_path / "g")
    with pytest.raises(ConfetiError, match="gta5 has no 'val' split"):
        datasets.build_dataset({"type": "gta5", "root": str(tmp_path / "g")}, "val")
