import numpy as np

from confeti_fast.data import labels
from helpers import CITYSCAPES, SYNTHIA  # docs/method.md §1, typed in from the table


def test_cityscapes_and_gta5_table_for_every_id():
    ids = np.arange(256, dtype=np.uint8)
    got = labels.cityscapes_to_train_ids(ids)
    for i in range(256):
        assert got[i] == CITYSCAPES.get(i, 255), i


def test_synthia_table_for_every_16bit_id():
    ids = np.arange(65536, dtype=np.uint16)
    got = labels.synthia_to_train_ids(ids)
    expected = np.full(65536, 255)
    for k, v in SYNTHIA.items():
        expected[k] = v
    np.testing.assert_array_equal(got, expected)


def test_synthia_class_sets():
    assert labels.SYNTHIA_16_CLASSES == tuple(sorted(set(range(19)) - {9, 14, 16}))
    assert labels.SYNTHIA_13_CLASSES == tuple(sorted(set(range(19)) - {9, 14, 16, 3, 4, 5}))


def test_train_ids_back_to_label_ids():
    train_ids = np.array(list(CITYSCAPES.values()) + [255], dtype=np.uint8)
    np.testing.assert_array_equal(labels.train_ids_to_label_ids(train_ids), list(CITYSCAPES.keys()) + [0])


def test_colorize_uses_cityscapes_palette():
    rgb = labels.colorize(np.array([[0, 10, 255]], dtype=np.uint8))
    np.testing.assert_array_equal(rgb[0], [(128, 64, 128), (70, 130, 180), (0, 0, 0)])
