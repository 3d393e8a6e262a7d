"""The fused/reference switch itself: modes, the environment variable and the CLIs' --kernels,
the one-line warning and the reference when a fused piece is missing, and a training step over
all three ops compiled with torch.compile(fullgraph=True). (Each op against its reference:
test_op_contrast.py, test_op_patch_nce.py, test_op_proto_update.py.)"""
import pytest
import torch
import torch.nn.functional as F

from confeti_fast import ops
from confeti_fast.errors import ConfetiError
from confeti_fast.kernels import proto_update
from confeti_fast import reference
from confeti_fast.ops.contrast import pixel_proto_contrast_cpu

needs_extension = pytest.mark.skipif(
    not proto_update.AVAILABLE, reason=f"compiled extension not importable: {proto_update.LOAD_ERROR}")


# ---------------------------------------------------------------- the switch

def test_default_is_fused_and_env_and_context_manager_choose(monkeypatch):
    monkeypatch.delenv("CONFETI_KERNELS", raising=False)
    ops.set_kernels(None)
    assert ops.get_kernels() == "fused"
    monkeypatch.setenv("CONFETI_KERNELS", "reference")
    assert ops.get_kernels() == "reference"
    assert ops.implementation("patch_nce") is reference.patch_nce
    with ops.kernels("fused"):
        assert ops.implementation("pixel_proto_contrast") is pixel_proto_contrast_cpu
        with ops.kernels("reference"):
            assert ops.implementation("pixel_proto_contrast") is reference.pixel_proto_contrast
        assert ops.get_kernels() == "fused"
    assert ops.get_kernels() == "reference"  # the context manager restored the env's choice


def test_bad_choice_names_its_origin(monkeypatch):
    monkeypatch.setenv("CONFETI_KERNELS", "fast")
    ops.set_kernels(None)
    with pytest.raises(ConfetiError, match="CONFETI_KERNELS"):
        ops.get_kernels()
    with pytest.raises(ConfetiError, match="--kernels"):
        ops.set_kernels("triton")
    with pytest.raises(ConfetiError, match="kernels()"):
        with ops.kernels("cuda"):
            pass


def test_missing_extension_warns_once_and_gives_reference_numbers(monkeypatch, capsys):
    monkeypatch.delenv("CONFETI_KERNELS", raising=False)
    monkeypatch.setattr(proto_update, "AVAILABLE", False)
    monkeypatch.setattr(proto_update, "LOAD_ERROR", "no module named confeti_fast._C")
    monkeypatch.setattr(ops.switch, "_warned", set())
    args = _proto_inputs(torch.Generator().manual_seed(0))
    expected = [t.clone() for t in args[:2]]
    reference.proto_ema_update(*expected, *args[2:])
    for _ in range(2):
        got = [t.clone() for t in args[:2]]
        ops.proto_ema_update(*got, *args[2:])
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "proto_ema_update" in err and "no module named confeti_fast._C" in err and "reference" in err


def test_only_rank_0_prints_the_fallback_and_bf16_warnings(monkeypatch, capsys):
    """Under torchrun every rank runs this code; one line per run is enough."""
    from confeti_fast import runtime

    monkeypatch.setattr(proto_update, "AVAILABLE", False)
    monkeypatch.setattr(proto_update, "LOAD_ERROR", "no extension")
    for rank, expected in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(ops.switch, "_warned", set())
        with ops.kernels("fused"):
            ops.implementation("proto_ema_update", "cpu")
        runtime.resolve({"amp": "bf16"}, "cpu", announce=rank == "0")
        captured = capsys.readouterr()
        assert captured.err.count("warning: confeti_fast has no fused") == expected, rank
        assert captured.out.count("bf16 autocast on a CPU") == expected, rank


def test_train_and_test_clis_take_kernels():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for script in ("train.py", "test.py"):
        spec = importlib.util.spec_from_file_location(script[:-3] + "_cli", root / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        extra = ["demo", "--random-init"] if script == "test.py" else []
        assert module.parse_args(extra + ["--kernels", "reference"]).kernels == "reference"
        with pytest.raises(SystemExit):
            module.parse_args(extra + ["--kernels", "triton"])


# ---------------------------------------------------------------- torch.compile over the three ops

def _proto_inputs(gen, batch=2, dim=8, small=(5, 6), full=(17, 21), classes=7):
    protos = F.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    counts = torch.randint(0, 3, (classes,), generator=gen)
    feats = torch.randn(batch, dim, *small, generator=gen)
    cam = torch.rand(batch, classes, *small, generator=gen)
    labels = torch.randint(0, classes, (batch, *full), generator=gen)
    labels[:, :2] = 255
    return protos, counts, feats, cam, labels


@needs_extension
def test_compiled_training_step_fullgraph_matches_eager(monkeypatch):
    """The forward of one step through all three fused CPU ops, traced without graph breaks
    (dynamo does not trace .backward(); AOTAutograd compiles the backward graph)."""
    monkeypatch.delenv("CONFETI_KERNELS", raising=False)
    gen = torch.Generator().manual_seed(3)
    batch, dim, classes = 2, 8, 7
    head = torch.nn.Conv2d(3, dim, 1)
    torch.nn.init.normal_(head.weight, generator=gen)
    image = torch.randn(batch, 3, 5, 6, generator=gen)
    protos0, counts0, _, cam, full_labels = _proto_inputs(gen, batch, dim, classes=classes)
    labels = torch.randint(0, classes, (batch, 5, 6), generator=gen)
    labels[0, 0, 0] = 255  # flat index 0: not sampled, but out of the regulariser's mean
    idx = torch.tensor([1, 5, 7, 20, 33, 41, 59])
    keys = [F.normalize(torch.randn(batch * 9, dim, generator=gen), dim=1) for _ in range(3)]

    def step(protos, counts):
        proj = head(image)
        with torch.no_grad():
            ops.proto_ema_update(protos, counts, proj.detach(), cam, full_labels, momentum=0.99, top_k=4)
        ce, reg = ops.pixel_proto_contrast(proj, labels, protos, sample_idx=idx)
        queries = [F.normalize(proj.flatten(2).transpose(1, 2)[:, :9].reshape(-1, dim) + 0.1 * k, dim=1)
                   for k in keys]
        return ce + reg + ops.patch_nce(queries, keys, batch)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        head.zero_grad(set_to_none=True)
        protos, counts = protos0.clone(), counts0.clone()
        loss = fn(protos, counts)
        loss.backward()  # through the compiled backward graph
        results.append((loss.detach(), protos, counts, head.weight.grad.clone()))
    (l0, p0, c0, g0), (l1, p1, c1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)
    assert torch.equal(c1, c0) and not torch.equal(c0, counts0)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
