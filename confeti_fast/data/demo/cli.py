"""The command line: python -m confeti_fast.data.demo [--root data/demo] [--seed 0] [--force]."""
import argparse
from importlib import import_module

from .files import DEFAULT_ROOT, generate_demo, is_complete


def main(argv=None):
    # the help text is the first paragraph of the package's docstring, as it always was
    description = import_module(__package__).__doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m confeti_fast.data.demo", description=description)
    parser.add_argument("--root", default=DEFAULT_ROOT, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if complete")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.force and is_complete(args.root, args.seed):
        print(f"{args.root}: demo data complete, nothing to do (--force regenerates it)")
        return 0
    stats = generate_demo(args.root, args.seed, progress=not args.quiet)
    print(f"{stats['root']}: {stats['images']} images in {stats['seconds']:.1f} s, "
          f"{stats['bytes'] / 1e6:.1f} MB")
    return 0
