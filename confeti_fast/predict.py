"""Segment any images with a trained checkpoint: no dataset layout, any size.

    python -m confeti_fast.predict CFG CKPT IMAGE_OR_FOLDER... [--out DIR] [--teacher]
                                   [--mode whole|slide] [--eval-scale W H | --eval-scale full]
                                   [--device cpu|cuda] [--cfg-options KEY=VALUE ...] [--no-progress]

(`python test.py CFG CKPT --images PATH... [--out DIR]` does the same.) A folder is searched
recursively for .png/.jpg/.jpeg/.bmp/.tif/.tiff/.webp files. For each image it writes, under
DIR (default `predictions`), keeping the image's path below its folder:

* `overlay/<name>.png`: the prediction in the Cityscapes palette blended over the image;
* `labelIds/<name>.png`: the 8-bit Cityscapes labelIds of the prediction.

Inference is the evaluation's (`evaluation.predict_logits`): the config's normalization,
scale (`evaluation.scale`, None = full resolution) and mode, logits upsampled to the image's
own size. CKPT is read as `test.py` reads it (a training checkpoint or an authors' mmseg one).
"""
import argparse
from pathlib import Path

from .errors import ConfetiError
from .serialization import checkpoint_kind, read_mmcv_checkpoint

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------

def load_checkpoint(path):
    """The checkpoint dict at `path`, read with weights_only=True; ConfetiError otherwise.
    The authors' mmseg-format checkpoints are converted to our layout on the way."""
    from .models.interop import convert_mmseg_checkpoint

    ckpt = read_mmcv_checkpoint(path, "checkpoint")
    if not isinstance(ckpt, dict):
        raise ConfetiError(f"checkpoint {path} must hold a dict with the weights under 'model', "
                           f"found {type(ckpt).__name__}")
    if checkpoint_kind(ckpt) == "mmseg":
        ckpt = convert_mmseg_checkpoint(ckpt, f"authors' checkpoint {path}")
    return ckpt


def select_weights(ckpt, path, teacher=False):
    """The segmentor state dict to evaluate: ckpt['model'] or, with `teacher`, ckpt['teacher']
    (a segmentor state dict, or a dict holding one under 'segmentor')."""
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


def load_model(cfg, checkpoint=None, teacher=False, device="cpu"):
    """(segmentor on `device`, checkpoint dict) for `cfg`: the weights of `checkpoint` (the
    student, or the teacher), or with `checkpoint` None a random init (seeded by cfg's seed).
    The checkpoint holds every weight: no ImageNet file is read."""
    import torch

    from .models import build_segmentor, load_model_weights

    torch.manual_seed(cfg["seed"])
    model = build_segmentor(dict(cfg["model"], pretrained=None), cfg["num_classes"], verbose=False)
    ckpt = {}
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        key, weights = select_weights(ckpt, checkpoint, teacher)
        load_model_weights(model, weights, f"{checkpoint} ['{key}']")
    return model.to(device), ckpt


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------

def collect_images(paths):
    """[(image path, output name)] of image files and folders (searched recursively, sorted);
    the output name keeps an image's path below its folder, with a .png suffix. A one-line
    ConfetiError names a missing path, a folder without images, a file that is no image, or
    two images that would write the same output."""
    from PIL import Image

    from .data.io import _PIL_ERRORS

    if not paths:
        raise ConfetiError("no images given: name image files or folders")
    found, names = [], {}
    for given in map(Path, paths):
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ConfetiError(f"folder {given} holds no images ({', '.join(IMAGE_SUFFIXES)}, "
                                   f"searched recursively)")
            pairs = [(p, p.relative_to(given).with_suffix(".png")) for p in files]
        elif given.is_file():
            pairs = [(given, Path(given.name).with_suffix(".png"))]
        else:
            raise ConfetiError(f"image or folder {given} does not exist")
        for path, name in pairs:
            try:
                with Image.open(path):  # the header only: catches a file that is no image early
                    pass
            except _PIL_ERRORS as err:
                raise ConfetiError(f"cannot read image {path} (corrupt or not an image): "
                                   f"{' '.join(str(err).split())}") from None
            if name in names:
                raise ConfetiError(f"images {names[name]} and {path} would both be written as {name}; "
                                   f"segment them in separate runs (or --out folders)")
            names[name] = path
            found.append((path, name))
    return found


