"""patch_nce (docs/method.md §6): the reference against the CUT code and by hand, and the fused Triton
op against the reference (the contract): loss and q gradients. (On the CPU "fused" is the
reference itself; the switch: test_ops_switch.py.)

The Triton op runs on CPU under the Triton interpreter and on CUDA when a GPU is present; the
tolerances (fp32 and bf16) are those of tests/test_op_contrast.py and live in helpers.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from confeti_fast.kernels import patch_nce as kp
from confeti_fast import reference
from confeti_fast.profiling import count_launches
from helpers import (BF16_GRAD_ATOL_FRAC, BF16_GRAD_RTOL, BF16_LOSS, DEVICES, FP32, assert_close_bf16_grad,
                     needs_cuda)
from helpers import exact_fp32_matmul  # noqa: F401  (autouse fixture)

needs_triton = pytest.mark.skipif(not kp.AVAILABLE, reason=f"Triton unusable here: {kp.LOAD_ERROR}")


# ---------------------------------------------------------------- the reference

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
    got = reference.patch_nce(qs, ks, 2)
    want = _cut_patch_nce(qs, ks, 2, 0.07)
    assert got.item() == pytest.approx(want.item(), abs=1e-6, rel=1e-6)


def test_patch_nce_hand_value_and_same_image_negatives():
    # q = k = orthonormal rows: logits 1/tau on the diagonal, 0 elsewhere (P=2 per image)
    e = torch.eye(2)
    q = torch.cat([e, e])  # batch 2, 2 patches each
    got = reference.patch_nce([q], [q.clone()], 2).item()
    assert got == pytest.approx(math.log(1 + math.exp(-1 / 0.07)), abs=1e-7)
    got = reference.patch_nce([q], [q.clone()], 2, tau=0.25).item()
    assert got == pytest.approx(math.log(1 + math.exp(-4)), rel=1e-5)
    # negatives from the whole batch would include the other image's identical row (logits
    # 4, 0, 4, 0): CE = log(2 + 2 e^-4), about 0.71, far from 0.018
    # tau is honoured: with tau = 1, per patch logits (1, 0) -> CE = log(e + 1) - 1
    assert reference.patch_nce([q], [q.clone()], 2, tau=1.0).item() == pytest.approx(math.log(math.e + 1) - 1, rel=1e-6)


def test_patch_nce_k_gets_no_gradient():
    g = torch.Generator().manual_seed(5)
    q = F.normalize(torch.randn(8, 4, generator=g), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(8, 4, generator=g), dim=1).requires_grad_(True)
    loss = reference.patch_nce([q, q * 1.0], [k, k * 1.0], 2)
    loss.backward()
    assert k.grad is None
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


# ---------------------------------------------------------------- the Triton op = the reference

def nce_case(device, shapes, batch_size, dtype=torch.float32, seed=0):
    """q and k layers as (B*P, C) rows, L2-normalized like PatchSampleF's output."""
    gen = torch.Generator().manual_seed(seed)
    qs, ks = [], []
    for patches, channels in shapes:
        for out in (qs, ks):
            out.append(F.normalize(torch.randn(batch_size * patches, channels, generator=gen), dim=1)
                       .to(device=device, dtype=dtype))
    return qs, ks


def run_nce(fn, qs, ks, batch_size, tau=0.07):
    q_leaves = [q.detach().clone().requires_grad_(True) for q in qs]
    k_leaves = [k.detach().clone().requires_grad_(True) for k in ks]
    loss = fn(q_leaves, k_leaves, batch_size, tau=tau)
    loss.backward()
    assert all(k.grad is None for k in k_leaves), "k must be detached"
    return loss.detach(), [q.grad for q in q_leaves]


def assert_nce_matches(qs, ks, batch_size, tau=0.07):
    """The fused loss and q gradients equal the reference's within FP32; returns the fused loss."""
    loss, grads = run_nce(kp.patch_nce, qs, ks, batch_size, tau)
    rloss, rgrads = run_nce(reference.patch_nce, qs, ks, batch_size, tau)
    torch.testing.assert_close(loss, rloss, **FP32)
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g, rg, **FP32)
    return loss


NCE_CASES = {
    "p10_c16_3layers": ([(10, 16)] * 3, 2),
    "p40_c40_2layers_b3": ([(40, 40)] * 2, 3),  # 2 row blocks, C tail of 8
    "p256_c32": ([(256, 32)], 2),
    "mixed_shapes": ([(8, 16), (8, 16), (12, 24), (8, 16), (5, 16)], 2),  # 3 launches
}


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(NCE_CASES))
def test_patch_nce_matches_reference(device, name):
    shapes, batch_size = NCE_CASES[name]
    qs, ks = nce_case(device, shapes, batch_size)
    loss = assert_nce_matches(qs, ks, batch_size)
    assert loss.dtype == torch.float32 and loss.dim() == 0


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_patch_nce_other_tau_and_unnormalized_q(device):
    # q is used as given (no renormalization), exactly like the reference.
    qs, ks = nce_case(device, [(10, 16)] * 2, 2)
    qs = [3.0 * q for q in qs]
    assert_nce_matches(qs, ks, 2, tau=0.2)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_patch_nce_opcheck(device):
    qs, ks = nce_case(device, [(10, 16)] * 2 + [(6, 8)], 2)
    qs = [q.requires_grad_(True) for q in qs]
    torch.library.opcheck(torch.ops.confeti_fast.patch_nce_forward.default, (qs, ks, 2, 0.07))
    grads = [torch.randn(q.shape, device=device) for q in qs]
    torch.library.opcheck(torch.ops.confeti_fast.patch_nce_backward.default,
                          (grads, torch.tensor(0.5, device=device), [0, 1, 0]))


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_patch_nce_compiles_without_graph_breaks(device):
    qs, ks = nce_case(device, [(10, 16), (10, 16), (6, 16)], 2)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k: kp.patch_nce(q, k, 2), fullgraph=True, backend="aot_eager")
    a = [q.clone().requires_grad_(True) for q in qs]
    b = [q.clone().requires_grad_(True) for q in qs]
    la, lb = compiled(a, ks), kp.patch_nce(b, ks, 2)
    torch.testing.assert_close(la, lb, **FP32)
    la.backward()
    lb.backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, **FP32)


