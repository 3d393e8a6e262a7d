"""Inference by the authors' protocol, from an RGB image to logits at its own size.

It follows mmseg's `EncoderDecoder`, which the authors used: the image is resized to the
evaluation scale (keep ratio; `evaluation.scale` None keeps the full resolution, the authors'
protocol), the logits are upsampled bilinearly (align_corners False) to the network input
size, then to the label's full resolution. Sliding-window inference averages the window
logits over the pixels that several windows cover. `predict_logits` is that one path:
`evaluate` and `predict.py` both use it.
"""
import contextlib

import torch
import torch.nn.functional as F

from ..config import EVAL_MODES
from ..errors import ConfetiError


def resolve_mode(cfg, mode=None):
    """The inference mode: `mode` when given, else the config's `evaluation.mode` ('whole' when
    unset); ConfetiError unless it is one of EVAL_MODES."""
    mode = mode or cfg["evaluation"].get("mode", "whole")
    if mode not in EVAL_MODES:
        raise ConfetiError(f"evaluation mode must be one of {EVAL_MODES}, got {mode!r}")
    return mode


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
    from ..data.transforms import resize, to_input

    ev = cfg["evaluation"]
    mode = resolve_mode(cfg, mode)
    num_classes = int(cfg["num_classes"])
    out_size = tuple(out_size) if out_size is not None else tuple(image.shape[:2])
    if ev.get("scale") is not None:
        image, _ = resize(image, None, ev["scale"])
    tensor = to_input(image, cfg["pipeline"]["mean"], cfg["pipeline"]["std"]).unsqueeze(0).to(device)
    if mode == "whole":
        logits = infer_whole(model, tensor, out_size, autocast_dtype)
    else:
        logits = infer_slide(model, tensor, ev["slide_crop"], ev["slide_stride"], num_classes, out_size,
                             autocast_dtype)
    if logits.shape[1] != num_classes:
        raise ConfetiError(f"model gives {logits.shape[1]} classes, the config says {num_classes}")
    return logits
