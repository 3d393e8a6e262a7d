"""pixel_proto_contrast (docs/method.md §5): the reference by hand, and the CPU fast path and the fused
Triton op against the reference (the contract): losses and gradients. (The switch that picks
among them: test_ops_switch.py; the sampler: test_sampling.py.)

The hand-computed checks take every expected value from typed-in numbers or a naive
formulation written here or in helpers.py (plain Python / `math`), never from the code under test.

The Triton op runs on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
where there is no CUDA GPU) and on CUDA when a GPU is present; shapes are small because the
interpreter is ~1000x slower than eager.

Tolerances
* fp32: rtol 1e-5, atol 1e-6. Both sides compute in fp32 from the same inputs; only the
  summation order differs (x.P then scale by 1/|x| instead of normalize then dot; per-block
  partial sums), which moves results by ~1e-7 relative.
* bf16 feats / q (CUDA only): the reference runs on the same bf16 tensors (it upcasts to fp32
  itself), so losses still agree to fp32 rounding: rtol 1e-4, atol 1e-5 (headroom over the
  ~1e-6 seen in fp32). Gradients come back in bf16 on both sides, each the bf16 rounding of
  fp32 values that agree to ~1e-6, so they differ by at most one bf16 ulp (2^-8..2^-7
  relative): rtol 1e-2, atol 1e-3 x the largest reference gradient (for elements where the
  normalization's g - v (v.g) cancels and the relative error of tiny values is larger).
"""
import itertools
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from confeti_fast.kernels import contrast as kc
from confeti_fast.kernels import patch_nce as kp
from confeti_fast import reference
from confeti_fast.ops.contrast import pixel_proto_contrast_cpu
from confeti_fast.sampling import sample_kept_pixels, sample_pixels
from helpers import BF16_LOSS, DEVICES, FP32, assert_close_bf16_grad, needs_cuda, py_normalize
from helpers import exact_fp32_matmul  # noqa: F401  (autouse fixture)

needs_triton = pytest.mark.skipif(not (kc.AVAILABLE and kp.AVAILABLE),
                                  reason=f"Triton unusable here: {kc.LOAD_ERROR or kp.LOAD_ERROR}")


# ---------------------------------------------------------------- the reference, by hand

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
    v = [py_normalize(p) for p in pixels]
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


def test_contrast_tiny_case_by_hand():
    # v = (0.6, 0.8), (0, -1), (-1/sqrt2, 1/sqrt2)
    pixels = [[3.0, 4.0], [0.0, -2.0], [-1.0, 1.0]]
    labels = [0, 1, 2]
    feats = _feats(pixels, 1, 3)
    lab = torch.tensor(labels).reshape(1, 1, 3)
    protos = torch.tensor(PROTOS3)
    ce, reg = reference.pixel_proto_contrast(feats, lab, protos, sample_idx=torch.tensor([0, 2]))

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
    ce, reg = reference.pixel_proto_contrast(feats, lab, torch.tensor(PROTOS3), sample_idx=torch.tensor([2]))
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
    ce, reg = reference.pixel_proto_contrast(_feats(pixels, 1, 3), lab, torch.tensor(PROTOS3), tau=0.5,
                                   sample_idx=torch.tensor([1, 2, 0]), ce_weight=1.0, reg_weight=1.0)
    exp_ce, exp_reg = _naive_contrast(pixels, labels, PROTOS3, [1, 2, 0], tau=0.5, ce_weight=1.0, reg_weight=1.0)
    assert ce.item() == pytest.approx(exp_ce, abs=1e-5)
    assert reg.item() == pytest.approx(exp_reg, abs=1e-5)


