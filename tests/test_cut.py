"""CUT networks (docs/method.md §2): layout and keys as in the original CUT code, blur filters, sampler,
[-1, 1] <-> ImageNet conversion, init, LSGAN. Expected values are derived by hand below."""
import math

import pytest
import torch
import torch.nn.functional as F

from confeti_fast.models import (
    NCE_CHANNELS,
    NCE_LAYERS,
    CutGenerator,
    PatchDiscriminator,
    PatchSampleF,
    build_cut,
    cut_to_imagenet,
    imagenet_to_cut,
    init_cut_weights,
    lsgan_loss,
)
from confeti_fast.models.cut import Downsample, Upsample

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    return init_cut_weights(CutGenerator())


@pytest.fixture(scope="module")
def small_gen():
    torch.manual_seed(1)
    return init_cut_weights(CutGenerator(ngf=8))


# ----------------------------------------------------------------------------- generator
def test_nce_layer_constants():
    assert NCE_LAYERS == (0, 4, 8, 12, 16)
    assert NCE_CHANNELS == (3, 128, 256, 256, 256)


def test_nce_layer_shapes(gen):
    # 32x32 input: layer 0 = reflect pad 3 -> 38x38 (3 ch); conv7 -> 32x32; layer 4 = conv3 s1 p1
    # 64->128 at 32x32; layer 7 blur-down -> 16x16; layer 8 = conv3 128->256 at 16x16; layer 11
    # blur-down -> 8x8; layers 12 and 16 = residual blocks 1 and 5 (256 ch, 8x8).
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        feats = gen(x, nce_layers=NCE_LAYERS)
    assert [tuple(f.shape) for f in feats] == [
        (1, 3, 38, 38), (1, 128, 32, 32), (1, 256, 16, 16), (1, 256, 8, 8), (1, 256, 8, 8)]
    padded = feats[0][0]
    assert torch.equal(padded[:, 3:-3, 3:-3], x[0])
    # reflection: padded row 0 is original row 3, padded column 0 original column 3
    assert torch.equal(padded[:, 0, 3:-3], x[0, :, 3, :])
    assert torch.equal(padded[:, 3:-3, 0], x[0, :, :, 3])
    assert torch.equal(padded[:, 2, 3:-3], x[0, :, 1, :])


def test_nce_layers_in_requested_order(small_gen):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        feats = small_gen(x, nce_layers=[8, 0])
    assert [tuple(f.shape) for f in feats] == [(1, 32, 8, 8), (1, 3, 22, 22)]
    with pytest.raises(ValueError):
        small_gen(x, nce_layers=[32])


def test_generator_output_shape_and_range(gen):
    torch.manual_seed(2)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        y = gen(x)
    assert y.shape == x.shape
    assert float(y.min()) >= -1.0 and float(y.max()) <= 1.0


def _reference_generator(x, sd):
    """docs/method.md §2's generator written out with functional ops and test-made blur kernels."""
    def conv(h, k, pad=0):
        return F.conv2d(h, sd[f"model.{k}.weight"], sd[f"model.{k}.bias"], padding=pad)

    def norm_relu(h):
        return F.relu(F.instance_norm(h))

    def blur_down(h):
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(h.shape[1], 1, 3, 3)
        return F.conv2d(F.pad(h, (1, 1, 1, 1), mode="reflect"), k, stride=2, groups=h.shape[1])

    def blur_up(h):
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = (k[:, None] * k[None, :] / 64 * 4).expand(h.shape[1], 1, 4, 4)
        out = F.conv_transpose2d(F.pad(h, (1, 1, 1, 1), mode="replicate"), k, stride=2, padding=2,
                                 groups=h.shape[1])
        return out[:, :, 1:, 1:][:, :, :-1, :-1]

    h = norm_relu(conv(F.pad(x, (3, 3, 3, 3), mode="reflect"), 1))
    for k in (4, 8):
        h = blur_down(norm_relu(conv(h, k, pad=1)))
    for b in range(12, 21):
        w1, b1 = sd[f"model.{b}.conv_block.1.weight"], sd[f"model.{b}.conv_block.1.bias"]
        w2, b2 = sd[f"model.{b}.conv_block.5.weight"], sd[f"model.{b}.conv_block.5.bias"]
        r = norm_relu(F.conv2d(F.pad(h, (1, 1, 1, 1), mode="reflect"), w1, b1))
        h = h + F.instance_norm(F.conv2d(F.pad(r, (1, 1, 1, 1), mode="reflect"), w2, b2))
    for k in (22, 26):
        h = norm_relu(conv(blur_up(h), k, pad=1))
    return torch.tanh(conv(F.pad(h, (3, 3, 3, 3), mode="reflect"), 30))