@needs_triton
@needs_cuda
@pytest.mark.parametrize("shapes", [[(10, 16)] * 3, [(256, 256)] * 5], ids=["small", "training_size"])
def test_patch_nce_bf16_cuda(shapes):
    qs, ks = nce_case("cuda", shapes, 2, dtype=torch.bfloat16)
    loss, grads = run_nce(kp.patch_nce, qs, ks, 2)
    rloss, rgrads = run_nce(reference.patch_nce, qs, ks, 2)
    torch.testing.assert_close(loss, rloss, **BF16_LOSS)
    for g, rg in zip(grads, rgrads):
        assert g.dtype == torch.bfloat16 == rg.dtype
        assert_close_bf16_grad(g, rg)


@needs_triton
@needs_cuda
def test_patch_nce_training_size_fp32_cuda():
    assert_nce_matches(*nce_case("cuda", [(256, 256)] * 5, 2), 2)


@needs_triton
@needs_cuda
def test_patch_nce_has_no_host_syncs_cuda():
    qs, ks = nce_case("cuda", [(10, 16)] * 2, 2)

    def forward_backward():
        q_leaves = [q.clone().requires_grad_(True) for q in qs]
        kp.patch_nce(q_leaves, ks, 2).backward()

    forward_backward()  # compiles the kernel first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------------------------ launches, layer layouts

ROWS, SUM, SCALE = "triton::_patch_nce_rows_kernel", "triton::_patch_nce_sum_kernel", "triton::_patch_nce_scale_kernel"


def nce_launches(qs, ks, batch_size, grad_out):
    """(launch names of one forward + backward, loss, q grads); q leaves made outside the count."""
    q_leaves = [q.detach().clone().requires_grad_(True) for q in qs]
    out = {}

    def step():
        out["loss"] = kp.patch_nce(q_leaves, ks, batch_size)
        torch.autograd.backward([out["loss"]], [grad_out])

    names = count_launches(step).names
    return names, out["loss"].detach(), [q.grad for q in q_leaves]


@needs_triton
def test_patch_nce_forward_backward_launches():
    # CUT's case: five layers of one shape -> rows kernel, loss sum, backward scale; no stacking.
    qs, ks = nce_case("cpu", [(12, 24)] * 5, 2)
    grad_out = torch.tensor(0.37)
    names, loss, grads = nce_launches(qs, ks, 2, grad_out)
    assert names == [ROWS, SUM, SCALE], names
    assert "aten::stack" not in names and len(names) <= 3
    rloss, rgrads = run_nce(reference.patch_nce, qs, ks, 2)
    torch.testing.assert_close(loss, rloss, **FP32)
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g, grad_out * rg, **FP32)
    # Deterministic: a second run gives the same bits.
    _, loss2, grads2 = nce_launches(qs, ks, 2, grad_out)
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


@needs_triton
def test_patch_nce_mixed_dtypes_and_strides():
    # Same shape, but a bf16 layer, a column-major q, a row-strided (sliced) k: the layers are
    # read where they lie (no copies); each (dtype, strides) is its own rows launch.
    qs, ks = nce_case("cpu", [(10, 16)] * 5, 2)
    qs[1], ks[1] = qs[1].to(torch.bfloat16), ks[1].to(torch.bfloat16)
    qs[2] = qs[2].t().contiguous().t()
    ks[3] = torch.cat([ks[3], torch.randn_like(ks[3])], dim=1)[:, :16]
    grad_out = torch.tensor(1.5)
    names, loss, grads = nce_launches(qs, ks, 2, grad_out)
    assert names == [ROWS] * 4 + [SUM, SCALE], names
    rloss, rgrads = run_nce(reference.patch_nce, qs, ks, 2)
    torch.testing.assert_close(loss, rloss, **FP32)
    for i, (g, rg) in enumerate(zip(grads, rgrads)):
        assert g.dtype == qs[i].dtype == rg.dtype and g.shape == qs[i].shape
        if i == 1:
            # the bf16 layer: atol from the unscaled reference gradient
            torch.testing.assert_close(g.float(), grad_out * rg.float(), rtol=BF16_GRAD_RTOL,
                                       atol=BF16_GRAD_ATOL_FRAC * rg.float().abs().max().item())
        else:
            torch.testing.assert_close(g, grad_out * rg, **FP32)


@needs_triton
def test_patch_nce_more_layers_than_pointer_slots(monkeypatch):
    # Past MAX_LAYERS a group runs in several launches (forward and backward alike).
    monkeypatch.setattr(kp, "MAX_LAYERS", 2)
    qs, ks = nce_case("cpu", [(6, 16)] * 5, 2)
    grad_out = torch.tensor(1.0)
    names, loss, grads = nce_launches(qs, ks, 2, grad_out)
    assert names == [ROWS] * 3 + [SUM] + [SCALE] * 3, names
    rloss, rgrads = run_nce(reference.patch_nce, qs, ks, 2)
    torch.testing.assert_close(loss, rloss, **FP32)
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g, rg, **FP32)