def test_contrast_k19_uniform_logits():
    # zero prototypes: every logit 0 -> CE = ln 19, reg = 2 * 19 * ln(1/19) / (19 ln 19) = -2
    feats = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    lab = torch.tensor([[[0, 5, 18], [3, 255, 7]]])
    ce, reg = reference.pixel_proto_contrast(feats, lab, torch.zeros(19, 4), sample_idx=torch.tensor([0, 1, 2, 3]))
    assert ce.item() == pytest.approx(0.5 * math.log(19), abs=1e-5)
    assert reg.item() == pytest.approx(-2.0, abs=1e-5)


def test_contrast_k19_uses_k_ln_k():
    g = torch.Generator().manual_seed(1)
    protos = F.normalize(torch.randn(19, 3, generator=g), dim=1)
    feats = torch.randn(1, 3, 2, 2, generator=g)
    lab = torch.tensor([[[4, 9], [255, 13]]])
    _, reg = reference.pixel_proto_contrast(feats, lab, protos, sample_idx=torch.tensor([0]))
    pix = feats[0].permute(1, 2, 0).reshape(-1, 3).tolist()
    v = [py_normalize(p) for p in pix]
    kept = [0, 1, 3]
    vbar = [sum(v[i][d] for i in kept) / 3 for d in range(3)]
    s = sum(_log_softmax([_dot(vbar, pk) / 0.1 for pk in protos.tolist()]))
    assert reg.item() == pytest.approx(2 * s / 55.944, rel=1e-4)


def test_contrast_all_ignored_is_zero_and_backward_works():
    feats = torch.randn(2, 3, 2, 2, requires_grad=True)
    lab = torch.full((2, 2, 2), 255, dtype=torch.long)
    ce, reg = reference.pixel_proto_contrast(feats, lab, F.normalize(torch.randn(5, 3), dim=1))
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
    ce, reg = reference.pixel_proto_contrast(feats, lab, protos, sample_idx=torch.tensor([1, 4, 9, 17]))
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
        ce, _ = reference.pixel_proto_contrast(feats, lab, torch.tensor(PROTOS3), num_samples=2, ce_weight=1.0)
        hits = [i for i, m in enumerate(means[2]) if abs(m - ce.item()) < 1e-5]
        assert len(hits) == 1, ce.item()
        assert all(abs(m - ce.item()) > 1e-3 for m in others)
        seen.add(hits[0])
    assert len(seen) > 1  # it is random
    # more samples than kept pixels: all kept pixels, each once
    torch.manual_seed(0)
    ce, _ = reference.pixel_proto_contrast(feats, lab, torch.tensor(PROTOS3), num_samples=4096, ce_weight=1.0)
    assert ce.item() == pytest.approx(means[4][0], abs=1e-5)


# ---------------------------------------------------------------- the CPU fast path = the reference

def _contrast_inputs(gen, batch, dim, height, width, classes, ignored_fraction, channels_last=False):
    feats = torch.randn(batch, dim, height, width, generator=gen)
    if channels_last:
        feats = feats.to(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch, height, width), generator=gen)
    labels[torch.rand(batch, height, width, generator=gen) < ignored_fraction] = 255
    protos = F.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    return feats.requires_grad_(True), labels, protos


@pytest.mark.parametrize("batch,dim,height,width,classes,ignored,channels_last", [
    (2, 16, 9, 7, 19, 0.3, False),
    (1, 40, 13, 11, 16, 0.0, True),
    (3, 8, 5, 5, 19, 0.97, False),
])
def test_cpu_fast_path_matches_reference(batch, dim, height, width, classes, ignored, channels_last):
    gen = torch.Generator().manual_seed(dim)
    feats, labels, protos = _contrast_inputs(gen, batch, dim, height, width, classes, ignored, channels_last)
    idx = sample_kept_pixels(labels, 64, torch.Generator().manual_seed(1))
    results = []
    for op in (reference.pixel_proto_contrast, pixel_proto_contrast_cpu):
        feats.grad = None
        ce, reg = op(feats, labels, protos, sample_idx=idx)
        (ce + 0.7 * reg).backward()
        results.append((ce.detach(), reg.detach(), feats.grad.clone()))
    (ce0, reg0, g0), (ce1, reg1, g1) = results
    torch.testing.assert_close(ce1, ce0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reg1, reg0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)


