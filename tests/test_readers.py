"""Each reader on files written in the real layouts, with labels whose expected trainIds come
from the label table of docs/method.md §1, typed into helpers.py."""
import numpy as np
import pytest

from confeti_fast.data import datasets, io
from confeti_fast.errors import ConfetiError
from helpers import CITYSCAPES, SYNTHIA, make_cityscapes, make_gta5, make_synthia
from pngwriter import write_png


def _expected(ids, table):
    return np.vectorize(lambda v: table.get(int(v), 255))(ids).astype(np.uint8)


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
