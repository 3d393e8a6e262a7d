"""The contrast's pixel samplers (`confeti_fast.sampling`): the kept pixels only, uniformly."""
import torch

from confeti_fast.sampling import sample_kept_pixels, sample_pixels


def test_sample_kept_pixels():
    labels = torch.tensor([[[0, 255, 3], [255, 1, 1]], [[255, 255, 2], [7, 255, 0]]])
    kept = {0, 2, 4, 5, 8, 9, 11}
    for seed in range(5):
        torch.manual_seed(seed)
        idx = sample_kept_pixels(labels, 4).tolist()
        assert len(idx) == 4 and len(set(idx)) == 4 and set(idx) <= kept
    idx = sample_kept_pixels(labels, 100).tolist()
    assert sorted(idx) == sorted(kept)


def test_sample_pixels_is_a_uniform_draw_of_kept_pixels():
    labels = torch.full((2, 6, 5), 255)
    labels[0, 1, 2] = labels[1, 4, 4] = 3
    labels[1, :2] = 1  # 10 more kept pixels: 12 in all
    gen = torch.Generator().manual_seed(0)
    few = sample_pixels(labels, 20, gen)
    kept = set((labels.reshape(-1) != 255).nonzero().squeeze(1).tolist())
    assert few.numel() == 20 and len(set(few.tolist())) == 20
    assert kept <= set(few[:12].tolist())  # every kept pixel first, then ignored ones fill up
    counts = torch.zeros(60)
    for _ in range(600):
        counts[sample_pixels(labels, 4, gen)] += 1
    assert counts[[i for i in range(60) if i not in kept]].sum() == 0
    # each kept pixel drawn with probability 4/12: 200 expected of 600
    assert counts[sorted(kept)].min() > 150 and counts[sorted(kept)].max() < 250