def test_cpu_fast_path_everything_ignored():
    feats, labels, protos = _contrast_inputs(torch.Generator().manual_seed(0), 1, 4, 3, 3, 5, 1.0)
    ce, reg = pixel_proto_contrast_cpu(feats, labels, protos)
    (ce + reg).backward()
    assert ce.item() == 0.0 and reg.item() == 0.0
    assert torch.count_nonzero(feats.grad) == 0


def test_cpu_fast_path_skips_samples_at_ignored_pixels():
    feats, labels, protos = _contrast_inputs(torch.Generator().manual_seed(5), 1, 8, 6, 7, 19, 0.9)
    idx = sample_pixels(labels, 30, torch.Generator().manual_seed(2))
    assert (labels.reshape(-1)[idx] == 255).any()
    got = pixel_proto_contrast_cpu(feats, labels, protos, sample_idx=idx)
    want = reference.pixel_proto_contrast(feats, labels, protos, sample_idx=idx)
    kept_only = idx[labels.reshape(-1)[idx] != 255]
    same = reference.pixel_proto_contrast(feats, labels, protos, sample_idx=kept_only)
    for a, b, c in zip(got, want, same):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the Triton op = the reference

def contrast_case(device, B=2, D=32, H=9, W=13, K=19, num_samples=100, ignore_frac=0.2, classes=None,
                  kept=None, channels_last=False, dtype=torch.float32, seed=0):
    """feats, labels, prototypes, sample_idx. `classes` limits the labels present; `kept` keeps
    only that many pixels (the rest 255)."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, D, H, W, generator=gen)
    choices = torch.tensor(classes if classes is not None else list(range(K)))
    labels = choices[torch.randint(0, len(choices), (B, H, W), generator=gen)]
    if kept is None:
        labels[torch.rand(B, H, W, generator=gen) < ignore_frac] = 255
    else:
        labels.view(-1)[torch.randperm(labels.numel(), generator=gen)[kept:]] = 255
    protos = F.normalize(torch.randn(K, D, generator=gen), dim=1)
    idx = sample_kept_pixels(labels.reshape(-1), num_samples, generator=gen)
    feats = feats.to(device=device, dtype=dtype)
    if channels_last:
        feats = feats.contiguous(memory_format=torch.channels_last)
    return feats, labels.to(device), protos.to(device), idx.to(device)


def run_contrast(fn, feats, labels, protos, idx, w_ce=0.7, w_reg=1.3, **kw):
    leaf = feats.detach().clone().requires_grad_(True)
    loss_ce, loss_reg = fn(leaf, labels, protos, sample_idx=idx, **kw)
    (w_ce * loss_ce + w_reg * loss_reg).backward()
    return loss_ce.detach(), loss_reg.detach(), leaf.grad


def assert_contrast_matches(case, grad_tol=FP32, **kw):
    ce, reg, grad = run_contrast(kc.pixel_proto_contrast, *case, **kw)
    rce, rreg, rgrad = run_contrast(reference.pixel_proto_contrast, *case, **kw)
    for got in (ce, reg):
        assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(ce, rce, **FP32)
    torch.testing.assert_close(reg, rreg, **FP32)
    assert grad.dtype == rgrad.dtype and grad.shape == rgrad.shape
    torch.testing.assert_close(grad, rgrad, **grad_tol)
    return grad


CONTRAST_CASES = {
    # 234 pixels: not a multiple of the pixel block; 100 samples: not a multiple of 32
    "basic_k19": dict(),
    "k16": dict(K=16),
    "single_class": dict(classes=[4]),
    "three_kept": dict(kept=3),
    "samples_below_block": dict(num_samples=5),
    "d40": dict(D=40),  # sampled-row kernel: D chunks of 32, the second one partial
    "channels_last": dict(channels_last=True),
    "all_kept_sampled": dict(num_samples=10_000, ignore_frac=0.5),
    "b1_odd_map": dict(B=1, H=7, W=5, D=24, K=5),
}


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONTRAST_CASES))
def test_contrast_matches_reference(device, name):
    assert_contrast_matches(contrast_case(device, **CONTRAST_CASES[name]))


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_other_hyperparameters(device):
    assert_contrast_matches(contrast_case(device), tau=0.2, ce_weight=1.0, reg_weight=0.5)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_multichunk_pixel_kernels(device, monkeypatch):
    # D = 40 in chunks of 16 (the last one 8 wide) in the all-pixel kernels, 32 pixels a block.
    monkeypatch.setattr(kc, "_BLOCK_OVERRIDE", {"pixel_d": 16, "pixel_m": 32, "sample_d": 16})
    assert not kc._blocks(19, 40)["one_chunk"]
    assert_contrast_matches(contrast_case(device, D=40))


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_multipass_reductions(device, monkeypatch):
    # Small tiles so every reduction loop runs several times, the last pass partial: kernel B
    # sums kernel A's 15 partial rows 4 at a time over 3 column chunks (the last 8 wide), the
    # finalize sums 15 kept counts and 7 sample blocks 4 at a time, B's 3 logit partials 2 at a
    # time and writes mean_grad in 3 chunks of 16.
    monkeypatch.setattr(kc, "_BLOCK_OVERRIDE", {"pixel_m": 16, "sample_n": 16, "red_rows": 4, "red_d": 16,
                                                "fin_p": 4, "fin_r": 2, "fin_d": 16})
    assert_contrast_matches(contrast_case(device, D=40))


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_strided_feats(device):
    # A non-dense view (every other channel, cropped width): read by strides, never copied.
    feats, labels, protos, _ = contrast_case(device, D=64, W=15)
    view = feats[:, ::2, :, 1:-1]
    labels = labels[:, :, 1:-1].contiguous()
    idx = sample_kept_pixels(labels.reshape(-1), 50, generator=torch.Generator().manual_seed(1))
    grad = assert_contrast_matches((view, labels, protos[:, :32].contiguous(), idx.to(device)))
    assert grad.shape == view.shape


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_zero_feature_vector(device):
    # A kept, sampled pixel whose vector is 0 takes F.normalize's eps branch (gradient g / eps).
    feats, labels, protos, idx = contrast_case(device)
    flat = idx[0]
    b, rem = divmod(int(flat), 9 * 13)
    feats[b, :, rem // 13, rem % 13] = 0
    # That row's gradient is sum_k g_k P_k / (tau eps) ~ 1e7, a sum whose terms cancel (logits
    # are all 0, g = 1/K - onehot): summation order alone moves it by ~1e-5 relative.
    assert_contrast_matches((feats, labels, protos, idx), grad_tol=dict(rtol=1e-4, atol=1e-6))


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_sampler_draw(device):
    # sample_idx=None draws with sampling.sample_kept_pixels from the global generator.
    feats, labels, protos, _ = contrast_case(device)
    torch.manual_seed(123)
    got = kc.pixel_proto_contrast(feats, labels, protos, num_samples=40)
    torch.manual_seed(123)
    want = reference.pixel_proto_contrast(feats, labels, protos, num_samples=40)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **FP32)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("given_idx", [True, False], ids=["empty_idx", "sampler"])
def test_contrast_everything_ignored(device, given_idx):
    feats, labels, protos, _ = contrast_case(device)
    labels = torch.full_like(labels, 255)
    idx = torch.empty(0, dtype=torch.long, device=device) if given_idx else None
    leaf = feats.clone().requires_grad_(True)
    loss_ce, loss_reg = kc.pixel_proto_contrast(leaf, labels, protos, sample_idx=idx)
    assert loss_ce.dtype == loss_reg.dtype == torch.float32
    assert loss_ce.item() == 0.0 and loss_reg.item() == 0.0
    (loss_ce + loss_reg).backward()
    assert leaf.grad is not None and torch.count_nonzero(leaf.grad).item() == 0
    rce, rreg = reference.pixel_proto_contrast(feats, labels, protos, sample_idx=idx)
    assert rce.item() == 0.0 and rreg.item() == 0.0


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_one_loss_backward(device):
    # Backward through loss_ce alone (loss_reg unused) and loss_reg alone.
    case = contrast_case(device, num_samples=20)
    for which in (0, 1):
        grads = []
        for fn in (kc.pixel_proto_contrast, reference.pixel_proto_contrast):
            leaf = case[0].clone().requires_grad_(True)
            fn(leaf, *case[1:3], sample_idx=case[3])[which].backward()
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[0], grads[1], **FP32)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_prototypes_get_no_gradient(device):
    feats, labels, protos, idx = contrast_case(device, num_samples=20)
    protos = protos.clone().requires_grad_(True)
    loss_ce, loss_reg = kc.pixel_proto_contrast(feats.requires_grad_(True), labels, protos, sample_idx=idx)
    (loss_ce + loss_reg).backward()
    assert protos.grad is None and feats.grad is not None


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_opcheck(device):
    feats, labels, protos, idx = contrast_case(device, D=16, H=5, W=6, K=5, num_samples=20)
    feats.requires_grad_(True)
    torch.library.opcheck(torch.ops.confeti_fast.contrast_forward.default,
                          (feats, labels, protos, idx, 0.1, 0.5, 2.0))
    out = torch.ops.confeti_fast.contrast_forward(feats.detach(), labels, protos, idx, 0.1, 0.5, 2.0)
    for grads in [(torch.tensor(0.7, device=device), torch.tensor(1.3, device=device)),
                  (None, torch.tensor(1.3, device=device))]:  # an unused loss's gradient is None
        torch.library.opcheck(torch.ops.confeti_fast.contrast_backward.default,
                              (*grads, feats.detach(), labels, protos, idx, out[2], out[3], 0.1))


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_compiles_without_graph_breaks(device):
    feats, labels, protos, idx = contrast_case(device, D=16, H=5, W=6, K=5, num_samples=20)

    def step(x):
        loss_ce, loss_reg = kc.pixel_proto_contrast(x, labels, protos, sample_idx=idx)
        return loss_ce + loss_reg

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = feats.clone().requires_grad_(True)
    b = feats.clone().requires_grad_(True)
    torch.testing.assert_close(compiled(a), step(b), **FP32)
    compiled(a).backward()
    step(b).backward()
    torch.testing.assert_close(a.grad, b.grad, **FP32)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_duplicate_sample_idx(device):
    # A user-given sample_idx may repeat pixels: the reference counts each repeat in the CE mean
    # and sums their gradients. Repeats inside one block of 32 rows and across blocks, one
    # pixel three times, and a repeated sample at an ignored pixel (skipped each time).
    feats, labels, protos, idx = contrast_case(device)
    ignored = (labels.reshape(-1) == 255).nonzero()[0]
    idx = torch.cat([idx, idx[:6], idx[2:3], idx[40:41], ignored, ignored, idx[97:99]])
    assert_contrast_matches((feats, labels, protos, idx))


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_forward_backward_launches(device):
    # Forward + backward with sample_idx given: kernel A (kept sum, zeroes the sample counts),
    # B (sampled rows' CE, second stage of A's sum), C (finalize), one backward kernel; at
    # most 6 launches in all (today no torch op does work: 4).
    from confeti_fast.profiling import count_launches
    expected = ["triton::_kept_sum_kernel", "triton::_sample_kernel", "triton::_finalize_kernel",
                "triton::_backward_kernel"]
    for dtype in [torch.float32] + ([torch.bfloat16] if device == "cuda" else []):
        feats, labels, protos, idx = contrast_case(device, dtype=dtype)
        g_ce, g_reg = torch.tensor(0.7, device=device), torch.tensor(1.3, device=device)
        # Fresh leaves: autograd then stores the gradient without an accumulating add.
        leaves = [feats.detach().clone().requires_grad_(True) for _ in range(2)]

        def step(leaf):
            ce, reg = kc.pixel_proto_contrast(leaf, labels, protos, sample_idx=idx)
            torch.autograd.backward([ce, reg], [g_ce, g_reg])

        step(leaves[0])  # compiles the kernels first (on CUDA)
        launches = count_launches(lambda: step(leaves[1]))
        assert [name for name in launches.names if name.startswith("triton::")] == expected, launches.names
        assert launches.total <= 6, launches.names
        torch.testing.assert_close(leaves[1].grad, leaves[0].grad, rtol=0, atol=0)  # deterministic


@needs_triton
@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [dict(), dict(B=2, D=512, H=64, W=64, K=19, num_samples=4096)],
                         ids=["small", "training_size"])
def test_contrast_bf16_cuda(channels_last, shape):
    case = contrast_case("cuda", channels_last=channels_last, dtype=torch.bfloat16, **shape)
    ce, reg, grad = run_contrast(kc.pixel_proto_contrast, *case)
    rce, rreg, rgrad = run_contrast(reference.pixel_proto_contrast, *case)
    torch.testing.assert_close(ce, rce, **BF16_LOSS)
    torch.testing.assert_close(reg, rreg, **BF16_LOSS)
    assert grad.dtype == torch.bfloat16 == rgrad.dtype
    assert_close_bf16_grad(grad, rgrad)


@needs_triton
@needs_cuda
def test_contrast_training_size_fp32_cuda():
    # D = 512 (whole rows in the all-pixel kernels, 64-wide chunks in the sampled-row one), 4096 samples.
    assert_contrast_matches(contrast_case("cuda", B=2, D=512, H=64, W=64, num_samples=4096,
                                          channels_last=True))


@needs_triton
@needs_cuda
def test_contrast_has_no_host_syncs_cuda():
    # Forward and backward (sample_idx given) never wait on the GPU.
    feats, labels, protos, idx = contrast_case("cuda", num_samples=50)

    def forward_backward():
        leaf = feats.clone().requires_grad_(True)
        loss_ce, loss_reg = kc.pixel_proto_contrast(leaf, labels, protos, sample_idx=idx)
        (loss_ce + loss_reg).backward()

    forward_backward()  # compiles the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward()
        labels.fill_(255)  # everything ignored: still no sync
        forward_backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


class PtxasCannotRead(Exception):
    """The ptxas Triton compiles with rejects the PTX version Triton wrote (the reason is the message)."""


def _triton_ptxas(arch=90):
    """(path, CUDA release) of the ptxas Triton compiles sm_`arch` kernels with, or None where it
    finds none. Triton sizes the PTX .version to that ptxas: 3.9 takes bin/ptxas-blackwell (CUDA 13)
    from sm_90 on and writes PTX the wheel's bin/ptxas (CUDA 12.9) cannot read."""
    try:
        from triton.backends.nvidia import compiler
    except ImportError:
        return None
    try:
        if not hasattr(compiler, "get_ptxas"):  # older Triton: one ptxas, found by name
            return tuple(compiler._path_to_binary("ptxas"))
        try:
            tool = compiler.get_ptxas(arch)
        except TypeError:  # versions whose get_ptxas() takes no arch
            tool = compiler.get_ptxas()
    except RuntimeError:  # "Cannot find ptxas"
        return None
    return (tool.path, tool.version) if hasattr(tool, "path") else tuple(tool)


