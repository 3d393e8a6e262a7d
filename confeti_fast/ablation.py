"""The demo ablation: each component's gain over seeds, at the same stage-2 budget.

    python -m confeti_fast.ablation [--seeds 0 1 2 3 4] [--rows ROW ...] [--out docs/ablation]
                                    [--work-dir work_dirs/ablation]

Rows (presets): source_only, self_training (demo_selftrain), contrast (demo_nostyle: + CAM,
prototypes and pixel-to-prototype contrast), full (demo: stage 0, 1 and 2), and for reference
oracle (demo_oracle: trained on the target's labels, the ceiling at this budget). Runs go one after
another (two at once on a small CPU make both far slower), each `python train.py --config
PRESET --seed S`. Every finished run is appended to OUT/runs.csv at once, and a run already
there is not repeated, so an interrupted table resumes where it stopped. OUT/summary.csv holds
each row's mean and standard deviation of the final and the best target mIoU, and
OUT/ablation.png the bar chart with the seeds' spread.
"""
import argparse
import csv
import functools
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

ROWS = {
    "source_only": ("source_only", "source only"),
    "self_training": ("demo_selftrain", "self-training"),
    "contrast": ("demo_nostyle", "+ CAM, prototypes, contrast"),
    "full": ("demo", "full method (stages 0-2)"),
    # not a method: the ceiling, source cross-entropy on the target's own labels
    "oracle": ("demo_oracle", "target labels (oracle)"),
}
RUN_FIELDS = ["row", "preset", "seed", "final_miou", "best_miou", "wall_s"]


def _stage2_mious(work_dir):
    from .training_log import read_log

    records = read_log(Path(work_dir) / "stage2" / "log.jsonl")
    mious = [r["mIoU"] for r in records if "mIoU" in r]
    if not mious:
        raise RuntimeError(f"{work_dir}: stage 2 logged no mIoU")
    return mious[-1], max(mious)


