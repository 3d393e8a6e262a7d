"""Our mIoU agrees with the official Cityscapes evaluator (cityscapesscripts).

A small val set of structured labelId maps is written in the gtFine layout, predictions are
derived from it with perturbations and written where the official script looks for them
(`<city>_<seq>_<frame>*.png` anywhere under its results folder), and both evaluators must
give the same per-class IoUs and class mean.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

pytest.importorskip(
    "cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling",
    reason="the official Cityscapes evaluator (pip package cityscapesscripts) is needed for this comparison",
)
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official  # noqa: E402
from cityscapesscripts.helpers.labels import id2label  # noqa: E402

from confeti_fast.data.labels import CITYSCAPES_LABEL_IDS, CLASSES, cityscapes_to_train_ids  # noqa: E402
from confeti_fast.evaluation import confusion_matrix, evaluate, summary  # noqa: E402

W, H = 64, 32
IGNORED_IDS = (0, 1, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)  # ignoreInEval labelIds
ABSENT = 16          # train (labelId 31): in no ground truth and no prediction
ONLY_PREDICTED = 14  # truck (labelId 27): predicted somewhere, never in ground truth
CITIES = ("frankfurt", "lindau", "munster")


def _save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path)


def _read(path):
    with Image.open(path) as img:
        return np.asarray(img).copy()


def _ground_truth(rng):
    """A labelId map of rectangles of several classes, ignored ids included."""
    present = [t for t in range(19) if t not in (ABSENT, ONLY_PREDICTED)]
    label = np.full((H, W), CITYSCAPES_LABEL_IDS[0], np.uint8)  # road background
    for _ in range(12):
        y, x = int(rng.integers(0, H - 4)), int(rng.integers(0, W - 4))
        h, w = int(rng.integers(3, 14)), int(rng.integers(3, 20))
        if rng.random() < 0.3:
            value = IGNORED_IDS[int(rng.integers(len(IGNORED_IDS)))]
        else:
            value = CITYSCAPES_LABEL_IDS[present[int(rng.integers(len(present)))]]
        label[y:y + h, x:x + w] = value
    label[:2] = 1   # ego vehicle rows
    label[-3:] = 0  # unlabeled rows
    return label


def _prediction(gt, rng):
    """The ground truth with class swaps: whole classes, rectangles and single pixels; any
    value (even an ignored id) where the ground truth is ignored."""
    valid_ids = np.array([i for t, i in enumerate(CITYSCAPES_LABEL_IDS) if t != ABSENT], np.uint8)
    pred = gt.copy()
    ignored = cityscapes_to_train_ids(gt) == 255
    pred[ignored] = rng.choice(np.array([0, 1, 7, 26, 21], np.uint8), size=int(ignored.sum()))
    present = [v for v in np.unique(gt) if cityscapes_to_train_ids(v) != 255]
    src = present[int(rng.integers(len(present)))]
    pred[gt == src] = valid_ids[int(rng.integers(len(valid_ids)))]
    for _ in range(4):
        y, x = int(rng.integers(0, H - 6)), int(rng.integers(0, W - 6))
        pred[y:y + 6, x:x + 9] = valid_ids[int(rng.integers(len(valid_ids)))]
    flips = rng.random(gt.shape) < 0.05
    pred[flips] = rng.choice(valid_ids, size=int(flips.sum()))
    pred[5:8, 5:9] = CITYSCAPES_LABEL_IDS[ONLY_PREDICTED]
    return pred


def _write_val_set(root, n=4, seed=0):
    rng = np.random.default_rng(seed)
    gts, images = [], []
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        stem = f"{city}_{i:06d}_{19 + i:06d}"
        gt_path = root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"
        _save(_ground_truth(rng), gt_path)
        image_path = root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"
        _save(rng.integers(0, 256, (H, W, 3)), image_path)
        gts.append(str(gt_path))
        images.append(str(image_path))
    return gts


def _official_args(results_dir, tmp_path):
    args = copy.copy(official.args)
    args.evalInstLevelScore = False  # no *_instanceIds.png needed
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.exportFile = str(tmp_path / "official.json")
    args.quiet = True
    args.colorized = False
    args.bold = args.nocol = ""
    args.predictionPath = str(results_dir)  # where getPrediction searches
    args.predictionWalk = None
    return args


def _official_scores(gts, results_dir, tmp_path):
    args = _official_args(results_dir, tmp_path)
    # the official matcher: <city>_<seq>_<frame>*.png anywhere under the results folder
    preds = [official.getPrediction(args, gt) for gt in gts]
    result = official.evaluateImgLists(preds, gts, args)
    per_class = np.array([result["classScores"][id2label[i].name] for i in CITYSCAPES_LABEL_IDS])
    return preds, per_class, result["averageScoreClasses"]


def _assert_agree(ours, per_class, mean):
    assert [id2label[i].name for i in CITYSCAPES_LABEL_IDS] == list(CLASSES)
    np.testing.assert_array_equal(np.isnan(ours["IoU"]), np.isnan(per_class))
    valid = ~np.isnan(per_class)
    np.testing.assert_allclose(ours["IoU"][valid], per_class[valid], rtol=0, atol=1e-6)
    assert math.isclose(ours["mIoU"], mean, rel_tol=0, abs_tol=1e-6)


def test_miou_agrees_with_official_evaluator(tmp_path):
    gts = _write_val_set(tmp_path / "cityscapes")
    rng = np.random.default_rng(1)
    results = tmp_path / "results"
    for gt_path in gts:
        gt = _read(gt_path)
        city = gt_path.split("/")[-2]
        name = gt_path.split("/")[-1].replace("_gtFine_labelIds.png", "_leftImg8bit.png")
        _save(_prediction(gt, rng), results / city / name)

    preds, per_class, mean = _official_scores(gts, results, tmp_path)

    cm = np.zeros((19, 19), np.int64)
    for pred_path, gt_path in zip(preds, gts):
        cm += confusion_matrix(cityscapes_to_train_ids(_read(pred_path)), cityscapes_to_train_ids(_read(gt_path)))
    ours = summary(cm, "all")
    _assert_agree(ours, per_class, mean)
    # the case is non-trivial: an absent class, a class only predicted, imperfect scores
    assert math.isnan(ours["IoU"][ABSENT]) and ours["IoU"][ONLY_PREDICTED] == 0.0
    assert 0.2 < ours["mIoU"] < 0.95


class _BlobModel(nn.Module):
    """A stand-in segmentor with stride-8 logits that vary over the image."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 19, 8, stride=8)

    def forward(self, x):
        return self.conv(x) * 20


def test_evaluate_label_id_output_agrees_with_official_evaluator(tmp_path):
    """evaluate()'s own labelId PNGs, read by the official script, give evaluate()'s mIoU."""
    from confeti_fast.data.datasets import build_dataset

    gts = _write_val_set(tmp_path / "cityscapes", seed=5)
    cfg = {
        "num_classes": 19, "eval_classes": "all",
        "target": {"type": "cityscapes", "root": str(tmp_path / "cityscapes")},
        "pipeline": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
        "evaluation": {"mode": "whole", "scale": [48, 24], "slide_crop": [16, 16], "slide_stride": [8, 8]},
    }
    dataset = build_dataset(cfg["target"], "val")
    results = tmp_path / "label_ids"
    ours = evaluate(_BlobModel(), dataset, cfg, progress=False, label_id_dir=results,
                    train_id_dir=tmp_path / "train_ids", show_dir=tmp_path / "show")
    preds, per_class, mean = _official_scores(sorted(gts), results, tmp_path)
    assert all(p.startswith(str(results)) for p in preds)
    _assert_agree(ours, per_class, mean)
