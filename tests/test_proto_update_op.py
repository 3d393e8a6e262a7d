"""The compiled prototype EMA update (`confeti_fast.kernels.proto_update`) against the reference.

Selection: `proto_select` must pick exactly the pixels of the reference's own selection
(`reference.proto_selection`), in the same order. Update: prototypes within 1e-6 (CUDA 1e-5),
counts equal. The CUDA algorithm also runs on the CPU (`emulate_cuda`: the kernels' block code
with emulated threads) and must equal the CPU op bit for bit.
"""
import pytest
import torch
import torch.nn.functional as F

from confeti_fast.kernels import proto_update as pu
from confeti_fast.ops import reference

pytestmark = pytest.mark.skipif(not pu.AVAILABLE, reason=f"confeti_fast._C is not built: {pu.LOAD_ERROR}")
needs_cuda = pytest.mark.skipif(not (pu.CUDA_AVAILABLE and torch.cuda.is_available()), reason="CUDA not available")


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


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_random_shapes(shape):
    B, D, h, w, H, W, K = shape
    check_cpu(make_case(1, B=B, D=D, h=h, w=w, H=H, W=W, K=K))


def test_ties_without_cam():
    # every weight is 1: the 32 lowest flat indices of each class, across images in (b, y, x) order
    check_cpu(make_case(2, cam=False))


def ties_at_the_cut(case, top_k):
    """Whether some class has equal weights on both sides of its top_k cut."""
    full = reference.proto_selection(case["cam"], case["labels"], case["valid"], top_k=10**9)
    return any(w.numel() > top_k and w[top_k - 1] == w[top_k] for _, _, w, _ in full)


@pytest.mark.parametrize("h,H,top_k", [(5, 17, 32), (5, 9, 4), (9, 9, 4), (3, 65, 32)])
def test_ties_dyadic_cam(h, H, top_k):
    case = make_case(3, B=2, h=h, w=h, H=H, W=H, K=16, ignore=0.0)
    case["cam"] = dyadic_cam(3, 2, 16, h, h)
    assert ties_at_the_cut(case, top_k)  # else the test would prove nothing
    check_cpu(case, top_k=top_k)


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


def test_constant_cam_is_all_ties():
    case = make_case(4, K=19)
    case["cam"] = torch.full_like(case["cam"], 0.375)
    check_cpu(case)


def test_fewer_candidates_than_k_and_absent_classes():
    case = make_case(5, B=1, H=12, W=10, K=19, classes=[0, 3, 7, 18], ignore=0.3)
    idx, cand = op_selection(case)
    assert (cand[[1, 2, 4]] == 0).all() and (idx[1] == -1).all()
    assert 0 < cand[3] < 32 and (idx[3, cand[3]:] == -1).all()
    p, n = check_cpu(case)
    assert n[1] == case["counts"][1]


def test_zero_weights_for_a_class():
    case = make_case(6, K=19, counts_max=3)
    case["cam"][:, 4] = 0
    p, n = check_cpu(case)
    kept = min(int((case["labels"] == 4).sum()), 32)
    assert n[4] == case["counts"][4] + kept
    assert torch.allclose(p[4], F.normalize(case["prototypes"][4], dim=0), atol=1e-7)


def test_warmup_valid_mask():
    check_cpu(make_case(7, cam=False, valid=True))
    check_cpu(make_case(8, cam=True, valid=True))


@pytest.mark.parametrize("counts_max", [1, 5, 2000])
def test_nonzero_starting_counts(counts_max):
    check_cpu(make_case(9, counts_max=counts_max), momentum=0.9)


