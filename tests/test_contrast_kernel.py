"""The fused Triton ops against the reference ops (the contract): losses and gradients.

Runs on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py where there
is no CUDA GPU) and on CUDA when a GPU is present; shapes are small because the interpreter is
~1000x slower than eager.

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
import os

import pytest
import torch
import torch.nn.functional as F

from confeti_fast.kernels import contrast as kc
from confeti_fast.kernels import patch_nce as kp
from confeti_fast.ops import reference
from triton_support import BF16_GRAD_ATOL_FRAC, BF16_GRAD_RTOL, BF16_LOSS, DEVICES, FP32, needs_cuda
from triton_support import exact_fp32_matmul  # noqa: F401  (autouse fixture)

if not (kc.AVAILABLE and kp.AVAILABLE):
    pytest.skip(f"Triton unusable here: {kc.LOAD_ERROR or kp.LOAD_ERROR}", allow_module_level=True)


# ------------------------------------------------------------------------------ contrast

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
    idx = reference.sample_kept_pixels(labels.reshape(-1), num_samples, generator=gen)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONTRAST_CASES))
def test_contrast_matches_reference(device, name):
    assert_contrast_matches(contrast_case(device, **CONTRAST_CASES[name]))


@pytest.mark.parametrize("device", DEVICES)
def test_contrast_other_hyperparameters(device):
    assert_contrast_matches(contrast_case(device), tau=0.2, ce_weight=1.0, reg_weight=0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_contrast_multichunk_pixel_kernels(device, monkeypatch):
    # D = 40 in chunks of 16 (the last one 8 wide) in the all-pixel kernels, 32 pixels a block.
    monkeypatch.setattr(kc, "_BLOCK_OVERRIDE", {"pixel_d": 16, "pixel_m": 32, "sample_d": 16})
    assert not kc._blocks(19, 40)["one_chunk"]
    assert_contrast_matches(contrast_case(device, D=40))


@pytest.mark.parametrize("device", DEVICES)
def test_contrast_strided_feats(device):
    # A non-dense view (every other channel, cropped width): read by strides, never copied.
    feats, labels, protos, _ = contrast_case(device, D=64, W=15)
    view = feats[:, ::2, :, 1:-1]
    labels = labels[:, :, 1:-1].contiguous()
    idx = reference.sample_kept_pixels(labels.reshape(-1), 50, generator=torch.Generator().manual_seed(1))
    grad = assert_contrast_matches((view, labels, protos[:, :32].contiguous(), idx.to(device)))
    assert grad.shape == view.shape


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


@pytest.mark.parametrize("device", DEVICES)
def test_contrast_sampler_draw(device):
    # sample_idx=None draws with reference.sample_kept_pixels from the global generator.
    feats, labels, protos, _ = contrast_case(device)
    torch.manual_seed(123)
    got = kc.pixel_proto_contrast(feats, labels, protos, num_samples=40)
    torch.manual_seed(123)
    want = reference.pixel_proto_contrast(feats, labels, protos, num_samples=40)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **FP32)


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


@pytest.mark.parametrize("device", DEVICES)
def test_contrast_prototypes_get_no_gradient(device):
    feats, labels, protos, idx = contrast_case(device, num_samples=20)
    protos = protos.clone().requires_grad_(True)
    loss_ce, loss_reg = kc.pixel_proto_contrast(feats.requires_grad_(True), labels, protos, sample_idx=idx)
    (loss_ce + loss_reg).backward()
    assert protos.grad is None and feats.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_contrast_opcheck(device):
    feats, labels, protos, idx = contrast_case(device, D=16, H=5, W=6, K=5, num_samples=20)
    feats.requires_grad_(True)
    torch.library.opcheck(torch.ops.confeti_fast.contrast_forward.default,
                          (feats, labels, protos, idx, 0.1, 0.5, 2.0))
    out = torch.ops.confeti_fast.contrast_forward(feats.detach(), labels, protos, idx, 0.1, 0.5, 2.0)
    torch.library.opcheck(torch.ops.confeti_fast.contrast_backward.default,
                          (torch.tensor(0.7, device=device), torch.tensor(1.3, device=device),
                           feats.detach(), labels, idx, out[2], out[3]))


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
    torch.testing.assert_close(grad.float(), rgrad.float(), rtol=BF16_GRAD_RTOL,
                               atol=BF16_GRAD_ATOL_FRAC * rgrad.float().abs().max().item())


@needs_cuda
def test_contrast_training_size_fp32_cuda():
    # D = 512 (whole rows in the all-pixel kernels, 64-wide chunks in the sampled-row one), 4096 samples.
    assert_contrast_matches(contrast_case("cuda", B=2, D=512, H=64, W=64, num_samples=4096,
                                          channels_last=True))


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


# ------------------------------------------------------------------------------ module hygiene

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


@pytest.mark.parametrize("device", DEVICES)
def test_contrast_skips_samples_at_ignored_pixels(device):
    # The trainer's sync-free sampler fills up with ignored pixels when fewer than num_samples
    # are kept; every implementation must skip those samples (CE = mean over the others).
    feats, labels, protos, _ = contrast_case(device, kept=7)
    idx = reference.sample_pixels(labels, 40, torch.Generator().manual_seed(3)).to(device)
    sampled = labels.reshape(-1)[idx]
    assert int((sampled != 255).sum()) == 7 and int((sampled == 255).sum()) == 33
    assert_contrast_matches((feats, labels, protos, idx))
    kept_only = idx[sampled != 255]
    ce, _, _ = run_contrast(kc.pixel_proto_contrast, feats, labels, protos, kept_only)
    ce_padded, _, _ = run_contrast(kc.pixel_proto_contrast, feats, labels, protos, idx)
    torch.testing.assert_close(ce_padded, ce, **FP32)
