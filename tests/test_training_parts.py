"""Hand-computed checks of the training pieces: losses, pseudo labels, ClassMix and the
augmentation, the optimizer schedule and the EMA teacher (docs/method.md §3).

Expected values are typed-in numbers or plain `math`, never a second call of the code under test.
"""
import math

import pytest
import torch
import torch.nn as nn

from confeti_fast.data.augment import (blur_kernel_size, class_mix_masks, color_jitter, gaussian_blur, mix,
                                       strong_augment)
from confeti_fast.losses import cam_loss, downscale_label_ratio, feature_distance, nearest_downsample, seg_ce
from confeti_fast.optim import build_optimizer, copy_state, ema_alpha, lr_at, set_lr, update_teacher
from confeti_fast.iteration import pseudo_labels

THINGS = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def _softplus(x):
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- seg_ce

def test_bn_buffers_travel_in_one_collective_and_exactly(monkeypatch):
    """One broadcast per step for all BN buffers of student and teacher (not one per tensor),
    and the float64 carrier gives back every float32 statistic and int64 counter bit for bit."""
    from confeti_fast import distributed

    calls = []
    monkeypatch.setattr(distributed.dist, "broadcast", lambda tensor, src: calls.append((tensor.dtype, src)))
    nets = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)) for _ in range(2)]
    for net in nets:
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.1, 3.0)
                module.num_batches_tracked.fill_(2 ** 40 + 3)
    before = [b.clone() for net in nets for b in net.buffers()]
    distributed.Context(rank=1, world_size=2).broadcast_buffers(*nets)
    assert calls == [(torch.float64, 0)]
    after = list(b for net in nets for b in net.buffers())
    assert all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(before, after))


def test_seg_ce_mean_over_all_pixels_including_ignored():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2): pixel 0 (2, 0), pixel 1 (0, 1)
    ce0 = _softplus(-2.0)  # -log softmax(2, 0)[0] = log(1 + e^-2)
    got = seg_ce(logits, torch.tensor([[[0, 255]]])).item()
    assert got == pytest.approx(ce0 / 2, rel=1e-6)  # not ce0 (mean over kept only)


def test_seg_ce_pixel_weights():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])
    ce0, ce1 = _softplus(-2.0), _softplus(-1.0)  # pixel 1 labelled 1: log(1 + e^-1)
    weight = torch.tensor([[[0.5, 2.0]]])
    got = seg_ce(logits, torch.tensor([[[0, 1]]]), weight).item()
    assert got == pytest.approx((0.5 * ce0 + 2.0 * ce1) / 2, rel=1e-6)
    got = seg_ce(logits, torch.tensor([[[255, 1]]]), weight).item()
    assert got == pytest.approx(2.0 * ce1 / 2, rel=1e-6)


def test_seg_ce_upsamples_logits_to_label_size():
    logits = torch.tensor([[[[1.0]], [[-1.0]]]])  # constant, upsampled to 2x2 stays constant
    got = seg_ce(logits, torch.tensor([[[1, 1], [1, 255]]])).item()
    assert got == pytest.approx(3 * _softplus(2.0) / 4, rel=1e-6)


# ---------------------------------------------------------------- cam_loss

def test_cam_loss_by_hand():
    cam = torch.tensor([
        [[[1.0, 3.0]], [[-1.0, -1.0]], [[0.0, 4.0]]],   # scores 2, -1, 2
        [[[0.0, 0.0]], [[2.0, -4.0]], [[1.0, 1.0]]],    # scores 0, -1, 1
    ])
    labels = torch.tensor([[[0, 255], [0, 0]], [[1, 2], [255, 2]]])  # present {0} and {1, 2}
    # y = 1: log(1 + e^-s); y = 0: log(1 + e^s)
    terms = [_softplus(-2), _softplus(-1), _softplus(2),
             _softplus(0), _softplus(1), _softplus(-1)]
    assert cam_loss(cam, labels).item() == pytest.approx(sum(terms) / 6, rel=1e-6)


def test_cam_loss_all_ignored_label_is_all_negative():
    cam = torch.tensor([[[[0.5]], [[-2.0]]]])
    labels = torch.full((1, 2, 2), 255)
    assert cam_loss(cam, labels).item() == pytest.approx((_softplus(0.5) + _softplus(-2.0)) / 2, rel=1e-6)


