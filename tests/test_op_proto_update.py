"""proto_ema_update (docs/method.md §4): the reference by hand, and the compiled op
(`confeti_fast.kernels.proto_update`, csrc/) against the reference; its schemas checked with
torch.library.opcheck. (The switch and its warning fallback: test_ops_switch.py.)

The hand-computed checks take every expected value from typed-in numbers or a naive
formulation written here or in helpers.py, never from the code under test.

The compiled op. Selection: `proto_select` must pick exactly the pixels of the reference's
own selection (`reference.proto_selection`), in the same order. Update: prototypes within 1e-6
(CUDA 1e-5), counts equal. The CUDA algorithm also runs on the CPU (`emulate_cuda`: the
kernels' block code with emulated threads) and must equal the CPU op bit for bit. The `reduce`
hook (DDP): `proto_class_stats` + `proto_ema_apply_` against the reference, simulated and real
2-rank runs.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from confeti_fast import ops
from confeti_fast.kernels import proto_update as pu
from confeti_fast import reference
from helpers import py_normalize

needs_extension = pytest.mark.skipif(not pu.AVAILABLE, reason=f"confeti_fast._C is not built: {pu.LOAD_ERROR}")
needs_cuda = pytest.mark.skipif(not (pu.CUDA_AVAILABLE and torch.cuda.is_available()), reason="CUDA not available")


# ---------------------------------------------------------------- the reference, by hand

def _maps(pixels, b, h, w):
    """(b, C, h, w) from a list of C-vectors in (b, y, x) order."""
    t = torch.tensor(pixels, dtype=torch.float32)
    return t.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


def _wmean_dir(vectors, weights):
    s = sum(weights)
    return py_normalize([sum(w * v[d] for v, w in zip(vectors, weights)) / s for d in range(len(vectors[0]))])


def test_ema_first_update_sets_row_exactly():
    # B=1, 1x4, K=3 (class 2 absent), D=2; CAM at the label resolution (identity upsampling)
    feats = _maps([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [5.0, 5.0]], 1, 1, 4)
    cam = _maps([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [9.0, 9.0, 9.0]], 1, 1, 4)
    labels = torch.tensor([[[0, 0, 1, 255]]])
    protos = torch.tensor([[0.0, -1.0], [0.0, 0.0], [0.6, 0.8]])  # row 0 non-zero but count 0
    counts = torch.tensor([0, 0, 7])
    reference.proto_ema_update(protos, counts, feats, cam, labels)
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
    reference.proto_ema_update(protos, counts, feats, cam, labels)
    n = math.sqrt(0.25 ** 2 + 1.5 ** 2)
    mu = [0.25 / n, 1.5 / n]
    alpha = 0.001  # min(1 - 1/2, 1 - 0.999)
    raw = [(1 - alpha) * 1.0 + alpha * mu[0], alpha * mu[1]]
    assert protos[0].tolist() == pytest.approx(py_normalize(raw), abs=1e-6)
    assert counts.tolist() == [3]
    # an alpha of 0.5 (1 - 1/(n+1)) would be far away
    assert abs(py_normalize([0.5 + 0.5 * mu[0], 0.5 * mu[1]])[1] - protos[0, 1].item()) > 0.1


@pytest.mark.parametrize("n,expected_alpha", [(1, 0.5), (3, 0.75), (9, 0.8)])
def test_ema_alpha_is_min_of_both(n, expected_alpha):
    # momentum 0.2: 1 - momentum = 0.8; alpha = min(1 - 1/(n+1), 0.8)
    feats = _maps([[0.0, 3.0]], 1, 1, 1)
    protos = torch.tensor([[1.0, 0.0]])
    counts = torch.tensor([n])
    reference.proto_ema_update(protos, counts, feats, None, torch.tensor([[[0]]]), momentum=0.2)
    assert protos[0].tolist() == pytest.approx(py_normalize([1 - expected_alpha, expected_alpha]), abs=1e-6)
    assert counts.tolist() == [n + 1]


def test_ema_warmup_valid_mask_and_unit_weights():
    feats = _maps([[1.0, 0.0], [0.0, 100.0], [0.0, 3.0], [7.0, 7.0]], 1, 2, 2)
    labels = torch.tensor([[[0, 0], [0, 0]]])
    valid = torch.tensor([[[True, False], [True, False]]])
    protos = torch.zeros(1, 2)
    counts = torch.zeros(1, dtype=torch.int64)
    reference.proto_ema_update(protos, counts, feats, None, labels, valid=valid)
    assert protos[0].tolist() == pytest.approx(py_normalize([0.5, 1.5]), abs=1e-6)  # mean of (1,0), (0,3)
    assert counts.tolist() == [2]


def test_ema_top_k_ties_go_to_lower_index():
    # four pixels of class 0 with distinct directions; weights 0.5, 0.9, 0.5, 0.5; keep 2
    vecs = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]
    feats = _maps(vecs, 1, 1, 4)
    cam = _maps([[0.5], [0.9], [0.5], [0.5]], 1, 1, 4)
    protos = torch.zeros(1, 3)
    counts = torch.zeros(1, dtype=torch.int64)
    reference.proto_ema_update(protos, counts, feats, cam, torch.zeros(1, 1, 4, dtype=torch.long), top_k=2)
    expected = py_normalize([0.5 / 1.4, 0.9 / 1.4, 0.0])  # pixels 1 and 0
    assert protos[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert counts.tolist() == [2]
    wrong = py_normalize([0.0, 0.9 / 1.4, -0.5 / 1.4])  # ties to the higher index (pixel 3)
    assert max(abs(a - b) for a, b in zip(wrong, protos[0].tolist())) > 0.1


def test_ema_ties_across_images_use_flat_b_y_x_order():
    # equal weights everywhere; top_k=3 keeps flat indices 0, 1, 2 = (b0,y0,x0), (b0,y0,x1), (b0,y1,x0)
    vecs = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0],
            [-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, -1.0]]
    feats = _maps(vecs, 2, 2, 2)
    protos = torch.zeros(1, 4)
    counts = torch.zeros(1, dtype=torch.int64)
    reference.proto_ema_update(protos, counts, feats, None, torch.zeros(2, 2, 2, dtype=torch.long), top_k=3)
    assert protos[0].tolist() == pytest.approx(py_normalize([1.0, 1.0, 1.0, 0.0]), abs=1e-6)
    assert counts.tolist() == [3]


def test_ema_default_top_k_is_32():
    # 40 pixels with weights 1..40: the 32 largest are pixels 8..39
    vals = [float(i) for i in range(40)]
    vecs = [[1.0, v] for v in vals]
    feats = _maps(vecs, 1, 5, 8)
    cam = _maps([[i + 1.0] for i in range(40)], 1, 5, 8)
    protos = torch.zeros(1, 2)
    counts = torch.zeros(1, dtype=torch.int64)
    reference.proto_ema_update(protos, counts, feats, cam, torch.zeros(1, 5, 8, dtype=torch.long))
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
    reference.proto_ema_update(protos, counts, feats, cam, torch.zeros(1, 1, 3, dtype=torch.long), top_k=32)
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
    reference.proto_ema_update(protos, counts, feats, cam, labels)
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
    reference.proto_ema_update(protos, counts, feats, cam, labels)
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
    reference.proto_ema_update(protos, counts, feats, cam, labels)
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
    reference.proto_ema_update(protos, counts, feats, None, labels)
    return protos[0].tolist()


def test_ema_bilinear_align_corners_upsampling():
    # channel 0: corners [[0, 2], [4, 10]]; channel 1: constant 1. Direction (x, 1)/|.| reveals x.
    feats = torch.tensor([[[[0.0, 2.0], [4.0, 10.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    for pixel, x in [((0, 0), 0.0), ((0, 2), 2.0), ((2, 0), 4.0), ((2, 2), 10.0),
                     ((1, 1), 4.0), ((0, 1), 1.0), ((1, 2), 6.0)]:
        assert _single_pixel_direction(feats, (3, 3), pixel) == pytest.approx(py_normalize([x, 1.0]), abs=1e-6), pixel
    # 2x2 -> 4x4: align_corners=True samples at 1/3 (align_corners=False would give 0.25)
    feats = torch.tensor([[[[0.0, 3.0], [6.0, 9.0]], [[1.0, 1.0], [1.0, 1.0]]]])  # f(y, x) = 6y + 3x
    assert _single_pixel_direction(feats, (4, 4), (1, 1)) == pytest.approx(py_normalize([3.0, 1.0]), abs=1e-6)
    assert _single_pixel_direction(feats, (4, 4), (2, 1)) == pytest.approx(py_normalize([5.0, 1.0]), abs=1e-6)


def test_ema_cam_is_upsampled_too():
    # features at 1x2 -> labels 1x3; CAM (1, 1, 1, 2) = [0, 4] -> upsampled [0, 2, 4]
    feats = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # upsampled: (1,0), (0.5,0.5), (0,1)
    cam = torch.tensor([[[[0.0, 4.0]]]])
    protos = torch.zeros(1, 2)
    counts = torch.zeros(1, dtype=torch.int64)
    reference.proto_ema_update(protos, counts, feats, cam, torch.zeros(1, 1, 3, dtype=torch.long))
    # weights 0, 2, 4 on vectors (1,0), (0.5,0.5), (0,1): sum w v = (1, 5)
    assert protos[0].tolist() == pytest.approx(py_normalize([1.0, 5.0]), abs=1e-6)
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
    other = reference.proto_class_stats(feats1, cam1, labels1, num_classes=2)
    seen = []

    def reduce(weighted_sum, weight_sum, kept):
        seen.append((weighted_sum.tolist(), weight_sum.tolist(), kept.tolist()))
        for t, o in zip((weighted_sum, weight_sum, kept), other):
            t += o

    protos = torch.tensor([[0.0, 0.0], [0.6, 0.8]])
    counts = torch.tensor([0, 4])
    reference.proto_ema_update(protos, counts, feats0, cam0, labels0, reduce=reduce)
    assert seen == [([[1.0, 6.0], [0.0, 0.0]], [4.0, 0.0], [2, 0])]  # this rank's own statistics
    assert protos[0].tolist() == pytest.approx(py_normalize([1.5, 1.0]), abs=1e-6)  # alpha 1: mu itself
    assert protos[1].tolist() == pytest.approx([0.6, 0.8], abs=1e-7)
    assert counts.tolist() == [3, 5]
    # an identity reduce is the plain update
    a = (torch.tensor([[1.0, 0.0], [0.6, 0.8]]), torch.tensor([3, 4]))
    b = (a[0].clone(), a[1].clone())
    reference.proto_ema_update(*a, feats0, cam0, labels0)
    reference.proto_ema_update(*b, feats0, cam0, labels0, reduce=lambda *t: None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------- the switch picks the compiled op

@needs_extension
def test_fused_cpu_uses_the_cpp_op(monkeypatch):
    monkeypatch.delenv("CONFETI_KERNELS", raising=False)
    assert ops.implementation("proto_ema_update", "cpu") is pu.proto_ema_update


# ---------------------------------------------------------------- the compiled op = the reference

def make_case(seed, B=2, D=16, h=9, w=11, H=100, W=90, K=19, cam=True, dtype=torch.float32,
              classes=None, ignore=0.1, counts_max=0, valid=False, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, D, h, w, generator=g).to(dtype)
    cam_t = torch.rand(B, K, h, w, generator=g).to(dtype) if cam else None
    pool = torch.tensor(classes if classes is not None else list(range(K)))
    labels = pool[torch.randint(0, len(pool), (B, H, W), generator=g)]
    labels[torch.rand(B, H, W, generator=g) < ignore] = 255
    valid_t = torch.rand(B, H, W, generator=g) < 0.7 if valid else None
    protos = F.normalize(torch.randn(K, D, generator=g), dim=1)
    protos[K // 2] = 0  # a zero row must stay zero unless its class moves it
    counts = torch.randint(0, counts_max + 1, (K,), generator=g)
    if channels_last:
        feats = feats.contiguous(memory_format=torch.channels_last)
        cam_t = cam_t.contiguous(memory_format=torch.channels_last) if cam_t is not None else None
    return dict(prototypes=protos, counts=counts, feats=feats, cam=cam_t, labels=labels, valid=valid_t)


def dyadic_cam(seed, B, K, h, w):
    """CAM values in {0, 1/4, ..., 1}: with a dyadic upsampling scale every weight is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (B, K, h, w), generator=g).float() / 4


