"""The start-up data check (data/check) and the data.bad_samples policy, on tiny datasets in
the real layouts: every bad pair found in one pass, the per-file cache, "skip" out of the
index and the RCS statistics, a file gone bad after the check replaced deterministically
("skip") or raised as BadSampleError ("error"), and the `python -m confeti_fast.data.check` CLI."""
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from confeti_fast.config import load_config
from confeti_fast.data import check, datasets, loader, rcs
from confeti_fast.data.check import BadSampleError, DataCheckError
from confeti_fast.data.loader import PairedSteps, paired_loader
from confeti_fast.errors import ConfetiError
from helpers import make_cityscapes, make_gta5, make_synthia
from pngwriter import write_png

H, W = 40, 48
REPO = Path(__file__).resolve().parents[1]


def _gta5(root, n=6):
    make_gta5(root, n=n, h=H, w=W)
    return root


def _cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _cut_body_keep_end(path):
    """A PNG whose pixel data stops half-way although its header and IEND are intact."""
    data = path.read_bytes()
    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start:start + 4])
    half = data[start + 8:start + 8 + length][: length // 2]
    path.write_bytes(data[:start] + _chunk(b"IDAT", half) + _chunk(b"IEND", b""))


def _break_four(root):
    """A missing label, an image cut short (header intact), a label of another size, an RGB label."""
    (root / "labels" / "00001.png").unlink()
    _cut_in_half(root / "images" / "00002.png")
    with Image.open(root / "images" / "00002.png") as img:
        assert img.size == (W, H)  # the header still decodes
    write_png(root / "labels" / "00003.png", np.zeros((H - 1, W), np.uint8))
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "labels" / "00004.png")
    return [root / "labels" / "00001.png", root / "images" / "00002.png", root / "labels" / "00003.png",
            root / "labels" / "00004.png"]


def test_every_bad_pair_is_found_in_one_pass(tmp_path, capsys):
    root = _gta5(tmp_path / "gta5")
    bad = _break_four(root)
    report = tmp_path / "work" / "stage1" / "bad_samples.txt"
    with pytest.raises(DataCheckError) as err:
        datasets.gta5(root, check=True, report=report)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("4 bad pairs in the gta5 train data")
    assert f"first {bad[0]}: not found (the label of {root / 'images' / '00001.png'})" in message
    assert str(report) in message and "--cfg-options data.bad_samples=skip" in message
    assert [p for p, _ in err.value.bad] == [str(p) for p in bad]
    reasons = dict(err.value.bad)
    assert "cut short" in reasons[str(bad[1])]
    assert f"is {W}x{H - 1} but its image" in reasons[str(bad[2])]
    assert "label mode RGB" in reasons[str(bad[3])]
    listed = [line.split("\t")[0] for line in report.read_text().splitlines() if not line.startswith("#")]
    assert listed == [str(p) for p in bad]
    shown = capsys.readouterr().err
    assert all(str(p) in shown for p in bad)


def test_a_clean_dataset_writes_no_list_and_clears_a_stale_one(tmp_path):
    root = _gta5(tmp_path / "gta5", n=3)
    (root / "labels" / "00000.png").unlink()
    report = tmp_path / "bad_samples.txt"
    with pytest.raises(DataCheckError):
        datasets.gta5(root, check=True, report=report)
    assert report.is_file()
    make_gta5(tmp_path / "fresh", n=1, h=H, w=W)
    os.replace(tmp_path / "fresh" / "labels" / "00000.png", root / "labels" / "00000.png")
    assert len(datasets.gta5(root, check=True, report=report)) == 3
    assert not report.exists()


@pytest.mark.parametrize("channels", [3, 4])
def test_synthia_16bit_labels_pass_and_a_palette_label_does_not(tmp_path, channels):
    root = tmp_path / "synthia"
    make_synthia(root, n=3, h=H, w=W, channels=channels)
    assert len(datasets.synthia(root, check=True)) == 3  # 16-bit RGB(A) labels, which OpenCV reads
    label = root / "GT" / "LABELS" / "0000001.png"
    img = Image.fromarray(np.zeros((H, W), np.uint8), mode="P")
    img.putpalette([0] * 768)
    img.save(label)
    with pytest.raises(DataCheckError, match="SYNTHIA labels are grey, RGB or RGBA PNGs"):
        datasets.synthia(root, check=True)