# ---------------------------------------------------------------- downscale / feature distance

def _label_8x8():
    lab = torch.zeros(8, 8, dtype=torch.long)
    lab[0:4, 0:4] = 11                       # cell (0,0): 100% person
    lab[0:4, 4:8] = 13
    lab[0, 4:8] = 2                          # cell (0,1): 12/16 = 75% car -> kept
    lab[4:8, 0:4] = 17
    lab[4:6, 0:3] = 0                        # cell (1,0): 10/16 = 62.5% motorcycle -> 255
    lab[4:8, 4:8] = 255
    lab[7, 4:8] = 8                          # cell (1,1): 12/16 ignored, 4/16 vegetation -> 255
    return lab


def test_downscale_label_ratio():
    lab = _label_8x8()
    assert int((lab[4:8, 0:4] == 17).sum()) == 10 and int((lab[0:4, 4:8] == 13).sum()) == 12
    got = downscale_label_ratio(lab[None], (2, 2), 0.75, 19)
    assert got.tolist() == [[[11, 13], [255, 255]]]
    got = downscale_label_ratio(lab[None], (2, 2), 0.6, 19)
    assert got.tolist() == [[[11, 13], [17, 255]]]
    full = torch.full((1, 8, 8), 255, dtype=torch.long)
    assert downscale_label_ratio(full, (2, 2), 0.75, 19).tolist() == [[[255, 255], [255, 255]]]


def _vec_map(cells):
    """(D, 2, 2) from [[v00, v01], [v10, v11]]."""
    return torch.tensor(cells, dtype=torch.float32).permute(2, 0, 1)


def test_feature_distance_mean_over_thing_cells():
    lab0 = _label_8x8()                       # cells 11, 13, 255 (62.5% thing), 255
    lab1 = torch.full((8, 8), 8, dtype=torch.long)
    lab1[4:8, 4:8] = 6                        # cells 8 (stuff), 8, 8, 6 (thing)
    labels = torch.stack([lab0, lab1])
    imnet = torch.zeros(2, 2, 2, 2)
    student = torch.stack([
        _vec_map([[[3.0, 4.0], [1.0, 0.0]], [[100.0, 0.0], [0.0, 50.0]]]),
        _vec_map([[[0.0, 100.0], [70.0, 0.0]], [[9.0, 9.0], [0.0, 2.0]]]),
    ])
    imnet = imnet + 1.0
    student = student + 1.0
    got = feature_distance(student, imnet, labels, THINGS, 19).item()
    assert got == pytest.approx((5.0 + 1.0 + 2.0) / 3, rel=1e-6)   # not per-image (3 + 2) / 2
    # a lower majority ratio lets the 62.5% motorcycle cell (distance 100) in
    got = feature_distance(student, imnet, labels, THINGS, 19, min_ratio=0.6).item()
    assert got == pytest.approx((5.0 + 1.0 + 2.0 + 100.0) / 4, rel=1e-6)


def test_feature_distance_zero_without_things():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 4:, :] = 255
    student = torch.randn(1, 3, 2, 2, requires_grad=True)
    got = feature_distance(student, torch.zeros(1, 3, 2, 2), labels, THINGS, 19)
    assert got.item() == 0.0 and math.isfinite(got.item())


def test_nearest_downsample():
    lab = torch.arange(16).reshape(1, 4, 4)
    lab[0, 0, 2] = 255
    got = nearest_downsample(lab, (2, 2))
    assert got.dtype == torch.long and got.tolist() == [[[0, 255], [8, 10]]]
    lab = torch.arange(36).reshape(1, 6, 6)
    # 6 -> 4: source index floor(i * 1.5) = 0, 1, 3, 4
    assert nearest_downsample(lab, (4, 4)).tolist() == [[[0, 1, 3, 4], [6, 7, 9, 10], [18, 19, 21, 22],
                                                        [24, 25, 27, 28]]]


# ---------------------------------------------------------------- pseudo labels

