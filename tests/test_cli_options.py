"""Experiments from the command line (train.py --seed / --cfg-options, test.py --cfg-options /
--eval-scale), the evaluation protocol the presets default to and the table names, and the
message for a missing ImageNet file."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from confeti_fast.config import dump_config, eval_scale_override, load_config
from confeti_fast.errors import ConfetiError
from confeti_fast.evaluation import describe_protocol, predict_logits
from helpers import tiny_config, tiny_eval_run

REPO = Path(__file__).resolve().parents[1]


def _py(script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def _one_error_line(proc, *names):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- train.py

def _safe_train(tmp_path, *args):
    """train.py on the tiny config, one iteration, in tmp_path: a check that stopped failing
    would run a short training there, never the demo's."""
    cfg_path = tmp_path / "tiny.py"
    if not cfg_path.is_file():
        dump_config(tiny_config(tmp_path), cfg_path)
    return _py("train.py", "--config", cfg_path, "--stage", "2", "--iters", "1", "--work-dir", tmp_path / "w",
               "--no-progress", *args)


def test_train_cfg_options_typo_is_the_config_error(tmp_path):
    line = _one_error_line(_safe_train(tmp_path, "--cfg-options", "train.contrast_afer=10"),
                           "--cfg-options", "unknown key 'train.contrast_afer'", "'train.contrast_after'")
    assert line.startswith("error: --cfg-options: ")
    _one_error_line(_safe_train(tmp_path, "--cfg-options", "optimizer.lr=fast"), "'optimizer.lr' must be a number")
    _one_error_line(_safe_train(tmp_path, "--cfg-options", "optimizer.lr"), "key.path=value", "'optimizer.lr'")


