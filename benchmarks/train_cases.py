"""The training-step cases, shared by `test_train_step.py` (pytest-benchmark) and the GPU suite
(`suite/train_steps.py`).

    cfg = config("paper", data_root)             # or "demo" (the CPU benchmark), "tiny" (dry runs)
    trainer = make_trainer(cfg, stage, work_dir, "cuda", "fast")
    batch = synthetic_batch(cfg, stage, torch.Generator().manual_seed(0))
    trainer.step(batch, STEP_T)

Sizes: "paper": ResNetV1c-101, 512 crops in stages 0 and 1 and 640 in stage 2, batch 2 + 2,
CUT with 64 base channels, evaluation as in gta2cs (whole image at 1280 x 640); "demo": the
demo preset (ResNetV1c-18, 112 / 128 crops); "tiny": ResNetV1c-18 at 32 x 32 crops with a
4-channel CUT.

The batch is synthetic, so the datasets on disk only have to exist: `write_datasets` writes a
few small GTA5/Cityscapes-layout PNGs (one validation image at exactly the evaluation scale,
so evaluation resizes nothing and needs no OpenCV), with rare class sampling off (no class
statistics pass, no tqdm). Variants: "reference" (fp32, eager, contiguous, plain AdamW,
per-step finiteness check; run it under `ops.kernels("reference")`) and "fast" (the device's
runtime defaults, or the `runtime` given).
"""
from pathlib import Path

import numpy as np
import torch

from confeti_fast.config import load_config
from confeti_fast.trainer import Trainer

REFERENCE_RUNTIME = {"amp": "fp32", "channels_last": False, "compile": None, "fused_optimizer": False,
                     "check_finite": "step"}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, per card
STEP_T = 5000  # past every gate of every preset
LABEL_IDS = (7, 8, 11, 17, 21, 23, 24, 26)  # Cityscapes/GTA5 label ids: road ... car

SIZES = {
    "paper": {"model": {"depth": 101, "pretrained": None}, "cut": {"ngf": 64, "ndf": 64},
              "stages": {"0": {"crop_size": [512, 512]}, "1": {"crop_size": [512, 512]},
                         "2": {"crop_size": [640, 640]}},
              "evaluation": {"mode": "whole", "scale": [1280, 640]}},
    "demo": {},
    "tiny": {"model": {"depth": 18, "pretrained": None}, "cut": {"ngf": 4, "ndf": 4, "num_patches": 16},
             "stages": {s: {"crop_size": [32, 32]} for s in ("0", "1", "2")},
             "evaluation": {"mode": "whole", "scale": [48, 40]}},
}


def _blocky_labels(rng, height, width, block=8):
    grid = rng.choice(LABEL_IDS, (-(-height // block), -(-width // block))).astype(np.uint8)
    return np.kron(grid, np.ones((block, block), np.uint8))[:height, :width]


def write_datasets(root, eval_scale, side=64):
    """A two-image GTA5 source and a Cityscapes target (two train images, one val image of
    `eval_scale` (w, h)) under `root`; returns the config overrides that point at them."""
    from PIL import Image

    root, rng = Path(root), np.random.default_rng(0)

    def write(image_path, label_path, width, height):
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image_path)
        Image.fromarray(_blocky_labels(rng, height, width)).save(label_path)

    for i in range(2):
        write(root / "gta5" / "images" / f"{i:05d}.png", root / "gta5" / "labels" / f"{i:05d}.png", side, side)
    cs = root / "cityscapes"
    for split, count, (width, height) in (("train", 2, (side, side)), ("val", 1, tuple(eval_scale))):
        for k in range(count):
            stem = f"aachen_{k:06d}_000019"
            write(cs / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png",
                  cs / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", width, height)
    return {"source": {"type": "gta5", "root": str(root / "gta5"), "resize": [side, side], "generate": None},
            "target": {"type": "cityscapes", "root": str(cs), "resize": [side, side], "generate": None},
            "rcs": {"enabled": False}}


def config(size, data_root):
    """The demo preset at `size` ("paper", "demo", "tiny"), on datasets written under data_root."""
    from confeti_fast.config import merge

    overrides = merge(SIZES[size], {"stages": {s: {"iters": 100_000} for s in ("0", "1", "2")}})
    scale = overrides.get("evaluation", {}).get("scale") or load_config("demo")["evaluation"]["scale"]
    return load_config("demo", merge(overrides, write_datasets(data_root, scale)))


def synthetic_batch(cfg, stage, gen):
    height, width = cfg["stages"][str(stage)]["crop_size"]
    ns, nt = cfg["batch"]["source"], cfg["batch"]["target"]
    labels = torch.randint(0, cfg["num_classes"], (ns, height, width), generator=gen)
    labels[:, : height // 10] = 255
    return {"step": STEP_T, "source_image": torch.randn(ns, 3, height, width, generator=gen),
            "source_label": labels, "target_image": torch.randn(nt, 3, height, width, generator=gen)}


def make_trainer(cfg, stage, work_dir, device, variant, runtime=None):
    """A Trainer for `variant` ("reference" or "fast"; `runtime` overrides the fast one's
    defaults). Stage 2 gets a random G of the right shape in place of stage 1's output."""
    work_dir = Path(work_dir)
    cfg = dict(cfg, runtime=REFERENCE_RUNTIME if variant == "reference" else dict(runtime or {}))
    cut_checkpoint = None
    if stage == 2 and cfg["cut"]["enabled"]:
        from confeti_fast.style import StyleTransfer

        style = StyleTransfer(cfg["cut"], "cpu", cfg["pipeline"]["mean"], cfg["pipeline"]["std"])
        work_dir.mkdir(parents=True, exist_ok=True)
        cut_checkpoint = work_dir / "net_G.pth"
        torch.save(style.G.state_dict(), cut_checkpoint)
    return Trainer(cfg, stage, work_dir / "run", device=device, progress=False, cut_checkpoint=cut_checkpoint)


def step_flops(trainer, batch):
    """FLOPs of one step (torch.utils.flop_counter; run it on an eager trainer)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.step(batch, STEP_T)
    return counter.get_total_flops()


def cpu_step_peak_mb(trainer, batch):
    """The most memory one CPU step allocates beyond what exists before it (profiler events)."""
    from confeti_fast.profiling import cpu_peak_allocated_mb

    return cpu_peak_allocated_mb(lambda: trainer.step(batch, STEP_T))


def bf16_peak_tflops(device_name):
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in (device_name or "")), None)


def speedup_info(fast_median, fast_info, ref_median, ref_info):
    """The fast variant's ratios against the reference of the same session (and its MFU)."""
    info = {"speedup_vs_reference": round(ref_median / fast_median, 2)}
    for key in ("peak_allocated_mb", "peak_extra_mb"):
        if ref_info.get(key) and fast_info.get(key):
            info["memory_vs_reference"] = round(fast_info[key] / ref_info[key], 3)
    if "step_tflop" in ref_info:
        info["step_tflop"] = ref_info["step_tflop"]
        peak = bf16_peak_tflops(fast_info.get("device_name"))
        if peak:
            info["mfu_bf16"] = round(ref_info["step_tflop"] / fast_median / peak, 4)
    return info
