"""Pictures a user would rather look at than read: ClassMix debug panels and training curves.

The curves are drawn with matplotlib on its non-interactive Agg canvas (no display, no pyplot
state); the panels are PIL grids, also sent to TensorBoard as images when a writer is given.
"""
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .data.labels import colorize
from .data.normalization import denormalize
from .errors import writing
from .evaluation import METRIC_NAMES
from .training_log import read_log


def picture(image, mean, std):
    """(3, H, W) normalized tensor -> (H, W, 3) uint8."""
    rgb = denormalize(image.detach().float().cpu(), mean, std)
    return rgb.clamp(0, 255).byte().permute(1, 2, 0).numpy()


MIN_TILE_SIDE = 256  # small crops are enlarged (nearest neighbour) so a person can see what G does


def _tile(array, title):
    tile = Image.fromarray(array).convert("RGB")
    if min(tile.size) < MIN_TILE_SIDE:
        factor = math.ceil(MIN_TILE_SIDE / min(tile.size))
        tile = tile.resize((tile.width * factor, tile.height * factor), Image.NEAREST)
    canvas = Image.new("RGB", (tile.width, tile.height + 14), "white")
    canvas.paste(tile, (0, 14))
    ImageDraw.Draw(canvas).text((2, 1), title, fill="black")
    return canvas


def panel_image(tiles, columns=3):
    """Titled (title, HxWx3 uint8) tiles as one PIL grid image."""
    images = [_tile(array, title) for title, array in tiles]
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (width * columns, height * rows), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def save_panel(tiles, path, columns=3, writer=None, tag=None, step=None):
    """Write titled (title, HxWx3 uint8) tiles as a grid PNG (and to `writer`, a TensorBoard
    SummaryWriter, as image `tag` at `step`, when given)."""
    grid = panel_image(tiles, columns)
    with writing(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
    if writer is not None:
        writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
    return path


def label_picture(label):
    return colorize(label.detach().cpu().numpy().astype(np.uint8))


def weight_picture(weight):
    return (weight.detach().float().cpu().clamp(0, 1) * 255).byte().numpy()


def _log_series(log_path):
    """{name: {iter: value}} of a JSON-lines training log (a later record of the same
    iteration, e.g. after a resume, replaces the earlier one)."""
    series = {}
    for record in read_log(log_path, partial=True):  # a line cut short by a kill is skipped
        t = record.get("iter")
        if not isinstance(t, (int, float)):
            continue
        for key, value in record.items():
            if key != "iter" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[t] = float(value)
    return {name: dict(sorted(points.items())) for name, points in series.items()}


def smooth(values, weight=None):
    """TensorBoard's smoothing: a debiased exponential moving average. The weight grows with the
    number of points (0 for 1-2 points, about 0.6 at 25, up to 0.9), skipping NaNs."""
    values = [float(v) for v in values]
    if weight is None:
        weight = min(0.9, max(0.0, 1.0 - 10.0 / max(len(values), 1)))
    out, last, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(float("nan"))
            continue
        last, count = last * weight + (1 - weight) * value, count + 1
        out.append(last / (1 - weight ** count) if weight > 0 else value)
    return out


_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
            "#7f7f7f", "#bcbd22"]


def _loss_panel(ax, series, log_scale):
    """Raw losses faint, smoothed ones solid; on a log axis, values <= 0 are left out."""
    for i, (name, points) in enumerate(series.items()):
        xs, ys = list(points), list(points.values())
        if log_scale:
            ys = [y if y > 0 else float("nan") for y in ys]
        colour = _COLOURS[i % len(_COLOURS)]
        if len(xs) > 1:
            ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(xs, smooth(ys), color=colour, linewidth=1.6, label=name, marker="o" if len(xs) < 3 else None)
    if log_scale:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _style_panel(ax, style):
    """The stylization scores of each evaluation: structure kept (SSIM, left axis) and the colour
    distance to the target (right axis), beside the distance of the unstylized source."""
    if "structure_ssim" in style:
        points = style["structure_ssim"]
        ax.plot(list(points), list(points.values()), color=_COLOURS[0], marker="o",
                label="structure: SSIM(x_s, G(x_s))")
    ax.set_ylim(0, 1)
    ax.set_ylabel("SSIM")
    right = ax.twinx()
    for name, colour, dashes in (("appearance_dist", _COLOURS[1], "-"), ("appearance_dist_source", "#7f7f7f", "--")):
        if name in style:
            points = style[name]
            label = "colour distance to target: G(x_s)" if name == "appearance_dist" else "... and x_s itself"
            right.plot(list(points), list(points.values()), color=colour, linestyle=dashes, marker=".", label=label)
    right.set_ylabel("colour statistics distance (0-255)")
    right.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.08, 1.0), fontsize=8, frameon=False)
    ax.set_title("stylization (fixed source and target crops)", fontsize=10, loc="left")
    ax.grid(True, alpha=0.3)


