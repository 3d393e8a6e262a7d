"""Loading the authors' files: CUT's latest_net_{G,D,F}.pth and CONFETI's mmseg checkpoints."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from confeti_fast.errors import ConfetiError
from confeti_fast.models import (
    CutGenerator,
    DeepLabV2,
    PatchDiscriminator,
    PatchSampleF,
    convert_mmseg_checkpoint,
    init_cut_weights,
    load_authors_checkpoint,
    load_cut_state_dict,
    load_model_weights,
)
from confeti_fast.models.heads import ConfetiNet, reg_proj
from confeti_fast.serialization import is_mmseg_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _single_line(err):
    text = str(err.value)
    assert "\n" not in text, text
    return text


def _equal_state(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- CUT files
def _hand_written_d(ndf=4):
    """A D file in CUT's key layout, written key by key (ndf=4 -> 4, 8, 16, 32 channels)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.0.weight": (4, 3, 4, 4), "model.0.bias": (4,),
              "model.3.weight": (8, 4, 4, 4), "model.3.bias": (8,),
              "model.7.weight": (16, 8, 4, 4), "model.7.bias": (16,),
              "model.11.weight": (32, 16, 4, 4), "model.11.bias": (32,),
              "model.14.weight": (1, 32, 4, 4), "model.14.bias": (1,)}
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    blur = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16
    for idx, c in ((2, 4), (6, 8), (10, 16)):
        sd[f"model.{idx}.filt"] = blur.expand(c, 1, 3, 3).clone()
    return sd


def test_load_hand_written_discriminator(tmp_path):
    sd = _hand_written_d()
    path = tmp_path / "latest_net_D.pth"
    torch.save(sd, path)
    d = load_cut_state_dict(PatchDiscriminator(ndf=4), path, "CUT discriminator")
    assert torch.equal(d.model[0].weight, sd["model.0.weight"])
    assert torch.equal(d.model[11].bias, sd["model.11.bias"])
    assert torch.equal(d.model[14].weight, sd["model.14.weight"])
    assert torch.equal(d.model[6].filt, sd["model.6.filt"])
    _equal_state(d.state_dict(), sd)


def test_load_generator_file_and_module_prefix(tmp_path):
    torch.manual_seed(0)
    src = init_cut_weights(CutGenerator(ngf=8))
    sd = src.state_dict()
    # a few keys by hand, to pin the layout the file is read with
    assert tuple(sd["model.1.weight"].shape) == (8, 3, 7, 7)
    assert tuple(sd["model.12.conv_block.5.weight"].shape) == (32, 32, 3, 3)
    assert tuple(sd["model.21.filt"].shape) == (32, 1, 4, 4)
    path = tmp_path / "latest_net_G.pth"
    torch.save(sd, path)
    torch.manual_seed(1)
    dst = load_cut_state_dict(init_cut_weights(CutGenerator(ngf=8)), path, "CUT generator")
    _equal_state(dst.state_dict(), sd)

    wrapped = tmp_path / "dp_net_G.pth"
    torch.save({f"module.{k}": v + 1 for k, v in sd.items()}, wrapped)
    dst = load_cut_state_dict(CutGenerator(ngf=8), wrapped)
    assert torch.equal(dst.model[30].weight, sd["model.30.weight"] + 1)


def test_load_sampler_file(tmp_path):
    g = torch.Generator().manual_seed(2)
    chans = (3, 8, 16, 16, 16)
    sd = {}
    for i, c in enumerate(chans):
        sd[f"mlp_{i}.0.weight"] = torch.randn(16, c, generator=g)
        sd[f"mlp_{i}.0.bias"] = torch.randn(16, generator=g)
        sd[f"mlp_{i}.2.weight"] = torch.randn(16, 16, generator=g)
        sd[f"mlp_{i}.2.bias"] = torch.randn(16, generator=g)
    path = tmp_path / "latest_net_F.pth"
    torch.save(sd, path)
    f = load_cut_state_dict(PatchSampleF(nc=16, in_channels=chans), path, "CUT sampler")
    assert torch.equal(f.mlp_3[0].weight, sd["mlp_3.0.weight"])
    assert torch.equal(f.mlp_4[2].bias, sd["mlp_4.2.bias"])


def test_cut_file_extra_and_missing_keys(tmp_path):
    sd = _hand_written_d()
    sd.pop("model.3.bias")
    sd["model.99.weight"] = torch.zeros(1)
    path = tmp_path / "latest_net_D.pth"
    torch.save(sd, path)
    with pytest.raises(ConfetiError) as err:
        load_cut_state_dict(PatchDiscriminator(ndf=4), path, "CUT discriminator")
    text = _single_line(err)
    assert "model.3.bias" in text and "model.99.weight" in text and str(path) in text


def test_cut_file_wrong_shape_and_missing_file(tmp_path):
    path = tmp_path / "latest_net_D.pth"
    torch.save(_hand_written_d(), path)
    with pytest.raises(ConfetiError) as err:
        load_cut_state_dict(PatchDiscriminator(ndf=8), path, "CUT discriminator")
    assert "model.0.weight is (4, 3, 4, 4) in the checkpoint but (8, 3, 4, 4)" in _single_line(err)
    with pytest.raises(ConfetiError) as err:
        load_cut_state_dict(PatchDiscriminator(ndf=4), tmp_path / "nope.pth", "CUT discriminator")
    assert "does not exist" in _single_line(err)


