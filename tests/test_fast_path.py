"""The fast execution path (runtime.py) against the plain one: the same step, the same losses.

bf16 autocast + channels_last + torch.compile on a tiny config must give the eager fp32 step's
losses within bf16 tolerances. CPU here (bf16 is emulated, slowly, so the config is tiny);
the GPU suite runs the same comparison on CUDA.

Tolerance: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 2e-3 per operation); through
a ResNet-18 forward and the losses' reductions the observed relative differences stay below
~2e-2, so losses must agree within rtol 5e-2 (atol 1e-3 for terms near 0). (One case only:
compiling on this CPU takes about 1.5 minutes.)
"""
import pytest
import torch

from confeti_fast.trainer import Trainer
from helpers import tiny_config

STEP = 3  # every gate open (tiny_config: mixed CAM after 0, contrast after 1)


def _losses(cfg, tmp_path, runtime, name):
    cfg = dict(cfg, runtime=runtime)
    trainer = Trainer(cfg, 2, tmp_path / name, device="cpu", progress=False)
    losses = trainer.step(trainer.steps[STEP], STEP)
    return {k: float(v.detach()) for k, v in losses.items()}, trainer


@pytest.fixture(scope="module")
def eager_fp32(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fast_path")
    cfg = tiny_config(tmp_path)
    plain = {"amp": "fp32", "channels_last": False, "compile": None, "fused_optimizer": False}
    return cfg, tmp_path, _losses(cfg, tmp_path, plain, "eager")[0]


def test_fast_step_gives_the_eager_fp32_losses(eager_fp32):
    cfg, tmp_path, expected = eager_fp32
    fast = {"amp": "bf16", "channels_last": True, "compile": "default", "fused_optimizer": True}
    got, trainer = _losses(cfg, tmp_path, fast, "fast")
    assert trainer.cfg["runtime"]["compile"] == "default"
    conv = next(m for m in trainer.nets.student.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert got.keys() == expected.keys() and {"mix_contrast", "src_contrast", "fdist"} <= got.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=5e-2, abs=1e-3), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available: the sync check is a CUDA feature")
@pytest.mark.parametrize("stage,cut", [(1, True), (2, False)], ids=["stage1", "stage2"])
def test_cuda_step_has_no_host_sync(tmp_path, stage, cut):
    """After warm-up (compilation, CUDA-graph recording), a whole training step runs under
    torch.cuda.set_sync_debug_mode('error'): any device-to-host read or blocking copy raises."""
    cfg = tiny_config(tmp_path, cut=cut)
    trainer = Trainer(cfg, stage, tmp_path / "run", device="cuda", progress=False)
    assert trainer.runtime["check_finite"] == "log" and trainer.runtime["amp"] == "bf16"
    for t in range(2, 5):  # every gate open from t = 2
        batch = trainer.steps[t]
        if t == 4:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.step(batch, t)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("deterministic", [False, True])
def test_cudnn_autotuning_unless_deterministic(deterministic, monkeypatch):
    # CUDA runs autotune cuDNN's algorithms unless runtime.deterministic asks for reproducible ones.
    from confeti_fast import runtime

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not deterministic)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", not deterministic)
    resolved = runtime.resolve({"deterministic": deterministic}, "cuda")
    runtime.configure_backends(resolved, "cuda")
    assert torch.backends.cudnn.benchmark is (not deterministic)
    assert torch.backends.cudnn.deterministic is deterministic
    from train import parse_args
    assert parse_args(["--deterministic"] if deterministic else ["--no-deterministic"]).deterministic is deterministic
