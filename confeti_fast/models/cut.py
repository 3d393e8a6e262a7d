"""The CUT style-transfer networks (docs/method.md §2): generator G, PatchGAN discriminator D, patch sampler F.

Module layout and state-dict keys are those of the original CUT code
(taesungp/contrastive-unpaired-translation, models/networks.py, with CONFETI's options
`--netG resnet_9blocks --normG instance --normD instance --netF mlp_sample`, anti-aliasing on),
so its `latest_net_G.pth` / `latest_net_D.pth` / `latest_net_F.pth` load without renaming
(see `interop.load_cut_state_dict`):

    G  model.1 conv7 3->64 | model.4, model.8 down convs | model.7.filt, model.11.filt blur-down
       | model.12 .. model.20 residual blocks (conv_block.1 / conv_block.5) | model.21.filt,
       model.25.filt blur-up | model.22, model.26 up convs | model.30 conv7 64->3     (52 keys)
    D  model.0, 3, 7, 11, 14 convs | model.2.filt, model.6.filt, model.10.filt      (13 keys)
    F  mlp_{i}.0 / mlp_{i}.2 (Linear weight and bias) for the 5 NCE layers          (20 keys)

Everything here is convolutions, padding, instance norm and element-wise ops, with `reshape`
instead of `view`, so it runs in channels_last memory format and under autocast.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.schema import CUT_GENERATORS
from ..data.normalization import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize

# Sequential indices of G whose outputs feed PatchNCE (CUT's --nce_layers 0,4,8,12,16):
# the reflect-padded input, the first 128-ch conv, the first 256-ch conv, residual blocks 1 and 5.
NCE_LAYERS = (0, 4, 8, 12, 16)
NCE_CHANNELS = (3, 128, 256, 256, 256)


def _binomial_filter(taps):
    """Normalized 2-D binomial filter from the 1-D taps (outer product / sum)."""
    a = torch.tensor(taps, dtype=torch.float32)
    filt = a[:, None] * a[None, :]
    return filt / filt.sum()


class Downsample(nn.Module):
    """Anti-aliased stride-2 downsampling: reflect pad 1, depthwise [1,2,1]x[1,2,1]/16 blur, stride 2.

    Output size ceil(H/2) x ceil(W/2). The filter is the buffer `filt` (C x 1 x 3 x 3), as in CUT.
    """

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.register_buffer("filt", _binomial_filter([1.0, 2.0, 1.0])[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x):
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.filt.to(x.dtype), stride=2, groups=x.shape[1])


class Upsample(nn.Module):
    """Anti-aliased x2 upsampling: replicate pad 1, depthwise transposed conv with the
    normalized [1,3,3,1]x[1,3,3,1] filter times 4 (stride^2), stride 2, padding 2, then crop
    [1:, 1:] and, the filter being even-sized, [:-1, :-1]. Output 2H x 2W. Buffer `filt`
    (C x 1 x 4 x 4), as in CUT."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        filt = _binomial_filter([1.0, 3.0, 3.0, 1.0]) * 4.0
        self.register_buffer("filt", filt[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x):
        if torch.compiler.is_compiling():
            return upsample_separable(x)
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        out = F.conv_transpose2d(x, self.filt.to(x.dtype), stride=2, padding=2, groups=x.shape[1])
        return out[:, :, 1:-1, 1:-1]


def upsample_separable(x):
    """`Upsample` as two 1-D passes of taps (1/4, 3/4) on edge-clamped neighbours, the same
    filter up to rounding. Compiled graphs use it: inductor mispredicts the output strides of
    replication_pad2d_backward (a stride assertion on the CPU) and of the transposed
    convolution's backward (pytorch issues 171622 and 184026), which would crash stage 0/1."""
    for dim in (3, 2):
        n = x.shape[dim]
        previous = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
        following = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
        even, odd = 0.25 * previous + 0.75 * x, 0.75 * x + 0.25 * following
        x = torch.stack([even, odd], dim + 1).flatten(dim, dim + 1)
    return x


def _instance_norm(channels):
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResnetBlock(nn.Module):
    """x + conv_block(x); conv_block = reflect-pad 1, conv3, IN, ReLU, reflect-pad 1, conv3, IN."""

    def __init__(self, dim):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, padding=0, bias=True),
            _instance_norm(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, padding=0, bias=True),
            _instance_norm(dim),
        )

    def forward(self, x):
        return x + self.conv_block(x)