def _raise_if_ptx_version_unread(log, ptxas, release):
    """PtxasCannotRead when ptxas's `log` says it does not read the PTX version it was given."""
    import re

    import triton
    line = next((x.strip() for x in log.splitlines() if "Unsupported .version" in x), None)
    if line is not None:
        version = re.search(r"Unsupported \.version ([\d.]+)", line)
        raise PtxasCannotRead(f"no ptxas here reads the PTX .version {version.group(1) if version else '?'} that "
                              f"Triton {triton.__version__} writes for sm_90: Triton compiles with {ptxas} "
                              f"(CUDA {release}), which stops with {line!r}")


def _sm90_ptxas_info(B=2, D=512, H=81, W=81, K=19, N=4096, channels_last=True, dtype=torch.bfloat16,
                     grads=(True, True), view=False):
    """{kernel: ptxas -v line} for the contrast kernels as launched at this shape, compiled for
    sm_90 with a real launch's specialization (ints == 1 constexpr, ints and pointers % 16).
    Needs no GPU; call without TRITON_INTERPRET (the kernels must be JIT functions). Raises
    PtxasCannotRead where Triton's ptxas does not read the PTX version Triton wrote."""
    import subprocess
    import tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.int64: "*i64", torch.int32: "*i32"}
    feats = torch.zeros(B, 2 * D if view else D, H, W + 2 * view, dtype=dtype)
    feats = feats[:, ::2, :, 1:-1] if view else feats
    if channels_last:
        feats = feats.contiguous(memory_format=torch.channels_last)
    labels, protos, idx = torch.zeros(B, H, W, dtype=torch.long), torch.zeros(K, D), torch.zeros(N, dtype=torch.long)
    launches = []
    launch = kc.launch
    kc.launch = lambda kernel, grid, *args, **kw: launches.append((kernel, args, kw))
    try:
        _, _, counts, saved = kc._forward_impl(feats, labels, protos, idx, 0.1, 0.5, 2.0)
        grad_ce, grad_reg = (torch.ones(()) if g else None for g in grads)
        kc._backward_impl(grad_ce, grad_reg, feats, labels, protos, idx, counts, saved, 0.1)
    finally:
        kc.launch = launch
    ptxas, release = _triton_ptxas()
    info = {}
    for kernel, args, kw in launches:
        kw = dict(kw)
        num_warps = kw.pop("num_warps")
        sig, consts, attrs = {}, {}, {}
        values = list(args) + [kw[n] for n in kernel.arg_names[len(args):]]
        for i, (name, value) in enumerate(zip(kernel.arg_names, values)):
            if name in kw or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
                sig[name], consts[(i,)] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                sig[name], attrs[(i,)] = ptr[value.dtype], [["tt.divisibility", 16]]
            elif isinstance(value, float):
                sig[name] = "fp32"
            else:
                sig[name] = "i32" if abs(value) < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        try:
            compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": num_warps})
        except Exception as exc:  # its cubin stage runs the same ptxas
            _raise_if_ptx_version_unread(str(exc), ptxas, release)
            raise
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "k.ptx").write_text(compiled.asm["ptx"])
            out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(Path(tmp) / "k.ptx"), "-o",
                                  str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
        if out.returncode != 0:
            _raise_if_ptx_version_unread(out.stderr, ptxas, release)
        out.check_returncode()
        info[kernel.__name__] = " ".join(line.split("ptxas info    :")[-1].strip()
                                         for line in out.stderr.splitlines() if "Used" in line or "spill" in line)
    return info


