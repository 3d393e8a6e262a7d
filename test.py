#!/usr/bin/env python3
"""Evaluate a checkpoint on the target's val split and print the per-class IoU table.

    python test.py CFG (CKPT | --random-init) [--teacher] [--mode whole|slide] [--device cpu|cuda]
                   [--eval-scale W H | --eval-scale full] [--show-dir DIR] [--label-id-dir DIR]
                   [--train-id-dir DIR] [--max-images N] [--kernels fused|reference]
                   [--images PATH... [--out DIR]] [--cfg-options KEY=VALUE ...]

CFG is the resolved `config.py` a training run wrote into its work dir, or a preset name.
CKPT is a checkpoint written by training: a dict with the student's state dict under
'model' and, optionally, the teacher's under 'teacher'; or one of the authors' mmseg-format
checkpoints (keys `model.backbone.*`, `ema_model.*`, ...), converted on the fly. It is read with
`torch.load(weights_only=True)`, so only tensors and plain literals are accepted.

The protocol is the config's `evaluation` section: `scale` None is the authors' full
resolution (the paper presets), `--eval-scale 1280 640` is CONFETII's and `--eval-scale 1024
512` DAFormer's; the table's first line names it (scale, whole/slide, student/teacher, classes).

--images PATH... segments image files or folders of any size instead of the val split (as
`python -m confeti_fast.predict` does): colour overlays and labelId PNGs under --out DIR.

--label-id-dir writes 8-bit labelId PNGs as `<DIR>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`,
which the official evaluator and the Cityscapes test server read, e.g.
    CITYSCAPES_DATASET=data/cityscapes CITYSCAPES_RESULTS=DIR csEvalPixelLevelSemanticLabeling
"""
import argparse
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate a CONFETI checkpoint (mIoU on the target's val split).")
    parser.add_argument("config", help="resolved config file (work_dir/config.py) or a preset name")
    parser.add_argument("checkpoint", nargs="?", default=None, help="checkpoint file written by training")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate a randomly initialised model instead of a checkpoint (a smoke check)")
    parser.add_argument("--show-dir", type=Path, default=None,
                        help="write side-by-side PNGs (image, prediction, ground truth) here")
    parser.add_argument("--label-id-dir", type=Path, default=None,
                        help="write labelId PNGs for the official Cityscapes evaluation / test server here")
    parser.add_argument("--train-id-dir", type=Path, default=None, help="write trainId PNGs here")
    parser.add_argument("--max-images", type=_positive_int, default=None, metavar="N",
                        help="evaluate only the first N images")
    parser.add_argument("--kernels", choices=("fused", "reference"), default=None,
                        help="fused kernels or the plain-PyTorch reference ops, as in train.py "
                             "(default: $CONFETI_KERNELS or fused); inference itself runs none of them")
    parser.add_argument("--images", nargs="+", default=None, metavar="PATH",
                        help="segment these image files / folders (any size, no dataset layout) instead of "
                             "evaluating the val split; writes overlay/ and labelIds/ under --out")
    parser.add_argument("--out", type=Path, default=None, help="with --images: output folder (default: predictions)")
    from confeti_fast.predict import add_inference_arguments

    add_inference_arguments(parser, images=False)  # --teacher, --mode, --device, --no-progress, --eval-scale, ...
    return parser.parse_args(argv)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def load_checkpoint(path):
    """The checkpoint dict at `path` (see confeti_fast.predict.load_checkpoint)."""
    from confeti_fast.predict import load_checkpoint as load

    return load(path)


def select_weights(ckpt, path, teacher=False):
    """The segmentor state dict to evaluate (see confeti_fast.predict.select_weights)."""
    from confeti_fast.predict import select_weights as select

    return select(ckpt, path, teacher)


def main(argv=None):
    args = parse_args(argv)

    from confeti_fast.errors import ConfetiError
    from confeti_fast.predict import load_inference_config

    # config errors show before the slow torch import
    cfg = load_inference_config(args.config, args.cfg_options, args.eval_scale)
    if (args.checkpoint is None) == (not args.random_init):
        raise ConfetiError("give either a CKPT file or --random-init (not both)")
    if args.images is None and args.out is not None:
        raise ConfetiError("--out is the output folder of --images; for the val split use --show-dir, "
                           "--label-id-dir or --train-id-dir")
    if args.images is not None:
        given = [flag for flag, value in (("--show-dir", args.show_dir), ("--label-id-dir", args.label_id_dir),
                                          ("--train-id-dir", args.train_id_dir), ("--max-images", args.max_images))
                 if value is not None]
        if given:
            raise ConfetiError(f"{', '.join(given)} belong to the val split; --images writes its overlays and "
                               f"labelIds under --out DIR")

    from confeti_fast import ops
    from confeti_fast.data.datasets import build_dataset
    from confeti_fast.evaluation import describe_protocol, evaluate, format_table, resolve_mode
    from confeti_fast.predict import collect_images, load_model, run
    from confeti_fast.runtime import resolve_device

    ops.set_kernels(args.kernels)
    if args.images is not None:
        collect_images(args.images)  # bad inputs fail before the model loads
        return run(cfg, args.checkpoint, args.images, args.out or Path("predictions"), teacher=args.teacher,
                   mode=args.mode, device=args.device, progress=not args.no_progress)

    device = str(resolve_device(args.device))
    model, ckpt = load_model(cfg, args.checkpoint, args.teacher, device)
    if args.random_init:
        args.checkpoint = "a randomly initialised model"

    dataset = build_dataset(cfg["target"], "val")
    mode = resolve_mode(cfg, args.mode)
    weights = "teacher" if args.teacher else "student"
    iteration = ckpt.get("iteration")
    at = f" at iteration {iteration}" if isinstance(iteration, int) else ""
    count = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    print(f"{weights} of {args.checkpoint}{at}: "
          f"{count} {dataset.split} images of {dataset.root}, {mode} inference on {device}", flush=True)

    result = evaluate(model, dataset, cfg, device=device, mode=mode, progress=not args.no_progress,
                      show_dir=args.show_dir, label_id_dir=args.label_id_dir,
                      train_id_dir=args.train_id_dir, max_images=args.max_images)
    result["protocol"] = describe_protocol(cfg, mode, weights)
    print(format_table(result))
    for flag, folder in (("--show-dir", args.show_dir), ("--label-id-dir", args.label_id_dir),
                         ("--train-id-dir", args.train_id_dir)):
        if folder is not None:
            print(f"{flag}: predictions written to {folder}")
    return result


if __name__ == "__main__":
    from confeti_fast.errors import run_cli

    run_cli(main)