def test_second_check_reads_no_header_and_a_touched_file_is_read_again(tmp_path, monkeypatch):
    root = _gta5(tmp_path / "gta5", n=4)
    datasets.gta5(root, check=True)
    assert (root / check.CACHE_NAME).is_file()
    opened = []
    real_open = check.files.Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(getattr(fp, "name", fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(check.files.Image, "open", counting_open)
    assert len(datasets.gta5(root, check=True)) == 4
    assert opened == []
    touched = root / "labels" / "00002.png"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    datasets.gta5(root, check=True)
    assert opened == [str(touched)]
    # A cached verdict is keyed by the file's stamp: a label rewritten bad is caught.
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(touched)
    with pytest.raises(DataCheckError, match="label mode RGB"):
        datasets.gta5(root, check=True)


def test_an_unwritable_cache_is_no_cache_and_no_failure(tmp_path, monkeypatch):
    root = _gta5(tmp_path / "gta5", n=2)
    (root / "blocker").write_text("a file where the cache's folder would be")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".cache").write_text("a file, not a folder")
    monkeypatch.setattr(check.cache, "CACHE_NAME", "blocker/cache.json")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert len(datasets.gta5(root, check=True)) == 2
    assert len(datasets.gta5(root, check=True)) == 2
    assert sorted(p.name for p in root.iterdir()) == ["blocker", "images", "labels"]


def _steps_config(tmp_path, policy, rcs_enabled=False, n=5):
    _gta5(tmp_path / "gta5", n=n)
    make_cityscapes(tmp_path / "cs", "train", h=H, w=W)
    cfg = load_config("demo", {
        "source": {"root": str(tmp_path / "gta5"), "resize": [W, H], "generate": None},
        "target": {"root": str(tmp_path / "cs"), "resize": [W, H], "generate": None},
        "rcs": {"enabled": rcs_enabled, "min_pixels": 20},
        "stages": {"1": {"crop_size": [16, 16], "iters": 6}},
    })
    # data.bad_samples is set here, not through load_config (see the report on the schema).
    cfg["data"] = {"bad_samples": policy}
    return cfg


def test_skip_leaves_bad_pairs_out_of_the_index_and_the_rcs_statistics(tmp_path, capsys):
    cfg = _steps_config(tmp_path, "skip", rcs_enabled=True)
    source = tmp_path / "gta5"
    before = rcs.class_counts(datasets.gta5(source), progress=False)  # cached for all 5 pairs
    assert before.shape == (5, 19)
    write_png(source / "labels" / "00002.png", np.zeros((H - 1, W), np.uint8))
    report = tmp_path / "work" / "bad_samples.txt"
    steps = PairedSteps(cfg, 1, progress=False, bad_samples_file=report)
    kept = [pair for pair in steps.source.samples]
    assert len(kept) == 4 and str(source / "images" / "00002.png") not in [img for img, _ in kept]
    assert steps.source.left_out == [(str(source / "labels" / "00002.png"),
                                      f"is {W}x{H - 1} but its image {source / 'images' / '00002.png'} is {W}x{H}")]
    out = capsys.readouterr().out
    assert "left out 1 bad pair of 5 in the gta5 train data" in out and str(report) in out
    assert str(source / "labels" / "00002.png") in report.read_text()
    # The RCS statistics are those of the 4 pairs kept, not the 5-pair cache from before.
    counts = rcs.class_counts(steps.source, progress=False)
    np.testing.assert_array_equal(counts, np.delete(before, 2, axis=0))
    assert steps.rcs.images_with_class[0].max() < 4
    steps[0]


def _truncate_after_check(steps, index):
    path = Path(steps.source.samples[index][0])
    _cut_in_half(path)
    return str(path)


def test_a_file_gone_bad_after_the_check_is_replaced_the_same_way_every_time(tmp_path, capsys):
    steps = PairedSteps(_steps_config(tmp_path, "skip"), 1, progress=False)
    bad = _truncate_after_check(steps, 1)
    first = list(paired_loader(steps))
    second = list(paired_loader(steps, workers=1))  # the record comes back from a worker too
    replaced = [entry for batch in first for entry in batch["replaced"]]
    assert replaced, "index 1 is drawn in 12 draws over 5 images"
    assert all(e["path"] == bad and e["replacement"] == steps.source.samples[2][0] for e in replaced)
    assert "truncated" in replaced[0]["reason"]
    for a, b in zip(first, second):
        assert a["replaced"] == b["replaced"]
        for key in ("source_image", "source_label", "target_image"):
            assert torch.equal(a[key], b[key]), key
    assert f"data: cannot read {bad}" in capsys.readouterr().out
    # The replacement is the next index: the slot that drew index 1 holds pair 2, transformed as index 1 would be.
    t, slot = next((t, j) for t in range(6) for j in range(2)
                   if steps._epoch_order(loader._SOURCE, 5, steps._global_slot(t, j, 2)) == 1)
    image, label = steps._transform(*steps.source.load(2), steps._rng(loader._SOURCE, t, slot), "source",
                                    steps.cfg["pipeline"]["cat_max_ratio"])
    assert torch.equal(first[t]["source_image"][slot], image) and torch.equal(first[t]["source_label"][slot], label)


def test_error_at_draw_time_raises_BadSampleError_naming_the_file(tmp_path):
    steps = PairedSteps(_steps_config(tmp_path, "error"), 1, progress=False)
    label = steps.source.samples[3][1]
    os.unlink(label)
    for workers in (0, 1):
        with pytest.raises(BadSampleError) as err:
            list(paired_loader(steps, workers=workers))
        assert err.value.path == label and "not found" in err.value.reason
        message = str(err.value)
        assert "\n" not in message and label in message and "data.bad_samples=skip" in message


def test_one_check_lists_the_bad_pairs_of_the_training_and_val_sets_in_one_file(tmp_path):
    cfg = _steps_config(tmp_path, "error")
    make_cityscapes(tmp_path / "cs", "val", per_city=1, h=H, w=W)
    (tmp_path / "gta5" / "labels" / "00004.png").unlink()
    val_image = tmp_path / "cs" / "leftImg8bit" / "val" / "bonn" / "bonn_000000_000019_leftImg8bit.png"
    _cut_in_half(val_image)
    val = datasets.build_dataset(cfg["target"], "val", check=False)
    report = tmp_path / "work" / "stage1" / "bad_samples.txt"
    with pytest.raises(DataCheckError) as err:
        PairedSteps(cfg, 1, progress=False, bad_samples_file=report, also_check=[val])
    assert str(err.value).startswith("2 bad pairs in gta5 train at ")
    assert "cityscapes val at " in str(err.value) and str(report) in str(err.value)
    text = report.read_text()
    assert "## gta5 train data" in text and "## cityscapes val data" in text and str(val_image) in text
    # Checked again alone (as a trainer building its val set later would), the other section stays.
    with pytest.raises(DataCheckError):
        datasets.build_dataset(cfg["target"], "val", report=report)
    assert report.read_text() == text


def test_the_policy_value_is_checked(tmp_path):
    with pytest.raises(ConfetiError, match="data.bad_samples must be one of"):
        PairedSteps(_steps_config(tmp_path, "ignore"), 1, progress=False)


def _cli(tmp_path, *args):
    overrides = [f"source.root={tmp_path / 'gta5'}", f"target.root={tmp_path / 'cs'}", "source.generate=None",
                 "target.generate=None"]
    return subprocess.run([sys.executable, "-m", "confeti_fast.data.check", "demo", "--no-progress", *args,
                           "--cfg-options", *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_command_line_exit_status_and_full_decode(tmp_path):
    root = _gta5(tmp_path / "gta5", n=3)
    make_cityscapes(tmp_path / "cs", "train", h=H, w=W)
    make_cityscapes(tmp_path / "cs", "val", per_city=1, h=H, w=W)
    clean = _cli(tmp_path)
    assert clean.returncode == 0, clean.stderr
    assert "gta5 train data" in clean.stdout and "cityscapes val data" in clean.stdout
    damaged = root / "images" / "00001.png"
    _cut_body_keep_end(damaged)
    headers = _cli(tmp_path)
    assert headers.returncode == 0, headers.stderr  # header and end marker are intact
    out = tmp_path / "list.txt"
    full = _cli(tmp_path, "--full", "--out", str(out))
    assert full.returncode == 1
    assert str(damaged) in full.stderr and "does not decode" in full.stderr
    assert str(damaged) in out.read_text()
    # The cache remembers the failed decode: a plain check now refuses the file too.
    assert _cli(tmp_path).returncode == 1
    (root / "labels" / "00000.png").unlink()
    missing = _cli(tmp_path)
    assert missing.returncode == 1 and "2 bad pairs" in missing.stderr
