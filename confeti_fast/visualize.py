"""Pictures a user would rather look at than read: ClassMix debug panels and training curves."""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data.labels import colorize


def denormalize(image, mean, std):
    """(3, H, W) normalized tensor -> (H, W, 3) uint8."""
    mean = torch.as_tensor(mean).view(3, 1, 1)
    std = torch.as_tensor(std).view(3, 1, 1)
    rgb = image.detach().float().cpu() * std + mean
    return rgb.clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _tile(array, title):
    tile = Image.fromarray(array).convert("RGB")
    canvas = Image.new("RGB", (tile.width, tile.height + 14), "white")
    canvas.paste(tile, (0, 14))
    ImageDraw.Draw(canvas).text((2, 1), title, fill="black")
    return canvas


def save_panel(tiles, path, columns=3):
    """Write titled (title, HxWx3 uint8) tiles as a grid PNG."""
    images = [_tile(array, title) for title, array in tiles]
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (width * columns, height * rows), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def label_picture(label):
    return colorize(label.detach().cpu().numpy().astype(np.uint8))


def weight_picture(weight):
    return (weight.detach().float().cpu().clamp(0, 1) * 255).byte().numpy()


def _plot(draw, box, series, title):
    """Line plot of {name: (xs, ys)} inside `box` (left, top, right, bottom)."""
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    draw.text((left + 4, top - 14), title, fill="black")
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if np.isfinite(y)]
    if not points:
        return
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    draw.text((left + 4, bottom + 2), f"iter {x0:g} .. {x1:g}", fill="black")
    draw.text((right - 120, top - 14), f"{y0:.3g} .. {y1:.3g}", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
    for i, (name, (xs, ys)) in enumerate(series.items()):
        xy = [(left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))
              for x, y in zip(xs, ys) if np.isfinite(y)]
        colour = colours[i % len(colours)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        elif xy:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
        draw.text((right + 6, top + 14 * i), name, fill=colour)


def plot_curves(log_path, out_path):
    """Loss curves and the mIoU curve of a JSON-lines training log, as one PNG."""
    losses, metric = {}, {}
    for line in Path(log_path).read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key.startswith("loss/"):
                losses.setdefault(key[5:], ([], []))
                losses[key[5:]][0].append(record["iter"])
                losses[key[5:]][1].append(value)
            elif key.startswith("mIoU"):
                metric.setdefault(key, ([], []))
                metric[key][0].append(record["iter"])
                metric[key][1].append(value)
    canvas = Image.new("RGB", (900, 640), "white")
    draw = ImageDraw.Draw(canvas)
    _plot(draw, (40, 30, 740, 300), losses, "losses")
    _plot(draw, (40, 350, 740, 610), metric, "target mIoU (%)")
    canvas.save(out_path)
    return out_path


def save_iteration_pictures(images, work_dir, t, mean, std):
    """The pictures of one iteration's images (`Iteration.images`): with style transfer the
    source / stylized / target panel and each stylized image; after ClassMix its debug panel."""
    work_dir = Path(work_dir)
    if "x_st" in images:
        stylized = [denormalize(x, mean, std) for x in images["x_st"]]
        save_panel([("source", denormalize(images["x_s"][0], mean, std)), ("stylized", stylized[0]),
                    ("target", denormalize(images["x_t"][0], mean, std))], work_dir / "panels" / f"style_{t:06d}.png")
        for j, image in enumerate(stylized):
            save_panel([(f"stylized {t}", image)], work_dir / "stylized" / f"{t:06d}_{j}.png", 1)
    if "x_m" in images:
        save_panel([
            ("source", denormalize(images["x_s"][0], mean, std)),
            ("target", denormalize(images["x_t"][0], mean, std)),
            ("mixed", denormalize(images["x_m"][0], mean, std)),
            ("mixed label", label_picture(images["y_m"][0])),
            ("pseudo label", label_picture(images["y_t"][0])),
            ("weights", weight_picture(images["w_m"][0])),
        ], work_dir / "panels" / f"classmix_{t:06d}.png")
