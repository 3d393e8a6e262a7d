"""Stage 0/1/2 with the style transfer: gradient routing, resume, where G comes from, the
default schedule and the stylization scores."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from confeti_fast.serialization import load_training_checkpoint
from confeti_fast.config import dump_config, load_config
from confeti_fast.errors import ConfetiError
from confeti_fast.style import colour_statistics, ssim
from confeti_fast.trainer import Trainer
from helpers import assert_states_equal, resume_after_kill, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def stage1(tmp_path):
    return Trainer(tiny_config(tmp_path, cut=True), 1, tmp_path / "run", progress=False)


def test_consistency_reaches_g_and_reg_proj_only(stage1):
    torch.manual_seed(0)
    stage1.nets.prototypes.copy_(torch.nn.functional.normalize(torch.randn_like(stage1.nets.prototypes), dim=1))
    x_s = stage1.steps[0]["source_image"]
    style = stage1.nets.style
    x_st = style.to_imagenet(style.G(style.to_cut(x_s)))
    running_mean = stage1.nets.student.segmentor.backbone.stem[1].running_mean.clone()
    stage1.iteration.consistency(x_s, x_st).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage1.nets.reg_proj.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in style.G.parameters())
    assert all(p.grad is None for p in stage1.nets.student.segmentor.backbone.parameters())
    assert all(p.grad is None for p in stage1.nets.student.proj_head.parameters())
    # frozen for this term also means its forward leaves the BN statistics alone
    assert torch.equal(stage1.nets.student.segmentor.backbone.stem[1].running_mean, running_mean)


def test_segmentation_losses_do_not_reach_g(stage1, monkeypatch):
    seen = {}
    d_loss = stage1.nets.style.d_loss

    def spy(real_target, fake):
        # Steps 3-6 (source CE, CAM, contrast, feature distance) have run their backward by now.
        seen["g_grads"] = [p.grad for p in stage1.nets.style.G.parameters()]
        return d_loss(real_target, fake)

    monkeypatch.setattr(stage1.nets.style, "d_loss", spy)
    stage1.step(stage1.steps[2], 2)  # t = 2 > contrast_after: every segmentation loss is on
    assert all(g is None for g in seen["g_grads"])


def test_d_step_leaves_g_and_g_step_leaves_d(stage1, monkeypatch):
    """Step 7 as the iteration runs it: D's update moves D alone, G/F's update moves G and F alone."""
    style = stage1.nets.style
    gen = torch.Generator().manual_seed(0)
    x = stage1.steps[0]
    real_source, real_target = style.to_cut(x["source_image"]), style.to_cut(x["target_image"])
    cut = {"real_source": real_source, "real_target": real_target,
           "fake": style.G(real_source), "identity": style.G(real_target)}
    seen = {}
    g_losses = style.g_losses

    def before_g(*args):  # D has stepped, G has not
        seen["after_d"] = _params(style.G), _params(style.D), _params(style.F)
        return g_losses(*args)

    monkeypatch.setattr(style, "g_losses", before_g)
    g_before, d_before, f_before = _params(style.G), _params(style.D), _params(style.F)
    losses = stage1.iteration.style_step(cut, gen, 0)
    g_after_d, d_after_d, f_after_d = seen["after_d"]
    assert _same(g_before, g_after_d) and _same(f_before, f_after_d) and not _same(d_before, d_after_d)
    assert _same(d_after_d, _params(style.D))
    assert not _same(g_before, _params(style.G)) and not _same(f_before, _params(style.F))
    assert set(losses) == {"cut_d", "cut_gan", "cut_nce"} and all(v.grad_fn is None for v in losses.values())


def test_stage1_resume_is_bitwise_exact_with_cut_state(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, cut=True)
    straight = Trainer(cfg, 1, tmp_path / "straight", progress=False)
    straight.train()
    resumed = resume_after_kill(cfg, 1, tmp_path / "halves", monkeypatch)
    ckpt = load_training_checkpoint(tmp_path / "halves" / "stage1" / "best.pth")
    assert set(ckpt["style"]) == {"G", "D", "F", "opt_G", "opt_D"} and ckpt["style"]["opt_D"]["state"]
    assert_states_equal(straight.state_dict(), resumed.state_dict())
    assert (tmp_path / "halves" / "stage1" / "panels" / "style_000004.png").is_file()
    assert (tmp_path / "halves" / "stage1" / "stylized" / "000004_0.png").is_file()


def test_stage2_takes_g_from_stage1_and_restarts_the_segmentor(tmp_path):
    cfg = tiny_config(tmp_path, cut=True)
    with pytest.raises(ConfetiError, match=r"stage1/last.pth; run `python train.py --stage 1`"):
        Trainer(cfg, 2, tmp_path / "run", progress=False)
    first = Trainer(cfg, 1, tmp_path / "run", progress=False)
    first.train()
    second = Trainer(cfg, 2, tmp_path / "run", progress=False)
    assert _same(_params(first.nets.style.G), _params(second.nets.style.G))
    assert not second.nets.style.G.training and not any(p.requires_grad for p in second.nets.style.G.parameters())
    assert not _same(_params(first.nets.student), _params(second.nets.student))  # fresh segmentor
    g_before = _params(second.nets.style.G)
    second.train()
    assert _same(g_before, _params(second.nets.style.G))


def test_stage1_starts_from_stage0_and_from_an_original_cut_file(tmp_path):
    cfg = tiny_config(tmp_path, cut=True)
    stage0 = Trainer(cfg, 0, tmp_path / "run", progress=False)
    stage0.train()
    stage1 = Trainer(cfg, 1, tmp_path / "run", progress=False)
    assert _same(_params(stage0.nets.style.G), _params(stage1.nets.style.G))
    assert _same(_params(stage0.nets.style.F), _params(stage1.nets.style.F))
    original = tmp_path / "latest_net_G.pth"
    torch.save(stage0.nets.style.G.state_dict(), original)  # the CUT layout: model.N.*
    other = Trainer(cfg, 1, tmp_path / "other", progress=False, cut_checkpoint=original)
    assert _same(_params(stage0.nets.style.G), _params(other.nets.style.G))
    assert not _same(_params(stage0.nets.style.D), _params(other.nets.style.D))  # no D file: random


def test_an_original_cut_folder_gives_g_d_and_f(tmp_path, capsys):
    """CUT's checkpoints/<name>/latest_net_{G,D,F}.pth: naming G loads D and F beside it, and says so."""
    cfg = tiny_config(tmp_path, cut=True)
    stage0 = Trainer(cfg, 0, tmp_path / "run", progress=False)
    stage0.train()
    folder = tmp_path / "checkpoints" / "gta2cs"
    folder.mkdir(parents=True)
    for name in ("G", "D", "F"):
        torch.save(getattr(stage0.nets.style, name).state_dict(), folder / f"latest_net_{name}.pth")
    capsys.readouterr()
    stage1 = Trainer(cfg, 1, tmp_path / "other", progress=False, cut_checkpoint=folder / "latest_net_G.pth")
    for name in ("G", "D", "F"):
        assert _same(_params(getattr(stage0.nets.style, name)), _params(getattr(stage1.nets.style, name))), name
    assert f"style transfer: G/D/F from {folder / 'latest_net_G.pth'}" in capsys.readouterr().out
    (folder / "latest_net_F.pth").unlink()
    Trainer(cfg, 1, tmp_path / "third", progress=False, cut_checkpoint=folder / "latest_net_G.pth")
    assert "G/D from" in capsys.readouterr().out  # and F starts from random weights, as the line says


