"""The trainer end to end on tiny data: exact resume, NaN stop, atomic checkpoints, presets."""
import pytest
import torch

from confeti_fast.serialization import load_training_checkpoint
from confeti_fast.config import load_config, merge
from confeti_fast.errors import ConfetiError
from confeti_fast import iteration as iteration_module
from confeti_fast.trainer import NonFiniteLoss, Trainer
from helpers import assert_states_equal, resume_after_kill, tiny_config


def test_resume_is_bitwise_exact(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    straight = Trainer(cfg, 2, tmp_path / "straight", progress=False)
    straight.train()
    assert straight.t == 4 and straight.nets.proto_counts.sum() > 0
    resumed = resume_after_kill(cfg, 2, tmp_path / "halves", monkeypatch)
    assert resumed.t == 4
    assert_states_equal(straight.state_dict(), resumed.state_dict())


def test_resume_warns_of_each_method_relevant_config_change(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    Trainer(cfg, 2, tmp_path / "run", progress=False).train()
    last = tmp_path / "run" / "stage2" / "last.pth"
    capsys.readouterr()
    Trainer(cfg, 2, tmp_path / "run", resume=last, progress=False)
    assert "warning" not in capsys.readouterr().err  # the same config: nothing to say
    changed = merge(cfg, {"train": {"cam_weight": 0.5, "log_interval": 7}, "stages": {"2": {"crop_size": [24, 24]}},
                          "evaluation": {"interval": 3}})
    Trainer(changed, 2, tmp_path / "run", resume=last, progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(lines) == 2, lines  # train.log_interval and evaluation.* change no result
    assert any("train.cam_weight = 0.5" in line and f"resuming {last}" in line for line in lines)
    assert any("stages.2.crop_size = [24, 24]" in line for line in lines)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    real_cam_loss = iteration_module.cam_loss
    calls = {"n": 0}

    def cam_loss_nan_at_iteration_3(cam, labels):
        loss = real_cam_loss(cam, labels)
        calls["n"] += 1
        # cam_loss runs on the source and (t > 0) the mixed image: t=0 once, t=1,2 twice each
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(iteration_module, "cam_loss", cam_loss_nan_at_iteration_3)
    run = Trainer(cfg, 2, tmp_path / "run", progress=False)
    with pytest.raises(NonFiniteLoss, match=r"loss 'src_cam' is nan at iteration 3") as err:
        run.train()
    assert "\n" not in str(err.value) and isinstance(err.value, ConfetiError)
    ckpt = load_training_checkpoint(tmp_path / "run" / "stage2" / "last.pth")
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_interrupted_checkpoint_write_keeps_previous_file(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    run = Trainer(cfg, 2, tmp_path / "run", progress=False)
    run.train()
    last = tmp_path / "run" / "stage2" / "last.pth"
    before = last.read_bytes()

    def torch_save_dies_halfway(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torch_save_dies_halfway)
    with pytest.raises(ConfetiError, match="cannot write .*last.pth: disk full; the previous last.pth is intact"):
        run.save({"mIoU": 0.5})
    assert last.read_bytes() == before
    assert load_training_checkpoint(last)["iteration"] == 4


def test_run_outputs(tmp_path):
    cfg = tiny_config(tmp_path)
    run = Trainer(cfg, 2, tmp_path / "run", progress=False)
    result = run.train()
    out = tmp_path / "run" / "stage2"
    written = load_config(out / "config.py")
    # the run records how it executed: the CPU defaults, resolved
    assert written.pop("runtime") == {"amp": "fp32", "channels_last": False, "compile": None,
                                      "fused_optimizer": False, "check_finite": "step", "sync_bn": False,
                                      "deterministic": False}
    assert written == cfg
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"mIoU"' in line]) == 2 and len(lines) == 6
    assert (out / "panels" / "classmix_000002.png").is_file() and (out / "curves.png").is_file()
    assert (out / "best.pth").is_file() and 0.0 <= result["mIoU"] <= 1.0


def test_source_only_trains_only_the_segmentor(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["method"] = "source_only"
    run = Trainer(cfg, 2, tmp_path / "run", progress=False)
    cam_head = [p.detach().clone() for p in run.nets.student.cam_head.parameters()]
    run.train()
    assert run.nets.proto_counts.sum() == 0
    # no gradient ever reached the CAM head, so AdamW (weight decay included) skipped it
    assert all(torch.equal(p, q) for p, q in zip(run.nets.student.cam_head.parameters(), cam_head))


def test_resume_rejects_another_stage_and_foreign_files(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["stages"]["1"] = dict(cfg["stages"]["2"])
    Trainer(cfg, 2, tmp_path / "run", progress=False).train()
    with pytest.raises(ConfetiError, match="from stage 2, not stage 1"):
        Trainer(cfg, 1, tmp_path / "run", resume=tmp_path / "run" / "stage2" / "last.pth", progress=False)
    junk = tmp_path / "junk.pth"
    torch.save({"weights": 1}, junk)
    with pytest.raises(ConfetiError, match="not a confeti_fast training checkpoint"):
        Trainer(cfg, 2, tmp_path / "run", resume=junk, progress=False)


@pytest.mark.parametrize("preset", ["gta2cs", "synthia2cs"])
def test_paper_presets_build_full_models_and_run_one_iteration(tmp_path, preset):
    cfg = tiny_config(tmp_path, base=preset, mix_cam_after=-1, contrast_after=-1)
    cfg["model"]["depth"] = load_config(preset)["model"]["depth"]
    cfg["stages"]["2"]["iters"] = 1
    run = Trainer(cfg, 2, tmp_path / "run", progress=False)
    assert run.nets.student.segmentor.depth == 101 and run.nets.student.proj_head.out_channels == 512
    batch = run.steps[0]
    losses = run.step(batch, 0)
    expected = {"src_ce", "src_cam", "fdist", "src_contrast", "src_reg", "mix_ce", "mix_cam",
                "mix_contrast", "mix_reg", "q"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