def _read_csv(path):
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _write_csv(path, fields, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def run_row(row, seed, work_root, repo):
    preset = ROWS[row][0]
    work_dir = work_root / row / f"seed{seed}"
    cmd = [sys.executable, "train.py", "--config", preset, "--seed", str(seed), "--work-dir", str(work_dir),
           "--no-progress"]
    started = time.perf_counter()
    with open(work_root / f"{row}_seed{seed}.log", "w") as log:
        subprocess.run(cmd, cwd=repo, stdout=log, stderr=subprocess.STDOUT, check=True)
    final, best = _stage2_mious(work_dir)
    return {"row": row, "preset": preset, "seed": seed, "final_miou": f"{final:.2f}", "best_miou": f"{best:.2f}",
            "wall_s": f"{time.perf_counter() - started:.0f}"}


def summarize(runs):
    """Per row: n, mean and std (over seeds) of the final and the best mIoU."""
    out = []
    for row in ROWS:
        mine = [r for r in runs if r["row"] == row]
        if not mine:
            continue
        entry = {"row": row, "label": ROWS[row][1], "n": len(mine)}
        for key in ("final_miou", "best_miou"):
            values = [float(r[key]) for r in mine]
            entry[f"{key}_mean"] = round(statistics.mean(values), 2)
            entry[f"{key}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    labels = [textwrap.fill(s["label"], 18) + f"\n(n={s['n']})" for s in summary]
    xs = range(len(summary))
    final = ax.bar([x - 0.2 for x in xs], [s["final_miou_mean"] for s in summary], 0.4,
                   yerr=[s["final_miou_std"] for s in summary], capsize=4, label="final")
    best = ax.bar([x + 0.2 for x in xs], [s["best_miou_mean"] for s in summary], 0.4,
                  yerr=[s["best_miou_std"] for s in summary], capsize=4, label="best", alpha=0.7)
    for i, s in enumerate(summary):
        if s["row"] == "oracle":  # a reference, not a method: hatched
            for bars in (final, best):
                bars[i].set_hatch("//")
                bars[i].set_edgecolor("white")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("target mIoU (%), mean ± std over seeds")
    ax.set_title("Demo ablation (stage-2 budget of the demo preset)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# Who judges G(x_s): segmentors that never saw a stylized image, one trained on the source's
# look (source_only), one on the target's (oracle). Which views of each held-out source image:
# x_s, the colour-model baseline, G at the end of stage 0 and of stage 1, and the ideal
# translation (the same scene rendered in the target's look: what a perfect G would give).
JUDGES = ("source_only", "oracle")
VIEWS = ("plain", "colour", "stage0_g", "stage1_g", "ideal")
VIEW_TITLES = {"plain": "x_s", "colour": "colour model", "stage0_g": "G(x_s), end of stage 0",
               "stage1_g": "G(x_s), end of stage 1", "ideal": "ideal translation"}
PAIRED = ("psnr", "ssim", "edge")  # style.paired_scores against the ideal translation
STYLE_FIELDS = ["seed", "images"] + [f"{judge}_{view}_miou" for judge in JUDGES for view in VIEWS] \
    + [f"{view}_ideal_{score}" for view in VIEWS[:-1] for score in PAIRED] + ["oracle_stage1_g_share"]


def _stylizer(stage_dir):
    """The frozen G of a finished stage (its config.py and last.pth), on the CPU."""
    from .config import load_config
    from .style import StyleTransfer, load_style

    cfg = load_config(stage_dir / "config.py")
    style = StyleTransfer(cfg["cut"], torch.device("cpu"), cfg["pipeline"]["mean"], cfg["pipeline"]["std"])
    load_style(style, stage_dir / "last.pth", with_optimizers=False)
    style.freeze()
    return style


@torch.no_grad()
def _stylize(style, image):
    """G(image) for an (H, W, 3) uint8 RGB image, back as uint8 (H and W multiples of 4)."""
    from .data.transforms import to_input
    from .visualize import picture

    x = to_input(image, style.mean, style.std)[None]
    return picture(style.translate(x)[0], style.mean, style.std)


def _judge(work_root, judge, seed):
    from .config import load_config
    from .predict import load_model

    run = work_root / judge / f"seed{seed}" / "stage2"
    cfg = load_config(run / "config.py")
    model, _ = load_model(cfg, run / "last.pth")
    return model.eval(), cfg


def _stylization_ready(work_root, seed):
    needed = [work_root / judge / f"seed{seed}" / "stage2" / "last.pth" for judge in JUDGES]
    return all(p.is_file() for p in needed + [work_root / "full" / f"seed{seed}" / "stage1" / "last.pth"])


@functools.cache
def _colour_model():
    """The colour-model baseline, fitted on the demo's training images (all source images and
    the target's train split, as a run sees them); fitted once per process, not once per seed."""
    from .data.demo import DEFAULT_COUNTS, make_image
    from .style import colour_transfer, dataset_colour_statistics

    stats = [dataset_colour_statistics(make_image(domain, i)[0] for i in range(DEFAULT_COUNTS[key]))
             for domain, key in (("source", "source"), ("train", "train"))]
    return lambda image: colour_transfer(image, *stats)


def _as_batch(image):
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


@torch.no_grad()
def stylization_check(work_root, seed, count=60, picture=None):
    """Whether G keeps the scene, judged on `count` held-out demo source images (indices after
    the ones the runs train on), in the views VIEWS: x_s, the colour model, the full run's G at
    the end of stage 0 (where stage 1 starts) and of stage 1 (what stage 2 trains on), and the
    ideal translation. The judges are the source-only and the oracle runs' segmentors: mIoU
    against the images' own labels (the oracle rises on G(x_s) as far as G gives the target's
    look and keeps the layout; on the ideal translation it reads its ceiling). Each view but the
    ideal is also scored against the ideal (PSNR, SSIM, edge agreement). Returns a STYLE_FIELDS
    row. `picture`: also write the first image's panel there (x_s, G(x_s) at the end of stage
    1 and the ideal above, the oracle's predictions on each below)."""
    from .data.demo import held_out_sources, make_ideal_translation
    from .data.labels import cityscapes_to_train_ids, colorize
    from .evaluation import class_iou, confusion_matrix, mean_iou, predict_logits
    from .style import paired_scores
    from .visualize import save_panel

    full = work_root / "full" / f"seed{seed}"
    judges = {judge: _judge(work_root, judge, seed) for judge in JUDGES}
    makers = {"colour": _colour_model(), "stage0_g": _stylizer(full / "stage0"),
              "stage1_g": _stylizer(full / "stage1")}
    cms = {(judge, view): 0 for judge in JUDGES for view in VIEWS}
    paired = {view: [] for view in VIEWS[:-1]}
    pictured = held_out_sources(1)[0]
    for index in held_out_sources(count):
        image, ideal, label_ids = make_ideal_translation(index, seed=0)  # the demo data's seed, not the run's
        label = cityscapes_to_train_ids(label_ids)
        views = {"plain": image, "ideal": ideal}
        views.update({view: maker(image) if view == "colour" else _stylize(maker, image)
                      for view, maker in makers.items()})
        preds = {}
        for (judge, view) in cms:
            model, cfg = judges[judge]
            preds[judge, view] = predict_logits(model, views[view], cfg).argmax(1)[0].numpy()
            cms[judge, view] = cms[judge, view] + confusion_matrix(preds[judge, view], label)
        for view in paired:
            paired[view].append(paired_scores(_as_batch(views[view]), _as_batch(ideal)))
        if picture is not None and index == pictured:
            shown = ("plain", "stage1_g", "ideal")
            tiles = [(VIEW_TITLES[view], views[view]) for view in shown]
            tiles += [(f"oracle on {VIEW_TITLES[view]}", colorize(preds["oracle", view])) for view in shown]
            save_panel(tiles, picture)
    row = {"seed": seed, "images": count}
    for (judge, view), cm in cms.items():
        row[f"{judge}_{view}_miou"] = f"{100 * mean_iou(class_iou(cm)):.2f}"
    for view, scores in paired.items():
        for score in PAIRED:
            row[f"{view}_ideal_{score}"] = f"{sum(s[score] for s in scores) / len(scores):.3f}"
    # how much of its reading of the ideal translation the oracle keeps on G(x_s)
    row["oracle_stage1_g_share"] = f"{float(row['oracle_stage1_g_miou']) / float(row['oracle_ideal_miou']):.3f}"
    return row


def summarize_stylization(rows):
    """Mean and sample std over seeds of every stylization column: [{column, n, mean, std}]."""
    out = []
    for column in STYLE_FIELDS[2:]:
        values = [float(r[column]) for r in rows]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append({"column": column, "n": len(values), "mean": round(statistics.mean(values), 3),
                    "std": round(std, 3)})
    return out


def _stylization_table(work_root, seeds, out):
    """OUT/stylization.csv (one row per seed whose source-only, oracle and full runs are there,
    kept once written) and OUT/stylization.png (the first such seed's picture)."""
    path = out / "stylization.csv"
    rows = _read_csv(path)
    for seed in seeds:
        if any(int(r["seed"]) == seed for r in rows) or not _stylization_ready(work_root, seed):
            continue
        row = stylization_check(work_root, seed, picture=out / "stylization.png" if not rows else None)
        for judge in JUDGES:
            readings = ", ".join(f"{VIEW_TITLES[view]} {row[f'{judge}_{view}_miou']}" for view in VIEWS)
            print(f"ablation: stylization check, seed {seed}: {judge} segmentor, mIoU on held-out sources: "
                  f"{readings}", flush=True)
        rows.append(row)
        _write_csv(path, STYLE_FIELDS, rows)
    if rows:
        _write_csv(out / "stylization_summary.csv", ["column", "n", "mean", "std"], summarize_stylization(rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--out", type=Path, default=Path("docs/ablation"), help="the CSVs and the chart")
    parser.add_argument("--work-dir", type=Path, default=Path("work_dirs/ablation"), help="the runs' outputs")
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    out, work_root = args.out.resolve(), args.work_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work_root.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.csv"
    runs = _read_csv(runs_path)
    for row in args.rows:
        for seed in args.seeds:
            if any(r["row"] == row and int(r["seed"]) == seed for r in runs):
                continue
            print(f"ablation: {row} seed {seed} ...", flush=True)
            result = run_row(row, seed, work_root, repo)
            print(f"ablation: {row} seed {seed}: final {result['final_miou']}, best {result['best_miou']} "
                  f"({result['wall_s']} s)", flush=True)
            runs.append(result)
            runs.sort(key=lambda r: (list(ROWS).index(r["row"]), int(r["seed"])))
            _write_csv(runs_path, RUN_FIELDS, runs)
    _stylization_table(work_root, args.seeds, out)
    summary = summarize(runs)
    _write_csv(out / "summary.csv", list(summary[0]), summary)
    plot(summary, out / "ablation.png")
    for s in summary:
        print(f"{s['label']:32s} final {s['final_miou_mean']:.2f} ± {s['final_miou_std']:.2f}   "
              f"best {s['best_miou_mean']:.2f} ± {s['best_miou_std']:.2f}   (n={s['n']})")


if __name__ == "__main__":
    main()