def test_generator_matches_spec_written_out(small_gen):
    torch.manual_seed(10)
    # larger weights than CUT's init so every layer matters numerically
    g = CutGenerator(ngf=8)
    x = torch.rand(2, 3, 16, 20) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(g(x), _reference_generator(x, g.state_dict()), atol=1e-5)
        assert torch.allclose(small_gen(x), _reference_generator(x, small_gen.state_dict()), atol=1e-5)


def test_generator_layout(gen):
    assert len(gen.model) == 32
    # 2 (conv7) + 2 + 1 (filt) + 2 + 1 + 9 blocks x 4 + (1 + 2) x 2 up blocks + 2 (conv7) = 52
    expected = ["model.1.weight", "model.1.bias", "model.4.weight", "model.4.bias", "model.7.filt",
                "model.8.weight", "model.8.bias", "model.11.filt"]
    for b in range(12, 21):
        expected += [f"model.{b}.conv_block.{i}.{p}" for i in (1, 5) for p in ("weight", "bias")]
    expected += ["model.21.filt", "model.22.weight", "model.22.bias", "model.25.filt", "model.26.weight",
                 "model.26.bias", "model.30.weight", "model.30.bias"]
    sd = gen.state_dict()
    assert len(expected) == 52
    assert sorted(sd) == sorted(expected)
    shapes = {"model.1.weight": (64, 3, 7, 7), "model.4.weight": (128, 64, 3, 3), "model.7.filt": (128, 1, 3, 3),
              "model.8.weight": (256, 128, 3, 3), "model.11.filt": (256, 1, 3, 3),
              "model.12.conv_block.1.weight": (256, 256, 3, 3), "model.12.conv_block.5.weight": (256, 256, 3, 3),
              "model.21.filt": (256, 1, 4, 4), "model.22.weight": (128, 256, 3, 3), "model.25.filt": (128, 1, 4, 4),
              "model.26.weight": (64, 128, 3, 3), "model.30.weight": (3, 64, 7, 7), "model.30.bias": (3,)}
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    # instance norms (stem, 2 down, 9 x 2 residual, 2 up) carry no parameters or running stats
    norms = [m for m in gen.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert len(norms) == 1 + 2 + 18 + 2 and all(not m.affine and not m.track_running_stats for m in norms)


# ----------------------------------------------------------------------------- blur filters
def test_blur_down_filter_and_hand_values():
    down = Downsample(1)
    assert torch.equal(down.filt[0, 0], torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16)
    # x[i, j] = 4i + j is linear; reflect padding mirrors row 1 above row 0, so the [1,2,1]/4
    # blur centred on row 0 sees rows (1, 0, 1) -> 0.5, on row 2 sees (1, 2, 3) -> 2; same for
    # columns. Output = 4 * row + col at the centres: [[2.5, 4], [8.5, 10]].
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.allclose(down(x), torch.tensor([[[[2.5, 4.0], [8.5, 10.0]]]]))
    # A unit impulse at (1, 1): the window at row 0 covers padded rows (-1->1, 0, 1): weight
    # 1/4 + 1/4 = 1/2; the window at row 2 covers rows (1, 2, 3): weight 1/4. Outer product:
    delta = torch.zeros(1, 1, 4, 4)
    delta[0, 0, 1, 1] = 1
    assert torch.allclose(down(delta), torch.tensor([[[[1 / 4, 1 / 8], [1 / 8, 1 / 16]]]]))


def test_blur_down_output_size_and_depthwise():
    down = Downsample(2)
    x = torch.zeros(1, 2, 5, 7)
    x[0, 1] = 3.0
    y = down(x)
    assert y.shape == (1, 2, 3, 4)  # ceil(5/2), ceil(7/2)
    assert torch.all(y[0, 0] == 0) and torch.allclose(y[0, 1], torch.full((3, 4), 3.0))


def test_blur_up_filter_and_hand_values():
    up = Upsample(1)
    one_d = torch.tensor([1., 3., 3., 1.])
    assert torch.allclose(up.filt[0, 0], one_d[:, None] * one_d[None, :] / 64 * 4)
    # 1-D: replicate pad [a, b] -> [a, a, b, b]; transposed conv, stride 2, taps [1,3,3,1]/8 x 2;
    # after padding 2 and the [1:-1] crop the outputs are the full-conv positions 3..6:
    # [a, (3a + b)/4, (a + 3b)/4, b]. In 2-D the same along rows and columns. For
    # [[0, 4], [8, 16]]: rows -> [0,4], [2,7], [6,13], [8,16]; then columns.
    x = torch.tensor([[[[0.0, 4.0], [8.0, 16.0]]]])
    expected = torch.tensor([[0.0, 1.0, 3.0, 4.0],
                             [2.0, 3.25, 5.75, 7.0],
                             [6.0, 7.75, 11.25, 13.0],
                             [8.0, 10.0, 14.0, 16.0]])
    assert torch.allclose(up(x)[0, 0], expected)
    assert torch.allclose(up(torch.ones(1, 1, 3, 5)), torch.ones(1, 1, 6, 10))


# ----------------------------------------------------------------------------- discriminator
def test_discriminator_layout():
    d = PatchDiscriminator()
    assert len(d.model) == 15
    expected = {"model.0.weight": (64, 3, 4, 4), "model.0.bias": (64,), "model.2.filt": (64, 1, 3, 3),
                "model.3.weight": (128, 64, 4, 4), "model.3.bias": (128,), "model.6.filt": (128, 1, 3, 3),
                "model.7.weight": (256, 128, 4, 4), "model.7.bias": (256,), "model.10.filt": (256, 1, 3, 3),
                "model.11.weight": (512, 256, 4, 4), "model.11.bias": (512,),
                "model.14.weight": (1, 512, 4, 4), "model.14.bias": (1,)}
    sd = d.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_discriminator_output_shape():
    torch.manual_seed(3)
    d = init_cut_weights(PatchDiscriminator())
    # conv4 s1 p1 shrinks by 1, blur-down gives ceil(n/2):
    # 70 -> 69 -> 35 -> 34 -> 17 -> 16 -> 8 -> 7 (conv 256->512) -> 6 (conv 512->1)
    # 32 -> 31 -> 16 -> 15 -> 8 -> 7 -> 4 -> 3 -> 2
    with torch.no_grad():
        assert d(torch.zeros(1, 3, 70, 70)).shape == (1, 1, 6, 6)
        assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)