class CutGenerator(nn.Module):
    """CUT's ResnetGenerator (resnet_9blocks, instance norm, anti-aliased, no dropout).

    `forward(x)` maps a B x 3 x H x W image in [-1, 1] (H, W multiples of 4) to one of the same
    size in [-1, 1]. `forward(x, nce_layers=[...])` returns instead the list of outputs of the
    `self.model` layers with those indices, in the order asked, and stops after the deepest
    one (CUT's `encode_only`); layer 0's output is the reflect-padded input.

    `residual=True` (not CUT's; config cut.generator "residual") gives clamp(x + r(x), -1, 1),
    r being the same network without its final tanh: with r's last convolution at zero
    (`build_cut`) G starts as the identity and learns only the change of look. The state-dict
    keys are CUT's either way (tanh has no weights).
    """

    def __init__(self, ngf=64, n_blocks=9, input_nc=3, output_nc=3, residual=False):
        super().__init__()
        self.residual = residual
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, padding=0, bias=True),
                  _instance_norm(ngf), nn.ReLU(True)]
        for i in range(2):
            cin, cout = ngf * 2 ** i, ngf * 2 ** (i + 1)
            layers += [nn.Conv2d(cin, cout, 3, stride=1, padding=1, bias=True), _instance_norm(cout),
                       nn.ReLU(True), Downsample(cout)]
        dim = ngf * 4
        layers += [ResnetBlock(dim) for _ in range(n_blocks)]
        for i in range(2):
            cin = ngf * 2 ** (2 - i)
            cout = cin // 2
            layers += [Upsample(cin), nn.Conv2d(cin, cout, 3, stride=1, padding=1, bias=True),
                       _instance_norm(cout), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7, padding=0),
                   nn.Identity() if residual else nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x, nce_layers=None):
        if nce_layers is None:
            return (x + self.model(x)).clamp(-1.0, 1.0) if self.residual else self.model(x)
        wanted = [int(i) for i in nce_layers]
        if not wanted:
            return []
        n = len(self.model)
        bad = [i for i in wanted if not 0 <= i < n]
        if bad:
            raise ValueError(f"nce_layers {bad} out of range: the generator has layers 0..{n - 1}")
        last = max(wanted)
        found = {}
        feat = x
        for idx, layer in enumerate(self.model):
            feat = layer(feat)
            if idx in wanted:
                found[idx] = feat
            if idx == last:
                break
        return [found[i] for i in wanted]


class PatchDiscriminator(nn.Module):
    """CUT's NLayerDiscriminator (70x70 PatchGAN, instance norm, anti-aliased).

    conv4 s1 p1 3->64, LeakyReLU(0.2), blur-down; [conv4 s1 p1, IN, LeakyReLU, blur-down] to
    128 and 256; conv4 s1 p1 256->512, IN, LeakyReLU; conv4 s1 p1 512->1. Returns B x 1 x h x w
    raw scores (no sigmoid; LSGAN).
    """

    def __init__(self, ndf=64, n_layers=3, input_nc=3):
        super().__init__()
        seq = [nn.Conv2d(input_nc, ndf, 4, stride=1, padding=1), nn.LeakyReLU(0.2, True), Downsample(ndf)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=True),
                    _instance_norm(ndf * mult), nn.LeakyReLU(0.2, True), Downsample(ndf * mult)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=True),
                _instance_norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        seq += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*seq)

    def forward(self, x):
        return self.model(x)