def test_pseudo_labels_paper_rows_and_batch_q():
    h, w = 140, 4
    d = torch.zeros(2, h, w)       # logit of class 1 minus class 0; p_max = sigmoid(|d|)
    d[0, :70] = 10.0               # p = 0.99995, confident, class 1
    d[0, 70:] = 3.3                # p = 0.9644 < 0.968, class 1
    d[1, :10] = -3.5               # p = 0.9707 >= 0.968, class 0
    d[1, 10:] = 0.5                # p = 0.62, class 1
    logits = torch.stack([torch.zeros_like(d), d], dim=1)
    labels, weights, q = pseudo_labels(logits, (h, w), 0.968, 15, 120)
    # confident: 280 + 40 of 1120 pixels over the whole batch (per image it would be 0.5 and 1/14;
    # within the kept rows 15..19 it would be 0.5)
    assert float(q) == pytest.approx(2 / 7, abs=1e-7)
    assert labels.shape == (2, h, w) and weights.shape == (2, h, w)
    assert labels[0].eq(1).all() and labels[1, :10].eq(0).all() and labels[1, 10:].eq(1).all()
    expected = torch.zeros(2, h, w)
    expected[:, 15:20] = 2 / 7     # rows 0..14 and the last 120 rows (20..139) get 0
    assert torch.allclose(weights, expected, atol=1e-7)


def test_pseudo_labels_threshold_inclusive_and_no_bottom_rows():
    # K = 3: (0, 0, -100) -> p_max exactly 0.5 (counts at threshold 0.5); (0, 0, 0) -> 1/3 (not)
    logits = torch.zeros(1, 3, 4, 1)
    logits[0, 2, 0, 0] = -100.0
    logits[0, :, 1, 0] = torch.tensor([0.0, 8.0, 0.0])
    logits[0, 2, 2, 0] = -100.0
    labels, weights, q = pseudo_labels(logits, (4, 1), 0.5, 1, 0)
    assert float(q) == 0.75
    assert weights[0, :, 0].tolist() == [0.0, 0.75, 0.75, 0.75]   # ignore_bottom=0 keeps the last row
    assert labels[0, 1, 0].item() == 1


# ---------------------------------------------------------------- ClassMix and augmentation

def _mix_labels():
    a = torch.tensor([[0, 3, 3, 255], [7, 7, 0, 255]])           # classes {0, 3, 7}: pick 2
    b = torch.tensor([[1, 2, 4, 5], [5, 4, 2, 1]])               # {1, 2, 4, 5}: pick 2
    c = torch.tensor([[9, 9, 255, 9], [9, 9, 9, 9]])             # {9}: pick 1
    d = torch.full((2, 4), 255)                                  # nothing: empty mask
    return torch.stack([a, b, c, d])


def test_class_mix_masks_half_of_each_image_classes():
    labels = _mix_labels()
    wanted = {0: 2, 1: 2, 2: 1, 3: 0}
    own = [{0, 3, 7}, {1, 2, 4, 5}, {9}, set()]
    choices = set()
    for seed in range(12):
        masks = class_mix_masks(labels, torch.Generator().manual_seed(seed))
        assert masks.shape == labels.shape and masks.dtype == torch.bool
        for i in range(4):
            lab, m = labels[i].tolist(), masks[i].tolist()
            chosen = {lab[y][x] for y in range(2) for x in range(4) if m[y][x]}
            assert 255 not in chosen and chosen <= own[i]
            assert len(chosen) == wanted[i]
            for y in range(2):
                for x in range(4):  # every pixel of a chosen class is in the mask, nothing else
                    assert m[y][x] == (lab[y][x] in chosen)
            if i == 0:
                choices.add(frozenset(chosen))
    assert len(choices) > 1  # the choice is random


def test_class_mix_masks_deterministic_per_seed():
    labels = _mix_labels()
    a = class_mix_masks(labels, torch.Generator().manual_seed(7))
    b = class_mix_masks(labels, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_mix_images_and_labels():
    mask = torch.tensor([[[True, False], [False, True]]])
    src = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]])
    tgt = -src
    assert mix(mask, src, tgt).tolist() == [[[[1.0, -2.0], [-3.0, 4.0]], [[5.0, -6.0], [-7.0, 8.0]]]]
    assert mix(mask, torch.tensor([[[1, 2], [3, 4]]]), torch.tensor([[[9, 9], [9, 255]]])).tolist() == \
        [[[1, 9], [9, 4]]]


