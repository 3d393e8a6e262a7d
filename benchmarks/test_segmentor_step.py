"""Segmentor training-step benchmark (pytest-benchmark).

Run: `python -m pytest benchmarks --benchmark-only [--benchmark-json=out.json]`.

One step = zero_grad, forward, bilinear upsampling of the stride-8 logits to the label size,
cross-entropy (ignore 255), backward, AdamW step. Two variants per device:

* `fp32`: contiguous tensors, eager, fp32 (PyTorch's default cuDNN TF32 setting left as is);
* `fast`: bf16 autocast + channels_last, plus `torch.compile` of the model on CUDA;
* `fast-cudagraphs` (CUDA only): the same with `torch.compile(mode="reduce-overhead")`
  (CUDA graphs). At batch 2 the eager step is bound by kernel launches on the host (an H200
  spends ~27 ms of GPU kernel time in a ~44 ms fp32 step), which CUDA graphs remove.

Shapes: CPU uses a small model (ResNetV1c-18, batch 2, 64x64) to stay fast; CUDA uses the
paper's (ResNetV1c-101, batch 2, 512x512 crops, 19 classes). The fp32 case of a device runs
before its fast case (parametrization order), and the fast case stores its speed-up over
the fp32 median of the same session in `extra_info["speedup_vs_fp32"]`.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` over the timed rounds (after the
first step, so compilation is not counted); on CPU the process peak RSS from
`resource.getrusage(...).ru_maxrss`, reported both as the absolute peak and as the growth of
that peak during the test (0 when the test stayed below an earlier high-water mark).
"""
import platform
import resource
import sys

import pytest
import torch
import torch.nn.functional as F

from confeti_fast.models import DeepLabV2, upsample_logits
from timing import sync, time_ms

CUDA = torch.cuda.is_available()
NUM_CLASSES = 19
SHAPES = {
    # device: (depth, batch, crop)
    "cpu": (18, 2, 64),
    "cuda": (101, 2, 512),
}
# (device, variant): (timed rounds, warm-up rounds); one untimed step always runs first.
# CPUs without native bf16 (AVX2 only) emulate bf16 convolutions, ~20x slower than fp32:
# few rounds keep the CPU cases near 30 s.
ROUNDS = {
    ("cpu", "fp32"): (8, 1),
    ("cpu", "fast"): (3, 0),
    ("cuda", "fp32"): (20, 3),
    ("cuda", "fast"): (20, 3),
    ("cuda", "fast-cudagraphs"): (20, 3),
}
_NO_CUDA = pytest.mark.skipif(not CUDA, reason="CUDA not available: the paper-shape "
                              "(ResNetV1c-101, 2x512x512) case needs a GPU")
FP32_MEDIAN = {}  # device -> median seconds of the fp32 variant, this session

CASES = [
    pytest.param("cpu", "fp32", id="cpu-fp32"),
    pytest.param("cpu", "fast", id="cpu-bf16-channels_last"),
    pytest.param("cuda", "fp32", id="cuda-fp32", marks=_NO_CUDA),
    pytest.param("cuda", "fast", id="cuda-bf16-channels_last-compile", marks=_NO_CUDA),
    pytest.param("cuda", "fast-cudagraphs", id="cuda-bf16-channels_last-compile-cudagraphs", marks=_NO_CUDA),
]


def _rss_mb():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@pytest.mark.parametrize("device,variant", CASES)
def test_segmentor_train_step(benchmark, device, variant):
    depth, batch, crop = SHAPES[device]
    rounds, warmup = ROUNDS[device, variant]
    fast = variant != "fp32"
    cudagraphs = variant == "fast-cudagraphs"
    torch.manual_seed(0)
    dev = torch.device(device)
    model = DeepLabV2(depth, NUM_CLASSES).to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)
    x = torch.randn(batch, 3, crop, crop, device=dev)
    y = torch.randint(0, NUM_CLASSES, (batch, crop, crop), device=dev)
    y[:, : crop // 8] = 255
    memory_format = torch.channels_last if fast else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = x.contiguous(memory_format=memory_format)
    if fast and device == "cuda":
        net = torch.compile(model, mode="reduce-overhead" if cudagraphs else "default")
    else:
        net = model
    if device == "cuda":
        torch.backends.cudnn.benchmark = True

    def step():
        optimizer.zero_grad(set_to_none=True)
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=fast):
            logits = net(x)
            loss = F.cross_entropy(upsample_logits(logits, y.shape[-2:]), y, ignore_index=255)
        loss.backward()
        optimizer.step()
        sync(device)
        return loss.detach().clone() if cudagraphs else loss

    rss_before = _rss_mb()
    losses = []  # the first step's loss, checked below
    # includes torch.compile / cuDNN autotuning on CUDA
    first_step_s = time_ms(lambda: losses.append(step()), 1, device)[0] / 1e3
    if cudagraphs:  # CUDA graphs are recorded on the second/third call, not the first
        step()
    assert torch.isfinite(losses[0])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)

    info = benchmark.extra_info
    info.update({
        "device": device,
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "variant": {"fp32": "fp32 contiguous eager",
                    "fast": "bf16 autocast + channels_last" + (" + torch.compile" if device == "cuda" else ""),
                    "fast-cudagraphs": "bf16 autocast + channels_last + torch.compile(mode='reduce-overhead')",
                    }[variant],
        "depth": depth, "batch": batch, "crop": crop, "num_classes": NUM_CLASSES,
        "first_step_s": round(first_step_s, 3),
    })
    if device == "cuda":
        import triton  # noqa: F401  (present wherever torch.compile works on CUDA)
        info["triton"] = triton.__version__
        info["cuda"] = torch.version.cuda
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        info["reserved_memory_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        info["memory_method"] = "torch.cuda.max_memory_allocated over the timed rounds" + (
            "; CUDA-graph replays reuse a private pool allocated while recording, so allocated memory "
            "is undercounted here: see reserved_memory_mb (max_memory_reserved since process start)"
            if cudagraphs else "")
    else:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["peak_rss_mb"] = round(_rss_mb(), 1)
        info["peak_rss_delta_mb"] = round(_rss_mb() - rss_before, 1)
        info["memory_method"] = ("resource ru_maxrss: process peak RSS, and its growth during this test "
                                 "(0 if below an earlier peak)")
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats else None
    if median is not None:
        info["images_per_s"] = round(batch / median, 2)
        if not fast:
            FP32_MEDIAN[device] = median
        elif device in FP32_MEDIAN:
            info["fp32_median_s"] = FP32_MEDIAN[device]
            info["speedup_vs_fp32"] = round(FP32_MEDIAN[device] / median, 3)
        else:
            info["speedup_vs_fp32"] = None  # the fp32 case did not run in this session
    step = net = model = optimizer = None  # noqa: F841  (the benchmark keeps `step`; free the model now)
    if device == "cuda":
        if fast:
            torch._dynamo.reset()
        torch.cuda.empty_cache()
