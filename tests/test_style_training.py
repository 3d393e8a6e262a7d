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


# ----------------------------------------------------------------------------- the demo's choices for G
def _style(**cut):
    from confeti_fast.style import StyleTransfer

    cfg = dict(load_config("demo")["cut"], ngf=4, ndf=4, num_patches=8, **cut)
    torch.manual_seed(0)
    return StyleTransfer(cfg, torch.device("cpu"), (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


def test_paper_presets_keep_cut_as_its_authors_ran_it():
    from confeti_fast.models.cut import PatchDiscriminator

    for preset in ("gta2cs", "synthia2cs"):
        cut = load_config(preset)["cut"]
        assert (cut["generator"], cut["d_layers"], cut["identity_l1_weight"], cut["d_ignore_bottom"]) == \
            ("resnet", 3, 0.0, 0)
    style = _style(**{k: load_config("gta2cs")["cut"][k]
                      for k in ("generator", "d_layers", "identity_l1_weight", "d_ignore_bottom")})
    assert isinstance(style.G.model[-1], torch.nn.Tanh) and not style.G.residual
    assert len(style.D.model) == len(PatchDiscriminator(4).model)  # the 3-layer PatchGAN
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    losses = style.g_losses(x, style.G(x), x, style.G(x), torch.Generator().manual_seed(0))
    assert set(losses) == {"cut_gan", "cut_nce"}


def test_d_ignore_bottom_hides_the_bottom_rows_from_d():
    style = _style(d_ignore_bottom=8)
    real, fake = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    changed = real.clone()
    changed[..., -8:, :] = -1.0  # a "hood" in the bottom rows
    assert torch.equal(style.d_loss(real, fake), style.d_loss(changed, fake))
    changed[..., -9, :] = -1.0  # one row above it counts
    assert not torch.equal(style.d_loss(real, fake), style.d_loss(changed, fake))
    assert torch.equal(style.judge(real), style.D(real[..., :24, :]))


def test_d_ignore_bottom_as_tall_as_the_crop_is_a_one_line_error():
    style = _style(d_ignore_bottom=32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with pytest.raises(ConfetiError, match=r"cut.d_ignore_bottom = 32 .* 32-row crops"):
        style.d_loss(x, x)


def test_identity_l1_term_on_target_images():
    style = _style(identity_l1_weight=2.5)
    x_s, x_t = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    idt = style.G(x_t)
    losses = style.g_losses(x_s, style.G(x_s), x_t, idt, torch.Generator().manual_seed(0))
    assert torch.allclose(losses["cut_idt_l1"], 2.5 * (idt - x_t).abs().mean())
    residual = _style(identity_l1_weight=1.0, generator="residual")
    losses = residual.g_losses(x_s, residual.G(x_s), x_t, residual.G(x_t), torch.Generator().manual_seed(0))
    assert float(losses["cut_idt_l1"].detach()) == 0.0  # the identity at the start


def test_gradient_norms_match_each_terms_own_backward_and_leave_grad_alone():
    style = _style()
    x_s, x_t = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    fake, idt = style.G(x_s), style.G(x_t)
    losses = style.g_losses(x_s, fake, x_t, idt, torch.Generator().manual_seed(0))
    norms = style.gradient_norms(losses)
    assert set(norms) == {"grad_G/cut_gan", "grad_G/cut_nce"}
    assert all(p.grad is None for p in style.G.parameters())
    losses["cut_gan"].backward(retain_graph=True)
    by_hand = torch.sqrt(sum(p.grad.pow(2).sum() for p in style.G.parameters() if p.grad is not None))
    assert torch.allclose(norms["grad_G/cut_gan"], by_hand)


def test_paired_scores_tell_blur_from_a_change_of_colour():
    from confeti_fast.style import colour_transfer, dataset_colour_statistics, paired_scores

    torch.manual_seed(0)
    ideal = (torch.rand(1, 3, 1, 1) * torch.ones(1, 3, 48, 64)).clone()
    ideal[..., 10:30, 20:40] = torch.rand(1, 3, 1, 1)  # a box with sharp edges
    same = paired_scores(ideal, ideal)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-4) and same["edge"] == pytest.approx(1.0, abs=1e-4)
    assert same["psnr"] > 90
    blurred = torch.nn.functional.avg_pool2d(ideal, 7, stride=1, padding=3, count_include_pad=False)
    tinted = (ideal * 0.8 + 0.1).clamp(0, 1)  # another colour, the same edges
    assert paired_scores(tinted, ideal)["edge"] > 0.99 > 0.9 > paired_scores(blurred, ideal)["edge"]

    image = (ideal[0].permute(1, 2, 0) * 255).byte().numpy()
    source_stats = dataset_colour_statistics([image])
    target_stats = (source_stats[0] * 0.8 + 20, source_stats[1] * 0.7)  # inside 0..255: no clamping
    moved = colour_transfer(image, source_stats, target_stats)
    assert torch.allclose(dataset_colour_statistics([moved])[0], target_stats[0], atol=1.0)
    as_batch = torch.from_numpy(moved).permute(2, 0, 1)[None].float() / 255
    assert paired_scores(as_batch, ideal)["edge"] > 0.99  # colours only: every edge where it was


def test_demo_runs_log_paired_scores_and_the_gradient_norms_on_g(tmp_path):
    cfg = tiny_config(tmp_path, cut=True, log_style_gradients=True)
    trainer = Trainer(cfg, 0, tmp_path / "run", progress=False)
    trainer.cfg["source"]["generate"] = "demo"  # as the demo presets: the ideal translations exist
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "stage0" / "log.jsonl").read_text().splitlines()]
    paired = [r for r in records if "style/ideal_psnr" in r]
    assert [r["iter"] for r in paired] == [2, 4]
    for r in paired:
        assert 0 < r["style/ideal_ssim"] < 1 and -1 <= r["style/ideal_edge"] <= 1 and r["style/ideal_psnr"] > 0
        for key in ("psnr", "ssim", "edge"):  # x_s against the ideal: a fixed set of held-out scenes
            assert r[f"style/ideal_{key}_source"] == paired[0][f"style/ideal_{key}_source"]
    norms = [r for r in records if "grad_G/cut_gan" in r]
    assert len(norms) == 4 and all(r["grad_G/cut_gan"] > 0 and r["grad_G/cut_nce"] > 0 for r in norms)
    from confeti_fast.visualize import curves_figure
    titles = [ax.get_title(loc="left") for ax in curves_figure(tmp_path / "run" / "stage0" / "log.jsonl").axes]
    assert "norm of each term's gradient on G" in titles
    assert any(title.startswith("against the ideal translation") for title in titles)


def test_tiny_runs_without_the_demo_log_no_paired_scores_or_norms(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, cut=True), 0, tmp_path / "run", progress=False)
    trainer.train()
    text = (tmp_path / "run" / "stage0" / "log.jsonl").read_text()
    assert "style/structure_ssim" in text and "ideal_" not in text and "grad_G/" not in text
