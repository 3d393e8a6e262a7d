"""`python -m confeti_fast.data.check CONFIG [--full] [--out FILE]`: the start-up data check
alone, on the source and target training sets and the target val set of a config.

Exit status 0 when every pair is good, 1 with a summary when some are bad, 2 for a usage or
config error (a missing folder, an unknown preset).
"""
import argparse
import os
import sys
import time

from ...config import load_config, parse_cfg_options
from ...errors import run_cli
from ..datasets import build_dataset
from . import write_reports, describe, find_bad, summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m confeti_fast.data.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a preset name or a config file")
    parser.add_argument("--full", action="store_true",
                        help="decode every file fully (catches a damaged body behind an intact header)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes decoding files under --full (default: the CPUs, at most 8)")
    parser.add_argument("--out", help="one file listing every bad pair (default: bad_samples.txt beside each dataset)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, as train.py takes them (e.g. source.root=/data/gta5)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, parse_cfg_options(args.cfg_options), "--cfg-options")
    sets = [build_dataset(cfg["source"], "train", check=False), build_dataset(cfg["target"], "train", check=False),
            build_dataset(cfg["target"], "val", check=False)]
    found = []
    for ds in sets:
        start = time.perf_counter()
        bad = find_bad(ds, args.full, not args.no_progress, args.workers)
        found.append((ds, bad))
        verdict = f"{len(bad)} bad" if bad else "all good"
        print(f"{describe(ds)} data at {ds.root}: {len(ds)} pairs, {verdict} "
              f"({'full decode' if args.full else 'headers'}, {time.perf_counter() - start:.2f} s)", flush=True)
    where = write_reports(found, args.out)
    bad_sets = [(ds, bad) for ds, bad in found if bad]
    if bad_sets:
        print(summary(bad_sets, where), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
