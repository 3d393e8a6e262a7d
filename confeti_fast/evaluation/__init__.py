"""Evaluation on the target's val split (docs/method.md §7), one module per part:

- `metrics`: the confusion matrix, IoU/accuracy, the metric sets and their names;
- `inference`: the evaluation mode, whole-image and sliding-window inference, `predict_logits`;
- `report`: the protocol in words and the printed table;
- `outputs`: prediction pictures and the PNGs the Cityscapes scripts read;
- `loop`: `evaluate`, the loop over a split.

The names below are re-exported so `from confeti_fast.evaluation import ...` keeps working.
"""
from ..config import EVAL_MODES
from .inference import eval_mode, infer_slide, infer_whole, predict_logits, resolve_mode, slide_windows
from .loop import evaluate
from .metrics import (
    METRIC_NAMES, class_acc, class_iou, confusion_matrix, eval_class_sets, mean_iou, metric_names, summary,
)
from .outputs import overlay_image, show_image, write_png
from .report import describe_protocol, format_table

__all__ = [
    "EVAL_MODES", "METRIC_NAMES", "class_acc", "class_iou", "confusion_matrix", "describe_protocol",
    "eval_class_sets", "eval_mode", "evaluate", "format_table", "infer_slide", "infer_whole", "mean_iou",
    "metric_names", "overlay_image", "predict_logits", "resolve_mode", "show_image", "slide_windows", "summary",
    "write_png",
]
