"""End-to-end training step: the fast path against the reference path (pytest-benchmark).

Run: `python -m pytest benchmarks/test_train_step.py --benchmark-only [--benchmark-json=out.json]`.

One step is `Trainer.step` (SPEC 3, every gate open: contrast, mixed CAM, prototype update,
and in stage 1 the CUT D and G/F steps) on a fixed synthetic batch, host-to-device copy
included, data loading excluded. Variants:

* `reference`: fp32, eager, contiguous, plain AdamW, per-step finiteness check, reference ops;
* `fast`: the device's runtime defaults (runtime.py) and the fused kernels. On the CPU that
  is fp32 eager with the fused ops; on CUDA bf16 + channels_last + torch.compile
  (reduce-overhead) + fused AdamW + no per-step host sync.

Shapes: CPU, the demo preset (ResNetV1c-18, 112 / 128 crops); CUDA, the paper's (ResNetV1c-101,
512 crops in stage 1 and 640 in stage 2, batch 2 + 2, CUT with 64 base channels) on the demo
data's datasets (the batch itself is synthetic, so no real data is needed).

Recorded in `extra_info`: the speed-up of `fast` over `reference` (same session), peak memory
(CUDA: `max_memory_allocated` over the timed steps, weights and optimizer state included;
CPU: the most memory a step allocates beyond what exists before it, from the profiler's
allocator events), and on CUDA the step's FLOPs (torch.utils.flop_counter on one eager fp32
step) with the model FLOP utilisation against the card's dense bf16 peak.
"""
import platform

import pytest
import torch

from confeti_fast import ops
from confeti_fast.config import load_config
from confeti_fast.trainer import Trainer

CUDA = torch.cuda.is_available()
_NO_CUDA = pytest.mark.skipif(not CUDA, reason="CUDA not available: the paper-shape step needs a GPU")
REFERENCE_RUNTIME = {"amp": "fp32", "channels_last": False, "compile": None, "fused_optimizer": False,
                     "check_finite": "step"}
ROUNDS = {"cpu": (3, 1), "cuda": (10, 3)}  # timed steps, warm-up steps (after the first step)
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, per card
STEP_T = 5000  # past every gate of both presets
MEDIANS = {}


def _config(device):
    overrides = {"stages": {str(s): {"iters": 100_000} for s in ("0", "1", "2")}}
    if device == "cuda":
        overrides.update({"model": {"depth": 101, "pretrained": None}, "cut": {"ngf": 64, "ndf": 64},
                          "stages": {"1": {"crop_size": [512, 512], "iters": 100_000},
                                     "2": {"crop_size": [640, 640], "iters": 100_000}}})
    return load_config("demo", overrides)


def _batch(cfg, stage, gen):
    height, width = cfg["stages"][str(stage)]["crop_size"]
    ns, nt = cfg["batch"]["source"], cfg["batch"]["target"]
    labels = torch.randint(0, cfg["num_classes"], (ns, height, width), generator=gen)
    labels[:, : height // 10] = 255
    return {"step": STEP_T, "source_image": torch.randn(ns, 3, height, width, generator=gen),
            "source_label": labels, "target_image": torch.randn(nt, 3, height, width, generator=gen)}


def _trainer(tmp_path, device, stage, variant):
    cfg = _config(device)
    cfg = dict(cfg, runtime=REFERENCE_RUNTIME if variant == "reference" else {})
    cut_checkpoint = None
    if stage == 2:  # stage 2 needs a trained G: a random one of the right shape will do here
        from confeti_fast.style import StyleTransfer

        style = StyleTransfer(cfg["cut"], "cpu", cfg["pipeline"]["mean"], cfg["pipeline"]["std"])
        cut_checkpoint = tmp_path / "net_G.pth"
        torch.save(style.G.state_dict(), cut_checkpoint)
    return Trainer(cfg, stage, tmp_path / "run", device=device, progress=False, cut_checkpoint=cut_checkpoint)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _cpu_step_peak_mb(trainer, batch):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.step(batch, STEP_T)
    held = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20


def _step_flops(trainer, batch):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.step(batch, STEP_T)
    return counter.get_total_flops()


@pytest.mark.parametrize("variant", ["reference", "fast"])
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=_NO_CUDA)])
def test_train_step(benchmark, tmp_path, device, stage, variant):
    kernels = "reference" if variant == "reference" else "fused"
    with ops.kernels(kernels):
        trainer = _trainer(tmp_path, device, stage, variant)
        batch = _batch(trainer.cfg, stage, torch.Generator().manual_seed(0))
        trainer.step(batch, STEP_T)  # compilation, CUDA-graph recording, lazy init
        timed, warmup = ROUNDS[device]
        for _ in range(warmup):
            trainer.step(batch, STEP_T)
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def step():
            trainer.step(batch, STEP_T)
            _sync(device)

        benchmark.group = f"train-step-{device}-stage{stage}"
        benchmark.pedantic(step, rounds=timed, iterations=1)
        median = benchmark.stats.stats.median
        info = {"device": device, "stage": stage, "variant": variant, "kernels": kernels,
                "runtime": trainer.runtime, "torch": torch.__version__,
                "crop": trainer.cfg["stages"][str(stage)]["crop_size"], "depth": trainer.cfg["model"]["depth"],
                "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.machine()}
        if device == "cuda":
            info["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            if variant == "reference":
                info["step_tflop"] = round(_step_flops(trainer, batch) / 1e12, 3)
        else:
            info["peak_extra_mb"] = round(_cpu_step_peak_mb(trainer, batch), 1)
    key = (device, stage)
    MEDIANS.setdefault(key, {})[variant] = (median, info)
    if variant == "fast" and "reference" in MEDIANS[key]:
        ref_median, ref_info = MEDIANS[key]["reference"]
        info["speedup_vs_reference"] = round(ref_median / median, 2)
        memory_key = "peak_allocated_mb" if device == "cuda" else "peak_extra_mb"
        if ref_info.get(memory_key):
            info["memory_vs_reference"] = round(info[memory_key] / ref_info[memory_key], 3)
        if "step_tflop" in ref_info:
            info["step_tflop"] = ref_info["step_tflop"]
            peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in info["device_name"]), None)
            if peak:
                info["mfu_bf16"] = round(ref_info["step_tflop"] / median / peak, 4)
    benchmark.extra_info.update(info)
