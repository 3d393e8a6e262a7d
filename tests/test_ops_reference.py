"""Hand-computed checks of the reference ops (SPEC 4, 5, 6).

Every expected value here comes from typed-in numbers or a naive formulation written in this
file (plain Python / `math`, or the CUT code's own PatchNCE), never from the code under test.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from confeti_fast.ops.reference import (patch_nce, pixel_proto_contrast, proto_class_stats, proto_ema_update,
                                        sample_kept_pixels)


# ---------------------------------------------------------------- naive helpers (plain Python)

def _norm(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v] if n > 0 else [0.0 for _ in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _log_softmax(xs):
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def _feats(pixels, h, w):
    """(1, D, h, w) tensor from a list of D-vectors in (y, x) order."""
    t = torch.tensor(pixels, dtype=torch.float32)  # (h*w, D)
    return t.t().reshape(1, -1, h, w).contiguous()


def _naive_contrast(pixels, labels, protos, sample_idx, tau=0.1, ce_weight=0.5, reg_weight=2.0):
    v = [_norm(p) for p in pixels]
    ce = 0.0
    for i in sample_idx:
        logits = [_dot(v[i], pk) / tau for pk in protos]
        ce += -_log_softmax(logits)[labels[i]]
    ce = ce_weight * ce / len(sample_idx)
    kept = [i for i, lab in enumerate(labels) if lab != 255]
    vbar = [sum(v[i][d] for i in kept) / len(kept) for d in range(len(pixels[0]))]
    k = len(protos)
    reg = reg_weight * sum(_log_softmax([_dot(vbar, pk) / tau for pk in protos])) / (k * math.log(k))
    return ce, reg


PROTOS3 = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]


# ---------------------------------------------------------------- pixel_proto_contrast

def test_contrast_tiny_case_by_hand():
    # v = (0.6, 0.8), (0, -1), (-1/sqrt2, 1/sqrt2)
    pixels = [[3.0, 4.0], [0.0, -2.0], [-1.0, 1.0]]
    labels = [0, 1, 2]
    feats = _feats(pixels, 1, 3)
    lab = torch.tensor(labels).reshape(1, 1, 3)
    protos = torch.tensor(PROTOS3)
    ce, reg = pixel_proto_contrast(feats, lab, protos, sample_idx=torch.tensor([0, 2]))

    # pixel 0: logits (6, 8, -6), target 0; pixel 2: logits (-7.071, 7.071, 7.071), target 2
    s = 1 / math.sqrt(2)
    ce0 = -(6 - math.log(math.exp(6) + math.exp(8) + math.exp(-6)))
    ce2 = -(10 * s - math.log(math.exp(-10 * s) + 2 * math.exp(10 * s)))
    exp_ce = 0.5 * (ce0 + ce2) / 2
    # vbar over ALL three kept pixels (not just the two sampled ones)
    vbar = [(0.6 + 0 - s) / 3, (0.8 - 1 + s) / 3]
    z = [10 * vbar[0], 10 * vbar[1], -10 * vbar[0]]
    lse = math.log(sum(math.exp(x) for x in z))
    exp_reg = 2 * sum(x - lse for x in z) / (3 * math.log(3))
    assert ce.item() == pytest.approx(exp_ce, abs=1e-5)
    assert reg.item() == pytest.approx(exp_reg, abs=1e-5)
    # and the naive helper agrees with the spelled-out arithmetic
    assert _naive_contrast(pixels, labels, PROTOS3, [0, 2]) == pytest.approx((exp_ce, exp_reg), abs=1e-12)

    # vbar over only the sampled pixels would give a different regulariser: the test can tell
    vbar_s = [(0.6 - s) / 2, (0.8 + s) / 2]
    z_s = [10 * vbar_s[0], 10 * vbar_s[1], -10 * vbar_s[0]]
    wrong = 2 * sum(_log_softmax(z_s)) / (3 * math.log(3))
    assert abs(wrong - exp_reg) > 1e-2


def test_contrast_ignored_pixels_excluded_from_vbar():
    pixels = [[3.0, 4.0], [0.0, -2.0], [-1.0, 1.0], [5.0, 0.5]]
    labels = [0, 255, 2, 255]
    feats = _feats(pixels, 2, 2)
    lab = torch.tensor(labels).reshape(1, 2, 2)
    ce, reg = pixel_proto_contrast(feats, lab, torch.tensor(PROTOS3), sample_idx=torch.tensor([2]))
    exp_ce, exp_reg = _naive_contrast(pixels, labels, PROTOS3, [2])
    assert ce.item() == pytest.approx(exp_ce, abs=1e-5)
    assert reg.item() == pytest.approx(exp_reg, abs=1e-5)
    # including ignored pixels in vbar would change it
    _, reg_all = _naive_contrast(pixels, [0, 1, 2, 0], PROTOS3, [2])
    assert abs(reg_all - exp_reg) > 1e-2


def test_contrast_parameters_are_honoured():
    pixels = [[3.0, 4.0], [0.0, -2.0], [-1.0, 1.0]]
    labels = [1, 1, 0]
    lab = torch.tensor(labels).reshape(1, 1, 3)
    ce, reg = pixel_proto_contrast(_feats(pixels, 1, 3), lab, torch.tensor(PROTOS3), tau=0.5,
                                   sample_idx=torch.tensor([1, 2, 0]), ce_weight=1.0, reg_weight=1.0)
    exp_ce, exp_reg = _naive_contrast(pixels, labels, PROTOS3, [1, 2, 0], tau=0.5, ce_weight=1.0, reg_weight=1.0)
    assert ce.item() == pytest.approx(exp_ce, abs=1e-5)
    assert reg.item() == pytest.approx(exp_reg, abs=1e-5)


def test_contrast_k19_uniform_logits():
    # zero prototypes: every logit 0 -> CE = ln 19, reg = 2 * 19 * ln(1/19) / (19 ln 19) = -2
    feats = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    lab = torch.tensor([[[0, 5, 18], [3, 255, 7]]])
    ce, reg = pixel_proto_contrast(feats, lab, torch.zeros(19, 4), sample_idx=torch.tensor([0, 1, 2, 3]))
    assert ce.item() == pytest.approx(0.5 * math.log(19), abs=1e-5)
    assert reg.item() == pytest.approx(-2.0, abs=1e-5)


def test_contrast_k19_uses_k_ln_k():
    g = torch.Generator().manual_seed(1)
    protos = F.normalize(torch.randn(19, 3, generator=g), dim=1)
    feats = torch.randn(1, 3, 2, 2, generator=g)
    lab = torch.tensor([[[4, 9], [255, 13]]])
    _, reg = pixel_proto_contrast(feats, lab, protos, sample_idx=torch.tensor([0]))
    pix = feats[0].permute(1, 2, 0).reshape(-1, 3).tolist()
    v = [_norm(p) for p in pix]
    kept = [0, 1, 3]
    vbar = [sum(v[i][d] for i in kept) / 3 for d in range(3)]
    s = sum(_log_softmax([_dot(vbar, pk) / 0.1 for pk in protos.tolist()]))
    assert reg.item() == pytest.approx(2 * s / 55.944, rel=1e-4)


def test_contrast_all_ignored_is_zero_and_backward_works():
    feats = torch.randn(2, 3, 2, 2, requires_grad=True)
    lab = torch.full((2, 2, 2), 255, dtype=torch.long)
    ce, reg = pixel_proto_contrast(feats, lab, F.normalize(torch.randn(5, 3), dim=1))
    assert ce.item() == 0.0 and reg.item() == 0.0
    (ce + reg).backward()
    assert feats.grad is not None
    assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_contrast_gradients():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 4, 3, 3, generator=g).requires_grad_(True)
    protos = F.normalize(torch.randn(6, 4, generator=g), dim=1).requires_grad_(True)
    lab = torch.randint(0, 6, (2, 3, 3), generator=g)
    lab[0, 0, 0] = 255
    ce, reg = pixel_proto_contrast(feats, lab, protos, sample_idx=torch.tensor([1, 4, 9, 17]))
    (ce + reg).backward()
    assert protos.grad is None or torch.count_nonzero(protos.grad) == 0
    assert torch.isfinite(feats.grad).all()
    assert feats.grad.abs().sum() > 0


def _subset_means(values, sizes):
    out = {}
    for n in sizes:
        out[n] = [sum(c) / n for c in itertools.combinations(values, n)]
    return out


def test_contrast_random_sampling_draws_only_kept_pixels():
    # per-pixel CE values are distinct, so the loss tells which set of pixels was drawn
    pixels = [[1.0, 0.0], [0.3, 1.0], [0.2, 1.0], [-1.0, 0.5], [2.0, 2.0], [1.0, -0.3]]
    labels = [1, 255, 2, 1, 255, 0]
    lab = torch.tensor(labels).reshape(1, 2, 3)
    feats = _feats(pixels, 2, 3)
    kept = [0, 2, 3, 5]
    per_pixel = [_naive_contrast(pixels, labels, PROTOS3, [i], ce_weight=1.0)[0] for i in kept]
    means = _subset_means(per_pixel, (1, 2, 3, 4))
    others = [m for n in (1, 3, 4) for m in means[n]]
    assert min(abs(a - b) for a in means[2] for b in others + [x for x in means[2] if x != a]) > 1e-2
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        ce, _ = pixel_proto_contrast(feats, lab, torch.tensor(PROTOS3), num_samples=2, ce_weight=1.0)
        hits = [i for i, m in enumerate(means[2]) if abs(m - ce.item()) < 1e-5]
        assert len(hits) == 1, ce.item()
        assert all(abs(m - ce.item()) > 1e-3 for m in others)
        seen.add(hits[0])
    assert len(seen) > 1  # it is random
    # more samples than kept pixels: all kept pixels, each once
    torch.manual_seed(0)
    ce, _ = pixel_proto_contrast(feats, lab, torch.tensor(PROTOS3), num_samples=4096, ce_weight=1.0)
    assert ce.item() == pytest.approx(means[4][0], abs=1e-5)


def test_sample_kept_pixels():
    labels = torch.tensor([[[0, 255, 3], [255, 1, 1]], [[255, 255, 2], [7, 255, 0]]])
    kept = {0, 2, 4, 5, 8, 9, 11}
    for seed in range(5):
        torch.manual_seed(seed)
        idx = sample_kept_pixels(labels, 4).tolist()
        assert len(idx) == 4 and len(set(idx)) == 4 and set(idx) <= kept
    idx = sample_kept_pixels(labels, 100).tolist()
    assert sorted(idx) == sorted(kept)


# ---------------------------------------------------------------- proto_ema_update

def _maps(pixels, b, h, w):
    """(b, C, h, w) from a list of C-vectors in (b, y, x) order."""
    t = torch.tensor(pixels, dtype=torch.float32)
    return t.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


def _wmean_dir(vectors, weights):
    s = sum(weights)
    return _norm([sum(w * v[d] for v, w in zip(vectors, weights)) / s for d in range(len(vectors[0]))])


def test_ema_first_update_sets_row_exactly():
    # B=1, 1x4, K=3 (class 2 absent), D=2; CAM at the label resolution (identity upsampling)
    feats = _maps([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [5.0, 5.0]], 1, 1, 4)
    cam = _maps([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [9.0, 9.0, 9.0]], 1, 1, 4)
    labels = torch.tensor([[[0, 0, 1, 255]]])
    protos = torch.tensor([[0.0, -1.0], [0.0, 0.0], [0.6, 0.8]])  # row 0 non-zero but count 0
    counts = torch.tensor([0, 0, 7])
    proto_ema_update(protos, counts, feats, cam, labels)
    # class 0: mu = (1*(1,0) + 3*(0,2)) / 4 = (0.25, 1.5) -> raw features, not normalized first
    n = math.sqrt(0.25 ** 2 + 1.5 ** 2)
    assert protos[0].tolist() == pytest.approx([0.25 / n, 1.5 / n], abs=1e-6)
    assert protos[1].tolist() == pytest.approx([0.6, 0.8], abs=1e-6)
    assert protos[2].tolist() == pytest.approx([0.6, 0.8], abs=1e-7)  # absent: untouched
    assert counts.tolist() == [2, 1, 7]


def test_ema_second_update_uses_momentum_alpha():
    feats = _maps([[1.0, 0.0], [0.0, 2.0]], 1, 1, 2)
    cam = _maps([[1.0], [3.0]], 1, 1, 2)
    labels = torch.tensor([[[0, 0]]])
    protos = torch.tensor([[1.0, 0.0]])
    counts = torch.tensor([1])
    proto_ema_update(protos, counts, feats, cam, labels)
    n = math.sqrt(0.25 ** 2 + 1.5 ** 2)
    mu = [0.25 / n, 1.5 / n]
    alpha = 0.001  # min(1 - 1/2, 1 - 0.999)
    raw = [(1 - alpha) * 1.0 + alpha * mu[0], alpha * mu[1]]
    assert protos[0].tolist() == pytest.approx(_norm(raw), abs=1e-6)
    assert counts.tolist() == [3]
    # an alpha of 0.5 (1 - 1/(n+1)) would be far away
    assert abs(_norm([0.5 + 0.5 * mu[0], 0.5 * mu[1]])[1] - protos[0, 1].item()) > 0.1


@pytest.mark.parametrize("n,expected_alpha", [(1, 0.5), (3, 0.75), (9, 0.8)])
def test_ema_alpha_is_min_of_both(n, expected_alpha):
    # momentum 0.2: 1 - momentum = 0.8; alpha = min(1 - 1/(n+1), 0.8)
    feats = _maps([[0.0, 3.0]], 1, 1, 1)
    protos = torch.tensor([[1.0, 0.0]])
    counts = torch.tensor([n])
    proto_ema_update(protos, counts, feats, None, torch.tensor([[[0]]]), momentum=0.2)
    assert protos[0].tolist() == pytest.approx(_norm([1 - expected_alpha, expected_alpha]), abs=1e-6)
    assert counts.tolist() == [n + 1]


def test_ema_warmup_valid_mask_and_unit_weights():
    feats = _maps([[1.0, 0.0], [0.0, 100.0], [0.0, 3.0], [7.0, 7.0]], 1, 2, 2)
    labels = torch.tensor([[[0, 0], [0, 0]]])
    valid = torch.tensor([[[True, False], [True, False]]])
    protos = torch.zeros(1, 2)
    counts = torch.zeros(1, dtype=torch.int64)
    proto_ema_update(protos, counts, feats, None, labels, valid=valid)
    assert protos[0].tolist() == pytest.approx(_norm([0.5, 1.5]), abs=1e-6)  # mean of (1,0), (0,3)
    assert counts.tolist() == [2]


def test_ema_top_k_ties_go_to_lower_index():
    # four pixels of class 0 with distinct directions; weights 0.5, 0.9, 0.5, 0.5; keep 2
    vecs = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]
    feats = _maps(vecs, 1, 1, 4)
    cam = _maps([[0.5], [0.9], [0.5], [0.5]], 1, 1, 4)
    protos = torch.zeros(1, 3)
    counts = torch.zeros(1, dtype=torch.int64)
    proto_ema_update(protos, counts, feats, cam, torch.zeros(1, 1, 4, dtype=torch.long), top_k=2)
    expected = _norm([0.5 / 1.4, 0.9 / 1.4, 0.0])  # pixels 1 and 0
    assert protos[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert counts.tolist() == [2]
    wrong = _norm([0.0, 0.9 / 1.4, -0.5 / 1.4])  # ties to the higher index (pixel 3)
    assert max(abs(a - b) for a, b in zip(wrong, protos[0].tolist())) > 0.1


def test_ema_ties_across_images_use_flat_b_y_x_order():
    # equal weights everywhere; top_k=3 keeps flat indices 0, 1, 2 = (b0,y0,x0), (b0,y0,x1), (b0,y1,x0)
    vecs = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0],
            [-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, -1.0]]
    feats = _maps(vecs, 2, 2, 2)
    protos = torch.zeros(1, 4)
    counts = torch.zeros(1, dtype=torch.int64)
    proto_ema_update(protos, counts, feats, None, torch.zeros(2, 2, 2, dtype=torch.long), top_k=3)
    assert protos[0].tolist() == pytest.approx(_norm([1.0, 1.0, 1.0, 0.0]), abs=1e-6)
    assert counts.tolist() == [3]


def test_ema_default_top_k_is_32():
    # 40 pixels with weights 1..40: the 32 largest are pixels 8..39
    vals = [float(i) for i in range(40)]
    vecs = [[1.0, v] for v in vals]
    feats = _maps(vecs, 1, 5, 8)
    cam = _maps([[i + 1.0] for i in range(40)], 1, 5, 8)
    protos = torch.zeros(1, 2)
    counts = torch.zeros(1, dtype=torch.int64)
    proto_ema_update(protos, counts, feats, cam, torch.zeros(1, 5, 8, dtype=torch.long))
    chosen = list(range(8, 40))
    expected = _wmean_dir([vecs[i] for i in chosen], [i + 1.0 for i in chosen])
    assert protos[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert counts.tolist() == [32]


def test_ema_fewer_pixels_than_k_all_used():
    vecs = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    feats = _maps(vecs, 1, 1, 3)
    cam = _maps([[0.2], [0.3], [0.5]], 1, 1, 3)
    protos = torch.zeros(1, 2)
    counts = torch.tensor([0])
    proto_ema_update(protos, counts, feats, cam, torch.zeros(1, 1, 3, dtype=torch.long), top_k=32)
    assert protos[0].tolist() == pytest.approx(_wmean_dir(vecs, [0.2, 0.3, 0.5]), abs=1e-6)
    assert counts.tolist() == [3]


def test_ema_zero_weights_skip_update_but_count_grows():
    feats = _maps([[1.0, 0.0], [0.0, 1.0], [5.0, 1.0]], 1, 1, 3)
    # class 0: both weights 0 -> no change; class 1 (count 0) zero weight -> stays a zero row;
    # class 2 (row not unit) zero weight -> only the final renormalization
    cam = _maps([[0.0, 9.0, 9.0], [0.0, 9.0, 9.0], [9.0, 0.0, 9.0]], 1, 1, 3)
    labels = torch.tensor([[[0, 0, 1]]])
    protos = torch.tensor([[0.6, 0.8], [0.0, 0.0], [3.0, 4.0]])
    counts = torch.tensor([5, 0, 2])
    proto_ema_update(protos, counts, feats, cam, labels)
    assert protos[0].tolist() == pytest.approx([0.6, 0.8], abs=1e-7)
    assert protos[1].tolist() == [0.0, 0.0]  # a zero row stays zero (no NaN)
    assert protos[2].tolist() == pytest.approx([0.6, 0.8], abs=1e-7)  # rows renormalized
    assert counts.tolist() == [7, 1, 2]


def test_ema_ignore_label_and_per_class_independence():
    # classes 0 and 2 in one call equal two hand-computed single-class updates
    vecs = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-4.0, 2.0], [3.0, -1.0], [0.5, 0.5]]
    feats = _maps(vecs, 1, 2, 3)
    cam_rows = [[0.3, 0.0, 0.9], [0.7, 0.0, 0.1], [100.0, 100.0, 100.0],
                [0.0, 0.0, 0.4], [0.0, 0.0, 0.6], [100.0, 100.0, 100.0]]
    cam = _maps(cam_rows, 1, 2, 3)
    labels = torch.tensor([[[0, 0, 255], [2, 2, 255]]])
    protos = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    counts = torch.tensor([0, 4, 0])
    proto_ema_update(protos, counts, feats, cam, labels)
    assert protos[0].tolist() == pytest.approx(_wmean_dir(vecs[0:2], [0.3, 0.7]), abs=1e-6)
    assert protos[1].tolist() == [1.0, 0.0]
    assert protos[2].tolist() == pytest.approx(_wmean_dir(vecs[3:5], [0.4, 0.6]), abs=1e-6)
    assert counts.tolist() == [2, 4, 2]


def test_ema_rows_are_unit_after_update():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 5, 3, 3, generator=g)
    cam = torch.rand(2, 4, 3, 3, generator=g)
    labels = torch.randint(0, 3, (2, 3, 3), generator=g)
    protos = torch.zeros(4, 5)
    protos[3] = torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0])  # absent, not unit
    counts = torch.tensor([0, 3, 0, 1])
    proto_ema_update(protos, counts, feats, cam, labels)
    for c in range(4):
        assert math.sqrt(sum(x * x for x in protos[c].tolist())) == pytest.approx(1.0, abs=1e-6)
    assert protos[3].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert counts[3].item() == 1


def _single_pixel_direction(feats, size, pixel):
    """P[0] after one update where only `pixel` (y, x) is labelled 0; channel 1 of feats is 1."""
    labels = torch.full((1, *size), 255, dtype=torch.long)
    labels[0, pixel[0], pixel[1]] = 0
    protos = torch.zeros(1, 2)
    counts = torch.zeros(1, dtype=torch.int64)
    proto_ema_update(protos, counts, feats, None, labels)
    return protos[0].tolist()


def test_ema_bilinear_align_corners_upsampling():
    # channel 0: corners [[0, 2], [4, 10]]; channel 1: constant 1. Direction (x, 1)/|.| reveals x.
    feats = torch.tensor([[[[0.0, 2.0], [4.0, 10.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    for pixel, x in [((0, 0), 0.0), ((0, 2), 2.0), ((2, 0), 4.0), ((2, 2), 10.0),
                     ((1, 1), 4.0), ((0, 1), 1.0), ((1, 2), 6.0)]:
        assert _single_pixel_direction(feats, (3, 3), pixel) == pytest.approx(_norm([x, 1.0]), abs=1e-6), pixel
    # 2x2 -> 4x4: align_corners=True samples at 1/3 (align_corners=False would give 0.25)
    feats = torch.tensor([[[[0.0, 3.0], [6.0, 9.0]], [[1.0, 1.0], [1.0, 1.0]]]])  # f(y, x) = 6y + 3x
    assert _single_pixel_direction(feats, (4, 4), (1, 1)) == pytest.approx(_norm([3.0, 1.0]), abs=1e-6)
    assert _single_pixel_direction(feats, (4, 4), (2, 1)) == pytest.approx(_norm([5.0, 1.0]), abs=1e-6)


def test_ema_cam_is_upsampled_too():
    # features at 1x2 -> labels 1x3; CAM (1, 1, 1, 2) = [0, 4] -> upsampled [0, 2, 4]
    feats = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # upsampled: (1,0), (0.5,0.5), (0,1)
    cam = torch.tensor([[[[0.0, 4.0]]]])
    protos = torch.zeros(1, 2)
    counts = torch.zeros(1, dtype=torch.int64)
    proto_ema_update(protos, counts, feats, cam, torch.zeros(1, 1, 3, dtype=torch.long))
    # weights 0, 2, 4 on vectors (1,0), (0.5,0.5), (0,1): sum w v = (1, 5)
    assert protos[0].tolist() == pytest.approx(_norm([1.0, 5.0]), abs=1e-6)
    assert counts.tolist() == [3]


def test_ema_reduce_sums_the_statistics_before_the_ema():
    # two "ranks", K=2, D=2, identity upsampling. Rank 0: class 0 weights 1, 3 on (1,0), (0,2);
    # rank 1: class 0 weight 2 on (4,0), class 1 weight 0 on (1,1). Summed: class 0 sum w v =
    # (9, 6), sum w = 6, kept 3; class 1 kept 1 with weight sum 0 (count grows, row stays).
    feats0 = _maps([[1.0, 0.0], [0.0, 2.0]], 1, 1, 2)
    cam0 = _maps([[1.0, 7.0], [3.0, 7.0]], 1, 1, 2)
    feats1 = _maps([[4.0, 0.0], [1.0, 1.0]], 1, 1, 2)
    cam1 = _maps([[2.0, 5.0], [5.0, 0.0]], 1, 1, 2)
    labels0, labels1 = torch.tensor([[[0, 0]]]), torch.tensor([[[0, 1]]])
    other = proto_class_stats(feats1, cam1, labels1, num_classes=2)
    seen = []

    def reduce(weighted_sum, weight_sum, kept):
        seen.append((weighted_sum.tolist(), weight_sum.tolist(), kept.tolist()))
        for t, o in zip((weighted_sum, weight_sum, kept), other):
            t += o

    protos = torch.tensor([[0.0, 0.0], [0.6, 0.8]])
    counts = torch.tensor([0, 4])
    proto_ema_update(protos, counts, feats0, cam0, labels0, reduce=reduce)
    assert seen == [([[1.0, 6.0], [0.0, 0.0]], [4.0, 0.0], [2, 0])]  # this rank's own statistics
    assert protos[0].tolist() == pytest.approx(_norm([1.5, 1.0]), abs=1e-6)  # alpha 1: mu itself
    assert protos[1].tolist() == pytest.approx([0.6, 0.8], abs=1e-7)
    assert counts.tolist() == [3, 5]
    # an identity reduce is the plain update
    a = (torch.tensor([[1.0, 0.0], [0.6, 0.8]]), torch.tensor([3, 4]))
    b = (a[0].clone(), a[1].clone())
    proto_ema_update(*a, feats0, cam0, labels0)
    proto_ema_update(*b, feats0, cam0, labels0, reduce=lambda *t: None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------- patch_nce

def _cut_patch_nce(q_layers, k_layers, batch_size, tau):
    """The CUT code (patchnce.py, nce_includes_all_negatives_from_minibatch=False), averaged
    over layers as in cut_model.calculate_NCE_loss."""
    total = 0.0
    for feat_q, feat_k in zip(q_layers, k_layers):
        feat_k = feat_k.detach()
        num_patches, dim = feat_q.shape
        l_pos = (feat_q * feat_k).sum(-1, keepdim=True)
        q = feat_q.view(batch_size, -1, dim)
        k = feat_k.view(batch_size, -1, dim)
        npatches = q.size(1)
        l_neg_curbatch = torch.bmm(q, k.transpose(2, 1))
        diagonal = torch.eye(npatches, dtype=torch.bool)[None, :, :]
        l_neg_curbatch.masked_fill_(diagonal, -10.0)
        l_neg = l_neg_curbatch.view(-1, npatches)
        out = torch.cat((l_pos, l_neg), dim=1) / tau
        loss = F.cross_entropy(out, torch.zeros(out.size(0), dtype=torch.long), reduction="none")
        total = total + loss.mean()
    return total / len(q_layers)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patch_nce_matches_cut_code(seed):
    g = torch.Generator().manual_seed(seed)
    qs = [F.normalize(torch.randn(2 * 16, 8, generator=g), dim=1) for _ in range(5)]
    ks = [F.normalize(torch.randn(2 * 16, 8, generator=g), dim=1) for _ in range(5)]
    got = patch_nce(qs, ks, 2)
    want = _cut_patch_nce(qs, ks, 2, 0.07)
    assert got.item() == pytest.approx(want.item(), abs=1e-6, rel=1e-6)


def test_patch_nce_hand_value_and_same_image_negatives():
    # q = k = orthonormal rows: logits 1/tau on the diagonal, 0 elsewhere (P=2 per image)
    e = torch.eye(2)
    q = torch.cat([e, e])  # batch 2, 2 patches each
    got = patch_nce([q], [q.clone()], 2).item()
    assert got == pytest.approx(math.log(1 + math.exp(-1 / 0.07)), abs=1e-7)
    got = patch_nce([q], [q.clone()], 2, tau=0.25).item()
    assert got == pytest.approx(math.log(1 + math.exp(-4)), rel=1e-5)
    # negatives from the whole batch would include the other image's identical row (logits
    # 4, 0, 4, 0): CE = log(2 + 2 e^-4), about 0.71, far from 0.018
    # tau is honoured: with tau = 1, per patch logits (1, 0) -> CE = log(e + 1) - 1
    assert patch_nce([q], [q.clone()], 2, tau=1.0).item() == pytest.approx(math.log(math.e + 1) - 1, rel=1e-6)


def test_patch_nce_k_gets_no_gradient():
    g = torch.Generator().manual_seed(5)
    q = F.normalize(torch.randn(8, 4, generator=g), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(8, 4, generator=g), dim=1).requires_grad_(True)
    loss = patch_nce([q, q * 1.0], [k, k * 1.0], 2)
    loss.backward()
    assert k.grad is None
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