def test_blur_kernel_size():
    assert blur_kernel_size(512) == 51   # ceil(51.2) = 52 -> 51
    assert blur_kernel_size(640) == 63   # ceil(64.0) = 64 -> 63
    assert blur_kernel_size(51) == 5     # ceil(5.1) = 6 -> 5
    assert blur_kernel_size(30) == 3
    assert blur_kernel_size(70) == 7


def test_gaussian_blur_constant_and_impulse():
    const = torch.full((3, 20, 30), 0.37)
    assert torch.allclose(gaussian_blur(const, 0.8), const, atol=1e-6)
    # impulse far from the borders: 64 rows -> kernel 7, 30 columns -> kernel 3
    img = torch.zeros(1, 64, 30)
    img[0, 32, 15] = 1.0
    sigma = 0.9
    out = gaussian_blur(img, sigma)

    def kernel(size):
        raw = [math.exp(-((i - (size - 1) / 2) ** 2) / (2 * sigma ** 2)) for i in range(size)]
        return [r / sum(raw) for r in raw]

    ky, kx = kernel(7), kernel(3)
    expected = torch.zeros(1, 64, 30)
    for dy in range(7):
        for dx in range(3):
            expected[0, 32 - 3 + dy, 15 - 1 + dx] = ky[dy] * kx[dx]
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)  # mass (and so the mean) preserved


def test_color_jitter_range():
    g = torch.Generator().manual_seed(0)
    for seed in range(6):
        img = torch.rand(3, 5, 6, generator=g)
        img[:, 0, 0] = 1.0
        img[:, 0, 1] = 0.0
        out = color_jitter(img, 0.9, torch.Generator().manual_seed(seed))
        assert out.shape == img.shape and torch.isfinite(out).all()
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_color_jitter_zero_strength_is_identity():
    img = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(3))
    out = color_jitter(img, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(out, img, atol=1e-5)


def test_strong_augment_never_jitters_at_prob_one_without_blur():
    images = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(4))
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    for seed in range(5):
        out = strong_augment(images, mean, std, torch.Generator().manual_seed(seed), jitter_prob=1.0, blur=False)
        assert torch.equal(out, images)


# ---------------------------------------------------------------- EMA teacher

def test_ema_alpha():
    assert ema_alpha(0) == 0.0
    assert ema_alpha(1) == 0.5
    assert ema_alpha(10) == pytest.approx(1 - 1 / 11, abs=1e-15)
    assert ema_alpha(1_000_000) == 0.999
    assert ema_alpha(999) == pytest.approx(0.999, abs=1e-15)   # 1 - 1/1000 = momentum
    assert ema_alpha(500) == pytest.approx(1 - 1 / 501, abs=1e-15)


def _tiny(weight, bias, running_mean):
    m = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([weight[:2]]))
        m[0].bias.fill_(bias)
        m[1].weight.fill_(weight[2])
        m[1].bias.fill_(weight[3])
        m[1].running_mean.fill_(running_mean)
    return m


def _params(m):
    return [x for p in m.parameters() for x in p.detach().reshape(-1).tolist()]


@pytest.mark.parametrize("t,alpha", [(1, 0.5), (10, 1 - 1 / 11), (100_000, 0.999)])
def test_update_teacher(t, alpha):
    teacher = _tiny([1.0, 2.0, 3.0, 4.0], 5.0, 7.0)
    student = _tiny([-1.0, 0.5, 0.0, 8.0], 1.0, -3.0)
    tp, sp = _params(teacher), _params(student)
    update_teacher(teacher, student, t, 0.999)
    want = [alpha * a + (1 - alpha) * b for a, b in zip(tp, sp)]
    assert _params(teacher) == pytest.approx(want, abs=1e-6)
    assert teacher[1].running_mean.item() == 7.0     # BN buffers are not averaged
    assert _params(student) == sp


def test_update_teacher_copies_at_t0():
    teacher = _tiny([1.0, 2.0, 3.0, 4.0], 5.0, 7.0)
    student = _tiny([-1.0, 0.5, 0.0, 8.0], 1.0, -3.0)
    update_teacher(teacher, student, 0, 0.999)
    assert _params(teacher) == _params(student)
    assert teacher[1].running_mean.item() == 7.0


def _resnet_pair():
    from confeti_fast.models.resnet import ResNetV1c

    torch.manual_seed(0)
    a, b = ResNetV1c(18), ResNetV1c(18)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p))
        b(torch.randn(2, 3, 32, 32))  # moves b's BN running statistics
    return a, b


