#!/usr/bin/env python3
"""Train CONFETI (or the source-only baseline).

    python train.py [--config PRESET_OR_FILE] [--stage 0|1|2] [--work-dir DIR]
                    [--resume auto|PATH] [--kernels fused|reference] [--iters N]
                    [--cut-checkpoint PATH] [--amp bf16|fp32] [--[no-]channels-last]
                    [--compile MODE | --no-compile] [--[no-]fused-optimizer] [--check-finite step|log]
                    [--[no-]deterministic] [--seed N] [--cfg-options KEY=VALUE ...]

With no arguments: the demo preset on the embedded demo data (generated on first use),
stage 0 (CUT alone), stage 1, then stage 2, ending with the target mIoU. Outputs go to WORK_DIR/stage<N>/:
config.py (resolved), log.jsonl, last.pth / best.pth (written atomically), panels/
(ClassMix debug, source/stylized/target), stylized/, curves.png, and tb/ (TensorBoard
scalars and panels, when tensorboard is installed).

--cfg-options key.path=value ... overrides config values (mmseg's convention: each value is
a Python literal, else a string), e.g. `--cfg-options train.contrast_after=1000
optimizer.lr=1e-4 model.pretrained=weights/r101.pth`; they are checked like a config file
and recorded in the run's config.py.
"""
import argparse
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train CONFETI domain adaptation.")
    parser.add_argument("--config", default="demo", help="preset name or config file (default: demo)")
    parser.add_argument("--stage", type=int, choices=(0, 1, 2), default=None,
                        help="0: pre-train CUT alone; 1: joint; 2: frozen CUT, segmentor restarted "
                             "(default: 0, 1 then 2, the authors' schedule; only 2 without style transfer)")
    parser.add_argument("--cut-checkpoint", type=Path, default=None, metavar="PATH",
                        help="start G/D/F from this checkpoint (a stage's last.pth, or CUT's latest_net_G.pth); "
                             "default: the previous stage's last.pth in the work dir")
    parser.add_argument("--cut-random-start", action="store_true",
                        help="let stage 1 start G/D/F from random weights when there is no pre-trained CUT "
                             "(the paper presets otherwise stop with an error)")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: work_dirs/<config name>")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="'auto': continue from WORK_DIR/stage<N>/last.pth if it exists; or a checkpoint")
    parser.add_argument("--kernels", choices=("fused", "reference"), default=None,
                        help="fused kernels or the plain-PyTorch reference ops (default: $CONFETI_KERNELS or fused)")
    parser.add_argument("--iters", type=int, default=None, help="override the stage's iteration count")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed")
    parser.add_argument("--cfg-options", nargs="+", default=None, metavar="KEY=VALUE",
                        help="override config values, e.g. train.contrast_after=1000 optimizer.lr=1e-4 "
                             "(values are Python literals, else strings; checked like a config file)")
    fast = parser.add_argument_group(
        "runtime", "how the step executes; default: the config's runtime section, else the device's "
                   "default (CPU: fp32 eager; CUDA: bf16, channels_last, compile reduce-overhead, fused AdamW)")
    fast.add_argument("--amp", choices=("bf16", "fp32"), default=None, help="bf16 autocast (fp32 master weights)")
    fast.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    fast.add_argument("--compile", default=None, metavar="MODE",
                      choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                      help="torch.compile mode for the backbones, G and D")
    fast.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="run eager")
    fast.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=None)
    fast.add_argument("--check-finite", choices=("step", "log"), default=None,
                      help="check losses for NaN/inf every step (a host sync) or when the log reads them")
    fast.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                      help="cuDNN's deterministic algorithms instead of cudnn.benchmark autotuning")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from confeti_fast.config import load_config, parse_cfg_options
    from confeti_fast.errors import ConfetiError

    if args.iters is not None and args.iters < 1:
        raise ConfetiError(f"--iters must be positive, got {args.iters}")
    overrides = parse_cfg_options(args.cfg_options)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.cut_random_start:
        overrides.setdefault("cut", {})["require_pretrained"] = False
    cfg = load_config(args.config, overrides, "--cfg-options" if args.cfg_options else "command line")
    runtime = {key: getattr(args, key) for key in ("amp", "channels_last", "compile", "fused_optimizer", "check_finite",
                                                   "deterministic") if getattr(args, key) is not None}
    if runtime.get("compile") == "off":
        runtime["compile"] = None
    styled = cfg["method"] == "confeti" and cfg["cut"]["enabled"]
    stages = [args.stage] if args.stage is not None else ([0, 1, 2] if styled else [2])
    if args.resume not in (None, "auto") and len(stages) > 1:
        raise ConfetiError("--resume PATH needs --stage: a checkpoint belongs to one stage")

    from confeti_fast import ops
    from confeti_fast.config import merge
    from confeti_fast.distributed import shutdown
    from confeti_fast.evaluation import metric_names
    from confeti_fast.trainer import Trainer

    ops.set_kernels(args.kernels)
    if runtime:
        cfg = merge(cfg, {"runtime": runtime})
    work_dir = args.work_dir or Path("work_dirs") / cfg["name"]
    result = None
    for stage in stages:
        if args.iters is not None:
            cfg = merge(cfg, {"stages": {str(stage): {"iters": args.iters}}})
        trainer = Trainer(cfg, stage, work_dir, device=args.device, resume=_resume_path(args.resume, work_dir, stage),
                          progress=not args.no_progress,
                          cut_checkpoint=args.cut_checkpoint if stage == stages[0] else None)
        result = trainer.train()
        metrics = ", ".join(f"{k} {100 * result[k]:.2f}" for k in metric_names(result))
        if trainer.dist.is_main:
            print(f"stage {stage}: " + (f"target {metrics} " if metrics else "") +
                  f"after {trainer.t} iterations; outputs in {trainer.work_dir}", flush=True)
    shutdown()  # leave the torchrun process group, if any
    return result


def _resume_path(resume, work_dir, stage):
    from confeti_fast.distributed import launched_as_main

    if resume != "auto":
        return resume
    last = work_dir / f"stage{stage}" / "last.pth"
    if launched_as_main():  # one line per run, not per rank
        found = f"from {last}" if last.is_file() else f"no checkpoint in {last.parent}, starting fresh"
        print(f"resume: {found}", flush=True)
    return last if last.is_file() else None


if __name__ == "__main__":
    from confeti_fast.errors import run_cli

    run_cli(main)
