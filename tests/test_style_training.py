"""Stage 0/1/2 with the style transfer: gradient routing, resume, and where G comes from."""
import pytest
import torch

from confeti_fast.checkpoint import load_training_checkpoint
from confeti_fast.errors import ConfetiError
from confeti_fast.checkpoint import training_state
from confeti_fast.trainer import Trainer
from helpers import assert_states_equal, resume_after_kill, tiny_config


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def stage1(tmp_path):
    return Trainer(tiny_config(tmp_path, cut=True), 1, tmp_path / "run", progress=False)


def test_consistency_reaches_g_and_reg_proj_only(stage1):
    torch.manual_seed(0)
    stage1.prototypes.copy_(torch.nn.functional.normalize(torch.randn_like(stage1.prototypes), dim=1))
    x_s = stage1.steps[0]["source_image"]
    style = stage1.style
    x_st = style.to_imagenet(style.G(style.to_cut(x_s)))
    running_mean = stage1.student.segmentor.backbone.stem[1].running_mean.clone()
    stage1.iteration.consistency(x_s, x_st).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage1.reg_proj.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in style.G.parameters())
    assert all(p.grad is None for p in stage1.student.segmentor.backbone.parameters())
    assert all(p.grad is None for p in stage1.student.proj_head.parameters())
    # frozen for this term also means its forward leaves the BN statistics alone
    assert torch.equal(stage1.student.segmentor.backbone.stem[1].running_mean, running_mean)


def test_segmentation_losses_do_not_reach_g(stage1, monkeypatch):
    seen = {}
    d_step = stage1.style.d_step

    def spy(real_target, fake, check):
        # Steps 3-6 (source CE, CAM, contrast, feature distance) have run their backward by now.
        seen["g_grads"] = [p.grad for p in stage1.style.G.parameters()]
        return d_step(real_target, fake, check)

    monkeypatch.setattr(stage1.style, "d_step", spy)
    stage1.step(stage1.steps[2], 2)  # t = 2 > contrast_after: every segmentation loss is on
    assert all(g is None for g in seen["g_grads"])


def test_d_step_leaves_g_and_g_step_leaves_d(stage1):
    style = stage1.style
    gen = torch.Generator().manual_seed(0)
    x = stage1.steps[0]
    real_source, real_target = style.to_cut(x["source_image"]), style.to_cut(x["target_image"])
    fake, identity = style.G(real_source), style.G(real_target)
    g_before, d_before, f_before = _params(style.G), _params(style.D), _params(style.F)
    style.d_step(real_target, fake, lambda values: None)
    assert _same(g_before, _params(style.G)) and not _same(d_before, _params(style.D))
    d_after = _params(style.D)
    style.g_step(real_source, fake, real_target, identity, gen, lambda values: None)
    assert _same(d_after, _params(style.D))
    assert not _same(g_before, _params(style.G)) and not _same(f_before, _params(style.F))


def test_stage1_resume_is_bitwise_exact_with_cut_state(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, cut=True)
    straight = Trainer(cfg, 1, tmp_path / "straight", progress=False)
    straight.train()
    resumed = resume_after_kill(cfg, 1, tmp_path / "halves", monkeypatch)
    ckpt = load_training_checkpoint(tmp_path / "halves" / "stage1" / "best.pth")
    assert set(ckpt["style"]) == {"G", "D", "F", "opt_G", "opt_D"} and ckpt["style"]["opt_D"]["state"]
    assert_states_equal(training_state(straight), training_state(resumed))
    assert (tmp_path / "halves" / "stage1" / "panels" / "style_000004.png").is_file()
    assert (tmp_path / "halves" / "stage1" / "stylized" / "000004_0.png").is_file()


def test_stage2_takes_g_from_stage1_and_restarts_the_segmentor(tmp_path):
    cfg = tiny_config(tmp_path, cut=True)
    with pytest.raises(ConfetiError, match=r"stage1/last.pth; run `python train.py --stage 1`"):
        Trainer(cfg, 2, tmp_path / "run", progress=False)
    first = Trainer(cfg, 1, tmp_path / "run", progress=False)
    first.train()
    second = Trainer(cfg, 2, tmp_path / "run", progress=False)
    assert _same(_params(first.style.G), _params(second.style.G))
    assert not second.style.G.training and not any(p.requires_grad for p in second.style.G.parameters())
    assert not _same(_params(first.student), _params(second.student))  # fresh segmentor
    g_before = _params(second.style.G)
    second.train()
    assert _same(g_before, _params(second.style.G))


def test_stage1_starts_from_stage0_and_from_an_original_cut_file(tmp_path):
    cfg = tiny_config(tmp_path, cut=True)
    stage0 = Trainer(cfg, 0, tmp_path / "run", progress=False)
    stage0.train()
    stage1 = Trainer(cfg, 1, tmp_path / "run", progress=False)
    assert _same(_params(stage0.style.G), _params(stage1.style.G))
    assert _same(_params(stage0.style.F), _params(stage1.style.F))
    original = tmp_path / "latest_net_G.pth"
    torch.save(stage0.style.G.state_dict(), original)  # the CUT layout: model.N.*
    other = Trainer(cfg, 1, tmp_path / "other", progress=False, cut_checkpoint=original)
    assert _same(_params(stage0.style.G), _params(other.style.G))
