"""What several test files share (a test file never imports another test file):

* the Triton kernel tests' devices, dtype tolerances and fp32-matmul fixture (the reasoning
  behind each tolerance is in tests/test_op_contrast.py's docstring);
* plain-Python vector arithmetic for the hand-computed op checks;
* the docs/method.md §1 label tables, typed in;
* small datasets written in the real GTA5 / Cityscapes / SYNTHIA layouts;
* a tiny training config on such data, and resume helpers;
* running train.py under the rank check (the multi-process and multi-node tests).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from confeti_fast.config import load_config
from pngwriter import write_png

# ---------------------------------------------------------------- Triton kernel tests

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 / training-size checks)")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU runs need TRITON_INTERPRET=1 "
                                                                         "(set by conftest without a GPU)")),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU")),
]
FP32 = dict(rtol=1e-5, atol=1e-6)
BF16_LOSS = dict(rtol=1e-4, atol=1e-5)
BF16_GRAD_RTOL, BF16_GRAD_ATOL_FRAC = 1e-2, 1e-3


def assert_close_bf16_grad(grad, expected):
    """bf16 gradients: rtol 1e-2, atol 1e-3 of the expected gradient's largest magnitude."""
    expected = expected.float()
    torch.testing.assert_close(grad.float(), expected, rtol=BF16_GRAD_RTOL,
                               atol=BF16_GRAD_ATOL_FRAC * expected.abs().max().item())


@pytest.fixture(autouse=True)
def exact_fp32_matmul():
    # The reference's matmuls must be true fp32 on the GPU too (TF32 would loosen it to 1e-3).
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# ---------------------------------------------------------------- plain-Python arithmetic

def py_normalize(v):
    """v / |v| for a list of floats (all zeros stays zeros)."""
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v] if n > 0 else [0.0 for _ in v]


# ---------------------------------------------------------------- docs/method.md §1 label tables

# docs/method.md §1, typed in from the table: labelId -> trainId and SYNTHIA id -> trainId.
CITYSCAPES = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
              25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13,
           19: 15, 12: 17, 11: 18}


# ---------------------------------------------------------------- datasets on disk

def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_gta5(root, n=2, h=6, w=8):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    ids = []
    for i in range(n):
        Image.fromarray(_rgb(h, w, i)).save(root / "images" / f"{i:05d}.png")
        label = np.random.default_rng(10 + i).choice([0, 7, 8, 13, 26, 33, 34], (h, w)).astype(np.uint8)
        # Real GTA5 labels are palette PNGs: the palette index is the class id.
        img = Image.fromarray(label, mode="P")
        img.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
        img.save(root / "labels" / f"{i:05d}.png")
        ids.append(label)
    return ids


def make_cityscapes(root, split, cities=("aachen", "bonn"), per_city=2, h=6, w=8):
    ids = {}
    for c, city in enumerate(cities):
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        for k in range(per_city):
            stem = f"{city}_{k:06d}_000019"
            image_path = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            Image.fromarray(_rgb(h, w, 100 * c + k)).save(image_path)
            label = np.random.default_rng(c * 10 + k).choice([1, 7, 11, 23, 24, 31, 255], (h, w)).astype(np.uint8)
            write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label)
            ids[stem] = label
    return ids


def make_synthia(root, n=2, h=6, w=8, channels=3):
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    ids = []
    for i in range(n):
        Image.fromarray(_rgb(h, w, i)).save(root / "RGB" / f"{i:07d}.png")
        rng = np.random.default_rng(i)
        class_ids = rng.choice([0, 1, 2, 3, 8, 12, 13, 21, 22, 300, 1003], (h, w)).astype(np.uint16)
        # Second (and alpha) channels carry instance ids, which must not leak into the class.
        label = np.stack([class_ids] + [rng.integers(0, 65535, (h, w), dtype=np.uint16)
                                         for _ in range(channels - 1)], -1)
        write_png(root / "GT" / "LABELS" / f"{i:07d}.png", label, bit_depth=16)
        ids.append(class_ids)
    return ids


# ---------------------------------------------------------------- training runs

def tiny_config(tmp_path, base="demo", cut=False, **train):
    """A tiny run of `base` on generated data; `cut` turns on a 4-channel style transfer."""
    source = load_config(base)["source"]["type"]
    (make_synthia if source == "synthia" else make_gta5)(tmp_path / "source", n=4, h=40, w=48)
    make_cityscapes(tmp_path / "cs", "train", h=40, w=48)
    make_cityscapes(tmp_path / "cs", "val", per_city=1, h=40, w=48)
    return load_config(base, {
        "model": {"depth": 18, "pretrained": None},
        "source": {"root": str(tmp_path / "source"), "resize": [48, 40], "generate": None},
        "target": {"root": str(tmp_path / "cs"), "resize": [48, 40], "generate": None},
        "rcs": {"min_pixels": 30},
        "stages": {str(stage): {"crop_size": [32, 32], "iters": 4} for stage in (0, 1, 2)},
        "cut": {"enabled": cut, "ngf": 4, "ndf": 4, "num_patches": 16},
        "evaluation": {"scale": [48, 40], "interval": 2},
        "optimizer": {"warmup_iters": 2},
        # every gate opens within the 4 iterations: t > 0 mixed CAM, t > 1 contrast
        # the feature distance on as in the paper presets (the demo has it off), so that it runs
        "train": dict({"mix_cam_after": 0, "contrast_after": 1, "pseudo_ignore_top": 2,
                       "pseudo_ignore_bottom": 4, "log_interval": 1, "fdist_weight": 0.005}, **train),
    })