def _ideal_panel(ax, style):
    """The demo's paired scores of each evaluation: G(x_s) against the ideal translation of the
    same held-out scenes (solid), beside x_s itself against it (dashed): SSIM and edge agreement
    on the left axis, PSNR on the right."""
    right = ax.twinx()
    for name, colour, axis, label in (("ssim", _COLOURS[0], ax, "SSIM"), ("edge", _COLOURS[2], ax, "edge agreement"),
                                      ("psnr", _COLOURS[1], right, "PSNR (dB, right)")):
        for suffix, dashes, who in (("", "-", "G(x_s)"), ("_source", "--", "x_s")):
            points = style.get(f"ideal_{name}{suffix}")
            if points:
                axis.plot(list(points), list(points.values()), color=colour, linestyle=dashes,
                          marker="o" if not suffix else ".", label=f"{label}: {who}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("SSIM, edge agreement")
    right.set_ylabel("PSNR (dB)")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.08, 1.0), fontsize=8, frameon=False)
    ax.set_title("against the ideal translation (held-out scenes in the target's look)", fontsize=10, loc="left")
    ax.grid(True, alpha=0.3)


def plot_curves(log_path, out_path):
    """Training curves of a JSON-lines training log as one PNG (`curves_figure`)."""
    figure = curves_figure(log_path)
    with writing(out_path):
        figure.savefig(out_path)
    return out_path


def curves_figure(log_path):
    """A matplotlib Figure (Agg canvas) of a training log's curves: the losses (raw and smoothed,
    log scale; CUT's in a panel of their own; terms that go negative, the contrast
    regularisers, on a linear axis; with train.log_style_gradients each G term's gradient norm),
    the stylization scores (and on the demo the paired scores against the ideal translation)
    and the target mIoU with the pseudo-label confidence q."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = _log_series(log_path)
    losses = {k[5:]: v for k, v in series.items() if k.startswith("loss/")}
    negative = {k: v for k, v in losses.items() if any(y < 0 for y in v.values())}
    positive = {k: v for k, v in losses.items() if k not in negative and any(y > 0 for y in v.values())}
    panels = [("losses (smoothed; faint: raw)", {k: v for k, v in positive.items() if not k.startswith("cut_")},
               True),
              ("style transfer (CUT) losses", {k: v for k, v in positive.items() if k.startswith("cut_")}, True),
              ("terms that go negative (linear)", negative, False)]
    panels.append(("norm of each term's gradient on G", {k[7:]: v for k, v in series.items()
                                                        if k.startswith("grad_G/")}, True))
    panels = [p for p in panels if p[1]]
    metrics = {k: v for k, v in series.items() if k in METRIC_NAMES}
    style = {k[6:]: v for k, v in series.items() if k.startswith("style/")}
    paired = any(k.startswith("ideal_") for k in style)

    rows = len(panels) + 1 + bool(style) + paired
    fig = Figure(figsize=(10, 2.9 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, group, log_scale) in zip(axes, panels):
        _loss_panel(ax, group, log_scale)
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylabel(("gradient norm" if title.startswith("norm") else "loss") + (" (log)" if log_scale else ""))
    if style:
        _style_panel(axes[len(panels)], style)
    if paired:
        _ideal_panel(axes[len(panels) + 1], style)
    ax = axes[-1]
    for i, (name, points) in enumerate(metrics.items()):
        ax.plot(list(points), list(points.values()), color=_COLOURS[i], marker="o", linewidth=1.8,
                label=f"{name} (best {max(points.values()):.2f})")
    if "q" in series:
        points = series["q"]
        ax.plot(list(points), smooth([100 * y for y in points.values()]), color="#7f7f7f", linestyle="--",
                linewidth=1.2, label="q: confident target pixels")
    if not metrics and "q" not in series:
        ax.text(0.5, 0.5, "no evaluation yet", transform=ax.transAxes, ha="center", va="center", color="#7f7f7f")
    ax.set_title("target evaluation", fontsize=10, loc="left")
    ax.set_ylabel("%")
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if metrics or "q" in series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    where = Path(log_path).resolve().parent
    fig.suptitle(f"training curves: {where.parent.name}/{where.name}", fontsize=11)
    fig.tight_layout()
    return fig


def save_iteration_pictures(images, work_dir, t, mean, std, writer=None):
    """The pictures of one iteration's images (`Iteration.images`): with style transfer the
    source / stylized / target panel and each stylized image; after ClassMix its debug panel.
    With `writer` (a TensorBoard SummaryWriter) the panels also go there, as 'panels/style' and
    'panels/classmix' at step t."""
    work_dir = Path(work_dir)
    if "x_st" in images:
        stylized = [picture(x, mean, std) for x in images["x_st"]]
        save_panel([("source", picture(images["x_s"][0], mean, std)), ("stylized", stylized[0]),
                    ("target", picture(images["x_t"][0], mean, std))], work_dir / "panels" / f"style_{t:06d}.png",
                   writer=writer, tag="panels/style", step=t)
        for j, image in enumerate(stylized):
            save_panel([(f"stylized {t}", image)], work_dir / "stylized" / f"{t:06d}_{j}.png", 1)
    if "x_m" in images:
        save_panel([
            ("source", picture(images["x_s"][0], mean, std)),
            ("target", picture(images["x_t"][0], mean, std)),
            ("mixed", picture(images["x_m"][0], mean, std)),
            ("mixed label", label_picture(images["y_m"][0])),
            ("pseudo label", label_picture(images["y_t"][0])),
            ("weights", weight_picture(images["w_m"][0])),
        ], work_dir / "panels" / f"classmix_{t:06d}.png", writer=writer, tag="panels/classmix", step=t)
    if writer is not None:
        writer.flush()
