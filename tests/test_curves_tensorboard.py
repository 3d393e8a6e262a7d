"""Training curves drawn with matplotlib, and TensorBoard scalars and panels (rank 0 only)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from confeti_fast.distributed import Context
from confeti_fast.training_log import TrainingLog, tensorboard_tag
from confeti_fast.visualize import curves_figure, plot_curves, save_iteration_pictures, save_panel, smooth
from helpers import tiny_config, write_training_log

NO_TENSORBOARD = "tensorboard is not installed (pip install .[tensorboard]; the test extra has it)"


def _events(log_dir):
    pytest.importorskip("tensorboard", reason=NO_TENSORBOARD)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(log_dir.glob("events.out.tfevents.*")), f"no event file in {log_dir}"
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_curves_png_is_a_matplotlib_figure_with_log_losses_legend_and_miou(tmp_path):
    log = tmp_path / "stage1" / "log.jsonl"
    write_training_log(log)
    out = plot_curves(log, tmp_path / "curves.png")
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (1000, 1160)
        assert png.info.get("Software", "").startswith("Matplotlib")
    fig = curves_figure(log)
    losses, cut, negative, evaluation = fig.axes
    assert losses.get_yscale() == "log" and cut.get_yscale() == "log" and negative.get_yscale() == "linear"
    labels = [t.get_text() for t in losses.get_legend().get_texts()]
    assert labels == ["src_ce", "mix_ce", "src_cam", "fdist", "mix_contrast"]
    assert [t.get_text() for t in negative.get_legend().get_texts()] == ["mix_reg"]
    assert evaluation.get_xlabel() == "iteration" and evaluation.get_ylabel() == "%"
    miou = evaluation.get_lines()[0]
    assert list(miou.get_xdata()) == [200, 400, 600] and miou.get_label().startswith("mIoU (best ")
    # the smoothed src_ce line (drawn after its faint raw line) is smoother than the raw one
    raw, smoothed = (np.asarray(line.get_ydata()) for line in losses.get_lines()[:2])
    assert np.abs(np.diff(smoothed)).sum() < 0.5 * np.abs(np.diff(raw)).sum()


def test_curves_of_an_empty_log(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 1, "lr": 0.1}\n{"iter": 2, "loss/src_ce": 1.0')  # cut short by a kill
    assert curves_figure(log).axes[-1].texts[0].get_text() == "no evaluation yet"


def test_smoothing_is_debiased_and_keeps_a_constant():
    assert smooth([2.0] * 30) == pytest.approx([2.0] * 30)
    assert smooth([1.0, 3.0]) == [1.0, 3.0]  # too few points to smooth
    values = smooth([0.0] * 20 + [1.0] * 20, weight=0.5)
    assert values[20] == pytest.approx(0.5) and values[-1] == pytest.approx(1.0)


def test_tensorboard_gets_every_logged_number(tmp_path):
    log = TrainingLog(tmp_path / "log.jsonl", 1, Context(), False, tmp_path)
    log.write({"iter": 10, "lr": 1e-4, "it_per_s": 2.5, "loss/src_ce": 1.25, "q": 0.5})
    log.write({"iter": 20, "mIoU": 31.5})
    events = _events(tmp_path / "tb")
    assert set(events.Tags()["scalars"]) == {"train/lr", "train/it_per_s", "loss/src_ce", "train/q", "val/mIoU"}
    assert [(e.step, e.value) for e in events.Scalars("loss/src_ce")] == [(10, 1.25)]
    assert [(e.step, e.value) for e in events.Scalars("val/mIoU")] == [(20, 31.5)]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2  # the JSON-lines log stays
    assert tensorboard_tag("mIoU16") == "val/mIoU16"


def test_only_rank0_writes_tensorboard(tmp_path):
    log = TrainingLog(tmp_path / "log.jsonl", 1, Context(rank=1, world_size=2), False, tmp_path)
    log.write({"iter": 1, "loss/src_ce": 1.0})
    assert log.tensorboard is None and not (tmp_path / "tb").exists() and not (tmp_path / "log.jsonl").exists()


def test_panels_go_to_tensorboard_as_images(tmp_path):
    pytest.importorskip("tensorboard", reason=NO_TENSORBOARD)
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 24)
    images = {"x_s": x, "x_t": x, "x_st": x, "x_m": x, "y_m": torch.zeros(2, 16, 24, dtype=torch.long),
              "y_t": torch.ones(2, 16, 24, dtype=torch.long), "w_m": torch.rand(2, 16, 24)}
    writer = SummaryWriter(str(tmp_path / "tb"))
    save_iteration_pictures(images, tmp_path, 7, [0, 0, 0], [1, 1, 1], writer=writer)
    events = _events(tmp_path / "tb")
    assert set(events.Tags()["images"]) == {"panels/style", "panels/classmix"}
    classmix = events.Images("panels/classmix")[0]
    with Image.open(tmp_path / "panels" / "classmix_000007.png") as png:
        assert classmix.step == 7 and (classmix.width, classmix.height) == png.size


def test_a_tiny_training_writes_curves_and_tensorboard(tmp_path):
    from confeti_fast.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path), 2, tmp_path / "work", device="cpu", progress=False)
    trainer.train()
    out = tmp_path / "work" / "stage2"
    with Image.open(out / "curves.png") as png:
        assert png.info.get("Software", "").startswith("Matplotlib")
    events = _events(out / "tb")
    assert [e.step for e in events.Scalars("loss/src_ce")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/mIoU")] == [2, 4]
    assert [e.step for e in events.Images("panels/classmix")] == [2, 4]


def test_curves_draw_the_stylization_scores(tmp_path):
    log = tmp_path / "stage1" / "log.jsonl"
    log.parent.mkdir()
    records = [{"iter": 10, "loss/src_ce": 1.0}, {"iter": 20, "loss/src_ce": 0.8},
               {"iter": 20, "mIoU": 5.0, "style/structure_ssim": 0.4, "style/appearance_dist": 90.0,
                "style/appearance_dist_source": 40.0}]
    log.write_text("\n".join(json.dumps(r) for r in records))
    titles = [ax.get_title(loc="left") for ax in curves_figure(log).axes]
    assert "stylization (fixed source and target crops)" in titles
    style_labels = ("SSIM", "colour statistics distance (0-255)")
    style_axes = [ax for ax in curves_figure(log).axes if ax.get_ylabel() in style_labels]
    lines = {line.get_label(): list(line.get_ydata()) for ax in style_axes for line in ax.get_lines()}
    assert lines["structure: SSIM(x_s, G(x_s))"] == [0.4] and lines["colour distance to target: G(x_s)"] == [90.0]
    records[-1] = {"iter": 20, "mIoU": 5.0}  # no style transfer: no such panel
    log.write_text("\n".join(json.dumps(r) for r in records))
    assert "stylization (fixed source and target crops)" not in [ax.get_title(loc="left")
                                                                   for ax in curves_figure(log).axes]


def test_panel_tiles_are_at_least_256_pixels(tmp_path):
    # Demo crops are 112-128 px: the panels enlarge them so a person can see what G does.
    small = np.zeros((40, 60, 3), np.uint8)
    save_panel([("a", small), ("b", small)], tmp_path / "p.png", columns=2)
    width, height = Image.open(tmp_path / "p.png").size
    assert height - 14 >= 256 and width >= 2 * 256 * 60 // 40
