"""End-to-end training step: the fast path against the reference path (pytest-benchmark).

Run: `python -m pytest benchmarks/test_train_step.py --benchmark-only [--benchmark-json=out.json]`.

One step is `Trainer.step` (docs/method.md §3, every gate open: contrast, mixed CAM, prototype update,
and in stage 1 the CUT D and G/F steps) on a fixed synthetic batch, host-to-device copy
included, data loading excluded. Variants:

* `reference`: fp32, eager, contiguous, plain AdamW, per-step finiteness check, reference ops;
* `fast`: the device's runtime defaults (runtime.py) and the fused kernels. On the CPU that
  is fp32 eager with the fused ops; on CUDA bf16 + channels_last + torch.compile
  (reduce-overhead) + fused AdamW + no per-step host sync.

Shapes: CPU, the demo preset (ResNetV1c-18, 112 / 128 crops); CUDA, the paper's (ResNetV1c-101,
512 crops in stage 1 and 640 in stage 2, batch 2 + 2, CUT with 64 base channels). The batch is
synthetic, so the datasets are a few small generated images (`train_cases.py`, which
`gpu_suite.py` shares: configs, batch, trainers, FLOPs, MFU).

Recorded in `extra_info`: the speed-up of `fast` over `reference` (same session), peak memory
(CUDA: `max_memory_allocated` over the timed steps, weights and optimizer state included;
CPU: the most memory a step allocates beyond what exists before it, from the profiler's
allocator events), and on CUDA the step's FLOPs (torch.utils.flop_counter on one eager fp32
step) with the model FLOP utilisation against the card's dense bf16 peak.
"""
import platform

import pytest
import torch

import train_cases as tc
from confeti_fast import ops
from timing import sync

CUDA = torch.cuda.is_available()
_NO_CUDA = pytest.mark.skipif(not CUDA, reason="CUDA not available: the paper-shape step needs a GPU")
ROUNDS = {"cpu": (3, 1), "cuda": (10, 3)}  # timed steps, warm-up steps (after the first step)
STEP_T = tc.STEP_T
MEDIANS = {}


@pytest.mark.parametrize("variant", ["reference", "fast"])
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=_NO_CUDA)])
def test_train_step(benchmark, tmp_path, device, stage, variant):
    kernels = "reference" if variant == "reference" else "fused"
    with ops.kernels(kernels):
        cfg = tc.config("paper" if device == "cuda" else "demo", tmp_path / "data")
        trainer = tc.make_trainer(cfg, stage, tmp_path, device, variant)
        batch = tc.synthetic_batch(trainer.cfg, stage, torch.Generator().manual_seed(0))
        trainer.step(batch, STEP_T)  # compilation, CUDA-graph recording, lazy init
        timed, warmup = ROUNDS[device]
        for _ in range(warmup):
            trainer.step(batch, STEP_T)
        sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def step():
            trainer.step(batch, STEP_T)
            sync(device)

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
                info["step_tflop"] = round(tc.step_flops(trainer, batch) / 1e12, 3)
        else:
            info["peak_extra_mb"] = round(tc.cpu_step_peak_mb(trainer, batch), 1)
    key = (device, stage)
    MEDIANS.setdefault(key, {})[variant] = (median, info)
    if variant == "fast" and "reference" in MEDIANS[key]:
        ref_median, ref_info = MEDIANS[key]["reference"]
        info.update(tc.speedup_info(median, info, ref_median, ref_info))
    benchmark.extra_info.update(info)
