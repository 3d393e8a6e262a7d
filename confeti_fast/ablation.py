"""The demo ablation: each component's gain over seeds, at the same stage-2 budget.

    python -m confeti_fast.ablation [--seeds 0 1 2] [--rows ROW ...] [--out docs/ablation]
                                    [--work-dir work_dirs/ablation]

Rows (presets): source_only, self_training (demo_selftrain), contrast (demo_nostyle: + CAM,
prototypes and pixel-to-prototype contrast), full (demo: stage 0, 1 and 2). Runs go one after
another (two at once on a small CPU make both far slower), each `python train.py --config
PRESET --seed S`. Every finished run is appended to OUT/runs.csv at once, and a run already
there is not repeated, so an interrupted table resumes where it stopped. OUT/summary.csv holds
each row's mean and standard deviation of the final and the best target mIoU, and
OUT/ablation.png the bar chart with the seeds' spread.
"""
import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROWS = {
    "source_only": ("source_only", "source only"),
    "self_training": ("demo_selftrain", "self-training"),
    "contrast": ("demo_nostyle", "+ CAM, prototypes, contrast"),
    "full": ("demo", "full method (stages 0-2)"),
}
RUN_FIELDS = ["row", "preset", "seed", "final_miou", "best_miou", "wall_s"]


def _stage2_mious(work_dir):
    records = [json.loads(line) for line in (Path(work_dir) / "stage2" / "log.jsonl").read_text().splitlines()]
    mious = [r["mIoU"] for r in records if "mIoU" in r]
    if not mious:
        raise RuntimeError(f"{work_dir}: stage 2 logged no mIoU")
    return mious[-1], max(mious)


def _read_runs(path):
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


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

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    labels = [f"{s['label']}\n(n={s['n']})" for s in summary]
    xs = range(len(summary))
    ax.bar([x - 0.2 for x in xs], [s["final_miou_mean"] for s in summary], 0.4,
           yerr=[s["final_miou_std"] for s in summary], capsize=4, label="final")
    ax.bar([x + 0.2 for x in xs], [s["best_miou_mean"] for s in summary], 0.4,
           yerr=[s["best_miou_std"] for s in summary], capsize=4, label="best", alpha=0.7)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("target mIoU (%), mean ± std over seeds")
    ax.set_title("Demo ablation (stage-2 budget of the demo preset)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--out", type=Path, default=Path("docs/ablation"), help="the CSVs and the chart")
    parser.add_argument("--work-dir", type=Path, default=Path("work_dirs/ablation"), help="the runs' outputs")
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    out, work_root = args.out.resolve(), args.work_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work_root.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.csv"
    runs = _read_runs(runs_path)
    for row in args.rows:
        for seed in args.seeds:
            if any(r["row"] == row and int(r["seed"]) == seed for r in runs):
                continue
            print(f"ablation: {row} seed {seed} ...", flush=True)
            result = run_row(row, seed, work_root, repo)
            print(f"ablation: {row} seed {seed}: final {result['final_miou']}, best {result['best_miou']} "
                  f"({result['wall_s']} s)", flush=True)
            runs.append(result)
            with open(runs_path, "w", newline="") as f:
                writer = csv.DictWriter(f, RUN_FIELDS)
                writer.writeheader()
                writer.writerows(runs)
    summary = summarize(runs)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    plot(summary, out / "ablation.png")
    for s in summary:
        print(f"{s['label']:32s} final {s['final_miou_mean']:.2f} ± {s['final_miou_std']:.2f}   "
              f"best {s['best_miou_mean']:.2f} ± {s['best_miou_std']:.2f}   (n={s['n']})")


if __name__ == "__main__":
    main()
