"""Evaluation on the target's val split (docs/method.md §7): confusion matrix, IoU table, inference.

One confusion matrix is summed over the whole split (rows = ground truth, columns =
prediction, ignore label 255 skipped); IoU per class is TP / (TP + FP + FN) with NaN where a
class is absent from both ground truth and prediction, and the mean skips the NaNs. This is
what the official `cityscapesscripts` evaluator computes on labelIds (see
`tests/test_cityscapes_agreement.py`).

Inference follows mmseg's `EncoderDecoder`, which the authors used: the image is resized to
the evaluation scale (keep ratio; `evaluation.scale` None keeps the full resolution, the
authors' protocol), the logits are upsampled bilinearly (align_corners False) to the network
input size, then to the label's full resolution. Sliding-window inference averages the
window logits over the pixels that several windows cover. `predict_logits` is that one
path, from an RGB image to logits at its own size: `evaluate` and `predict.py` both use it.

`summary` returns fractions in [0, 1]; `format_table` prints percentages, under the line
`describe_protocol` gives when the result carries one.
"""
import contextlib
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfetiError
from .data.labels import (
    CLASSES, IGNORE_INDEX, NUM_CLASSES, SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES, colorize,
    train_ids_to_label_ids,
)

EVAL_MODES = ("whole", "slide")


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------

