import math

import numpy as np
import pytest

from confeti_fast.data import rcs
from confeti_fast.errors import ConfetiError


def test_class_probabilities_on_known_counts():
    totals = np.zeros(19)
    totals[[0, 2, 13]] = [6000, 3000, 1000]  # f = 0.6, 0.3, 0.1
    classes, probs = rcs.class_probabilities(totals, 0.01)
    assert list(classes) == [0, 2, 13]
    # (1 - f) / 0.01 = 40, 70, 90 -> softmax
    z = math.exp(40) + math.exp(70) + math.exp(90)
    np.testing.assert_allclose(probs, [math.exp(40) / z, math.exp(70) / z, math.exp(90) / z], rtol=1e-12)


def test_sampler_draws_only_images_above_min_pixels():
    counts = np.zeros((4, 19), dtype=np.int64)
    counts[:, 0] = [5000, 5000, 5000, 5000]
    counts[1, 18] = 3001  # the only image with more than 3000 pixels of class 18
    counts[2, 18] = 3000  # exactly 3000 does not qualify
    sampler = rcs.RareClassSampler(counts, temperature=0.01, min_pixels=3000, min_crop_ratio=0.5)
    assert sampler.min_crop_pixels == 1500
    rng = np.random.default_rng(0)
    draws = [sampler.draw(rng) for _ in range(200)]
    assert {img for c, img in draws if c == 18} == {1}
    # class 18 is far rarer, so it dominates the draws
    assert sum(c == 18 for c, _ in draws) > 190


def test_sampler_without_any_qualifying_image_is_a_clear_error():
    with pytest.raises(ConfetiError, match="rcs.min_pixels"):
        rcs.RareClassSampler(np.ones((2, 19)), min_pixels=3000)


def test_class_counts_are_cached_beside_the_data(tmp_path):
    from helpers import make_gta5
    from confeti_fast.data import datasets

    make_gta5(tmp_path / "gta5", n=3)
    ds = datasets.gta5(tmp_path / "gta5")
    counts = rcs.class_counts(ds, progress=False)
    assert counts.shape == (3, 19) and counts.sum() == sum(
        (ds.load_label(i) != 255).sum() for i in range(3))
    cache = tmp_path / "gta5" / rcs.CACHE_NAME
    assert cache.is_file()
    # A cached result is used as it is: poison it and see it come back.
    import json
    payload = json.loads(cache.read_text())
    payload["counts"][0][0] = 12345
    cache.write_text(json.dumps(payload))
    assert rcs.class_counts(ds, progress=False)[0, 0] == 12345
    # A changed label set invalidates it.
    (tmp_path / "gta5" / "images" / "00002.png").unlink()
    (tmp_path / "gta5" / "labels" / "00002.png").unlink()
    assert rcs.class_counts(datasets.gta5(tmp_path / "gta5"), progress=False).shape == (2, 19)