def predict_images(model, images, cfg, out_dir, device="cpu", mode=None, progress=True, autocast_dtype=None):
    """Segment `images` ([(path, output name)] from `collect_images`) and write, under `out_dir`,
    `overlay/<name>` (colour prediction over the image) and `labelIds/<name>` (8-bit labelIds).
    Returns {'images': count, 'overlay': folder, 'labelIds': folder}."""
    import torch
    from tqdm import tqdm

    from .data.io import read_rgb
    from .data.labels import train_ids_to_label_ids
    from .evaluation import eval_mode, overlay_image, predict_logits, resolve_mode, write_png

    out_dir = Path(out_dir)
    folders = {"overlay": out_dir / "overlay", "labelIds": out_dir / "labelIds"}
    with eval_mode(model):
        for path, name in tqdm(images, desc=f"predict ({resolve_mode(cfg, mode)})",
                               unit="img", disable=not progress, dynamic_ncols=True):
            image = read_rgb(path)
            logits = predict_logits(model, image, cfg, device, mode, autocast_dtype=autocast_dtype)
            pred = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
            write_png(overlay_image(image, pred), folders["overlay"] / name)
            write_png(train_ids_to_label_ids(pred), folders["labelIds"] / name)
    return {"images": len(images), **folders}


def run(cfg, checkpoint, paths, out_dir, teacher=False, mode=None, device=None, progress=True):
    """The command: check the inputs, load the weights, segment, print where the outputs are."""
    from .evaluation import EVAL_MODES, describe_protocol
    from .runtime import resolve_device

    images = collect_images(paths)  # bad inputs fail before the model loads
    if mode is not None and mode not in EVAL_MODES:
        raise ConfetiError(f"--mode must be one of {EVAL_MODES}, got {mode!r}")
    device = str(resolve_device(device))
    model, ckpt = load_model(cfg, checkpoint, teacher, device)
    iteration = ckpt.get("iteration")
    at = f" at iteration {iteration}" if isinstance(iteration, int) else ""
    weights = f"{'teacher' if teacher else 'student'} of {checkpoint}" if checkpoint else "a randomly initialised model"
    print(f"{weights}{at}: {len(images)} image(s) on {device}; "
          f"protocol: {describe_protocol(cfg, mode)}", flush=True)
    written = predict_images(model, images, cfg, out_dir, device, mode, progress)
    print(f"predictions: {written['images']} colour overlays in {written['overlay']}, "
          f"labelId PNGs in {written['labelIds']}", flush=True)
    return written


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m confeti_fast.predict",
        description="Segment images of any size with a CONFETI checkpoint (colour overlays and labelId PNGs).")
    parser.add_argument("config", help="resolved config file (work_dir/config.py) or a preset name")
    parser.add_argument("checkpoint", help="checkpoint file written by training (or an authors' mmseg one)")
    parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    add_inference_arguments(parser)
    return parser.parse_args(argv)


def add_inference_arguments(parser, images=True):
    """The options predict.py shares with test.py (`images`: predict.py's --out too)."""
    from .config import EVAL_MODES  # the config package imports no torch: --help stays quick

    if images:
        parser.add_argument("--out", type=Path, default=Path("predictions"),
                            help="output folder (default: predictions): overlay/ and labelIds/")
    parser.add_argument("--teacher", action="store_true", help="the EMA teacher instead of the student")
    parser.add_argument("--mode", choices=EVAL_MODES, default=None,
                        help="inference mode (default: the config's evaluation.mode)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--eval-scale", nargs="+", default=None, metavar="N",
                        help="W H: the inference scale (width height, keep ratio), e.g. 1280 640; "
                             "or 'full': the full resolution (default: the config's evaluation.scale)")
    parser.add_argument("--cfg-options", nargs="+", default=None, metavar="KEY=VALUE",
                        help="override config values (Python literals, else strings), e.g. "
                             "evaluation.slide_stride=[320,320]; checked like a config file")


def load_inference_config(config, cfg_options=None, eval_scale=None):
    """The config for inference: `config` with --cfg-options applied (checked like a file), then
    --eval-scale."""
    from .config import eval_scale_override, load_config, merge, parse_cfg_options

    cfg = load_config(config, parse_cfg_options(cfg_options), "--cfg-options")
    scale = eval_scale_override(eval_scale)
    return merge(cfg, scale) if scale else cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = load_inference_config(args.config, args.cfg_options, args.eval_scale)
    return run(cfg, args.checkpoint, args.images, args.out, teacher=args.teacher, mode=args.mode,
               device=args.device, progress=not args.no_progress)


if __name__ == "__main__":
    from .errors import run_cli

    run_cli(main)