def _to_numpy(array):
    if torch.is_tensor(array):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def confusion_matrix(pred, label, num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX):
    """(K, K) int64 confusion matrix: rows = ground truth, columns = prediction.

    `pred` and `label` are same-shaped integer arrays (numpy or torch). Pixels whose label
    is `ignore_index` are skipped. Any other value outside 0..K-1, in the label or in the
    prediction at an evaluated pixel, raises ValueError: a (K, K) matrix cannot count a
    prediction that is no class, and a model's argmax never produces one.
    """
    pred, label = _to_numpy(pred), _to_numpy(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    label = label.reshape(-1)
    pred = pred.reshape(-1)
    keep = label != ignore_index
    gt = label[keep].astype(np.int64)
    pr = pred[keep].astype(np.int64)
    k = int(num_classes)
    if gt.size:
        if gt.min() < 0 or gt.max() >= k:
            bad = gt[(gt < 0) | (gt >= k)][0]
            raise ValueError(f"label holds value {bad}, outside 0..{k - 1} and not the ignore index {ignore_index}")
        if pr.min() < 0 or pr.max() >= k:
            bad = pr[(pr < 0) | (pr >= k)][0]
            raise ValueError(f"prediction holds value {bad} at an evaluated pixel, outside 0..{k - 1}")
    return np.bincount(gt * k + pr, minlength=k * k).reshape(k, k).astype(np.int64)


def class_iou(cm):
    """Per-class IoU = TP / (TP + FP + FN) as float64; NaN where the union is 0."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def class_acc(cm):
    """Per-class accuracy (recall) = TP / ground-truth pixels; NaN where the class is absent."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, np.diag(cm) / np.where(total > 0, total, 1), np.nan)


def mean_iou(iou, classes=None):
    """Mean of `iou` over `classes` (all by default), skipping NaN; NaN when none is valid."""
    iou = np.asarray(iou, dtype=np.float64)
    if classes is not None:
        iou = iou[list(classes)]
    valid = iou[~np.isnan(iou)]
    return float(valid.mean()) if valid.size else float("nan")


def eval_class_sets(eval_classes, num_classes=NUM_CLASSES):
    """{metric name: class subset} for a config's `eval_classes` ('all' or 'synthia16')."""
    if eval_classes == "all":
        return {"mIoU": tuple(range(num_classes))}
    if eval_classes == "synthia16":
        if num_classes != NUM_CLASSES:
            raise ConfetiError(f"eval_classes 'synthia16' needs the 19 Cityscapes classes, not {num_classes}")
        return {"mIoU16": SYNTHIA_16_CLASSES, "mIoU13": SYNTHIA_13_CLASSES}
    raise ConfetiError(f"eval_classes must be 'all' or 'synthia16', got {eval_classes!r}")


def summary(cm, eval_classes="all"):
    """Metrics of a confusion matrix.

    Keys: 'mIoU' (eval_classes 'all') or 'mIoU16' and 'mIoU13' ('synthia16': means over
    SYNTHIA_16_CLASSES / SYNTHIA_13_CLASSES only); 'main_metric' (the name of the first of
    those); 'aAcc' (correct / evaluated pixels, all classes); 'IoU' and 'Acc' (per-class
    float64 arrays, NaN where undefined); 'classes' (the evaluated class indices);
    'class_names'; 'confusion_matrix'; 'pixels'. All values are fractions.
    """
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    k = cm.shape[0]
    sets = eval_class_sets(eval_classes, k)
    iou = class_iou(cm)
    acc = class_acc(cm)
    total = int(cm.sum())
    result = {name: mean_iou(iou, classes) for name, classes in sets.items()}
    result.update(
        main_metric=next(iter(sets)),
        aAcc=float(np.trace(cm) / total) if total else float("nan"),
        IoU=iou,
        Acc=acc,
        classes=tuple(sets[next(iter(sets))]),
        class_names=tuple(CLASSES) if k == NUM_CLASSES else tuple(f"class{i}" for i in range(k)),
        eval_classes=eval_classes,
        confusion_matrix=cm,
        pixels=total,
    )
    return result


def _pct(value):
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def describe_protocol(cfg, mode=None, weights=None):
    """The evaluation protocol in words, e.g. 'whole image at full resolution, student,
    mIoU over 19 classes': mode, scale, the evaluated weights (when given) and the classes."""
    ev = cfg["evaluation"]
    mode = mode or ev.get("mode", "whole")
    scale = ev.get("scale")
    at = "full resolution" if scale is None else f"{int(scale[0])}x{int(scale[1])} (keep ratio)"
    if mode == "slide":
        (ch, cw), (sh, sw) = ev["slide_crop"], ev["slide_stride"]
        how = f"sliding {ch}x{cw} windows (stride {sh}x{sw}) at {at}"
    else:
        how = f"whole image at {at}"
    sets = eval_class_sets(cfg["eval_classes"], int(cfg["num_classes"]))
    classes = ", ".join(f"{name} over {len(members)} classes" for name, members in sets.items())
    return ", ".join([how] + ([weights] if weights else []) + [classes])


def format_table(result):
    """A text table: class, IoU %, Acc % (classes not evaluated: '-'; undefined: 'n/a'),
    then the mean(s) and aAcc; first the protocol line when `result` has 'protocol'."""
    names = result["class_names"]
    evaluated = set(result["classes"])
    width = max(12, max(len(n) for n in names))
    rule = "-" * (width + 18)
    lines = [f"protocol: {result['protocol']}"] if result.get("protocol") else []
    lines += [f"{'class':<{width}} {'IoU':>8} {'Acc':>8}", rule]
    for i, name in enumerate(names):
        if i in evaluated:
            lines.append(f"{name:<{width}} {_pct(result['IoU'][i]):>8} {_pct(result['Acc'][i]):>8}")
        else:
            lines.append(f"{name:<{width}} {'-':>8} {'-':>8}")
    lines.append(rule)
    metrics = [m for m in ("mIoU", "mIoU16", "mIoU13") if m in result]
    lines.append("  ".join(f"{m}: {_pct(result[m])}" for m in metrics + ["aAcc"]))
    if "num_images" in result:
        lines[-1] += f"  ({result['num_images']} images)"
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------

@contextlib.contextmanager
def eval_mode(model):
    """Put `model` in eval mode and under no_grad; restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _autocast(device_type, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def _upsample(logits, size):
    size = tuple(int(s) for s in size)
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _forward(model, image, autocast_dtype):
    """Logits of the model at the input size (float32), like mmseg's encode_decode."""
    # Under CUDA graphs (compile mode reduce-overhead) each forward is its own step: the
    # previous forward's outputs, or the last training step's, are never read after this.
    torch.compiler.cudagraph_mark_step_begin()
    with _autocast(image.device.type, autocast_dtype):
        logits = model(image)
    return _upsample(logits.float(), image.shape[-2:])


def infer_whole(model, image, out_size, autocast_dtype=None):
    """Logits (1, K, H, W) float32 at `out_size` (H, W) for one normalized image (1, 3, h, w)."""
    with eval_mode(model):
        return _upsample(_forward(model, image, autocast_dtype), out_size)


def slide_windows(height, width, crop_size, stride):
    """The (y1, y2, x1, x2) windows of mmseg's slide inference over a height x width image.

    Windows start every `stride` (h, w); the last one in each direction is shifted back to
    end at the border; a crop larger than the image is clipped to it.
    """
    crop_h, crop_w = (int(v) for v in crop_size)
    stride_h, stride_w = (int(v) for v in stride)
    if min(crop_h, crop_w, stride_h, stride_w) <= 0:
        raise ConfetiError(f"slide inference needs positive crop and stride, got crop {crop_size}, stride {stride}")
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2 = min(r * stride_h + crop_h, height)
            x2 = min(c * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def infer_slide(model, image, crop_size, stride, num_classes, out_size, autocast_dtype=None):
    """Sliding-window logits (1, K, H, W) float32 at `out_size` for one image (1, 3, h, w).

    `crop_size` and `stride` are (h, w). Each window's logits are upsampled to the window
    size, summed into the image, divided by the per-pixel window count, then upsampled.
    """
    batch, _, height, width = image.shape
    windows = slide_windows(height, width, crop_size, stride)
    logits = image.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = image.new_zeros((1, 1, height, width), dtype=torch.float32)
    with eval_mode(model):
        for y1, y2, x1, x2 in windows:
            window = _forward(model, image[:, :, y1:y2, x1:x2], autocast_dtype)
            if window.shape[1] != num_classes:
                raise ConfetiError(f"model gives {window.shape[1]} classes, the config says {num_classes}")
            logits[:, :, y1:y2, x1:x2] += window
            count[:, :, y1:y2, x1:x2] += 1
        assert bool((count > 0).all()), "sliding windows left pixels uncovered"
        return _upsample(logits / count, out_size)


def predict_logits(model, image, cfg, device="cpu", mode=None, out_size=None, autocast_dtype=None):
    """Logits (1, K, H, W) float32 of `model` for one (H, W, 3) uint8 RGB image of any size,
    by the config's protocol: normalized with `pipeline.mean/std`, resized to fit
    `evaluation.scale` (None: kept at full resolution), whole-image or sliding-window inference
    (`mode`, default `evaluation.mode`), logits upsampled to `out_size` (default the image's)."""
    from .data.transforms import normalize, resize

    ev = cfg["evaluation"]
    mode = mode or ev.get("mode", "whole")
    if mode not in EVAL_MODES:
        raise ConfetiError(f"evaluation mode must be one of {EVAL_MODES}, got {mode!r}")
    num_classes = int(cfg["num_classes"])
    out_size = tuple(out_size) if out_size is not None else tuple(image.shape[:2])
    if ev.get("scale") is not None:
        image, _ = resize(image, None, ev["scale"])
    tensor = normalize(image, cfg["pipeline"]["mean"], cfg["pipeline"]["std"]).unsqueeze(0).to(device)
    if mode == "whole":
        logits = infer_whole(model, tensor, out_size, autocast_dtype)
    else:
        logits = infer_slide(model, tensor, ev["slide_crop"], ev["slide_stride"], num_classes, out_size,
                             autocast_dtype)
    if logits.shape[1] != num_classes:
        raise ConfetiError(f"model gives {logits.shape[1]} classes, the config says {num_classes}")
    return logits


def overlay_image(image, pred):
    """The prediction in the Cityscapes palette blended half and half over the image."""
    return (0.5 * image.astype(np.float32) + 0.5 * colorize(pred).astype(np.float32)).round().astype(np.uint8)


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------

def _output_name(dataset, index):
    """(sub folder, file name) of sample `index`: Cityscapes keeps its city folders and the
    image's name (`<city>_<seq>_<frame>_leftImg8bit.png`)."""
    image_path = Path(dataset.samples[index][0])
    name = image_path.stem + ".png"
    sub = image_path.parent.name if getattr(dataset, "kind", None) == "cityscapes" else ""
    return sub, name


def write_png(array, path):
    """Save a uint8 (H, W) array as an 8-bit grey ('L') PNG, or (H, W, 3) as RGB."""
    from PIL import Image

    array = np.ascontiguousarray(array, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def show_image(image, pred, label):
    """Side by side: the image, the prediction blended over it, the coloured ground truth."""
    return np.concatenate([image, overlay_image(image, pred), colorize(label)], axis=1)


def _is_within(path, folder):
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _check_output_dirs(show_dir, label_id_dir, train_id_dir):
    """The official evaluator matches `<city>_<seq>_<frame>*.png` anywhere under its results
    folder, so nothing else may be written inside the labelId folder."""
    if label_id_dir is None:
        return
    label_id_dir = Path(label_id_dir)
    for other, flag in ((show_dir, "--show-dir"), (train_id_dir, "--train-id-dir")):
        if other is not None and (_is_within(Path(other), label_id_dir) or _is_within(label_id_dir, Path(other))):
            raise ConfetiError(
                f"{flag} {other} and --label-id-dir {label_id_dir} must be separate folders: the "
                f"Cityscapes evaluator would find two predictions per image")


# --------------------------------------------------------------------------------------
# The evaluation loop
# --------------------------------------------------------------------------------------

def evaluate(model, dataset, cfg, device="cpu", mode=None, progress=True, show_dir=None,
             label_id_dir=None, max_images=None, train_id_dir=None, autocast_dtype=None, shard=(0, 1), reduce=None):
    """Evaluate `model` on `dataset` (a SegDataset split) with the settings of `cfg`.

    Returns `summary(cm, cfg['eval_classes'])` of one confusion matrix over the split, plus
    'num_images' and 'mode'. `show_dir` gets side-by-side PNGs (image, prediction overlay,
    ground truth); `label_id_dir` / `train_id_dir` get 8-bit labelId / trainId PNGs named
    `<city>/<city>_<seq>_<frame>_leftImg8bit.png`, the layout the Cityscapes scripts and test
    server read. The model's training flag is restored afterwards.

    Multi-GPU: `shard` (rank, world size) evaluates every world-size-th image from `rank`, and
    `reduce(tensor)` sums the confusion matrix over ranks in place, so every rank gets the
    result of the whole split.
    """
    ev = cfg["evaluation"]
    mode = mode or ev.get("mode", "whole")
    if mode not in EVAL_MODES:
        raise ConfetiError(f"evaluation mode must be one of {EVAL_MODES}, got {mode!r}")
    num_classes = int(cfg["num_classes"])
    eval_class_sets(cfg["eval_classes"], num_classes)  # fail early on a bad setting
    _check_output_dirs(show_dir, label_id_dir, train_id_dir)
    count = len(dataset) if max_images is None else max(0, min(int(max_images), len(dataset)))

    device = torch.device(device)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    metric = next(iter(eval_class_sets(cfg["eval_classes"], num_classes)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count, desc=f"eval ({mode})", unit="img", dynamic_ncols=True)
    rank, world_size = shard
    with eval_mode(model):
        for index in range(rank, count, world_size):
            image, label = dataset.load(index)
            logits = predict_logits(model, image, cfg, device, mode, label.shape, autocast_dtype)
            pred = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
            cm += confusion_matrix(pred, label, num_classes)

            sub, name = _output_name(dataset, index)
            if show_dir is not None:
                write_png(show_image(image, pred, label), Path(show_dir) / sub / name)
            if label_id_dir is not None:
                write_png(train_ids_to_label_ids(pred), Path(label_id_dir) / sub / name)
            if train_id_dir is not None:
                write_png(pred, Path(train_id_dir) / sub / name)
            if bar is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    running = mean_iou(class_iou(cm), eval_class_sets(cfg["eval_classes"], num_classes)[metric])
                bar.set_postfix_str(f"{metric} {_pct(running)}")
                bar.update(1)
    if bar is not None:
        bar.close()
    if reduce is not None:
        total = torch.from_numpy(cm).to(device)
        reduce(total)
        cm = total.cpu().numpy()
    result = summary(cm, cfg["eval_classes"])
    result.update(num_images=count, mode=mode, scale=ev.get("scale"), protocol=describe_protocol(cfg, mode))
    return result
