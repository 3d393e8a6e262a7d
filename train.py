#!/usr/bin/env python3
"""Train CONFETI (or the source-only baseline).

    python train.py [--config PRESET_OR_FILE] [--stage 1|2] [--work-dir DIR]
                    [--resume auto|PATH] [--kernels fused|reference] [--iters N]

With no arguments: the demo preset on the embedded demo data (generated on first use),
ending with the target mIoU. Outputs go to WORK_DIR/stage<N>/: config.py (resolved),
log.jsonl, last.pth / best.pth (written atomically), panels/ (ClassMix debug), curves.png.
"""
import argparse
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train CONFETI domain adaptation.")
    parser.add_argument("--config", default="demo", help="preset name or config file (default: demo)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2,
                        help="training stage (default 2; stage 1 runs without style transfer for now)")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: work_dirs/<config name>")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="'auto': continue from WORK_DIR/stage<N>/last.pth if it exists; or a checkpoint")
    parser.add_argument("--kernels", choices=("fused", "reference"), default=None,
                        help="fused kernels or the plain-PyTorch reference ops (default: $CONFETI_KERNELS or fused)")
    parser.add_argument("--iters", type=int, default=None, help="override the stage's iteration count")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from confeti_fast.config import load_config
    from confeti_fast.errors import ConfetiError

    overrides = {}
    if args.iters is not None:
        if args.iters < 1:
            raise ConfetiError(f"--iters must be positive, got {args.iters}")
        overrides = {"stages": {str(args.stage): {"iters": args.iters}}}
    cfg = load_config(args.config, overrides)

    from confeti_fast import ops
    from confeti_fast.trainer import Trainer

    ops.set_kernels(args.kernels)
    work_dir = args.work_dir or Path("work_dirs") / cfg["name"]
    resume = args.resume
    if resume == "auto":
        last = work_dir / f"stage{args.stage}" / "last.pth"
        resume = last if last.is_file() else None
        print(f"resume: {'from ' + str(last) if resume else 'no checkpoint in ' + str(last.parent) + ', starting fresh'}")
    trainer = Trainer(cfg, args.stage, work_dir, device=args.device, resume=resume, progress=not args.no_progress)
    result = trainer.train()
    metrics = ", ".join(f"{k} {100 * result[k]:.2f}" for k in ("mIoU", "mIoU16", "mIoU13") if k in result)
    print(f"target {metrics} after {trainer.t} iterations; outputs in {trainer.work_dir}")
    return result


if __name__ == "__main__":
    from confeti_fast.errors import run_cli

    run_cli(main)