def l2_normalize(x, eps=1e-7):
    """CUT's Normalize: x / (||x||_2 over dim 1 + eps), computed in at least float32."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)


class PatchSampleF(nn.Module):
    """CUT's PatchSampleF with `use_mlp=True` (netF mlp_sample).

    Per NCE layer i an MLP `mlp_{i}` = Linear(C_i, nc), ReLU, Linear(nc, nc), built here from
    the known channels (CUT builds them at the first forward) so an optimizer sees them.

    `forward(feats, num_patches, patch_ids=None, generator=None)` -> (list of (B*P, nc) L2-normalized
    rows grouped by image, list of patch-id tensors). Per layer, P = min(num_patches, H*W)
    positions are drawn with `torch.randperm(H*W, generator=generator)` and shared by all images
    of the batch; passing the `patch_ids` returned for k reuses them for q.
    """

    def __init__(self, nc=256, num_patches=256, in_channels=NCE_CHANNELS):
        super().__init__()
        self.nc = nc
        self.num_patches = num_patches
        self.in_channels = tuple(int(c) for c in in_channels)
        for i, c in enumerate(self.in_channels):
            setattr(self, f"mlp_{i}", nn.Sequential(nn.Linear(c, nc), nn.ReLU(), nn.Linear(nc, nc)))

    def mlp(self, i):
        return getattr(self, f"mlp_{i}")

    def forward(self, feats, num_patches=None, patch_ids=None, generator=None):
        num_patches = self.num_patches if num_patches is None else int(num_patches)
        if len(feats) != len(self.in_channels):
            raise ValueError(f"PatchSampleF expects {len(self.in_channels)} feature maps, got {len(feats)}")
        if patch_ids is not None and len(patch_ids) != len(feats):
            raise ValueError(f"patch_ids has {len(patch_ids)} entries for {len(feats)} feature maps")
        out, ids = [], []
        for i, feat in enumerate(feats):
            b, c, h, w = feat.shape
            if c != self.in_channels[i]:
                raise ValueError(f"NCE feature {i} has {c} channels, the sampler expects {self.in_channels[i]}")
            flat = feat.permute(0, 2, 3, 1).reshape(b, h * w, c)
            if patch_ids is not None:
                pid = patch_ids[i].to(feat.device, non_blocking=True)
            else:
                draw_on = generator.device if generator is not None else feat.device
                pid = torch.randperm(h * w, generator=generator, device=draw_on)[: min(num_patches, h * w)]
                pid = pid.to(feat.device, non_blocking=True)
            sample = flat[:, pid, :].reshape(b * pid.numel(), c)
            out.append(l2_normalize(self.mlp(i)(sample)))
            ids.append(pid)
        return out, ids


def init_cut_weights(module, gain=0.02):
    """CUT's init (init_type xavier, init_gain 0.02): xavier-normal weights for every Conv*/Linear
    module, biases 0. Returns the module."""
    for m in module.modules():
        name = type(m).__name__
        if ("Conv" in name or "Linear" in name) and isinstance(getattr(m, "weight", None), torch.Tensor):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return module


def cut_to_imagenet(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """CUT image in [-1, 1] -> segmentor input: rgb = (x + 1) * 127.5, (rgb - mean) / std.
    x is B x 3 x H x W or 3 x H x W; mean/std per channel on the 0..255 scale."""
    x = x if x.is_floating_point() else x.float()
    return normalize((x + 1.0) * 127.5, mean, std)


def imagenet_to_cut(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Segmentor input (ImageNet-normalized) -> CUT image: (x * std + mean) / 127.5 - 1."""
    x = x if x.is_floating_point() else x.float()
    return denormalize(x, mean, std) / 127.5 - 1.0


def lsgan_loss(prediction, target_is_real):
    """LSGAN: mean squared error of the discriminator scores against 1 (real) or 0 (fake)."""
    pred = prediction.float()
    target = 1.0 if target_is_real else 0.0
    return (pred - target).pow(2).mean()


def build_cut(ngf=64, ndf=64, n_blocks=9, nc=256, num_patches=256, generator="resnet", d_layers=3):
    """(G, D, F) with CUT's init. `generator`: "resnet" (CUT's) or "residual" (the identity at
    the start: `CutGenerator(residual=True)` with its last convolution zeroed). `d_layers`: the
    PatchGAN's downsampling layers (CUT: 3, an 84 px receptive field; 2: 40 px; 1: 18 px)."""
    if generator not in CUT_GENERATORS:
        raise ValueError(f"cut.generator must be one of {CUT_GENERATORS}, got {generator!r}")
    g = init_cut_weights(CutGenerator(ngf, n_blocks, residual=generator == "residual"))
    if generator == "residual":
        last = g.model[-2]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    d = init_cut_weights(PatchDiscriminator(ndf, n_layers=d_layers))
    f = init_cut_weights(PatchSampleF(nc, num_patches, (3, ngf * 2, ngf * 4, ngf * 4, ngf * 4)))
    return g, d, f
