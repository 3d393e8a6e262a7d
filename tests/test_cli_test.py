"""test.py: user errors are one `error:` line with exit status 2; a tiny run prints the table."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from confeti_fast.config import dump_config, load_config
from confeti_fast.data.labels import CITYSCAPES_LABEL_IDS

REPO = Path(__file__).resolve().parents[1]


def run_test_py(*args, timeout=120):
    return subprocess.run([sys.executable, "test.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(proc, *names):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for name in names:
        assert str(name) in errors[0], errors[0]
    return errors[0]


def _tiny_cityscapes(root, n=2, size=(64, 32)):
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        city = ("aachen", "bonn")[i % 2]
        stem = f"{city}_{i:06d}_000019"
        img = root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"
        gt = root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        gt.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img)
        label = np.full((h, w), CITYSCAPES_LABEL_IDS[0], np.uint8)
        label[: h // 3] = CITYSCAPES_LABEL_IDS[10]
        label[h // 2:, : w // 4] = CITYSCAPES_LABEL_IDS[13]
        label[-2:] = 1  # ego vehicle: ignored
        Image.fromarray(label).save(gt)
    return root


def _tiny_config(data_root):
    try:
        cfg = load_config("demo")
    except Exception:  # the demo preset is not there: a full literal config
        cfg = {
            "name": "tiny", "seed": 0, "num_classes": 19, "eval_classes": "all",
            "model": {"depth": 18, "pretrained": None},
            "source": {"type": "gta5", "root": "data/gta5", "resize": [64, 36]},
            "target": {}, "pipeline": {"cat_max_ratio": 0.75, "flip_prob": 0.5,
                                       "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
            "rcs": {"enabled": False}, "batch": {"source": 1, "target": 1},
            "stages": {"1": {"crop_size": [32, 32], "iters": 1}, "2": {"crop_size": [32, 32], "iters": 1}},
            "evaluation": {}, "data_loader": {"workers": 0},
        }
    cfg["model"] = {"depth": 18, "pretrained": None}
    cfg["target"] = {"type": "cityscapes", "root": str(data_root), "resize": [64, 32]}
    cfg["evaluation"] = {"mode": "whole", "scale": [64, 32], "slide_crop": [32, 32], "slide_stride": [24, 24],
                         "interval": 1}
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A resolved config file, a tiny val folder and a depth-18 checkpoint with a teacher."""
    from confeti_fast.models import build_segmentor

    tmp = tmp_path_factory.mktemp("cli")
    data = _tiny_cityscapes(tmp / "cityscapes")
    cfg = _tiny_config(data)
    config_path = dump_config(cfg, tmp / "work" / "config.py")
    torch.manual_seed(0)
    student = build_segmentor(cfg["model"], 19, verbose=False).state_dict()
    teacher = build_segmentor(cfg["model"], 19, verbose=False).state_dict()
    ckpt = tmp / "work" / "iter_10.pth"
    torch.save({"model": student, "teacher": teacher, "config": cfg, "iteration": 10}, ckpt)
    student_only = tmp / "work" / "student_only.pth"
    torch.save({"model": student, "config": cfg, "iteration": 10}, student_only)
    return {"tmp": tmp, "cfg": cfg, "config": config_path, "ckpt": ckpt, "student_only": student_only,
            "data": data, "student": student}


def test_missing_config_file(setup):
    missing = setup["tmp"] / "nope" / "config.py"
    assert_user_error(run_test_py(missing, setup["ckpt"]), missing)


def test_unknown_preset(setup):
    assert_user_error(run_test_py("no_such_preset", setup["ckpt"]), "no_such_preset")


def test_missing_checkpoint(setup):
    missing = setup["tmp"] / "missing.pth"
    assert_user_error(run_test_py(setup["config"], missing), missing)


def test_checkpoint_not_torch(setup):
    bad = setup["tmp"] / "garbage.pth"
    bad.write_text("not a checkpoint")
    assert_user_error(run_test_py(setup["config"], bad), bad)


def test_checkpoint_not_a_dict(setup):
    bad = setup["tmp"] / "tensor.pth"
    torch.save(torch.zeros(3), bad)
    assert_user_error(run_test_py(setup["config"], bad), bad, "dict")


def test_checkpoint_without_model(setup):
    bad = setup["tmp"] / "no_model.pth"
    torch.save({"iteration": 3}, bad)
    assert_user_error(run_test_py(setup["config"], bad), bad, "'model'")


def test_teacher_requested_but_absent(setup):
    line = assert_user_error(run_test_py(setup["config"], setup["student_only"], "--teacher"), setup["student_only"])
    assert "teacher" in line


def test_weights_do_not_fit_config(setup):
    bad = setup["tmp"] / "misfit.pth"
    weights = dict(setup["student"])
    head = "decode_head.aspp_modules.0.weight"
    weights[head] = torch.zeros(16, *weights[head].shape[1:])  # 16 classes instead of 19
    torch.save({"model": weights}, bad)
    assert_user_error(run_test_py(setup["config"], bad), bad)


def test_missing_data_folder(setup, tmp_path):
    cfg = dict(setup["cfg"], target={"type": "cityscapes", "root": str(tmp_path / "no_data")})
    config_path = dump_config(cfg, tmp_path / "config.py")
    assert_user_error(run_test_py(config_path, setup["ckpt"]), tmp_path / "no_data")


def test_happy_path_prints_table(setup):
    proc = run_test_py(setup["config"], setup["ckpt"], "--device", "cpu", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "mIoU" in proc.stdout and "road" in proc.stdout and "bicycle" in proc.stdout
    assert "student" in proc.stdout and "iteration 10" in proc.stdout


def test_happy_path_teacher_slide_outputs(setup, tmp_path):
    ids, show = tmp_path / "ids", tmp_path / "show"
    proc = run_test_py(setup["config"], setup["ckpt"], "--teacher", "--mode", "slide", "--device", "cpu",
                       "--label-id-dir", ids, "--show-dir", show, "--max-images", 1)
    assert proc.returncode == 0, proc.stderr
    assert "teacher" in proc.stdout and "slide" in proc.stdout and "mIoU" in proc.stdout
    assert (ids / "aachen" / "aachen_000000_000019_leftImg8bit.png").is_file()
    assert (show / "aachen" / "aachen_000000_000019_leftImg8bit.png").is_file()
    assert not (ids / "bonn").exists()  # --max-images 1
