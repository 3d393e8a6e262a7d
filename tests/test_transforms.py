import numpy as np
import torch

from confeti_fast.data import transforms


class ScriptedRng:
    """Returns pre-set crop offsets, so the test knows every box the crop rule draws."""

    def __init__(self, offsets):
        self.offsets = list(offsets)
        self.calls = 0

    def integers(self, low, high):
        self.calls += 1
        return self.offsets.pop(0)


def _label_with_sky_top():
    # 8 x 8: rows 0-3 all sky (10), rows 4-7 half road (0), half car (13).
    label = np.full((8, 8), 10, dtype=np.uint8)
    label[4:, :4] = 0
    label[4:, 4:] = 13
    return label


def test_crop_redraws_while_one_class_dominates():
    label = _label_with_sky_top()
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    # Draws: (top 0, left 0) = all sky -> redraw; (top 4, left 2): road/car 50/50 -> keep.
    rng = ScriptedRng([0, 0, 4, 2])
    _, crop = transforms.random_crop(image, label, (4, 4), rng, cat_max_ratio=0.75)
    assert rng.calls == 4
    np.testing.assert_array_equal(crop, label[4:8, 2:6])


def test_crop_rule_counts_ignore_as_nothing_and_needs_two_classes():
    label = np.full((4, 4), 255, dtype=np.uint8)
    label[0, 0] = 1  # one class alone (plus ignore) counts as dominant
    assert transforms.dominant_class_ratio(label) == 1.0
    label[0, 1] = 2
    label[0, 2] = 2
    assert transforms.dominant_class_ratio(label) == 2 / 3


def test_crop_gives_up_after_ten_redraws_and_keeps_the_last():
    label = np.full((8, 8), 10, dtype=np.uint8)
    rng = ScriptedRng([0, 0] + [1, 1] * 9 + [3, 2])
    _, crop = transforms.random_crop(np.zeros((8, 8, 3), np.uint8), label, (4, 4), rng, cat_max_ratio=0.75)
    assert rng.calls == 22  # the first box and ten redraws
    assert crop.shape == (4, 4)


def test_crop_at_ratio_one_never_redraws():
    rng = ScriptedRng([1, 1])
    transforms.random_crop(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), (4, 4), rng, cat_max_ratio=1.0)
    assert rng.calls == 2


def test_keep_ratio_size_matches_mmcv_rescale():
    # GTA5 1914x1052 into (1280, 720): factor min(1280/1914, 720/1052) = 0.66876
    assert transforms.keep_ratio_size(1914, 1052, (1280, 720)) == (1280, 704)
    assert transforms.keep_ratio_size(2048, 1024, (1280, 640)) == (1280, 640)
    assert transforms.keep_ratio_size(1280, 760, (1280, 760)) == (1280, 760)


def test_resize_label_is_nearest():
    label = np.array([[0, 255], [13, 7]], dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    image = np.zeros((8, 8, 3), np.uint8)
    _, small = transforms.resize(image, label, (4, 4))
    assert set(np.unique(small)) <= {0, 255, 13, 7}


def test_normalize_imagenet():
    image = np.zeros((1, 1, 3), np.uint8)
    image[0, 0] = (123, 116, 103)
    out = transforms.to_input(image)
    expected = torch.tensor([(123 - 123.675) / 58.395, (116 - 116.28) / 57.12, (103 - 103.53) / 57.375])
    torch.testing.assert_close(out[:, 0, 0], expected)


def test_pad_uses_ignore_for_labels():
    image, label = transforms.pad_to(np.ones((2, 3, 3), np.uint8), np.zeros((2, 3), np.uint8), (4, 4))
    assert image.shape == (4, 4, 3) and image[3, 3].sum() == 0
    assert label[3, 3] == 255 and label[0, 0] == 0
