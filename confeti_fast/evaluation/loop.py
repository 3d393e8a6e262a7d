"""The evaluation loop over a split: one confusion matrix, optional PNGs, the result."""
import warnings
from pathlib import Path

import numpy as np
import torch

from ..data.labels import train_ids_to_label_ids
from .inference import eval_mode, predict_logits, resolve_mode
from .metrics import class_iou, confusion_matrix, eval_class_sets, mean_iou, summary
from .outputs import _check_output_dirs, _output_name, show_image, write_png
from .report import _pct, describe_protocol


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
    mode = resolve_mode(cfg, mode)
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
