"""The three hot ops: fused against the reference, and against torch.compile(reference) where it
applies, per device (pytest-benchmark).

Run: `python -m pytest benchmarks --benchmark-only [--benchmark-json=out.json]`.

Cases (defined in `cases.py`, which `gpu_suite.py` shares), at the paper's shapes (K = 19
classes, D = 512), fp32 and contiguous:

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

import cases
from timing import sync

CUDA = torch.cuda.is_available()
MEDIANS = {}  # (op, device) -> {impl: median seconds}, this session
_NO_CUDA = pytest.mark.skipif(not CUDA, reason="CUDA not available")
ROUNDS = {"cpu": (10, 2), "cuda": (50, 5)}  # (timed rounds, warm-up rounds)
SLOW_CPU_REFERENCE_ROUNDS = 3  # the CPU reference prototype update takes seconds per call
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=_NO_CUDA)]


def _implementation(op, device, impl):
    try:
        return cases.implementation(op, device, impl)
    except cases.Unavailable as why:
        pytest.skip(str(why))


def _measure(benchmark, op, device, impl, rounds=None):
    case = cases.make_case(op, device)
    fn = _implementation(op, device, impl)
    timed, warmup = rounds or ROUNDS[device]
    case.call(fn, *case.setup())  # first call outside timing: compilation, lazy init
    sync(device)

    def timed_call(*args):
        case.call(fn, *args)
        sync(device)

    benchmark.group = f"{op}-{device}"
    benchmark.pedantic(timed_call, setup=lambda: (case.setup(), {}), rounds=timed, warmup_rounds=warmup, iterations=1)
    median = benchmark.stats.stats.median
    medians = MEDIANS.setdefault((op, device), {})
    medians[impl] = median
    info = {"op": op, "impl": impl, "device": device, "shape": case.shape,
            "device_name": (torch.cuda.get_device_name() if device == "cuda"
                            else platform.processor() or platform.machine()),
            "torch": torch.__version__, "peak_extra_mb": round(cases.peak_extra_mb(case, fn), 3)}
    for base in ("reference", "compiled"):
        if base in medians and impl != base:
            info[f"speedup_vs_{base}"] = round(medians[base] / median, 2)
    benchmark.extra_info.update(info)
    print(f"\n{op} {device} {impl}: median {median * 1e3:.3f} ms, peak extra {info['peak_extra_mb']:.1f} MB, "
          + ", ".join(f"{k} {v}x" for k, v in info.items() if k.startswith("speedup")), file=sys.stderr)


@pytest.mark.parametrize("impl", cases.IMPLS["contrast"])
@pytest.mark.parametrize("device", DEVICES)
def test_contrast_forward_backward(benchmark, device, impl):
    _measure(benchmark, "contrast", device, impl)


@pytest.mark.parametrize("impl", cases.IMPLS["patch_nce"])
@pytest.mark.parametrize("device", DEVICES)
def test_patch_nce_forward_backward(benchmark, device, impl):
    _measure(benchmark, "patch_nce", device, impl)


@pytest.mark.parametrize("impl", cases.IMPLS["proto_update"])
@pytest.mark.parametrize("device", DEVICES)
def test_proto_update(benchmark, device, impl):
    rounds = (SLOW_CPU_REFERENCE_ROUNDS, 0) if (device, impl) == ("cpu", "reference") else None
    _measure(benchmark, "proto_update", device, impl, rounds)
