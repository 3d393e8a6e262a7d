#!/usr/bin/env python3
"""Evaluate a checkpoint on the target's val split and print the per-class IoU table.

    python test.py CFG (CKPT | --random-init) [--teacher] [--mode whole|slide] [--device cpu|cuda]
                   [--show-dir DIR] [--label-id-dir DIR] [--train-id-dir DIR] [--max-images N]
                   [--kernels fused|reference]

CFG is the resolved `config.py` a training run wrote into its work dir, or a preset name.
CKPT is a checkpoint written by training: a dict with the student's state dict under
'model' and, optionally, the teacher's under 'teacher'; or one of the authors' mmseg-format
checkpoints (keys `model.backbone.*`, `ema_model.*`, ...), converted on the fly. It is read with
`torch.load(weights_only=True)`, so only tensors and plain literals are accepted.

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
    parser.add_argument("--teacher", action="store_true", help="evaluate the EMA teacher instead of the student")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None,
                        help="inference mode (default: the config's evaluation.mode)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    """The checkpoint dict at `path`, read with weights_only=True; ConfetiError otherwise.
    The authors' mmseg-format checkpoints are converted to our layout on the way."""
    from confeti_fast.errors import ConfetiError
    from confeti_fast.models.interop import convert_mmseg_checkpoint, is_mmseg_checkpoint, read_mmcv_checkpoint

    ckpt = read_mmcv_checkpoint(path, "checkpoint")
    if not isinstance(ckpt, dict):
        raise ConfetiError(f"checkpoint {path} must hold a dict with the weights under 'model', "
                           f"found {type(ckpt).__name__}")
    if is_mmseg_checkpoint(ckpt):
        ckpt = convert_mmseg_checkpoint(ckpt, f"authors' checkpoint {path}")
    return ckpt


def select_weights(ckpt, path, teacher=False):
    """The segmentor state dict to evaluate: ckpt['model'] or, with `teacher`, ckpt['teacher']
    (a segmentor state dict, or a dict holding one under 'segmentor')."""
    from confeti_fast.errors import ConfetiError

    key = "teacher" if teacher else "model"
    if key not in ckpt or ckpt[key] is None:
        if teacher:
            raise ConfetiError(f"checkpoint {path} has no teacher weights (no 'teacher' entry); "
                               f"drop --teacher to evaluate the student")
        keys = ", ".join(map(str, list(ckpt)[:8])) or "none"
        raise ConfetiError(f"checkpoint {path} has no 'model' entry (its keys: {keys})")
    weights = ckpt[key]
    if isinstance(weights, dict) and isinstance(weights.get("segmentor"), dict):
        weights = weights["segmentor"]
    if not isinstance(weights, dict):
        raise ConfetiError(f"checkpoint {path}: '{key}' must be a state dict, found {type(weights).__name__}")
    return key, weights


def main(argv=None):
    args = parse_args(argv)

    from confeti_fast.config import load_config

    cfg = load_config(args.config)  # config errors show before the slow torch import

    import torch

    from confeti_fast import ops
    from confeti_fast.data.datasets import build_dataset
    from confeti_fast.errors import ConfetiError
    from confeti_fast.evaluation import evaluate, format_table
    from confeti_fast.models import build_segmentor, load_model_weights

    ops.set_kernels(args.kernels)
    if (args.checkpoint is None) == (not args.random_init):
        raise ConfetiError("give either a CKPT file or --random-init (not both)")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfetiError("--device cuda: no CUDA device is available (use --device cpu)")

    # The checkpoint holds every weight: no ImageNet file is needed.
    torch.manual_seed(cfg["seed"])
    model = build_segmentor(dict(cfg["model"], pretrained=None), cfg["num_classes"], verbose=False)
    ckpt = {}
    if args.random_init:
        args.checkpoint = "a randomly initialised model"
    else:
        ckpt = load_checkpoint(args.checkpoint)
        key, weights = select_weights(ckpt, args.checkpoint, args.teacher)
        load_model_weights(model, weights, f"{args.checkpoint} ['{key}']")
    model.to(device)

    dataset = build_dataset(cfg["target"], "val")
    mode = args.mode or cfg["evaluation"].get("mode", "whole")
    iteration = ckpt.get("iteration")
    at = f" at iteration {iteration}" if isinstance(iteration, int) else ""
    count = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    print(f"{'teacher' if args.teacher else 'student'} of {args.checkpoint}{at}: "
          f"{count} {dataset.split} images of {dataset.root}, {mode} inference on {device}", flush=True)

    result = evaluate(model, dataset, cfg, device=device, mode=mode, progress=not args.no_progress,
                      show_dir=args.show_dir, label_id_dir=args.label_id_dir,
                      train_id_dir=args.train_id_dir, max_images=args.max_images)
    print(format_table(result))
    for flag, folder in (("--show-dir", args.show_dir), ("--label-id-dir", args.label_id_dir),
                         ("--train-id-dir", args.train_id_dir)):
        if folder is not None:
            print(f"{flag}: predictions written to {folder}")
    return result


if __name__ == "__main__":
    from confeti_fast.errors import run_cli

    run_cli(main)