def on(case, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def run_reference(case, momentum=0.999, top_k=32):
    p, n = case["prototypes"].clone(), case["counts"].clone()
    reference.proto_ema_update(p, n, case["feats"], case["cam"], case["labels"], case["valid"],
                               momentum=momentum, top_k=top_k)
    return p, n


def run_op(case, device="cpu", momentum=0.999, top_k=32):
    c = on(case, device)
    p, n = c["prototypes"].clone(), c["counts"].clone()
    pu.proto_ema_update(p, n, c["feats"], c["cam"], c["labels"], c["valid"], momentum=momentum, top_k=top_k)
    return p.cpu(), n.cpu()


def op_selection(case, device="cpu", top_k=32):
    c = on(case, device)
    K = case["prototypes"].shape[0]
    idx, cand = pu.proto_select(c["cam"], c["labels"], c["valid"], num_classes=K, top_k=top_k)
    return idx.cpu(), cand.cpu()


def assert_same_selection(case, idx, cand, top_k=32):
    K = case["prototypes"].shape[0]
    expected_idx = torch.full((K, top_k), -1, dtype=torch.long)
    expected_cand = torch.zeros(K, dtype=torch.long)
    for c, chosen, _, n in reference.proto_selection(case["cam"], case["labels"], case["valid"], top_k):
        expected_idx[c, :chosen.numel()] = chosen
        expected_cand[c] = n
    assert torch.equal(cand, expected_cand)
    for c in range(K):
        assert torch.equal(idx[c], expected_idx[c]), f"class {c}: {idx[c].tolist()} != {expected_idx[c].tolist()}"


def check_cpu(case, momentum=0.999, top_k=32):
    """Selection identical, prototypes within 1e-6, counts equal; the emulated CUDA algorithm equal."""
    idx, cand = op_selection(case, top_k=top_k)
    assert_same_selection(case, idx, cand, top_k)
    ref_p, ref_n = run_reference(case, momentum, top_k)
    p, n = run_op(case, momentum=momentum, top_k=top_k)
    assert torch.equal(n, ref_n)
    assert (p - ref_p).abs().max().item() <= 1e-6
    ep, en, eidx, ecand = pu.emulate_cuda(**case, momentum=momentum, top_k=top_k)
    assert torch.equal(eidx, idx) and torch.equal(ecand, cand)
    assert torch.equal(ep, p) and torch.equal(en, n)
    return p, n


# ---------------------------------------------------------------- cases

SHAPES = [  # B, D, h, w, H, W, K
    (2, 16, 9, 11, 100, 90, 19),
    (1, 8, 5, 7, 64, 80, 16),
    (3, 4, 13, 6, 37, 41, 19),     # H, W not multiples of h, w; H + W <= 128
    (2, 32, 17, 17, 129, 131, 16),
    (1, 8, 4, 4, 4, 4, 5),         # same size: no interpolation
    (2, 8, 6, 5, 1, 70, 7),        # one output row
    (1, 8, 1, 1, 30, 20, 3),       # 1 x 1 input
]


@needs_extension
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_random_shapes(shape):
    B, D, h, w, H, W, K = shape
    check_cpu(make_case(1, B=B, D=D, h=h, w=w, H=H, W=W, K=K))


@needs_extension
def test_ties_without_cam():
    # every weight is 1: the 32 lowest flat indices of each class, across images in (b, y, x) order
    check_cpu(make_case(2, cam=False))


def ties_at_the_cut(case, top_k):
    """Whether some class has equal weights on both sides of its top_k cut."""
    full = reference.proto_selection(case["cam"], case["labels"], case["valid"], top_k=10**9)
    return any(w.numel() > top_k and w[top_k - 1] == w[top_k] for _, _, w, _ in full)


@needs_extension
@pytest.mark.parametrize("h,H,top_k", [(5, 17, 32), (5, 9, 4), (9, 9, 4), (3, 65, 32)])
def test_ties_dyadic_cam(h, H, top_k):
    case = make_case(3, B=2, h=h, w=h, H=H, W=H, K=16, ignore=0.0)
    case["cam"] = dyadic_cam(3, 2, 16, h, h)
    assert ties_at_the_cut(case, top_k)  # else the test would prove nothing
    check_cpu(case, top_k=top_k)


@needs_extension
def test_weights_are_bitwise_those_of_interpolate():
    # Weights a few ulps apart: the full order (top_k = every pixel) is the reference's only if
    # every interpolated weight has the same bits. This is ATen's generic CPU kernel (contiguous
    # input, H + W > 128); its channels-last / small-output kernel rounds differently.
    g = torch.Generator().manual_seed(27)
    K, H, W = 4, 70, 80
    cam = (1 + torch.randint(0, 8, (2, K, 7, 9), generator=g).float() * 2**-23) * torch.rand(2, K, 1, 1, generator=g)
    labels = torch.randint(0, K, (2, H, W), generator=g)
    case = dict(prototypes=torch.zeros(K, 3), counts=torch.zeros(K, dtype=torch.long), feats=None, cam=cam,
                labels=labels, valid=None)
    assert ties_at_the_cut(case, 100)
    idx, cand = op_selection(case, top_k=2 * H * W)
    assert_same_selection(case, idx, cand, top_k=2 * H * W)


@needs_extension
def test_constant_cam_is_all_ties():
    case = make_case(4, K=19)
    case["cam"] = torch.full_like(case["cam"], 0.375)
    check_cpu(case)


@needs_extension
def test_fewer_candidates_than_k_and_absent_classes():
    case = make_case(5, B=1, H=12, W=10, K=19, classes=[0, 3, 7, 18], ignore=0.3)
    idx, cand = op_selection(case)
    assert (cand[[1, 2, 4]] == 0).all() and (idx[1] == -1).all()
    assert 0 < cand[3] < 32 and (idx[3, cand[3]:] == -1).all()
    p, n = check_cpu(case)
    assert n[1] == case["counts"][1]


@needs_extension
def test_zero_weights_for_a_class():
    case = make_case(6, K=19, counts_max=3)
    case["cam"][:, 4] = 0
    p, n = check_cpu(case)
    kept = min(int((case["labels"] == 4).sum()), 32)
    assert n[4] == case["counts"][4] + kept
    assert torch.allclose(p[4], F.normalize(case["prototypes"][4], dim=0), atol=1e-7)


@needs_extension
def test_warmup_valid_mask():
    check_cpu(make_case(7, cam=False, valid=True))
    check_cpu(make_case(8, cam=True, valid=True))


@needs_extension
@pytest.mark.parametrize("counts_max", [1, 5, 2000])
def test_nonzero_starting_counts(counts_max):
    check_cpu(make_case(9, counts_max=counts_max), momentum=0.9)


@needs_extension
def test_channels_last_inputs():
    check_cpu(make_case(10, channels_last=True))
    check_cpu(make_case(11, h=17, w=13, H=150, W=140, channels_last=True))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    check_cpu(make_case(12, dtype=dtype))
    check_cpu(make_case(13, dtype=dtype, channels_last=True, K=16))


@needs_extension
def test_bfloat16_feats_with_float_cam():
    case = make_case(14)
    case["feats"] = case["feats"].bfloat16()
    check_cpu(case)


@needs_extension
def test_strided_labels_and_cam():
    case = make_case(15, H=80, W=100)
    case["labels"] = case["labels"].transpose(1, 2)  # (B, 100, 80), not contiguous
    case["cam"] = case["cam"].transpose(2, 3)
    case["valid"] = (torch.rand(2, 80, 100) < 0.8).transpose(1, 2)
    check_cpu(case)


@needs_extension
@pytest.mark.parametrize("top_k", [1, 5, 32, 100])
def test_top_k_values(top_k):
    check_cpu(make_case(16, K=16), top_k=top_k)


@needs_extension
def test_all_pixels_ignored():
    case = make_case(17, ignore=1.0, counts_max=4)
    p, n = check_cpu(case)
    assert torch.equal(n, case["counts"])
    assert torch.allclose(p, F.normalize(case["prototypes"], dim=1), atol=1e-7)


@needs_extension
def test_nan_and_signed_zero_weights_order_like_torch_sort():
    case = make_case(18, B=1, h=4, w=4, H=4, W=4, K=3, ignore=0.0)
    cam = case["cam"]
    cam[0, :, 0, 0] = float("nan")
    cam[0, :, 1, :] = -0.0
    cam[0, :, 2, :] = 0.0
    idx, cand = op_selection(case, top_k=6)
    assert_same_selection(case, idx, cand, top_k=6)


@needs_extension
def test_multi_level_selection_matches():
    # > 2048 * 64 pixels: the emulated CUDA path needs two reduce levels
    case = make_case(19, B=2, D=8, h=21, w=23, H=300, W=310, K=19)
    check_cpu(case)
    check_cpu(case, top_k=5)


# ---------------------------------------------------------------- behaviour

@needs_extension
def test_deterministic_and_independent_of_threads():
    case = make_case(20, H=200, W=210)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            results.append(run_op(case))
    finally:
        torch.set_num_threads(threads)
    for p, n in results[1:]:
        assert torch.equal(p, results[0][0]) and torch.equal(n, results[0][1])


@needs_extension
def test_in_place():
    case = make_case(21)
    p, n = case["prototypes"].clone(), case["counts"].clone()
    ptr_p, ptr_n = p.data_ptr(), n.data_ptr()
    out_p, out_n = pu.proto_ema_update(p, n, case["feats"], case["cam"], case["labels"])
    assert out_p is p and out_n is n and p.data_ptr() == ptr_p and n.data_ptr() == ptr_n
    assert not torch.equal(p, case["prototypes"]) and not torch.equal(n, case["counts"])


@needs_extension
def test_strided_prototypes_updated_in_place():
    case = make_case(22)
    table = torch.zeros(case["prototypes"].shape[1], case["prototypes"].shape[0])
    table.copy_(case["prototypes"].t())
    p = table.t()  # (K, D) view with strides (1, K)
    n = case["counts"].clone()
    pu.proto_ema_update(p, n, case["feats"], case["cam"], case["labels"])
    ref_p, ref_n = run_reference(case)
    assert (table.t() - ref_p).abs().max().item() <= 1e-6 and torch.equal(n, ref_n)


@needs_extension
def test_wrapper_converts_labels_and_valid():
    case = make_case(23, valid=True)
    p, n = case["prototypes"].clone(), case["counts"].clone()
    pu.proto_ema_update(p, n, case["feats"], case["cam"], case["labels"].int(), case["valid"].to(torch.uint8))
    ref_p, ref_n = run_reference(case)
    assert (p - ref_p).abs().max().item() <= 1e-6 and torch.equal(n, ref_n)


def _raw(case, **over):
    args = dict(case, momentum=0.999, top_k=32)
    args.update(over)
    return torch.ops.confeti_fast.proto_ema_update_(
        args["prototypes"], args["counts"], args["feats"], args["cam"], args["labels"], args["valid"],
        args["momentum"], args["top_k"])


@needs_extension
@pytest.mark.parametrize("over,message", [
    (dict(labels=torch.zeros(2, 100, 90, dtype=torch.int32)), "labels must be int64"),
    (dict(labels=torch.zeros(100, 90, dtype=torch.long)), "labels must be (B, H, W)"),
    (dict(feats=torch.zeros(2, 16, 9)), "feats must be (B, D, h, w)"),
    (dict(feats=torch.zeros(2, 15, 9, 11)), "feats has 15 channels but prototypes have D = 16"),
    (dict(feats=torch.zeros(2, 16, 9, 11, dtype=torch.float64)), "feats must be float32, bfloat16 or float16"),
    (dict(cam=torch.zeros(2, 5, 9, 11)), "cam has 5 channels but there are 19 classes"),
    (dict(cam=torch.zeros(3, 19, 9, 11)), "cam has batch 3 but labels have 2"),
    (dict(prototypes=torch.zeros(19, 16, dtype=torch.float64)), "prototypes must be float32"),
    (dict(counts=torch.zeros(19, dtype=torch.int32)), "counts must be int64"),
    (dict(counts=torch.zeros(18, dtype=torch.long)), "counts must be (K,)"),
    (dict(valid=torch.ones(2, 100, 91, dtype=torch.bool)), "valid must have the shape of labels"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(labels=torch.full((2, 100, 90), 19, dtype=torch.long)), "labels must be in [0, 19) or 255"),
])
def test_clear_errors(over, message):
    case = make_case(24)
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        _raw(case, **over)


@needs_extension
def test_proto_select_needs_num_classes_without_cam():
    case = make_case(25, cam=False)
    with pytest.raises(ValueError, match="num_classes"):
        pu.proto_select(None, case["labels"])


@needs_extension
def test_torch_compile_fullgraph():
    case = make_case(26, B=1, D=8, h=5, w=5, H=20, W=20, K=5)

    def step(p, n, feats, cam, labels):
        pu.proto_ema_update(p, n, feats, cam, labels, momentum=0.99, top_k=8)
        idx, cand = pu.proto_select(cam, labels, num_classes=5, top_k=8)
        return p * 2, cand + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    p1, n1 = case["prototypes"].clone(), case["counts"].clone()
    p2, n2 = case["prototypes"].clone(), case["counts"].clone()
    eager = step(p1, n1, case["feats"], case["cam"], case["labels"])
    out = compiled(p2, n2, case["feats"], case["cam"], case["labels"])
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
    assert torch.equal(p2, p1) and torch.equal(n2, n1)  # the in-place update happened under compile


# ---------------------------------------------------------------- CUDA

def check_cuda(case, exact_selection, momentum=0.999, top_k=32):
    idx, cand = op_selection(case, "cuda", top_k)
    if exact_selection:
        assert_same_selection(case, idx, cand, top_k)
    cpu_idx, cpu_cand = op_selection(case, "cpu", top_k)
    assert torch.equal(cand, cpu_cand)
    ref_p, ref_n = run_reference(case, momentum, top_k)
    p, n = run_op(case, "cuda", momentum, top_k)
    assert torch.equal(n, ref_n)
    assert (p - ref_p).abs().max().item() <= 1e-5
    return idx, cpu_idx


CUDA_CASES = {
    "random": lambda: make_case(1),
    "random_k16": lambda: make_case(2, K=16, H=129, W=131, h=17, w=17),
    "valid_counts": lambda: make_case(3, valid=True, counts_max=2000),
    "channels_last": lambda: make_case(4, channels_last=True),
    "bf16": lambda: make_case(5, dtype=torch.bfloat16),
    "f16": lambda: make_case(6, dtype=torch.float16, K=16),
    "absent_few": lambda: make_case(7, B=1, H=12, W=10, classes=[0, 3, 7, 18], ignore=0.3),
    "all_ignored": lambda: make_case(8, ignore=1.0, counts_max=4),
    "multi_level": lambda: make_case(9, B=2, D=8, h=21, w=23, H=300, W=310),
}


@needs_extension
@needs_cuda
@pytest.mark.parametrize("name", sorted(CUDA_CASES))
def test_cuda_matches_reference(name):
    idx, cpu_idx = check_cuda(CUDA_CASES[name](), exact_selection=False)
    # the GPU runs the CPU op's arithmetic: the same pixels are expected
    assert torch.equal(idx, cpu_idx)


@needs_extension
@needs_cuda
@pytest.mark.parametrize("h,H,top_k", [(5, 17, 32), (5, 9, 4), (3, 65, 32)])
def test_cuda_ties_dyadic_cam(h, H, top_k):
    case = make_case(3, B=2, h=h, w=h, H=H, W=H, K=16, ignore=0.0)
    case["cam"] = dyadic_cam(3, 2, 16, h, h)
    check_cuda(case, exact_selection=True, top_k=top_k)


@needs_extension
@needs_cuda
def test_cuda_ties_without_cam_and_zero_weights():
    check_cuda(make_case(10, cam=False, valid=True), exact_selection=True)
    case = make_case(11)
    case["cam"] = torch.full_like(case["cam"], 0.5)
    case["cam"][:, 4] = 0
    check_cuda(case, exact_selection=True)


@needs_extension
@needs_cuda
def test_cuda_deterministic_and_small():
    case = on(make_case(12, B=2, D=512, h=81, w=81, H=640, W=640, ignore=0.05), "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    results = []
    for _ in range(3):
        p, n = case["prototypes"].clone(), case["counts"].clone()
        pu.proto_ema_update(p, n, case["feats"], case["cam"], case["labels"])
        results.append((p, n))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 16 * 2**20, f"{extra / 2**20:.1f} MiB of scratch"
    for p, n in results[1:]:
        assert torch.equal(p, results[0][0]) and torch.equal(n, results[0][1])


# ---------------------------------------------------------------- reduce hook (DDP)
# proto_ema_update(..., reduce=f): per-rank class statistics, f sums them across ranks in
# place, then the EMA. Fused: proto_class_stats + proto_ema_apply_.

def identity_reduce(*stats):
    pass


def fused_stats(case, device="cpu", top_k=32):
    c = on(case, device)
    K = case["prototypes"].shape[0]
    return [t.cpu() for t in pu.proto_class_stats(c["feats"], c["cam"], c["labels"], c["valid"], K, top_k)]


def reference_stats(case, top_k=32):
    K = case["prototypes"].shape[0]
    return list(reference.proto_class_stats(case["feats"], case["cam"], case["labels"], case["valid"], K, top_k))


def assert_close_stats(got, expected):
    """Sums of up to top_k terms in another order: within 1e-6 of the largest magnitude."""
    for g, e in zip(got[:2], expected[:2]):
        assert g.dtype == torch.float32 and g.shape == e.shape
        assert (g - e).abs().max().item() <= 1e-6 * max(1.0, e.abs().max().item())
    assert got[2].dtype == torch.int64 and torch.equal(got[2], expected[2])


def zero_weight_case():
    case = make_case(6, K=19, counts_max=3)
    case["cam"][:, 4] = 0
    return case


def dyadic_case():
    case = make_case(3, B=2, h=5, w=5, H=17, W=17, K=16, ignore=0.0)
    case["cam"] = dyadic_cam(3, 2, 16, 5, 5)
    return case


REDUCE_CASES = {
    "random": lambda: make_case(1),
    "ties_without_cam": lambda: make_case(2, cam=False),
    "ties_dyadic_cam": dyadic_case,
    "absent_classes": lambda: make_case(5, B=1, H=12, W=10, K=19, classes=[0, 3, 7, 18], ignore=0.3),
    "zero_weights": zero_weight_case,
    "warmup_valid": lambda: make_case(7, cam=False, valid=True),
    "valid_with_cam": lambda: make_case(8, valid=True, counts_max=5),
    "channels_last": lambda: make_case(10, channels_last=True),
    "bf16": lambda: make_case(12, dtype=torch.bfloat16),
    "k16_large_counts": lambda: make_case(9, K=16, counts_max=2000),
}


@needs_extension
@pytest.mark.parametrize("name", sorted(REDUCE_CASES))
def test_identity_reduce_is_the_one_shot_update(name):
    case = REDUCE_CASES[name]()
    p, n = run_op(case)
    c = case
    p2, n2 = c["prototypes"].clone(), c["counts"].clone()
    pu.proto_ema_update(p2, n2, c["feats"], c["cam"], c["labels"], c["valid"], reduce=identity_reduce)
    assert torch.equal(p2, p) and torch.equal(n2, n)  # same sums, same order: bitwise
    ref_p, ref_n = run_reference(case)
    p3, n3 = c["prototypes"].clone(), c["counts"].clone()
    reference.proto_ema_update(p3, n3, c["feats"], c["cam"], c["labels"], c["valid"], reduce=identity_reduce)
    assert torch.equal(p3, ref_p) and torch.equal(n3, ref_n)


@needs_extension
@pytest.mark.parametrize("name", sorted(REDUCE_CASES))
def test_stats_and_apply_match_reference(name):
    case = REDUCE_CASES[name]()
    stats, ref = fused_stats(case), reference_stats(case)
    assert_close_stats(stats, ref)
    p0, n0 = case["prototypes"], case["counts"]
    ref_p, ref_n = reference.proto_ema_apply(p0.clone(), n0.clone(), *ref)
    p, n = pu.proto_ema_apply(p0.clone(), n0.clone(), *stats)
    assert torch.equal(n, ref_n) and (p - ref_p).abs().max().item() <= 1e-6
    p, n = pu.proto_ema_apply(p0.clone(), n0.clone(), *ref)  # the apply alone, same inputs
    assert torch.equal(n, ref_n) and (p - ref_p).abs().max().item() <= 1e-6


@needs_extension
def test_apply_from_hand_made_statistics():
    # as after a reduction: kept > top_k, zero weight sums with kept > 0, negative weights,
    # absent classes; K = 19, strided prototypes and non-contiguous statistics
    g = torch.Generator().manual_seed(40)
    K, D = 19, 24
    table = torch.zeros(D, K)
    table.copy_(F.normalize(torch.randn(K, D, generator=g), dim=1).t())
    table[:, 3] = 0
    counts = torch.randint(0, 50, (K,), generator=g)
    counts[:4] = 0
    kept = torch.tensor([0, 64, 5, 40, 0, 1, 7, 96, 3, 0, 12, 64, 2, 33, 0, 8, 64, 1, 9])
    weight_sum = torch.rand(K, generator=g) * 40 - 5
    weight_sum[[1, 5, 9]] = 0  # 9: kept 0 as well
    weighted_sum = (torch.randn(D, K, generator=g) * 10).t()  # (K, D), not contiguous
    before = table.t().clone()
    p_ref, n_ref = reference.proto_ema_apply(before.clone(), counts.clone(), weighted_sum, weight_sum, kept,
                                             momentum=0.99)
    p, n = table.t(), counts.clone()
    pu.proto_ema_apply(p, n, weighted_sum, weight_sum, kept, momentum=0.99)
    assert torch.equal(n, n_ref) and torch.equal(n, counts + kept)
    assert (table.t() - p_ref).abs().max().item() <= 1e-6
    still = (kept == 0) | (weight_sum == 0)  # rows only renormalized
    assert (p[still] - F.normalize(before[still], dim=1)).abs().max().item() <= 1e-7
    assert (p[~still] - F.normalize(before[~still], dim=1)).abs().amax(1).min().item() > 1e-3


def two_rank_case():
    """B = 2, one image per rank: classes 0-11 on image 0, 5-17 on image 1, 18 nowhere; class 7
    has zero weights on rank 0 only, class 9 on both ranks; > top_k candidates per rank."""
    case = make_case(31, B=2, K=19, counts_max=3)
    lab = case["labels"]
    ign = lab == 255
    lab[0] = lab[0] % 12
    lab[1] = 5 + lab[1] % 13
    lab[ign] = 255
    case["cam"][0, 7] = 0
    case["cam"][:, 9] = 0
    return case


def rank_slice(case, r):
    out = dict(case)
    for key in ("feats", "cam", "labels", "valid"):
        if case[key] is not None:
            out[key] = case[key][r:r + 1]
    return out


def hand_rank_stats(case, top_k=32):
    """(sum w v, sum w, kept) per class from the reference's own selection, in plain torch."""
    K, D = case["prototypes"].shape
    v = F.interpolate(case["feats"].float(), size=case["labels"].shape[-2:], mode="bilinear", align_corners=True)
    v = v.permute(0, 2, 3, 1).reshape(-1, D)
    ws, wsum, kept = torch.zeros(K, D), torch.zeros(K), torch.zeros(K, dtype=torch.long)
    for c, chosen, w, _ in reference.proto_selection(case["cam"], case["labels"], case["valid"], top_k):
        ws[c] = (w[:, None] * v[chosen]).sum(0)
        wsum[c] = w.sum()
        kept[c] = chosen.numel()
    return ws, wsum, kept


def hand_ema(prototypes, counts, ws, wsum, kept, momentum):
    p, n = prototypes.clone(), counts.clone()
    for c in range(p.shape[0]):
        if kept[c] == 0:
            continue
        m = int(n[c])
        alpha = 1.0 if m == 0 else min(1.0 - 1.0 / (m + 1), 1.0 - momentum)
        n[c] += kept[c]
        if wsum[c] != 0:
            mu = ws[c] / wsum[c]
            p[c] = (1 - alpha) * p[c] + alpha * mu / mu.norm().clamp_min(1e-12)
    return p / p.norm(dim=1, keepdim=True).clamp_min(1e-12), n


def simulate_two_ranks(case, update, stats_fn, device="cpu", momentum=0.9):
    """Each rank runs `update` on its image; its reduce replaces the stats by the two ranks' sum."""
    ranks = [on(rank_slice(case, r), device) for r in (0, 1)]
    per_rank = [stats_fn(rc) for rc in ranks]
    total = [a + b for a, b in zip(*per_rank)]  # what all_reduce(SUM) gives with 2 ranks

    def reduce(*stats):
        for t, s in zip(stats, total):
            t.copy_(s)

    out = []
    for rc in ranks:
        p, n = rc["prototypes"].clone(), rc["counts"].clone()
        update(p, n, rc["feats"], rc["cam"], rc["labels"], rc["valid"], momentum=momentum, reduce=reduce)
        out.append((p.cpu(), n.cpu()))
    return out, [t.cpu() for t in total]


def fused_stats_on(rc):
    return list(pu.proto_class_stats(rc["feats"], rc["cam"], rc["labels"], rc["valid"], rc["prototypes"].shape[0]))


def reference_stats_on(rc):
    return list(reference.proto_class_stats(rc["feats"], rc["cam"], rc["labels"], rc["valid"],
                                            rc["prototypes"].shape[0]))


@needs_extension
def test_simulated_two_ranks():
    case = two_rank_case()
    hand = [hand_rank_stats(rank_slice(case, r)) for r in (0, 1)]
    hand_total = [a + b for a, b in zip(*hand)]
    exp_p, exp_n = hand_ema(case["prototypes"], case["counts"], *hand_total, momentum=0.9)
    # the case covers what it claims
    assert hand[0][2][7] == 32 and hand[0][1][7] == 0 and hand[1][1][7] != 0
    assert hand_total[2][9] == 64 and hand_total[1][9] == 0 and hand_total[2][18] == 0
    assert hand[0][2][13] == 0 and hand[1][2][2] == 0

    (p0, n0), (p1, n1) = simulate_two_ranks(case, pu.proto_ema_update, fused_stats_on)[0]
    assert torch.equal(p0, p1) and torch.equal(n0, n1)
    assert torch.equal(n0, exp_n) and torch.equal(n0, case["counts"] + hand_total[2])
    assert (p0 - exp_p).abs().max().item() <= 1e-6
    assert (p0[7] - case["prototypes"][7]).abs().max() > 0.01  # moved by rank 1's pixels only
    assert torch.allclose(p0[[9, 18]], F.normalize(case["prototypes"][[9, 18]], dim=1), atol=1e-7)

    (r0, m0), (r1, m1) = simulate_two_ranks(case, reference.proto_ema_update, reference_stats_on)[0]
    assert torch.equal(r0, r1) and torch.equal(m0, m1) and torch.equal(m0, exp_n)
    assert (r0 - exp_p).abs().max().item() <= 1e-6


DDP_WORKER = r"""
import sys
import torch
import torch.distributed as dist
from confeti_fast.kernels import proto_update as pu
from confeti_fast import reference

rank, init, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
case = torch.load(folder + "/case.pt")
inputs = [None if case[k] is None else case[k][rank:rank + 1] for k in ("feats", "cam", "labels", "valid")]
reduce = lambda *t: [dist.all_reduce(x) for x in t]
out = {}
for name, update in (("fused", pu.proto_ema_update), ("reference", reference.proto_ema_update)):
    p, n = case["prototypes"].clone(), case["counts"].clone()
    update(p, n, *inputs, momentum=0.9, reduce=reduce)
    out[name] = (p, n)
torch.save(out, f"{folder}/rank{rank}.pt")
dist.destroy_process_group()
"""


@needs_extension
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo not available")
def test_two_processes_gloo(tmp_path):
    import os
    import subprocess
    import sys

    case = two_rank_case()
    torch.save(case, tmp_path / "case.pt")
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # containers whose hostname does not resolve
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), init, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        logs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for r, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {r} failed:\n{logs[r][-3000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, update, stats_fn in (("fused", pu.proto_ema_update, fused_stats_on),
                                   ("reference", reference.proto_ema_update, reference_stats_on)):
        (p0, n0), (p1, n1) = ranks[0][name], ranks[1][name]
        assert torch.equal(p0, p1) and torch.equal(n0, n1), name
        sim_p, sim_n = simulate_two_ranks(case, update, stats_fn)[0][0]
        assert torch.equal(p0, sim_p) and torch.equal(n0, sim_n), name


@needs_extension
@pytest.mark.parametrize("over,message", [
    (dict(weighted_sum=torch.zeros(19, 15)), "weighted_sum must be (K, D) = (19, 16)"),
    (dict(weighted_sum=torch.zeros(19, 16, dtype=torch.float64)), "weighted_sum must be float32"),
    (dict(weight_sum=torch.zeros(18)), "weight_sum must be (K,) = (19,)"),
    (dict(kept=torch.zeros(19, dtype=torch.int32)), "kept must be int64"),
    (dict(counts=torch.zeros(19, dtype=torch.int32)), "counts must be int64"),
    (dict(momentum=1.5), "momentum must be in [0, 1]"),
])
def test_apply_clear_errors(over, message):
    args = dict(prototypes=torch.zeros(19, 16), counts=torch.zeros(19, dtype=torch.long),
                weighted_sum=torch.zeros(19, 16), weight_sum=torch.zeros(19), kept=torch.zeros(19, dtype=torch.long),
                momentum=0.999)
    args.update(over)
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        torch.ops.confeti_fast.proto_ema_apply_(*args.values())


@needs_extension
def test_stats_clear_errors():
    case = make_case(24)
    with pytest.raises(RuntimeError, match="feats has batch 1 but labels have 2"):
        torch.ops.confeti_fast.proto_class_stats(case["feats"][:1], case["cam"], case["labels"], None, 19, 32)
    with pytest.raises(RuntimeError, match="labels must be in"):
        torch.ops.confeti_fast.proto_class_stats(case["feats"], None, case["labels"].clamp(max=30), None, 19, 32)
    with pytest.raises(ValueError, match="num_classes"):
        pu.proto_class_stats(case["feats"], None, case["labels"])


@needs_extension
def test_torch_compile_fullgraph_with_reduce():
    case = make_case(26, B=1, D=8, h=5, w=5, H=20, W=20, K=5)

    def step(p, n, feats, cam, labels):
        pu.proto_ema_update(p, n, feats, cam, labels, momentum=0.99, top_k=8, reduce=identity_reduce)
        return p * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    p1, n1 = case["prototypes"].clone(), case["counts"].clone()
    p2, n2 = case["prototypes"].clone(), case["counts"].clone()
    eager = step(p1, n1, case["feats"], case["cam"], case["labels"])
    out = compiled(p2, n2, case["feats"], case["cam"], case["labels"])
    assert torch.equal(out, eager) and torch.equal(p2, p1) and torch.equal(n2, n1)


@needs_extension
@needs_cuda
@pytest.mark.parametrize("name", sorted(REDUCE_CASES))
def test_cuda_reduce_path(name):
    case = REDUCE_CASES[name]()
    c = on(case, "cuda")
    p, n = c["prototypes"].clone(), c["counts"].clone()
    pu.proto_ema_update(p, n, c["feats"], c["cam"], c["labels"], c["valid"])
    p2, n2 = c["prototypes"].clone(), c["counts"].clone()
    pu.proto_ema_update(p2, n2, c["feats"], c["cam"], c["labels"], c["valid"], reduce=identity_reduce)
    assert torch.equal(p2, p) and torch.equal(n2, n)  # the GPU's own one-shot op, bitwise
    assert_close_stats(fused_stats(case, "cuda"), reference_stats(case))
    ref_p, ref_n = run_reference(case)
    assert torch.equal(n2.cpu(), ref_n) and (p2.cpu() - ref_p).abs().max().item() <= 1e-5


@needs_extension
@needs_cuda
def test_cuda_reduce_path_does_not_sync_the_host():
    c = on(make_case(27), "cuda")
    p, n = c["prototypes"].clone(), c["counts"].clone()
    torch.cuda.synchronize()
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = pu.proto_class_stats(c["feats"], c["cam"], c["labels"], c["valid"], 19)
        pu.proto_ema_apply(p, n, *stats)
        pu.proto_ema_update(p, n, c["feats"], c["cam"], c["labels"], c["valid"], reduce=identity_reduce)
    finally:
        torch.cuda.set_sync_debug_mode(mode)
    torch.cuda.synchronize()


@needs_extension
@needs_cuda
def test_cuda_simulated_two_ranks():
    case = two_rank_case()
    (p0, n0), (p1, n1) = simulate_two_ranks(case, pu.proto_ema_update, fused_stats_on, device="cuda")[0]
    assert torch.equal(p0, p1) and torch.equal(n0, n1)
    (c0, m0), _ = simulate_two_ranks(case, pu.proto_ema_update, fused_stats_on)[0]
    assert torch.equal(n0, m0) and (p0 - c0).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- opcheck
# torch.library.opcheck on the extension's ops: test_schema (the in-place ops mutate exactly what
# their schemas declare, Tensor(a!) prototypes and Tensor(b!) counts, and nothing else),
# test_faketensor (the fake kernels of kernels/proto_update.py give the real outputs' metadata),
# test_autograd_registration and test_aot_dispatch_dynamic (the ops trace under torch.compile).

OPCHECK_CASES = {
    "cam_and_valid": dict(valid=True, counts_max=3),
    "no_cam": dict(cam=False),
    "bf16_channels_last": dict(dtype=torch.bfloat16, channels_last=True),
}
OPCHECK_DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def opcheck_case(name, device):
    """A small case on `device`: (prototypes, counts, the four inputs, K)."""
    c = on(make_case(40, B=2, D=8, h=5, w=6, H=12, W=14, K=5, **OPCHECK_CASES[name]), device)
    return c["prototypes"], c["counts"], (c["feats"], c["cam"], c["labels"], c["valid"]), c["prototypes"].shape[0]


@needs_extension
@pytest.mark.parametrize("device", OPCHECK_DEVICES)
@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck_proto_ema_update_(device, name):
    protos, counts, inputs, _ = opcheck_case(name, device)
    torch.library.opcheck(torch.ops.confeti_fast.proto_ema_update_.default,
                          (protos.clone(), counts.clone(), *inputs, 0.9, 4))


@needs_extension
@pytest.mark.parametrize("device", OPCHECK_DEVICES)
@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck_proto_select(device, name):
    _, _, (_, cam, labels, valid), num_classes = opcheck_case(name, device)
    torch.library.opcheck(torch.ops.confeti_fast.proto_select.default, (cam, labels, valid, num_classes, 4))


@needs_extension
@pytest.mark.parametrize("device", OPCHECK_DEVICES)
@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck_proto_class_stats(device, name):
    _, _, inputs, num_classes = opcheck_case(name, device)
    torch.library.opcheck(torch.ops.confeti_fast.proto_class_stats.default, (*inputs, num_classes, 4))


@needs_extension
@pytest.mark.parametrize("device", OPCHECK_DEVICES)
@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck_proto_ema_apply_(device, name):
    protos, counts, inputs, num_classes = opcheck_case(name, device)
    stats = torch.ops.confeti_fast.proto_class_stats(*inputs, num_classes, 4)
    torch.library.opcheck(torch.ops.confeti_fast.proto_ema_apply_.default,
                          (protos.clone(), counts.clone(), *stats, 0.9))
