import torch

from confeti_fast.config import load_config
from confeti_fast.data.loader import PairedSteps, paired_loader
from helpers import make_cityscapes, make_gta5


def tiny_config(tmp_path, rcs=True):
    make_gta5(tmp_path / "gta5", n=5, h=24, w=32)
    make_cityscapes(tmp_path / "cs", "train", h=24, w=32)
    return load_config("demo", {
        "source": {"root": str(tmp_path / "gta5"), "resize": [32, 24], "generate": None},
        "target": {"root": str(tmp_path / "cs"), "resize": [32, 16], "generate": None},
        "rcs": {"enabled": rcs, "min_pixels": 20},
        "stages": {"1": {"crop_size": [16, 16], "iters": 6}},
    })


def _assert_same(a, b):
    assert a["t"] == b["t"]
    for key in ("source_image", "source_label", "target_image"):
        assert torch.equal(a[key], b[key]), key


def test_batch_shapes(tmp_path):
    steps = PairedSteps(tiny_config(tmp_path), stage=1, progress=False)
    batch = steps[0]
    assert batch["source_image"].shape == (2, 3, 16, 16)
    assert batch["source_label"].shape == (2, 16, 16) and batch["source_label"].dtype == torch.int64
    assert batch["target_image"].shape == (2, 3, 16, 16)


def test_resume_position_gives_the_same_batches(tmp_path):
    for rcs in (True, False):
        steps = PairedSteps(tiny_config(tmp_path / str(rcs), rcs), stage=1, progress=False)
        straight = list(paired_loader(steps))
        resumed = list(paired_loader(PairedSteps(steps.cfg, stage=1, progress=False), start=4))
        assert len(straight) == 6 and len(resumed) == 2
        for a, b in zip(straight[4:], resumed):
            _assert_same(a, b)


def test_worker_processes_give_the_same_batches(tmp_path):
    steps = PairedSteps(tiny_config(tmp_path), stage=1, progress=False)
    for a, b in zip(paired_loader(steps), paired_loader(steps, workers=2)):
        _assert_same(a, b)


def test_without_rcs_an_epoch_visits_every_source_image_once(tmp_path):
    steps = PairedSteps(tiny_config(tmp_path, rcs=False), stage=1, progress=False)
    seen = [steps._epoch_order(0, len(steps.source), i) for i in range(len(steps.source))]
    assert sorted(seen) == list(range(len(steps.source)))


def test_ranks_draw_different_target_images(tmp_path):
    cfg = tiny_config(tmp_path)
    rank0 = PairedSteps(cfg, 1, rank=0, world_size=2, progress=False)
    rank1 = PairedSteps(cfg, 1, rank=1, world_size=2, progress=False)
    size = len(rank0.target)
    slots0 = {rank0._epoch_order(1, size, rank0._global_slot(0, j, 2)) for j in range(2)}
    slots1 = {rank1._epoch_order(1, size, rank1._global_slot(0, j, 2)) for j in range(2)}
    assert not slots0 & slots1


def test_stage0_plain_source_crops_switch_rcs_off_for_stage0_only(tmp_path):
    from confeti_fast.config import merge

    cfg = tiny_config(tmp_path)
    cfg = merge(cfg, {"stages": {"0": {"crop_size": [16, 16], "iters": 6}}})
    plain = merge(cfg, {"cut": {"stage0_source_crops": "plain"}})
    assert PairedSteps(cfg, stage=0, progress=False).rcs is not None  # the default: the segmentor's RCS
    assert PairedSteps(plain, stage=0, progress=False).rcs is None
    assert PairedSteps(plain, stage=1, progress=False).rcs is not None
    uniform = PairedSteps(merge(cfg, {"rcs": {"enabled": False}}), stage=0, progress=False)
    _assert_same(PairedSteps(plain, stage=0, progress=False)[3], uniform[3])
