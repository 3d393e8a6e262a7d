"""The three hot ops: fused against the reference, and against torch.compile(reference) where it
applies, per device (pytest-benchmark).

Run: `python -m pytest benchmarks --benchmark-only [--benchmark-json=out.json]`.

Cases, at the paper's shapes (K = 19 classes, D = 512):

* contrast: forward + backward of pixel-to-prototype contrast on features 2 x 512 x 81 x 81
  (640 crops at stride 8) with 4096 sampled pixels;
* patch_nce: forward + backward of PatchNCE over 5 layers x 4 images x 256 patches x 256;
* proto_update: the prototype EMA update, labels 2 x 512 x 512 with features 2 x 512 x 65 x 65
  on the CPU, and 640 crops (labels 2 x 640 x 640, features 2 x 512 x 81 x 81) on CUDA.
  torch.compile does not apply: the reference loops over classes with data-dependent shapes.

"fused" is whatever `--kernels fused` runs on that device (CPU: the C++ op and the cheapest
torch paths, which for PatchNCE is the reference itself; CUDA: the CUDA op and the Triton
kernels). Within an op/device group the cases run
in the order reference, compiled, fused; the later ones store in `extra_info` their speed-up
over the reference's (and the compiled reference's) median from the same session.

Peak memory (`extra_info["peak_extra_mb"]`): the most memory the call held beyond its inputs,
from one untimed call: on CUDA `torch.cuda.max_memory_allocated` above the allocation before
the call; on the CPU the running total of the allocator events the torch profiler records
(`profile_memory=True`), so it counts tensors, not Python objects.
"""
import platform
import sys

import pytest
import torch
import torch.nn.functional as F

from confeti_fast import ops
from confeti_fast.ops import reference

CUDA = torch.cuda.is_available()
GEN_SEED = 0
NUM_CLASSES, DIM = 19, 512
MEDIANS = {}  # (op, device) -> {impl: median seconds}, this session
_NO_CUDA = pytest.mark.skipif(not CUDA, reason="CUDA not available")
ROUNDS = {"cpu": (10, 2), "cuda": (50, 5)}  # (timed rounds, warm-up rounds)
SLOW_CPU_REFERENCE_ROUNDS = 3  # the CPU reference prototype update takes seconds per call


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_extra_mb(fn, setup, device):
    args = setup()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(*args)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20


def _measure(benchmark, op, device, impl, fn, setup, shape, rounds=None):
    timed, warmup = ROUNDS[device]
    if rounds is not None:
        timed, warmup = rounds
    fn(*setup())  # first call outside timing: compilation, lazy init
    _sync(device)

    def timed_call(*args):
        fn(*args)
        _sync(device)

    benchmark.group = f"{op}-{device}"
    benchmark.pedantic(timed_call, setup=lambda: (setup(), {}), rounds=timed, warmup_rounds=warmup, iterations=1)
    median = benchmark.stats.stats.median
    medians = MEDIANS.setdefault((op, device), {})
    medians[impl] = median
    info = {"op": op, "impl": impl, "device": device, "shape": shape,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
            "torch": torch.__version__, "peak_extra_mb": round(_peak_extra_mb(fn, setup, device), 3)}
    for base in ("reference", "compiled"):
        if base in medians and impl != base:
            info[f"speedup_vs_{base}"] = round(medians[base] / median, 2)
    benchmark.extra_info.update(info)
    print(f"\n{op} {device} {impl}: median {median * 1e3:.3f} ms, peak extra {info['peak_extra_mb']:.1f} MB, "
          + ", ".join(f"{k} {v}x" for k, v in info.items() if k.startswith("speedup")), file=sys.stderr)


def _fused(name, device):
    fn, missing = ops._fused(name, device)
    if fn is None:
        pytest.skip(f"no fused {name} for {device} on this install: {missing}")
    if fn is getattr(reference, name):
        pytest.skip(f"on {device} the fused {name} is the reference itself (measured above)")
    return fn


def _implementation(name, device, impl):
    if impl == "reference":
        return getattr(reference, name)
    if impl == "compiled":
        return torch.compile(getattr(reference, name))
    return _fused(name, device)


IMPLS = ["reference", "compiled", "fused"]
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=_NO_CUDA)]


# ---------------------------------------------------------------- pixel-to-prototype contrast

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_forward_backward(benchmark, device, impl):
    gen = torch.Generator().manual_seed(GEN_SEED)
    feats = torch.randn(2, DIM, 81, 81, generator=gen).to(device).requires_grad_(True)
    labels = torch.randint(0, NUM_CLASSES, (2, 81, 81), generator=gen)
    labels[:, :10] = 255
    labels = labels.to(device)
    protos = F.normalize(torch.randn(NUM_CLASSES, DIM, generator=gen), dim=1).to(device)
    idx = reference.sample_kept_pixels(labels, 4096, gen)
    fn = _implementation("pixel_proto_contrast", device, impl)

    def step(feats, labels, protos, idx):
        feats.grad = None
        ce, reg = fn(feats, labels, protos, sample_idx=idx)
        (ce + reg).backward()

    _measure(benchmark, "contrast", device, impl, step, lambda: (feats, labels, protos, idx),
             "feats 2x512x81x81, 4096 samples, K=19")


# ---------------------------------------------------------------- PatchNCE

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_patch_nce_forward_backward(benchmark, device, impl):
    gen = torch.Generator().manual_seed(GEN_SEED)
    layers, images, patches, channels = 5, 4, 256, 256
    qs = [F.normalize(torch.randn(images * patches, channels, generator=gen), dim=1).to(device).requires_grad_(True)
          for _ in range(layers)]
    ks = [F.normalize(torch.randn(images * patches, channels, generator=gen), dim=1).to(device)
          for _ in range(layers)]
    fn = _implementation("patch_nce", device, impl)

    def step(qs, ks):
        for q in qs:
            q.grad = None
        fn(qs, ks, images).backward()

    _measure(benchmark, "patch_nce", device, impl, step, lambda: (qs, ks),
             "5 layers x 4 images x 256 patches x 256")


# ---------------------------------------------------------------- prototype EMA update

PROTO_SHAPES = {"cpu": (512, 65), "cuda": (640, 81)}  # label side, feature side


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("device", DEVICES)
def test_proto_update(benchmark, device, impl):
    label_side, feat_side = PROTO_SHAPES[device]
    gen = torch.Generator().manual_seed(GEN_SEED)
    protos = F.normalize(torch.randn(NUM_CLASSES, DIM, generator=gen), dim=1).to(device)
    counts = torch.randint(0, 100, (NUM_CLASSES,), generator=gen).to(device)
    feats = torch.randn(2, DIM, feat_side, feat_side, generator=gen).to(device)
    cam = torch.rand(2, NUM_CLASSES, feat_side, feat_side, generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (2, label_side, label_side), generator=gen)
    labels[:, :40] = 255
    labels = labels.to(device)
    fn = _implementation("proto_ema_update", device, impl)

    def update(protos, counts):
        fn(protos, counts, feats, cam, labels, momentum=0.999, top_k=32)

    rounds = (SLOW_CPU_REFERENCE_ROUNDS, 0) if (device, impl) == ("cpu", "reference") else None
    _measure(benchmark, "proto_update", device, impl, update, lambda: (protos.clone(), counts.clone()),
             f"labels 2x{label_side}x{label_side}, feats 2x512x{feat_side}x{feat_side}, K=19", rounds)