def test_train_config_file_typo_names_the_file_and_path(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text('{"_base_": "demo", "name": "typo", "train": {"contrast_afer": 10}, "optimizer": {"lrr": 1.0}}')
    _one_error_line(_py("train.py", "--config", path, "--stage", "2", "--iters", "1", "--work-dir", tmp_path / "w"),
                    path, "'train.contrast_afer'", "'train.contrast_after'")


def test_train_seed_and_cfg_options_end_up_in_the_written_config(tmp_path):
    cfg_path = dump_config(tiny_config(tmp_path), tmp_path / "tiny.py")
    work = tmp_path / "work"
    proc = _py("train.py", "--config", cfg_path, "--stage", "2", "--iters", "1", "--work-dir", work, "--no-progress",
               "--kernels", "reference", "--seed", "17",
               "--cfg-options", "optimizer.lr=0.002", "train.pseudo_threshold=0.5", "name=cli run")
    assert proc.returncode == 0, proc.stderr
    written = ast.literal_eval("\n".join((work / "stage2" / "config.py").read_text().splitlines()[1:]))
    assert written["seed"] == 17 and written["optimizer"]["lr"] == 0.002
    assert written["train"]["pseudo_threshold"] == 0.5 and written["name"] == "cli run"
    assert load_config(work / "stage2" / "config.py")["seed"] == 17  # and it reads back


# ---------------------------------------------------------------- the missing ImageNet file

def test_missing_imagenet_file_says_what_where_and_how(tmp_path):
    from confeti_fast.models import build_segmentor

    path = tmp_path / "pretrained" / "resnet101_v1c.pth"
    with pytest.raises(ConfetiError) as err:
        build_segmentor({"depth": 101, "pretrained": str(path)}, 19)
    message = str(err.value)
    assert "\n" not in message and f"ImageNet checkpoint {path} does not exist" in message
    assert "ResNetV1c-101" in message and "open-mmlab://resnet101_v1c" in message
    assert "OpenMMLab model zoo" in message
    assert "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth" in message
    assert "model.pretrained" in message and "--cfg-options model.pretrained=PATH" in message


def test_missing_imagenet_file_from_train_py(tmp_path):
    missing = tmp_path / "weights" / "r18.pth"
    _one_error_line(_safe_train(tmp_path, "--cfg-options", f"model.pretrained={missing}"),
                    f"ImageNet checkpoint {missing} does not exist", "ResNetV1c-18", "open-mmlab://resnet18_v1c",
                    "model.pretrained")


# ---------------------------------------------------------------- the evaluation protocol

def test_paper_presets_evaluate_whole_images_at_full_resolution():
    for preset in ("gta2cs", "synthia2cs"):
        assert load_config(preset)["evaluation"]["scale"] is None
    assert load_config("demo")["evaluation"]["scale"] == [320, 160]
    assert describe_protocol(load_config("gta2cs")) == "whole image at full resolution, mIoU over 19 classes"
    assert describe_protocol(load_config("synthia2cs"), "slide", "teacher") == (
        "sliding 640x640 windows (stride 426x426) at full resolution, teacher, mIoU16 over 16 classes, "
        "mIoU13 over 13 classes")
    daformer = load_config("gta2cs", eval_scale_override(["1024", "512"]))
    assert describe_protocol(daformer, weights="student").startswith("whole image at 1024x512 (keep ratio), student")


def test_eval_scale_values():
    assert eval_scale_override(["1280", "640"]) == {"evaluation": {"scale": [1280, 640]}}
    assert eval_scale_override(["full"]) == {"evaluation": {"scale": None}}
    assert eval_scale_override(None) is None
    for bad in (["1280"], ["1280", "0"], ["w", "h"], ["1", "2", "3"]):
        with pytest.raises(ConfetiError, match="--eval-scale takes a width and a height"):
            eval_scale_override(bad)


class _InputSizes(torch.nn.Module):
    """Records the size of each input; logits at stride 1."""

    def __init__(self):
        super().__init__()
        self.conv, self.sizes = torch.nn.Conv2d(3, 19, 1), []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.conv(x)


@pytest.mark.parametrize("scale, network_input", [(None, (1024, 2048)), ([1280, 640], (640, 1280)),
                                                  ([1024, 512], (512, 1024))])
def test_inference_runs_at_the_protocol_scale(scale, network_input):
    cfg = load_config("gta2cs", {"evaluation": {"scale": scale}})
    model = _InputSizes()
    image = torch.randint(0, 256, (1024, 2048, 3), dtype=torch.uint8).numpy()
    logits = predict_logits(model, image, cfg)
    assert model.sizes == [network_input] and logits.shape == (1, 19, 1024, 2048)


@pytest.fixture(scope="module")
def evaluation_run(tmp_path_factory):
    return tiny_eval_run(tmp_path_factory.mktemp("protocol"))


@pytest.mark.parametrize("args, protocol", [
    ([], "protocol: whole image at 64x32 (keep ratio), student, mIoU over 19 classes"),
    (["--eval-scale", "48", "24", "--teacher"], "protocol: whole image at 48x24 (keep ratio), teacher, mIoU over 19"),
    (["--cfg-options", "evaluation.scale=None"], "protocol: whole image at full resolution, student, mIoU over 19"),
    (["--mode", "slide", "--cfg-options", "evaluation.slide_stride=[16,16]"],
     "protocol: sliding 32x32 windows (stride 16x16) at 64x32 (keep ratio), student, mIoU over 19"),
])
def test_the_printed_table_names_the_protocol(evaluation_run, args, protocol):
    config, checkpoint, _ = evaluation_run
    proc = _py("test.py", config, checkpoint, "--device", "cpu", "--no-progress", *args)
    assert proc.returncode == 0, proc.stderr
    assert protocol in proc.stdout and "road" in proc.stdout


def test_test_py_cfg_options_and_eval_scale_errors(evaluation_run):
    config, checkpoint, _ = evaluation_run
    _one_error_line(_py("test.py", config, checkpoint, "--cfg-options", "evaluation.scael=None"),
                    "--cfg-options", "unknown key 'evaluation.scael'", "'evaluation.scale'")
    _one_error_line(_py("test.py", config, checkpoint, "--eval-scale", "1280"), "--eval-scale")