@needs_triton
def test_contrast_kernels_compile_for_sm90_without_spills():
    # The interpreter runs what the compiler may reject (e.g. a variable typed differently in
    # the two branches of a runtime if) and shows nothing of registers: compile for sm_90
    # (no GPU needed) at the paper shape, and the other launch variants.
    import json
    import subprocess
    import sys
    pytest.importorskip("triton")
    if _triton_ptxas() is None:
        pytest.skip("Triton finds no ptxas to compile sm_90 kernels with here")
    code = ("import json, sys, torch; sys.path.insert(0, %r)\n"
            "import test_op_contrast as t\n"
            "try:\n"
            "    result = [t._sm90_ptxas_info(),\n"
            "        t._sm90_ptxas_info(D=64, H=9, W=13, N=0, grads=(False, True)),\n"
            "        t._sm90_ptxas_info(D=64, H=9, W=13, N=50, channels_last=False, view=True, grads=(True, False))]\n"
            "except t.PtxasCannotRead as why:\n"
            "    result = {'skip': str(why)}\n"
            "print(json.dumps(result))\n"
            % str(Path(__file__).parent))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if isinstance(result, dict):
        pytest.skip(result["skip"])
    paper, *variants = result
    assert list(paper) == ["_kept_sum_kernel", "_sample_kernel", "_finalize_kernel", "_backward_kernel"]
    for name, line in paper.items():  # bf16 channels_last, D=512, K=19, N=4096
        assert "0 bytes spill stores, 0 bytes spill loads" in line, (name, line)
    assert all(len(v) == 4 for v in variants)