@pytest.mark.parametrize("t", [0, 1, 7, 100_000])
def test_update_teacher_is_bitwise_the_per_parameter_loop(t):
    # The multi-tensor update must give exactly what the plain per-parameter loop gives.
    teacher, student = _resnet_pair()
    expected = [p.detach().clone() for p in teacher.parameters()]
    alpha = ema_alpha(t, 0.999)
    for p_t, p_s in zip(expected, student.parameters()):
        if t == 0:
            p_t.copy_(p_s.detach())
        else:
            p_t.mul_(alpha).add_(p_s.detach(), alpha=1.0 - alpha)
    update_teacher(teacher, student, t, 0.999)
    assert all(torch.equal(got, want) for got, want in zip(teacher.parameters(), expected))


def test_copy_state_is_bitwise_the_per_tensor_copy():
    destination, source = _resnet_pair()
    copy_state(destination, source)
    pairs = (list(zip(destination.parameters(), source.parameters()))
             + list(zip(destination.buffers(), source.buffers())))
    assert len(pairs) > 100 and all(torch.equal(d, s) and d.data_ptr() != s.data_ptr() for d, s in pairs)


# ---------------------------------------------------------------- learning rate

OPT = {"lr": 6e-5, "head_lr_mult": 10.0, "betas": (0.9, 0.999), "weight_decay": 0.01,
       "warmup_iters": 1500, "warmup_ratio": 1e-6, "power": 1.0}


def test_lr_at_schedule():
    assert lr_at(6e-5, 0, 80000, 1500) == pytest.approx(6e-11, rel=1e-9)
    # mmcv: regular = 6e-5 (1 - 750/80000) = 5.94375e-5; k = (1 - 0.5)(1 - 1e-6) = 0.4999995
    assert lr_at(6e-5, 750, 80000, 1500) == pytest.approx(5.94375e-5 * 0.5000005, rel=1e-12)
    assert lr_at(6e-5, 1500, 80000, 1500) == pytest.approx(6e-5 * 0.98125, rel=1e-12)
    assert lr_at(6e-5, 40000, 80000, 1500) == pytest.approx(3e-5, rel=1e-12)
    assert lr_at(6e-5, 80000, 80000, 1500) == 0.0
    assert lr_at(1.0, 40000, 80000, 1500, power=0.9) == pytest.approx(0.5 ** 0.9, rel=1e-12)


def test_optimizer_groups_and_set_lr():
    backbone = [nn.Parameter(torch.zeros(2))]
    heads = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(1))]
    opt = build_optimizer(iter(backbone), heads, OPT)
    assert isinstance(opt, torch.optim.AdamW)
    g0, g1 = opt.param_groups
    assert len(g0["params"]) == 1 and len(g1["params"]) == 2
    assert g0["betas"] == (0.9, 0.999) and g0["weight_decay"] == 0.01 and g1["weight_decay"] == 0.01
    assert g0["lr"] == pytest.approx(6e-5) and g1["lr"] == pytest.approx(6e-4)

    set_lr(opt, 0, 80000, OPT)
    assert g0["lr"] == pytest.approx(6e-11, rel=1e-9) and g1["lr"] == pytest.approx(6e-10, rel=1e-9)
    set_lr(opt, 750, 80000, OPT)
    assert g0["lr"] == pytest.approx(5.94375e-5 * 0.5000005, rel=1e-12)
    assert g1["lr"] == pytest.approx(5.94375e-4 * 0.5000005, rel=1e-12)
    set_lr(opt, 1500, 80000, OPT)
    assert g0["lr"] == pytest.approx(6e-5 * (1 - 1500 / 80000), rel=1e-12)
    assert g1["lr"] == pytest.approx(6e-4 * (1 - 1500 / 80000), rel=1e-12)
    set_lr(opt, 80000, 80000, OPT)
    assert g0["lr"] == 0.0 and g1["lr"] == 0.0
    # the base rate is not eroded by repeated set_lr calls
    set_lr(opt, 40000, 80000, OPT)
    assert g0["lr"] == pytest.approx(3e-5, rel=1e-12) and g1["lr"] == pytest.approx(3e-4, rel=1e-12)