def test_stage1_without_a_pretrained_cut_is_an_error_in_paper_presets(tmp_path):
    # The authors start stage 1 from a CUT trained alone (docs/method.md §3): the paper presets
    # require one, and say what to run.
    cfg = tiny_config(tmp_path, cut=True)
    cfg["cut"]["require_pretrained"] = True
    with pytest.raises(ConfetiError, match=r"stage 1 starts from a pre-trained style transfer.*--stage 0.*"
                                           r"--cut-checkpoint.*--cut-random-start"):
        Trainer(cfg, 1, tmp_path / "run", progress=False)
    assert load_config("gta2cs")["cut"]["require_pretrained"] and load_config("synthia2cs")["cut"]["require_pretrained"]


def test_default_schedule_runs_stage0_then_1_then_2(tmp_path):
    # `python train.py` with no --stage: CUT alone, then stage 1 from stage 0's G/D/F, then stage 2.
    cfg = tiny_config(tmp_path, cut=True)
    cfg["cut"]["require_pretrained"] = True  # so stage 1 fails unless it finds stage 0's output
    cfg_path = dump_config(cfg, tmp_path / "tiny.py")
    run = subprocess.run([sys.executable, "train.py", "--config", str(cfg_path), "--work-dir", str(tmp_path / "w"),
                          "--iters", "2", "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    stages = [line.split(":")[0] for line in run.stdout.splitlines() if line.startswith("stage ")]
    assert stages == ["stage 0", "stage 1", "stage 2"]
    assert f"style transfer: G/D/F from {tmp_path / 'w' / 'stage0' / 'last.pth'}" in run.stdout


def test_ssim_and_colour_statistics():
    torch.manual_seed(0)
    image = torch.rand(2, 1, 40, 40)
    assert torch.allclose(ssim(image, image), torch.ones(2))
    noisy = (image + 0.3 * torch.randn_like(image)).clamp(0, 1)
    assert (ssim(image, noisy) < 0.8).all() and (ssim(image, noisy) > ssim(image, torch.rand_like(image))).all()
    rgb = torch.zeros(1, 3, 4, 4)
    rgb[:, 0] = 0.5
    assert torch.allclose(colour_statistics(rgb), torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.0, 0.0]]))


def test_evaluations_log_the_stylization_scores(tmp_path):
    cfg = tiny_config(tmp_path, cut=True)
    trainer = Trainer(cfg, 0, tmp_path / "run", progress=False)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "stage0" / "log.jsonl").read_text().splitlines()]
    # stage 0 trains CUT alone, so its log carries CUT's rate, not the idle segmentor's
    assert {r["lr"] for r in records if "lr" in r} == {cfg["cut"]["lr"]}
    scores = [r for r in records if "style/structure_ssim" in r]
    assert [r["iter"] for r in scores] == [2, 4]  # at each evaluation (interval 2, 4 iterations)
    for r in scores:
        assert 0.0 <= r["style/structure_ssim"] <= 1.0 and r["style/appearance_dist"] >= 0
        assert r["style/appearance_dist_source"] == scores[0]["style/appearance_dist_source"]  # a fixed image set