def assert_states_equal(a, b, path="state"):
    if torch.is_tensor(a):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            if key != "rng":
                assert_states_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def resume_after_kill(cfg, stage, work_dir, monkeypatch):
    """Train, kill the run right after its first checkpoint, resume from it, and finish."""
    from confeti_fast.serialization import load_training_checkpoint
    from confeti_fast.trainer import Trainer  # here, so that the op tests need no trainer

    save = Trainer.save

    def stop_after_first_checkpoint(self, result):
        save(self, result)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save", stop_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, stage, work_dir, progress=False).train()
    monkeypatch.setattr(Trainer, "save", save)
    last = work_dir / f"stage{stage}" / "last.pth"
    assert load_training_checkpoint(last)["iteration"] == cfg["evaluation"]["interval"]
    resumed = Trainer(cfg, stage, work_dir, resume=last, progress=False)
    resumed.train()
    return resumed


# ---------------------------------------------------------------- training logs

def write_training_log(path, iters=600, interval=10, eval_interval=200, seed=0):
    """A log.jsonl shaped like a real stage-1 run's: loss records every `interval` iterations
    (decaying, noisy; CUT losses; contrast terms and their negative regularisers once the gate
    opens; fdist 0 at first), evaluation records (mIoU in %) every `eval_interval`."""
    import json

    rng = np.random.default_rng(seed)
    records = []
    for t in range(interval, iters + 1, interval):
        decay = math.exp(-t / (iters / 3))
        record = {"iter": t, "lr": 5e-4 * min(1.0, t / 50) * (1 - t / (iters + 1)), "it_per_s": 2.0,
                  "loss/src_ce": (0.4 + 1.8 * decay) * math.exp(rng.normal(0, 0.15)),
                  "loss/mix_ce": (0.3 + 1.0 * decay) * math.exp(rng.normal(0, 0.2)),
                  "loss/src_cam": (0.1 + 0.6 * decay) * math.exp(rng.normal(0, 0.2)),
                  "loss/fdist": 0.0 if t < iters / 6 else 0.01 * math.exp(rng.normal(0, 0.3)),
                  "loss/cut_d": 0.25 + 0.2 * decay, "loss/cut_gan": 0.5 + 0.4 * decay,
                  "loss/cut_nce": 2 + 2.5 * decay + rng.normal(0, 0.1),
                  "q": min(0.9, 0.1 + t / (1.5 * iters))}
        if t > iters / 3:
            record.update({"loss/mix_contrast": 0.8 * math.exp(rng.normal(0, 0.1)),
                           "loss/mix_reg": -4.0 - rng.random()})
        records.append(record)
        if t % eval_interval == 0:
            records.append({"iter": t, "mIoU": 100 * (0.08 + 0.25 * (1 - math.exp(-t / 500)))})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


# ---------------------------------------------------------------- a checkpoint to evaluate

def tiny_eval_run(root, size=(64, 32)):
    """A resolved demo config whose target is a tiny Cityscapes val split (one image per city,
    `size` (w, h)) under `root`, and a depth-18 checkpoint (student and teacher) that fits it:
    (config path, checkpoint path, config)."""
    from confeti_fast.config import dump_config
    from confeti_fast.models import build_segmentor

    width, height = size
    make_cityscapes(root / "cs", "val", per_city=1, h=height, w=width)
    cfg = load_config("demo", {
        "model": {"depth": 18, "pretrained": None},
        "target": {"root": str(root / "cs"), "resize": [width, height], "generate": None},
        "evaluation": {"mode": "whole", "scale": [width, height], "slide_crop": [32, 32], "slide_stride": [24, 24]},
    })
    config = dump_config(cfg, root / "work" / "config.py")
    torch.manual_seed(0)
    student = build_segmentor(cfg["model"], 19, verbose=False).state_dict()
    teacher = build_segmentor(cfg["model"], 19, verbose=False).state_dict()
    checkpoint = root / "work" / "ckpt.pth"
    torch.save({"model": student, "teacher": teacher, "iteration": 10}, checkpoint)
    return config, checkpoint, cfg


# ------------------------------------------------------------------ train.py under the rank check

REPO = Path(__file__).resolve().parents[1]


def rank_check_env():
    """The environment of a train.py run whose ranks are compared bit for bit after every step."""
    env = dict(os.environ, CONFETI_CHECK_RANKS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo picks an interface by hostname otherwise
    return env


def run_ranks(args, procs, cwd):
    """`python ARGS` (a script and its arguments) under the rank check: `procs` processes under
    torchrun, or one plain process; asserts that it exits 0 and returns the finished process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    done = subprocess.run(launcher + args, cwd=cwd, env=rank_check_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def stage1_command(cfg_path):
    """train.py's arguments for stage 1 of the config at `cfg_path` on the CPU (no work dir yet)."""
    return [str(REPO / "train.py"), "--config", str(cfg_path), "--stage", "1", "--device", "cpu", "--no-progress"]


def logged_iters(log):
    """The iterations of a log.jsonl's loss lines."""
    return [r["iter"] for r in map(json.loads, log.read_text().splitlines()) if "loss/src_ce" in r]


def assert_rank0_wrote_four_steps(out):
    """A 4-iteration stage's outputs in `out`, written once (by rank 0)."""
    assert logged_iters(out / "log.jsonl") == [1, 2, 3, 4]
    assert (out / "last.pth").is_file() and (out / "config.py").is_file()
