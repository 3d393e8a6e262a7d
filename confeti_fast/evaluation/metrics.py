"""Metrics of one confusion matrix summed over a split (docs/method.md §7).

Rows are ground truth, columns prediction, ignore label 255 skipped; IoU per class is
TP / (TP + FP + FN) with NaN where a class is absent from both ground truth and prediction,
and the mean skips the NaNs. This is what the official `cityscapesscripts` evaluator computes
on labelIds (see `tests/test_cityscapes_agreement.py`). `summary` returns fractions in [0, 1].

`eval_class_sets` names the metrics of each `eval_classes` setting; `METRIC_NAMES` and
`metric_names` are derived from it, so the table, the log, the best checkpoint and the curves
all read the one list.
"""
import numpy as np
import torch

from ..config import EVAL_CLASS_SETS
from ..data.labels import CLASSES, IGNORE_INDEX, NUM_CLASSES, SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES
from ..errors import ConfetiError


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


# Every metric a result can carry, in the order tables and logs list them (main metrics first).
METRIC_NAMES = tuple(name for setting in EVAL_CLASS_SETS for name in eval_class_sets(setting))


def metric_names(result):
    """The metric names (of METRIC_NAMES) that `result` (a summary, or a log's series) holds, in order."""
    return [name for name in METRIC_NAMES if name in result]
