"""Metrics, inference and the evaluation loop of confeti_fast.evaluation (docs/method.md §7)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from confeti_fast.data.labels import CLASSES, CITYSCAPES_LABEL_IDS, SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES
from confeti_fast.errors import ConfetiError
from confeti_fast.evaluation import (
    class_iou, confusion_matrix, evaluate, format_table, infer_slide, infer_whole, mean_iou,
    slide_windows, summary,
)


# ---------------------------------------------------------------- confusion matrix / IoU

def test_confusion_matrix_hand_case():
    label = np.array([[0, 0, 1, 255],
                      [1, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 3],
                     [1, 2, 0, 0]])
    cm = confusion_matrix(pred, label, num_classes=4)
    expected = np.array([[1, 1, 0, 0],
                         [0, 2, 0, 0],
                         [1, 0, 1, 0],
                         [0, 0, 0, 0]])
    assert cm.dtype == np.int64 and cm.shape == (4, 4)
    np.testing.assert_array_equal(cm, expected)
    # torch input gives the same
    np.testing.assert_array_equal(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), 4), expected)


def test_class_iou_hand_computed():
    # K = 4: class 0 and 1 normal, class 2 only predicted (never in gt), class 3 absent.
    cm = np.array([[3, 1, 1, 0],   # gt 0: 3 right, 1 -> class 1, 1 -> class 2
                   [0, 2, 0, 0],   # gt 1: 2 right
                   [0, 0, 0, 0],   # gt 2: never present
                   [0, 0, 0, 0]])  # gt 3: never present nor predicted
    iou = class_iou(cm)
    assert iou[0] == pytest.approx(3 / 5)        # tp 3, fn 2, fp 0
    assert iou[1] == pytest.approx(2 / 3)        # tp 2, fp 1
    assert iou[2] == 0.0                         # only predicted: IoU 0, counted
    assert math.isnan(iou[3])                    # absent everywhere: NaN, not counted
    assert mean_iou(iou) == pytest.approx((3 / 5 + 2 / 3 + 0) / 3)
    assert mean_iou(iou, [0, 1]) == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert math.isnan(mean_iou(iou, [3]))


def test_all_ignored_label_gives_zero_matrix():
    label = np.full((5, 7), 255, np.uint8)
    pred = np.random.default_rng(0).integers(0, 19, (5, 7))
    cm = confusion_matrix(pred, label)
    assert cm.shape == (19, 19) and cm.sum() == 0
    res = summary(cm)
    assert math.isnan(res["mIoU"]) and math.isnan(res["aAcc"])
    assert np.isnan(res["IoU"]).all()
    format_table(res)  # NaN-safe


def test_confusion_matrix_matches_naive_loop():
    rng = np.random.default_rng(1)
    for trial in range(5):
        k = int(rng.integers(2, 8))
        shape = (int(rng.integers(1, 9)), int(rng.integers(1, 9)))
        label = rng.integers(0, k, shape).astype(np.uint8)
        label[rng.random(shape) < 0.3] = 255
        pred = rng.integers(0, k, shape)
        naive = np.zeros((k, k), np.int64)
        for g, p in zip(label.ravel(), pred.ravel()):
            if g != 255:
                naive[g, p] += 1
        np.testing.assert_array_equal(confusion_matrix(pred, label, k), naive)


def test_confusion_matrix_rejects_bad_values():
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros((1, 2), int), np.array([[0, 19]]))
    with pytest.raises(ValueError):
        confusion_matrix(np.array([[0, 255]]), np.array([[0, 1]]))
    # an invalid prediction on an ignored pixel does not matter
    assert confusion_matrix(np.array([[0, 255]]), np.array([[0, 255]])).sum() == 1


def test_summary_all_classes():
    cm = np.zeros((19, 19), np.int64)
    cm[0, 0], cm[0, 1], cm[1, 1], cm[13, 13] = 6, 2, 4, 8
    res = summary(cm, "all")
    assert res["main_metric"] == "mIoU"
    assert "mIoU16" not in res
    iou0, iou1, iou13 = 6 / 8, 4 / 6, 1.0
    assert res["mIoU"] == pytest.approx((iou0 + iou1 + iou13) / 3)
    assert res["aAcc"] == pytest.approx(18 / 20)
    assert res["Acc"][0] == pytest.approx(6 / 8)
    assert math.isnan(res["Acc"][5])


def test_summary_synthia_subsets():
    cm = np.zeros((19, 19), np.int64)
    # road perfect; wall (3, in 16 not 13) half right; terrain (9, not in 16) perfect;
    # car (13) confused with truck (14, not in 16): car IoU 1/2, truck IoU 0.
    cm[0, 0] = 10
    cm[3, 3], cm[3, 0] = 5, 5
    cm[9, 9] = 100
    cm[13, 13], cm[13, 14] = 4, 4
    res = summary(cm, "synthia16")
    iou_road = 10 / 15      # fp 5 from wall
    iou_wall = 5 / 10
    iou_car = 4 / 8
    assert res["main_metric"] == "mIoU16" and "mIoU" not in res
    assert res["mIoU16"] == pytest.approx((iou_road + iou_wall + iou_car) / 3)
    assert res["mIoU13"] == pytest.approx((iou_road + iou_car) / 2)
    assert res["IoU"][9] == 1.0  # per-class IoU still reported
    assert set(res["classes"]) == set(SYNTHIA_16_CLASSES)
    assert set(SYNTHIA_13_CLASSES) < set(SYNTHIA_16_CLASSES)
    table = format_table(res)
    terrain_line = next(line for line in table.splitlines() if line.startswith("terrain"))
    assert terrain_line.split()[1:] == ["-", "-"]
    assert f"mIoU16: {100 * res['mIoU16']:.2f}" in table
    assert f"mIoU13: {100 * res['mIoU13']:.2f}" in table


def test_format_table_lists_classes_and_miou():
    cm = np.diag(np.arange(1, 20)).astype(np.int64)
    cm[0, 1] = 3
    res = summary(cm)
    table = format_table(res)
    for name in CLASSES:
        assert name in table
    assert f"mIoU: {100 * res['mIoU']:.2f}" in table
    assert "aAcc" in table


# ---------------------------------------------------------------- inference

class PointwiseModel(nn.Module):
    """A translation-equivariant stand-in: a 1x1 conv at stride 1."""

    def __init__(self, num_classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return self.conv(x)


class Stride8Model(nn.Module):
    """Logits at stride 8, like DeepLabV2."""

    def __init__(self, num_classes=19):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 8, stride=8)
        self.bn = nn.BatchNorm2d(num_classes)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("size,crop,stride", [((37, 53), (16, 20), (11, 13)), ((20, 20), (32, 32), (8, 8)),
                                              ((33, 47), (33, 10), (33, 7))])
def test_slide_windows_cover_every_pixel(size, crop, stride):
    h, w = size
    count = np.zeros(size, int)
    windows = slide_windows(h, w, crop, stride)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert y2 - y1 == min(crop[0], h) and x2 - x1 == min(crop[1], w)
        count[y1:y2, x1:x2] += 1
    assert (count > 0).all()
    # the last window ends at the border
    assert max(win[1] for win in windows) == h and max(win[3] for win in windows) == w


def test_slide_windows_mmseg_grid():
    # 640x1280 with 640 crops and stride 426 (the default config): 1 x 3 windows
    assert slide_windows(640, 1280, (640, 640), (426, 426)) == [
        (0, 640, 0, 640), (0, 640, 426, 1066), (0, 640, 640, 1280)]


def test_slide_equals_whole_for_pointwise_model():
    model = PointwiseModel(5)
    image = torch.randn(1, 3, 37, 53)
    out_size = (50, 70)
    whole = infer_whole(model, image, out_size)
    slide = infer_slide(model, image, (16, 20), (11, 13), 5, out_size)
    assert whole.shape == slide.shape == (1, 5, 50, 70)
    assert whole.dtype == torch.float32
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)


def test_inference_restores_training_mode_and_upsamples():
    model = Stride8Model(19).train()
    image = torch.randn(1, 3, 64, 96)
    out = infer_whole(model, image, (100, 150))
    assert out.shape == (1, 19, 100, 150) and model.training
    assert not out.requires_grad
    out = infer_slide(model, image, (32, 48), (24, 40), 19, (100, 150))
    assert out.shape == (1, 19, 100, 150) and model.training
    assert torch.isfinite(out).all()


def test_infer_whole_autocast_gives_float32():
    model = PointwiseModel(3)
    out = infer_whole(model, torch.randn(1, 3, 8, 8), (8, 8), autocast_dtype=torch.bfloat16)
    assert out.dtype == torch.float32


# ---------------------------------------------------------------- evaluation loop

def _read(path):
    with Image.open(path) as img:
        img.load()
        return img.mode, img.size, np.asarray(img)


def _cityscapes_val(root, n=2, size=(40, 24)):
    """A tiny Cityscapes val folder: random images, blob labels (labelIds)."""
    rng = np.random.default_rng(3)
    w, h = size
    for i in range(n):
        city = "aachen" if i % 2 == 0 else "bonn"
        stem = f"{city}_{i:06d}_000019"
        img_dir = root / "leftImg8bit" / "val" / city
        gt_dir = root / "gtFine" / "val" / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / f"{stem}_leftImg8bit.png")
        label = np.full((h, w), CITYSCAPES_LABEL_IDS[0], np.uint8)
        label[: h // 2, : w // 2] = CITYSCAPES_LABEL_IDS[13]
        label[h // 2:, w // 2:] = 0  # unlabeled -> ignored
        Image.fromarray(label).save(gt_dir / f"{stem}_gtFine_labelIds.png")
    return root


def _cfg(root, mode="whole"):
    return {
        "num_classes": 19, "eval_classes": "all", "target": {"type": "cityscapes", "root": str(root)},
        "pipeline": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
        "evaluation": {"mode": mode, "scale": [32, 16], "slide_crop": [16, 16], "slide_stride": [8, 12]},
    }


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_evaluate_writes_outputs(tmp_path, mode):
    from confeti_fast.data.datasets import build_dataset

    root = _cityscapes_val(tmp_path / "cs")
    cfg = _cfg(root, mode)
    dataset = build_dataset(cfg["target"], "val")
    model = Stride8Model(19)
    res = evaluate(model, dataset, cfg, progress=False, show_dir=tmp_path / "show",
                   label_id_dir=tmp_path / "ids", train_id_dir=tmp_path / "train_ids")
    assert res["num_images"] == 2 and res["mode"] == mode
    cm = res["confusion_matrix"]
    assert cm.sum() == 2 * (40 * 24 - 20 * 12)  # ignored quarter skipped
    assert 0.0 <= res["mIoU"] <= 1.0
    mode_, size, ids = _read(tmp_path / "ids" / "aachen" / "aachen_000000_000019_leftImg8bit.png")
    assert mode_ == "L" and size == (40, 24)
    assert set(np.unique(ids)) <= set(CITYSCAPES_LABEL_IDS)
    train = _read(tmp_path / "train_ids" / "bonn" / "bonn_000001_000019_leftImg8bit.png")[2]
    assert train.max() < 19
    # the trainId and labelId maps describe the same prediction
    ids_b = _read(tmp_path / "ids" / "bonn" / "bonn_000001_000019_leftImg8bit.png")[2]
    np.testing.assert_array_equal(np.array(CITYSCAPES_LABEL_IDS, np.uint8)[train], ids_b)
    mode_, size, _ = _read(tmp_path / "show" / "aachen" / "aachen_000000_000019_leftImg8bit.png")
    assert mode_ == "RGB" and size == (3 * 40, 24)
    # the confusion matrix matches the written predictions
    from confeti_fast.data.labels import cityscapes_to_train_ids
    total = np.zeros((19, 19), np.int64)
    for i in range(2):
        stem = dataset.samples[i][0]
        city = "aachen" if i % 2 == 0 else "bonn"
        pred = _read(tmp_path / "train_ids" / city / (stem.rsplit("/", 1)[1]))[2]
        gt = cityscapes_to_train_ids(_read(dataset.samples[i][1])[2])
        total += confusion_matrix(pred, gt)
    np.testing.assert_array_equal(total, cm)
    assert model.training  # restored


def test_evaluate_max_images_and_bad_dirs(tmp_path):
    from confeti_fast.data.datasets import build_dataset

    root = _cityscapes_val(tmp_path / "cs", n=3)
    cfg = _cfg(root)
    dataset = build_dataset(cfg["target"], "val")
    res = evaluate(Stride8Model(19), dataset, cfg, progress=False, max_images=1)
    assert res["num_images"] == 1 and res["pixels"] == 40 * 24 - 20 * 12
    with pytest.raises(ConfetiError, match="separate folders"):
        evaluate(Stride8Model(19), dataset, cfg, progress=False, label_id_dir=tmp_path / "out",
                 show_dir=tmp_path / "out" / "show")
    with pytest.raises(ConfetiError, match="mode"):
        evaluate(Stride8Model(19), dataset, cfg, progress=False, mode="tiles")