# ----------------------------------------------------------------------------- authors' mmseg checkpoints
@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(3)
    return {"student": ConfetiNet({"depth": 18}, 19, verbose=False),
            "teacher": ConfetiNet({"depth": 18}, 19, verbose=False),
            "imnet": DeepLabV2(18, 19)}


def _mmseg_segmentor(prefix, seg, conv_level=True):
    """Our segmentor's tensors under the authors' EncoderDecoder names."""
    out = {}
    for k, v in seg.state_dict().items():
        if k.startswith("decode_head.aspp_modules."):
            _, _, n, param = k.split(".")
            k = f"decode_head.aspp_modules.{n}.conv.{param}" if conv_level else k
        out[f"{prefix}.{k}"] = v.clone()
    return out


def _authors_state_dict(nets, conv_level=True):
    sd = {}
    sd.update(_mmseg_segmentor("model", nets["student"].segmentor, conv_level))
    sd.update(_mmseg_segmentor("ema_model", nets["teacher"].segmentor, conv_level))
    sd.update(_mmseg_segmentor("imnet_model", nets["imnet"], conv_level))
    sd["aux_heads.0.conv_cam.weight"] = nets["student"].cam_head.conv.weight.detach().clone()
    sd["aux_heads.1.conv_proj.weight"] = nets["student"].proj_head.weight.detach().clone()
    sd["ema_aux_heads.0.conv_cam.weight"] = nets["teacher"].cam_head.conv.weight.detach().clone()
    sd["ema_aux_heads.1.conv_proj.weight"] = nets["teacher"].proj_head.weight.detach().clone()
    sd["reg_proj.weight"] = torch.randn(512, 512, 1, 1)
    sd["reg_proj.bias"] = torch.randn(512)
    sd["tgt_proto.proto"] = torch.nn.functional.normalize(torch.randn(19, 512), dim=1)
    return sd


def test_authors_key_names_by_hand(nets):
    sd = _authors_state_dict(nets)
    for k in ("model.backbone.stem.0.weight", "model.backbone.layer4.1.bn2.running_var",
              "model.decode_head.aspp_modules.0.conv.weight", "model.decode_head.aspp_modules.3.conv.bias",
              "ema_model.backbone.layer1.0.conv1.weight", "imnet_model.decode_head.aspp_modules.2.conv.weight"):
        assert k in sd, k
    out = convert_mmseg_checkpoint({"state_dict": sd})
    assert out["model"]["decode_head.aspp_modules.3.bias"] is sd["model.decode_head.aspp_modules.3.conv.bias"]
    assert out["model"]["backbone.stem.0.weight"] is sd["model.backbone.stem.0.weight"]
    teacher = out["teacher"]["segmentor"]
    assert teacher["backbone.layer1.0.conv1.weight"] is sd["ema_model.backbone.layer1.0.conv1.weight"]
    assert out["imnet"]["decode_head.aspp_modules.2.weight"] is sd["imnet_model.decode_head.aspp_modules.2.conv.weight"]
    assert out["student"]["cam_head"]["conv.weight"] is sd["aux_heads.0.conv_cam.weight"]
    assert out["student"]["proj_head"]["weight"] is sd["aux_heads.1.conv_proj.weight"]
    assert out["teacher"]["cam_head"]["conv.weight"] is sd["ema_aux_heads.0.conv_cam.weight"]
    assert out["teacher"]["proj_head"]["weight"] is sd["ema_aux_heads.1.conv_proj.weight"]
    assert out["reg_proj"]["bias"] is sd["reg_proj.bias"]
    assert out["prototypes"] is sd["tgt_proto.proto"]


