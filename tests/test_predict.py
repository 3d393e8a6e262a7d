"""Inference on any images (python -m confeti_fast.predict, test.py --images): colour overlays and
labelId PNGs at each image's own size, by the evaluation's inference path; bad inputs are one
line naming the path."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from confeti_fast.data.labels import CITYSCAPES_LABEL_IDS
from confeti_fast.errors import ConfetiError
from confeti_fast.predict import collect_images
from helpers import tiny_eval_run

REPO = Path(__file__).resolve().parents[1]


def _run(*args, module=True):
    launcher = [sys.executable, "-m", "confeti_fast.predict"] if module else [sys.executable, "test.py"]
    return subprocess.run(launcher + [str(a) for a in args], cwd=REPO, capture_output=True, text=True, timeout=300)


def _one_error_line(proc, *names):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def _image(path, width, height, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    config, checkpoint, cfg = tiny_eval_run(root)
    photos = root / "photos"
    _image(photos / "street.jpg", 90, 50, 1)
    _image(photos / "night" / "alley.png", 37, 61, 2)  # odd sizes, portrait
    return {"root": root, "config": config, "checkpoint": checkpoint, "cfg": cfg, "photos": photos}


def test_predict_a_folder_of_any_sizes(run, tmp_path):
    out = tmp_path / "out"
    proc = _run(run["config"], run["checkpoint"], run["photos"], "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "predict" in proc.stderr and "2/2" in proc.stderr  # the tqdm bar
    assert "student of" in proc.stdout and "2 image(s)" in proc.stdout and "protocol: whole image" in proc.stdout
    for name, size in (("street.png", (90, 50)), ("night/alley.png", (37, 61))):
        with Image.open(out / "overlay" / name) as overlay, Image.open(out / "labelIds" / name) as ids:
            assert overlay.mode == "RGB" and overlay.size == size
            assert ids.mode == "L" and ids.size == size
            assert set(np.unique(np.asarray(ids))) <= set(CITYSCAPES_LABEL_IDS)


def test_predictions_are_the_evaluations(run, tmp_path):
    """One inference path: the labelIds of an image given to predict.py equal the labelIds that
    test.py writes for it as a val image, in whole and slide mode, at another scale too."""
    image = next((run["root"] / "cs" / "leftImg8bit" / "val").rglob("*.png"))
    for extra in ([], ["--mode", "slide"], ["--eval-scale", "48", "24", "--teacher"]):
        evaluated, predicted = tmp_path / f"eval{len(extra)}", tmp_path / f"pred{len(extra)}"
        proc = _run(run["config"], run["checkpoint"], "--device", "cpu", "--no-progress", "--label-id-dir",
                    evaluated, *extra, module=False)
        assert proc.returncode == 0, proc.stderr
        proc = _run(run["config"], run["checkpoint"], image, "--out", predicted, "--device", "cpu", "--no-progress",
                    *extra)
        assert proc.returncode == 0, proc.stderr
        mine = np.asarray(Image.open(predicted / "labelIds" / image.name))
        theirs = np.asarray(Image.open(evaluated / image.parent.name / image.name))
        assert np.array_equal(mine, theirs), extra


def test_test_py_images_writes_the_same_outputs(run, tmp_path):
    proc = _run(run["config"], run["checkpoint"], "--images", run["photos"] / "street.jpg", "--out", tmp_path / "a",
                "--no-progress", module=False)
    assert proc.returncode == 0, proc.stderr
    proc2 = _run(run["config"], run["checkpoint"], run["photos"] / "street.jpg", "--out", tmp_path / "b",
                 "--no-progress")
    assert proc2.returncode == 0, proc2.stderr
    for kind in ("overlay", "labelIds"):
        a, b = (tmp_path / run_dir / kind / "street.png" for run_dir in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
    combined = _run(run["config"], run["checkpoint"], "--images", run["photos"], "--show-dir", tmp_path / "s",
                    module=False)
    _one_error_line(combined, "--show-dir", "--out")


def test_overlay_blends_the_palette_over_the_image(run, tmp_path):
    from confeti_fast.data.labels import colorize, cityscapes_to_train_ids

    image = _image(tmp_path / "in" / "x.png", 40, 24, 5)
    proc = _run(run["config"], run["checkpoint"], image, "--out", tmp_path / "out", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    ids = np.asarray(Image.open(tmp_path / "out" / "labelIds" / "x.png"))
    rgb = np.asarray(Image.open(image)).astype(np.float32)
    expected = (0.5 * rgb + 0.5 * colorize(cityscapes_to_train_ids(ids)).astype(np.float32)).round()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "overlay" / "x.png")), expected.astype(np.uint8))


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "truncated", "collision", "none"])
def test_bad_inputs_name_the_path(tmp_path, case):
    if case == "missing":
        paths, name = [tmp_path / "nope.jpg"], tmp_path / "nope.jpg"
    elif case == "empty":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        (tmp_path / "empty" / "notes.txt").write_text("no images here")
        paths, name = [tmp_path / "empty"], tmp_path / "empty"
    elif case == "garbage":
        (tmp_path / "bad.png").write_bytes(b"not a png at all\n" * 4)
        paths, name = [tmp_path / "bad.png"], tmp_path / "bad.png"
    elif case == "truncated":
        data = (_image(tmp_path / "whole.png", 32, 32)).read_bytes()
        (tmp_path / "cut.png").write_bytes(data[:8])
        paths, name = [tmp_path / "cut.png"], tmp_path / "cut.png"
    elif case == "collision":
        paths = [_image(tmp_path / "a" / "x.jpg", 8, 8), _image(tmp_path / "b" / "x.png", 8, 8)]
        name = paths[1]
    else:
        paths, name = [], "no images given"
    with pytest.raises(ConfetiError) as err:
        collect_images(paths)
    assert str(name) in str(err.value) and "\n" not in str(err.value)


def test_bad_input_on_the_command_line_is_one_line(run, tmp_path):
    (tmp_path / "empty").mkdir()
    _one_error_line(_run(run["config"], run["checkpoint"], tmp_path / "empty"), tmp_path / "empty")
    _one_error_line(_run(run["config"], run["checkpoint"], "--images", tmp_path / "gone.png", module=False),
                    tmp_path / "gone.png")
    _one_error_line(_run(run["config"], run["checkpoint"], run["photos"], "--cfg-options", "evaluation.scael=None"),
                    "evaluation.scael", "evaluation.scale")


def test_an_image_read_fails_with_its_name(run, tmp_path, monkeypatch):
    """A file whose header reads but whose pixels do not (cut short mid-data)."""
    from confeti_fast.predict import load_model, predict_images

    whole = _image(tmp_path / "big.png", 64, 64).read_bytes()
    broken = tmp_path / "broken.png"
    broken.write_bytes(whole[: len(whole) // 2])
    model, _ = load_model(run["cfg"], run["checkpoint"])
    with pytest.raises(ConfetiError, match=f"cannot read image {broken}"):
        predict_images(model, collect_images([broken]), run["cfg"], tmp_path / "out", progress=False)
    assert torch.is_grad_enabled()