def test_channels_last_inputs():
    check_cpu(make_case(10, channels_last=True))
    check_cpu(make_case(11, h=17, w=13, H=150, W=140, channels_last=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    check_cpu(make_case(12, dtype=dtype))
    check_cpu(make_case(13, dtype=dtype, channels_last=True, K=16))


def test_bfloat16_feats_with_float_cam():
    case = make_case(14)
    case["feats"] = case["feats"].bfloat16()
    check_cpu(case)


def test_strided_labels_and_cam():
    case = make_case(15, H=80, W=100)
    case["labels"] = case["labels"].transpose(1, 2)  # (B, 100, 80), not contiguous
    case["cam"] = case["cam"].transpose(2, 3)
    case["valid"] = (torch.rand(2, 80, 100) < 0.8).transpose(1, 2)
    check_cpu(case)


@pytest.mark.parametrize("top_k", [1, 5, 32, 100])
def test_top_k_values(top_k):
    check_cpu(make_case(16, K=16), top_k=top_k)


def test_all_pixels_ignored():
    case = make_case(17, ignore=1.0, counts_max=4)
    p, n = check_cpu(case)
    assert torch.equal(n, case["counts"])
    assert torch.allclose(p, F.normalize(case["prototypes"], dim=1), atol=1e-7)


def test_nan_and_signed_zero_weights_order_like_torch_sort():
    case = make_case(18, B=1, h=4, w=4, H=4, W=4, K=3, ignore=0.0)
    cam = case["cam"]
    cam[0, :, 0, 0] = float("nan")
    cam[0, :, 1, :] = -0.0
    cam[0, :, 2, :] = 0.0
    idx, cand = op_selection(case, top_k=6)
    assert_same_selection(case, idx, cand, top_k=6)


def test_multi_level_selection_matches():
    # > 2048 * 64 pixels: the emulated CUDA path needs two reduce levels
    case = make_case(19, B=2, D=8, h=21, w=23, H=300, W=310, K=19)
    check_cpu(case)
    check_cpu(case, top_k=5)


# ---------------------------------------------------------------- behaviour

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


def test_in_place():
    case = make_case(21)
    p, n = case["prototypes"].clone(), case["counts"].clone()
    ptr_p, ptr_n = p.data_ptr(), n.data_ptr()
    out_p, out_n = pu.proto_ema_update(p, n, case["feats"], case["cam"], case["labels"])
    assert out_p is p and out_n is n and p.data_ptr() == ptr_p and n.data_ptr() == ptr_n
    assert not torch.equal(p, case["prototypes"]) and not torch.equal(n, case["counts"])


def test_strided_prototypes_updated_in_place():
    case = make_case(22)
    table = torch.zeros(case["prototypes"].shape[1], case["prototypes"].shape[0])
    table.copy_(case["prototypes"].t())
    p = table.t()  # (K, D) view with strides (1, K)
    n = case["counts"].clone()
    pu.proto_ema_update(p, n, case["feats"], case["cam"], case["labels"])
    ref_p, ref_n = run_reference(case)
    assert (table.t() - ref_p).abs().max().item() <= 1e-6 and torch.equal(n, ref_n)


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


def test_proto_select_needs_num_classes_without_cam():
    case = make_case(25, cam=False)
    with pytest.raises(ValueError, match="num_classes"):
        pu.proto_select(None, case["labels"])


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


@needs_cuda
@pytest.mark.parametrize("name", sorted(CUDA_CASES))
def test_cuda_matches_reference(name):
    idx, cpu_idx = check_cuda(CUDA_CASES[name](), exact_selection=False)
    # the GPU runs the CPU op's arithmetic: the same pixels are expected
    assert torch.equal(idx, cpu_idx)


@needs_cuda
@pytest.mark.parametrize("h,H,top_k", [(5, 17, 32), (5, 9, 4), (3, 65, 32)])
def test_cuda_ties_dyadic_cam(h, H, top_k):
    case = make_case(3, B=2, h=h, w=h, H=H, W=H, K=16, ignore=0.0)
    case["cam"] = dyadic_cam(3, 2, 16, h, h)
    check_cuda(case, exact_selection=True, top_k=top_k)


@needs_cuda
def test_cuda_ties_without_cam_and_zero_weights():
    check_cuda(make_case(10, cam=False, valid=True), exact_selection=True)
    case = make_case(11)
    case["cam"] = torch.full_like(case["cam"], 0.5)
    case["cam"][:, 4] = 0
    check_cuda(case, exact_selection=True)


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
