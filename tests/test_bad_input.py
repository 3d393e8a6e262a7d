"""Every bad input is a one-line ConfetiError that names the file or folder at fault."""
import numpy as np
import pytest
from PIL import Image

from confeti_fast.data import datasets, io
from confeti_fast.errors import ConfetiError
from helpers import make_cityscapes, make_gta5, make_synthia
from pngwriter import write_png


def _one_line_error(fn, *names):
    with pytest.raises(ConfetiError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, (name, message)
    return message


@pytest.mark.parametrize("kind, reader, layout", [
    ("gta5", lambda r: datasets.gta5(r), "images/*.png"),
    ("synthia", lambda r: datasets.synthia(r), "GT/LABELS"),
    ("cityscapes", lambda r: datasets.cityscapes(r, "val"), "leftImg8bit/<split>/<city>"),
])
def test_missing_data_folder_names_folder_and_layout(tmp_path, kind, reader, layout):
    message = _one_line_error(lambda: reader(tmp_path / "nowhere"), tmp_path / "nowhere")
    assert layout in message and kind in message


def test_empty_split(tmp_path):
    make_cityscapes(tmp_path, "train")
    (tmp_path / "leftImg8bit" / "val").mkdir()
    (tmp_path / "gtFine" / "val").mkdir()
    message = _one_line_error(lambda: datasets.cityscapes(tmp_path, "val"), tmp_path)
    assert "split 'val'" in message and "no images" in message


def test_image_without_label(tmp_path):
    make_gta5(tmp_path)
    (tmp_path / "labels" / "00001.png").unlink()
    _one_line_error(lambda: datasets.gta5(tmp_path, check=True), tmp_path / "images" / "00001.png",
                    tmp_path / "labels" / "00001.png")


@pytest.mark.parametrize("content", [b"", b"not a png at all", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"])
def test_corrupt_image_names_the_file(tmp_path, content):
    make_gta5(tmp_path)
    bad = tmp_path / "images" / "00000.png"
    bad.write_bytes(content)
    _one_line_error(lambda: datasets.gta5(tmp_path, check=True), bad)  # the start-up check
    ds = datasets.gta5(tmp_path)
    _one_line_error(lambda: ds.load(0), bad)  # a file gone bad after the check


def test_truncated_image_names_the_file(tmp_path):
    make_gta5(tmp_path, h=64, w=64)
    bad = tmp_path / "images" / "00000.png"
    bad.write_bytes(bad.read_bytes()[:200])
    _one_line_error(lambda: datasets.gta5(tmp_path, check=True), bad)
    _one_line_error(lambda: datasets.gta5(tmp_path).load(0), bad)


def test_corrupt_synthia_label_names_the_file(tmp_path):
    make_synthia(tmp_path)
    bad = tmp_path / "GT" / "LABELS" / "0000000.png"
    bad.write_bytes(b"garbage")
    _one_line_error(lambda: datasets.synthia(tmp_path, check=True), bad)
    _one_line_error(lambda: datasets.synthia(tmp_path).load(0), bad)


def test_label_of_wrong_mode_names_the_file(tmp_path):
    make_gta5(tmp_path)
    bad = tmp_path / "labels" / "00000.png"
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(bad)
    _one_line_error(lambda: io.read_label_ids(bad), bad)


def test_size_mismatch_names_both_files(tmp_path):
    make_gta5(tmp_path)
    label = tmp_path / "labels" / "00001.png"
    write_png(label, np.zeros((5, 8), np.uint8))
    for build in (lambda: datasets.gta5(tmp_path, check=True), lambda: datasets.gta5(tmp_path).load(1)):
        message = _one_line_error(build, tmp_path / "images" / "00001.png", label)
        assert "8x6" in message and "8x5" in message