def test_authors_checkpoint_loads_into_our_models(tmp_path, nets):
    sd = _authors_state_dict(nets)
    ckpt = {"meta": {"iter": 40000, "hook_msgs": {"best_score": np.float64(0.5), "best_ckpt": "x.pth"},
                     "CLASSES": ("road", "sidewalk"), "PALETTE": [[128, 64, 128]]},
            "state_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 6e-5, "params": [0]}]}}
    path = tmp_path / "iter_40000.pth"
    torch.save(ckpt, path)
    out = load_authors_checkpoint(path)
    assert out["iteration"] == 40000
    seg = load_model_weights(DeepLabV2(18, 19), out["model"], "converted")
    _equal_state(seg.state_dict(), nets["student"].segmentor.state_dict())
    for role in ("student", "teacher"):
        net = ConfetiNet({"depth": 18}, 19, verbose=False)
        for part in ("segmentor", "cam_head", "proj_head"):
            load_model_weights(getattr(net, part), out[role][part], f"converted [{role}.{part}]")
        _equal_state(net.state_dict(), nets[role].state_dict())
    imnet = load_model_weights(DeepLabV2(18, 19), out["imnet"], "converted [imnet]")
    _equal_state(imnet.state_dict(), nets["imnet"].state_dict())
    proj = load_model_weights(reg_proj(512), out["reg_proj"], "converted [reg_proj]")
    assert torch.equal(proj.weight, sd["reg_proj.weight"]) and torch.equal(proj.bias, sd["reg_proj.bias"])
    assert torch.equal(out["prototypes"], sd["tgt_proto.proto"])
    assert is_mmseg_checkpoint(ckpt) and not is_mmseg_checkpoint(out)


def test_authors_checkpoint_numpy1_meta(tmp_path, nets):
    """Files written with numpy 1.x name the scalar rebuilder numpy.core.multiarray.scalar;
    rewrite the pickle's GLOBAL to that name (protocol 2 text opcodes) and read it back."""
    import zipfile

    new, old = tmp_path / "new.pth", tmp_path / "old.pth"
    sd = _mmseg_segmentor("model", nets["student"].segmentor)
    torch.save({"meta": {"hook_msgs": {"best_score": np.float64(0.5)}}, "state_dict": sd}, new)
    with zipfile.ZipFile(new) as zin, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):  # (already the old name under numpy 1.x)
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                assert b"numpy.core.multiarray" in data
            zout.writestr(info.filename, data)
    out = load_authors_checkpoint(old)
    assert torch.equal(out["model"]["backbone.stem.0.weight"], sd["model.backbone.stem.0.weight"])
    # the numpy allowance is scoped to that read: the plain reader still refuses the file
    from confeti_fast.serialization import read_checkpoint

    with pytest.raises(ConfetiError):
        read_checkpoint(old)


def test_authors_checkpoint_variants(nets):
    # no `.conv.` level, DataParallel prefix, bare state dict, student only
    sd = {f"module.{k}": v for k, v in _mmseg_segmentor("model", nets["student"].segmentor, False).items()}
    out = convert_mmseg_checkpoint(sd)
    assert set(out) == {"model", "student"}
    seg = load_model_weights(DeepLabV2(18, 19), out["model"], "converted")
    _equal_state(seg.state_dict(), nets["student"].segmentor.state_dict())


def test_test_py_selects_converted_weights(nets):
    spec = importlib.util.spec_from_file_location("confeti_test_cli", ROOT / "test.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = convert_mmseg_checkpoint({"state_dict": _authors_state_dict(nets)})
    key, weights = cli.select_weights(out, "ckpt", teacher=True)
    assert key == "teacher" and weights is out["teacher"]["segmentor"]
    key, weights = cli.select_weights(out, "ckpt")
    assert key == "model" and weights is out["model"]


def test_test_py_reads_an_authors_file(nets, tmp_path):
    import numpy as np

    spec = importlib.util.spec_from_file_location("confeti_test_cli", ROOT / "test.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    path = tmp_path / "iter_40000.pth"
    torch.save({"meta": {"iter": 40000, "hook_msgs": {"best_score": np.float64(0.5)}},
                "state_dict": _authors_state_dict(nets)}, path)
    ckpt = cli.load_checkpoint(path)
    assert ckpt["iteration"] == 40000
    key, weights = cli.select_weights(ckpt, path, teacher=True)
    seg = load_model_weights(DeepLabV2(18, 19), weights, "converted")
    _equal_state(seg.state_dict(), nets["teacher"].segmentor.state_dict())


def test_authors_unplaceable_keys(nets):
    sd = _authors_state_dict(nets)
    sd["cut_model.netG.model.1.weight"] = torch.zeros(1)
    sd["model.auxiliary_head.conv_seg.weight"] = torch.zeros(1)
    with pytest.raises(ConfetiError) as err:
        convert_mmseg_checkpoint({"state_dict": sd})
    text = _single_line(err)
    assert "2 key(s)" in text and "cut_model.netG.model.1.weight" in text
    assert "model.auxiliary_head.conv_seg.weight" in text
    many = {f"src_proto.{i}.proto": torch.zeros(1) for i in range(7)}
    with pytest.raises(ConfetiError) as err:
        convert_mmseg_checkpoint(dict(_mmseg_segmentor("model", nets["student"].segmentor), **many))
    text = _single_line(err)
    assert "7 key(s)" in text and "src_proto.0.proto" in text and "(+4 more)" in text


def test_authors_not_mmseg_and_bad_file(tmp_path):
    with pytest.raises(ConfetiError) as err:
        convert_mmseg_checkpoint({"state_dict": {"reg_proj.weight": torch.zeros(1)}})
    assert "no model.backbone" in _single_line(err)
    path = tmp_path / "bad.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ConfetiError) as err:
        load_authors_checkpoint(path)
    assert str(path) in _single_line(err)


def test_converted_missing_key_is_reported(nets):
    sd = _mmseg_segmentor("model", nets["student"].segmentor)
    sd.pop("model.decode_head.aspp_modules.1.conv.weight")
    out = convert_mmseg_checkpoint(sd)
    with pytest.raises(ConfetiError) as err:
        load_model_weights(DeepLabV2(18, 19), out["model"], "converted")
    assert "decode_head.aspp_modules.1.weight" in _single_line(err)
