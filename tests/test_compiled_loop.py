"""The compiled training loop (compile mode `default`) runs every stage and keeps its graphs.

These are the slowest tests of the suite (torch.compile on a 2-core CPU: 2-5 minutes each);
they exist because a compiled loop can fail in ways an eager one cannot: inductor stride
bugs in a backward (stage 0/1 crashed in G's upsampling before `models.cut.upsample_separable`),
or graphs that recompile every step and, past dynamo's recompile limit, silently run eager.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from confeti_fast.config import load_config
from confeti_fast.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
GATES_OPEN = 2  # with the gates below, t = 2 is past all of them (EMA, mixed CAM, contrast)


def compiled_graphs():
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("stage", [0, 1])
def test_train_cli_runs_compiled_stages(tmp_path, stage):
    # The README's way to compile on a CPU, for the two stages that train the style transfer.
    cmd = [sys.executable, "train.py", "--config", "demo", "--stage", str(stage), "--iters", "3",
           "--compile", "default", "--work-dir", str(tmp_path), "--no-progress"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / f"stage{stage}" / "last.pth").is_file()
    written = (tmp_path / f"stage{stage}" / "config.py").read_text()
    assert "'compile': 'default'" in written


def _demo_trainer(tmp_path, stage, channels_last):
    cfg = load_config("demo", {
        "stages": {str(s): {"crop_size": [32, 32], "iters": 1000} for s in (0, 1, 2)},
        "cut": {"ngf": 4, "ndf": 4, "num_patches": 16},
        "train": {"mix_cam_after": 0, "contrast_after": 1},
        "runtime": {"compile": "default", "channels_last": channels_last},
    })
    cut_checkpoint = None
    if stage == 2:  # G from a (random) stage-1 style transfer, as `--cut-checkpoint` gives it
        source = Trainer(dict(cfg, runtime={}), 1, tmp_path / "source", device="cpu", progress=False)
        source.save({})
        cut_checkpoint = tmp_path / "source" / "stage1" / "last.pth"
    return Trainer(cfg, stage, tmp_path / "run", device="cpu", progress=False, cut_checkpoint=cut_checkpoint)


@pytest.mark.parametrize("stage,channels_last", [(0, True), (1, True), (2, True), (2, False)],
                         ids=["stage0-channels_last", "stage1-channels_last", "stage2-channels_last",
                              "stage2-nchw"])
def test_compiled_steps_keep_their_graphs(tmp_path, stage, channels_last):
    """3 steps past every gate, an evaluation, 3 more steps: after the first step (which compiles
    the training graphs) and the evaluation (which compiles the eval-mode backbone) dynamo
    compiles nothing, and no module reaches the recompile limit (which would raise: runtime.py
    sets fail_on_recompile_limit_hit)."""
    trainer = _demo_trainer(tmp_path, stage, channels_last)
    assert torch._dynamo.config.fail_on_recompile_limit_hit
    steps = range(GATES_OPEN, GATES_OPEN + 6)
    before = compiled_graphs()
    trainer.step(trainer.steps[steps[0]], steps[0])
    after_first = compiled_graphs()
    assert after_first > before, "the first step compiled nothing: is the loop compiled at all?"
    for t in steps[1:3]:
        losses = trainer.step(trainer.steps[t], t)
        assert all(torch.isfinite(value) for value in losses.values())
    assert compiled_graphs() == after_first, f"stage {stage}: steps 2-3 recompiled"
    trainer.evaluate()
    after_eval = compiled_graphs()
    for t in steps[3:]:
        trainer.step(trainer.steps[t], t)
    assert compiled_graphs() == after_eval, f"stage {stage}: a step after the evaluation recompiled"