# ----------------------------------------------------------------------------- patch sampler
def _sampler():
    # PyTorch's default Linear init: MLP outputs of norm ~1, so the + 1e-7 of CUT's Normalize
    # is negligible (with CUT's init, gain 0.02, the raw norms are ~1e-4 and rows come out
    # at |v| / (|v| + 1e-7), about 0.999, exactly as in CUT).
    torch.manual_seed(4)
    return PatchSampleF(nc=256, in_channels=(3, 8))


def test_sampler_layout_is_eager():
    f = PatchSampleF()
    keys = sorted(f.state_dict())
    assert keys == sorted(f"mlp_{i}.{j}.{p}" for i in range(5) for j in (0, 2) for p in ("weight", "bias"))
    n = sum(c * 256 + 256 + 256 * 256 + 256 for c in (3, 128, 256, 256, 256))
    assert sum(p.numel() for p in f.parameters()) == n
    assert tuple(f.mlp_1[0].weight.shape) == (256, 128)


def test_sampler_shapes_norm_and_shared_positions():
    f = _sampler()
    torch.manual_seed(5)
    feats = [torch.randn(2, 3, 6, 6), torch.randn(2, 8, 20, 20)]
    out, ids = f(feats, num_patches=16)
    assert [tuple(o.shape) for o in out] == [(32, 256), (32, 256)]
    for o in out:
        assert torch.allclose(o.norm(dim=1), torch.ones(32), atol=1e-5)
    for feat, o, pid, mlp in zip(feats, out, ids, (f.mlp_0, f.mlp_1)):
        assert pid.numel() == 16 and len(set(pid.tolist())) == 16
        w = feat.shape[3]
        # rows are grouped by image; image b's row p is the MLP of pixel pid[p] of image b
        for b in range(2):
            pix = torch.stack([feat[b, :, int(i) // w, int(i) % w] for i in pid])
            v = mlp(pix)
            assert torch.allclose(o[b * 16:(b + 1) * 16], v / (v.norm(dim=1, keepdim=True) + 1e-7), atol=1e-6)


def test_sampler_reuses_given_ids():
    f = _sampler()
    feats = [torch.randn(2, 3, 6, 6), torch.randn(2, 8, 20, 20)]
    _, ids = f(feats, num_patches=16)
    other = [x + 1 for x in feats]
    out2, ids2 = f(other, num_patches=16, patch_ids=ids)
    assert all(torch.equal(a, b) for a, b in zip(ids, ids2))
    w = 20
    pix = torch.stack([other[1][1, :, int(i) // w, int(i) % w] for i in ids[1]])
    v = f.mlp_1(pix)
    assert torch.allclose(out2[1][16:], v / (v.norm(dim=1, keepdim=True) + 1e-7), atol=1e-6)


def test_sampler_fewer_positions_than_requested_and_generator():
    f = _sampler()
    feats = [torch.randn(2, 3, 5, 5), torch.randn(2, 8, 4, 4)]
    out, ids = f(feats, num_patches=64)
    assert [tuple(o.shape) for o in out] == [(50, 256), (32, 256)]
    assert sorted(ids[0].tolist()) == list(range(25)) and sorted(ids[1].tolist()) == list(range(16))
    # positions: torch.randperm(H*W, generator)[:min(num_patches, H*W)], layer after layer
    g = torch.Generator().manual_seed(7)
    _, ids = f([torch.randn(1, 3, 6, 6), torch.randn(1, 8, 5, 5)], num_patches=10, generator=g)
    ref = torch.Generator().manual_seed(7)
    assert torch.equal(ids[0], torch.randperm(36, generator=ref)[:10])
    assert torch.equal(ids[1], torch.randperm(25, generator=ref)[:10])


# ----------------------------------------------------------------------------- conversions
def test_imagenet_cut_round_trip():
    g = torch.Generator().manual_seed(8)
    u8 = torch.randint(0, 256, (2, 3, 5, 7), generator=g, dtype=torch.uint8)
    mean = torch.tensor(MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(STD).reshape(1, 3, 1, 1)
    normalized = (u8.float() - mean) / std
    cut = imagenet_to_cut(normalized)
    assert torch.allclose(cut, u8.float() / 127.5 - 1, atol=1e-5)
    assert torch.allclose(cut_to_imagenet(cut), normalized, atol=1e-5)
    # black is -1 in CUT and (0 - mean) / std for the segmentor, exactly; white is 1 and (255 - mean) / std
    black = cut_to_imagenet(-torch.ones(1, 3, 2, 2))
    assert torch.equal(black, ((torch.zeros(1, 3, 1, 1) - mean) / std).expand(1, 3, 2, 2))
    white = cut_to_imagenet(torch.ones(3, 2, 2))
    assert torch.allclose(white, ((255 - mean) / std)[0].expand(3, 2, 2))


def test_conversion_custom_stats():
    x = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 3, 1, 1)
    rgb = cut_to_imagenet(x, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.allclose(rgb.flatten(), torch.tensor([0.0, 127.5, 255.0]))
    assert torch.allclose(imagenet_to_cut(rgb, mean=(0, 0, 0), std=(1, 1, 1)), x)


# ----------------------------------------------------------------------------- init, loss
def test_cut_init_xavier_gain_002(gen):
    # xavier-normal: std = gain * sqrt(2 / (fan_in + fan_out)); 3x3 conv 256->256:
    # fan_in = fan_out = 256 * 9 -> 0.02 * sqrt(2 / 4608) = 4.167e-4
    w = gen.state_dict()["model.12.conv_block.1.weight"]
    assert abs(float(w.std()) / (0.02 * math.sqrt(2 / 4608)) - 1) < 0.01
    assert float(w.mean().abs()) < 1e-5
    assert all(float(b.abs().max()) == 0 for k, b in gen.state_dict().items() if k.endswith("bias"))
    # the blur filters are buffers, untouched by the init
    assert torch.allclose(gen.state_dict()["model.7.filt"][0, 0].sum(), torch.tensor(1.0))
    f = init_cut_weights(PatchSampleF())
    lin = f.mlp_1[0].weight  # Linear 128 -> 256: 0.02 * sqrt(2 / 384)
    assert abs(float(lin.detach().std()) / (0.02 * math.sqrt(2 / 384)) - 1) < 0.02


def test_lsgan_loss_values():
    pred = torch.tensor([[0.5, 1.5], [1.0, 0.0]])
    # real: (0.25 + 0.25 + 0 + 1) / 4; fake: (0.25 + 2.25 + 1 + 0) / 4
    assert float(lsgan_loss(pred, True)) == pytest.approx(0.375)
    assert float(lsgan_loss(pred, False)) == pytest.approx(0.875)


def test_build_cut_channels():
    g, d, f = build_cut(ngf=8, ndf=4, nc=16, num_patches=8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        feats = g(x, nce_layers=NCE_LAYERS)
        out, _ = f(feats)
        assert d(g(x)).shape == (2, 1, 2, 2)  # see test_discriminator_output_shape
    assert [t.shape[1] for t in feats] == [3, 16, 32, 32, 32]
    assert [tuple(o.shape) for o in out] == [(16, 16)] * 5


# ----------------------------------------------------------------------------- memory format / autocast
def test_channels_last_matches(small_gen):
    torch.manual_seed(9)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d = init_cut_weights(PatchDiscriminator(ndf=4))
    with torch.no_grad():
        ref = small_gen(x)
        got = small_gen(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(ref, got, atol=1e-5)
        feats = small_gen(x.contiguous(memory_format=torch.channels_last), nce_layers=NCE_LAYERS)
        feats_ref = small_gen(x, nce_layers=NCE_LAYERS)
        f = init_cut_weights(PatchSampleF(nc=16, in_channels=[t.shape[1] for t in feats]))
        out, ids = f(feats, num_patches=8)
        out_ref, _ = f(feats_ref, patch_ids=ids)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, out_ref))
        assert torch.allclose(d(x.contiguous(memory_format=torch.channels_last)), d(x), atol=1e-5)


def test_autocast_cpu_bf16(small_gen):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    d = init_cut_weights(PatchDiscriminator(ndf=4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = small_gen(x.contiguous(memory_format=torch.channels_last))
        feats = small_gen(x, nce_layers=NCE_LAYERS)
        f = PatchSampleF(nc=16, in_channels=[t.shape[1] for t in feats])
        out, _ = f(feats, num_patches=8)
        score = d(y)
        loss = lsgan_loss(score, True)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in out)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
def test_cuda_channels_last_autocast(small_gen):
    g = small_gen.to("cuda").to(memory_format=torch.channels_last)
    x = (torch.rand(2, 3, 32, 32, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            y = g(x)
            feats = g(x, nce_layers=NCE_LAYERS)
            f = PatchSampleF(nc=16, in_channels=[t.shape[1] for t in feats]).cuda()
            out, ids = f(feats, num_patches=8, generator=torch.Generator().manual_seed(0))
        assert y.shape == x.shape and torch.isfinite(y.float()).all()
        assert all(i.device.type == "cuda" for i in ids)
    finally:
        small_gen.to("cpu").to(memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- the demo's choices (docs/choices.md)
def _receptive_field(d, side=200):
    """Rows of the input that reach the centre output of `d`, instance norms taken out (they
    mix every position into every other)."""
    for i, module in enumerate(d.model):
        if isinstance(module, torch.nn.InstanceNorm2d):
            d.model[i] = torch.nn.Identity()
    x = torch.rand(1, 3, side, side, requires_grad=True)
    out = d(x)
    out[0, 0, out.shape[-2] // 2, out.shape[-1] // 2].backward()
    rows = (x.grad.abs().sum(dim=(0, 1, 3)) > 0).nonzero()
    return int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize("layers, field", [(3, 84), (2, 40), (1, 18)])
def test_discriminator_receptive_field(layers, field):
    torch.manual_seed(0)
    assert _receptive_field(init_cut_weights(PatchDiscriminator(4, n_layers=layers))) == field


def test_residual_generator_starts_as_the_identity_and_keeps_cut_keys():
    torch.manual_seed(0)
    g, _, _ = build_cut(ngf=8, ndf=4, nc=16, num_patches=8, generator="residual")
    plain, _, _ = build_cut(ngf=8, ndf=4, nc=16, num_patches=8)
    assert g.state_dict().keys() == plain.state_dict().keys()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(g(x), x)
        assert not torch.allclose(plain(x), x, atol=0.1)  # CUT's G starts far from it
    # once its last layer moves, it is x + r(x), clamped to CUT's range
    with torch.no_grad():
        g.model[-2].bias.fill_(0.5)
    out = g(x)
    assert torch.allclose(out, (x + 0.5).clamp(-1, 1)) and out.max() <= 1.0
    out.sum().backward()  # the gradient reaches the residual branch's first layer
    assert g.model[1].weight.grad is not None


def test_build_cut_refuses_an_unknown_generator():
    with pytest.raises(ValueError, match="cut.generator"):
        build_cut(ngf=8, ndf=4, generator="unet")