# ------------------------------------------------------------------------------ module hygiene

@needs_triton
def test_modules_import_without_heavy_dependencies():
    import ast
    import subprocess
    import sys
    from pathlib import Path
    kernels_dir = Path(kc.__file__).resolve().parent
    for name in ("contrast.py", "patch_nce.py", "_triton_common.py"):
        tree = ast.parse((kernels_dir / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom)}
        assert not imported & {"cv2", "tqdm"}, (name, imported)
    # (torch itself imports tqdm, so only cv2 can be checked at run time.) The package root as
    # this process found it: an editable install maps kernels/ there.
    code = ("import importlib.util, sys, confeti_fast\n"
            "if importlib.util.find_spec('confeti_fast.kernels') is None:\n"
            f"    confeti_fast.__path__.append({str(kernels_dir.parent)!r})\n"
            "import confeti_fast.kernels.contrast, confeti_fast.kernels.patch_nce\n"
            "assert 'cv2' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


@needs_triton
def test_modules_import_without_triton():
    # With triton unimportable the modules still load, flag it, and the ops fall back.
    import subprocess
    import sys
    from pathlib import Path
    kernels_dir = Path(kc.__file__).resolve().parent
    code = ("import sys, importlib.util\n"
            "sys.modules['triton'] = None\n"
            "import confeti_fast\n"
            "if importlib.util.find_spec('confeti_fast.kernels') is None:\n"
            f"    confeti_fast.__path__.append({str(kernels_dir.parent)!r})\n"
            "from confeti_fast.kernels import contrast, patch_nce\n"
            "assert not contrast.AVAILABLE and not patch_nce.AVAILABLE and contrast.LOAD_ERROR\n"
            "import torch\n"
            "q = [torch.nn.functional.normalize(torch.randn(8, 4), dim=1)]\n"
            "assert torch.isfinite(patch_nce.patch_nce(q, q, 2))\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_skips_samples_at_ignored_pixels(device):
    # The trainer's sync-free sampler fills up with ignored pixels when fewer than num_samples
    # are kept; every implementation must skip those samples (CE = mean over the others).
    feats, labels, protos, _ = contrast_case(device, kept=7)
    idx = sample_pixels(labels, 40, torch.Generator().manual_seed(3)).to(device)
    sampled = labels.reshape(-1)[idx]
    assert int((sampled != 255).sum()) == 7 and int((sampled == 255).sum()) == 33
    assert_contrast_matches((feats, labels, protos, idx))
    kept_only = idx[sampled != 255]
    ce, _, _ = run_contrast(kc.pixel_proto_contrast, feats, labels, protos, kept_only)
    ce_padded, _, _ = run_contrast(kc.pixel_proto_contrast, feats, labels, protos, idx)
    torch.testing.assert_close(ce_padded, ce, **FP32)
