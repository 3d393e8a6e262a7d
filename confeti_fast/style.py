"""The style-transfer module: CUT's G, D and F with their optimizers and losses (docs/method.md §2, 3, 6).

Images cross between the segmentor's ImageNet normalization and CUT's [-1, 1] range through
`imagenet_to_cut` / `cut_to_imagenet` only, so the conversion is exact and in one place.
"""
from pathlib import Path

import torch

from . import ops
from .data.normalization import denormalize
from .errors import ConfetiError
from .models.cut import NCE_LAYERS, build_cut, cut_to_imagenet, imagenet_to_cut, lsgan_loss
from .models.interop import fit_cut_state_dict
from .models.weights import load_model_weights
from .serialization import checkpoint_kind, read_checkpoint


class StyleTransfer:
    def __init__(self, cut_cfg, device, mean, std, fused=False, prepare=None):
        """`prepare(x)` gives every image that G or D sees the run's memory format (one format
        per compiled module input)."""
        self.cfg, self.mean, self.std = cut_cfg, mean, std
        self.prepare = prepare or (lambda x: x)
        nets = build_cut(cut_cfg["ngf"], cut_cfg["ndf"], cut_cfg["n_blocks"], cut_cfg["nce_dim"],
                         cut_cfg["num_patches"], cut_cfg["generator"], cut_cfg["d_layers"])
        self.G, self.D, self.F = (net.to(device) for net in nets)
        betas = tuple(cut_cfg["betas"])
        fused = fused or None  # None: torch's default (foreach)
        self.opt_G = torch.optim.Adam(list(self.G.parameters()) + list(self.F.parameters()),
                                      lr=cut_cfg["lr"], betas=betas, fused=fused)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=cut_cfg["lr"], betas=betas, fused=fused)

    def modules(self):
        return {"G": self.G, "D": self.D, "F": self.F}

    def to_cut(self, x):
        return self.prepare(imagenet_to_cut(x, self.mean, self.std))

    def stylize(self, x_cut):
        """G(x) for an image in CUT's range, in the run's memory format."""
        return self.prepare(self.G(x_cut))

    def to_imagenet(self, x):
        return cut_to_imagenet(x, self.mean, self.std)

    def translate(self, x):
        """x_st = G(x_s) for a segmentor-normalized image, returned in the same normalization."""
        return self.to_imagenet(self.stylize(self.to_cut(x)))

    def freeze(self):
        """Stage 2: G runs in eval mode without gradients."""
        for net in self.modules().values():
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)

    def nce(self, real, fake, gen):
        """PatchNCE between the encoder features of `real` (keys, detached) and `fake` (queries)
        at the same 256 positions per layer."""
        keys, ids = self.F(self.G(real, nce_layers=NCE_LAYERS), generator=gen)
        queries, _ = self.F(self.G(fake, nce_layers=NCE_LAYERS), patch_ids=ids)
        return ops.patch_nce(queries, keys, real.shape[0], tau=self.cfg["nce_tau"])

    def judge(self, x):
        """D's patch scores. With cut.d_ignore_bottom = k > 0 (not CUT's) D sees every image
        without its bottom k rows, where the target's ego hood lies and no source image has one,
        so that D cannot tell the domains apart by a cue G cannot remove."""
        rows = self.cfg["d_ignore_bottom"]
        if rows and x.shape[-2] <= rows:
            raise ConfetiError(f"cut.d_ignore_bottom = {rows} hides every row of the {x.shape[-2]}-row crops "
                               f"from D: make it smaller than the stage's crop_size height")
        return self.D(x[..., : x.shape[-2] - rows, :] if rows else x)

    def d_loss(self, real_target, fake):
        """D's LSGAN loss: 0.5 [(D(x_t) - 1)^2 + D(G(x_s).detach())^2]."""
        return 0.5 * (lsgan_loss(self.judge(real_target), True) + lsgan_loss(self.judge(fake.detach()), False))

    def g_losses(self, real_source, fake, real_target, identity, gen):
        """G and F's losses: LSGAN(D(G(x_s)), 1) and 0.5 [NCE(x_s, G(x_s)) + NCE(x_t, G(x_t))],
        and with cut.identity_l1_weight > 0 (not CUT's) that weight times |G(x_t) - x_t|.
        D is built into the graph without gradients, so their backward leaves D alone."""
        self.D.requires_grad_(False)
        gan = lsgan_loss(self.judge(fake), True)
        self.D.requires_grad_(True)
        nce = 0.5 * (self.nce(real_source, fake, gen) + self.nce(real_target, identity, gen))
        losses = {"cut_gan": gan, "cut_nce": nce}
        weight = self.cfg["identity_l1_weight"]
        if weight > 0:
            losses["cut_idt_l1"] = weight * (identity.float() - real_target.float()).abs().mean()
        return losses

    def gradient_norms(self, losses):
        """The L2 norm of each loss term's gradient on G's weights (a diagnostic: which term
        moves G how much), without touching .grad; the graphs are kept for the real backward."""
        weights = [p for p in self.G.parameters() if p.requires_grad]
        norms = {}
        for name, loss in losses.items():
            grads = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
            norms[f"grad_G/{name}"] = torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None))
        return norms

    def state_dict(self):
        state = {name: net.state_dict() for name, net in self.modules().items()}
        state.update(opt_G=self.opt_G.state_dict(), opt_D=self.opt_D.state_dict())
        return state

    def load_state_dict(self, state, what, with_optimizers=True):
        for name, net in self.modules().items():
            load_model_weights(net, state[name], f"{what} [style.{name}]")
        if with_optimizers:
            self.opt_G.load_state_dict(state["opt_G"])
            self.opt_D.load_state_dict(state["opt_D"])


def load_style(style, path, with_optimizers=True):
    """Fill `style` from a confeti_fast training checkpoint (its 'style' entry: G, D, F and, with
    `with_optimizers`, their Adam states) or from an original CUT `latest_net_G.pth`, with the
    `latest_net_D.pth` and `latest_net_F.pth` beside it when they are there. Returns the names
    of the networks it loaded (the rest keep their random init)."""
    path = Path(path)
    ckpt = read_checkpoint(path, "style-transfer checkpoint")
    kind = checkpoint_kind(ckpt)
    if kind == "training":
        if not ckpt.get("style"):
            raise ConfetiError(f"checkpoint {path} holds no style transfer (trained without CUT?)")
        style.load_state_dict(ckpt["style"], str(path), with_optimizers)
        return ["G", "D", "F"]
    if kind == "mmseg":
        raise ConfetiError(f"checkpoint {path} is an authors' segmentation checkpoint, which holds no CUT "
                           f"networks; pass CUT's latest_net_G.pth (with latest_net_D/F.pth beside it)")
    fit_cut_state_dict(style.G, ckpt, path, "CUT generator")
    loaded = ["G"]
    if "_net_G" in path.name:  # CUT's BaseModel.save_networks names: <epoch>_net_{G,D,F}.pth
        for name, what in (("D", "CUT discriminator"), ("F", "CUT patch sampler")):
            sibling = path.with_name(path.name.replace("_net_G", f"_net_{name}"))
            if sibling.is_file():
                fit_cut_state_dict(getattr(style, name), read_checkpoint(sibling, what), sibling, what)
                loaded.append(name)
    return loaded


def _grey(rgb):
    return (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).unsqueeze(1)


def ssim(a, b, window=11, sigma=1.5):
    """Mean structural similarity of each image pair of (B, 1, H, W) maps in [0, 1] (Wang et al.
    2004: Gaussian window 11 / 1.5, C1 = 0.01^2, C2 = 0.03^2, valid region only); shape (B,)."""
    coords = torch.arange(window, dtype=torch.float32, device=a.device) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).view(1, 1, window, window)

    def blur(x):
        return torch.nn.functional.conv2d(x, kernel)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    score = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return score.mean(dim=(1, 2, 3))


def structure_similarity(rgb_a, rgb_b):
    """Per-pair SSIM of the grey levels of two (B, 3, H, W) RGB batches in [0, 1]."""
    return ssim(_grey(rgb_a), _grey(rgb_b))


def edge_strength(rgb):
    """Sobel gradient magnitude of the grey levels of (B, 3, H, W) RGB in [0, 1]; (B, 1, H-2, W-2)."""
    grey = _grey(rgb)
    sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=rgb.device)
    kernels = torch.stack([sobel, sobel.t()])[:, None]
    gradients = torch.nn.functional.conv2d(grey, kernels)
    return gradients.pow(2).sum(1, keepdim=True).sqrt()


def edge_agreement(rgb_a, rgb_b):
    """Per-pair Pearson correlation of the two images' edge strengths (1: edges in the same
    places with the same relative strength; a blur or a lost edge lowers it); shape (B,)."""
    a, b = (edge_strength(x).flatten(1) for x in (rgb_a, rgb_b))
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def psnr(rgb_a, rgb_b):
    """Per-pair peak signal-to-noise ratio (dB) of RGB batches in [0, 1]; shape (B,)."""
    mse = (rgb_a - rgb_b).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def paired_scores(rgb, ideal):
    """How close each image is to its ideal translation (the same scene in the target's look):
    PSNR (dB), grey-level SSIM and edge agreement, each the mean over the batch."""
    return {"psnr": float(psnr(rgb, ideal).mean()), "ssim": float(structure_similarity(rgb, ideal).mean()),
            "edge": float(edge_agreement(rgb, ideal).mean())}


def dataset_colour_statistics(images):
    """Per-channel mean and std over all pixels of (H, W, 3) uint8 images: ((3,), (3,)) in 0..255."""
    pixels = torch.cat([torch.from_numpy(image).reshape(-1, 3).double() for image in images])
    return pixels.mean(0), pixels.std(0)


def colour_transfer(image, source_stats, target_stats):
    """The cheap, edge-preserving baseline for G: each channel of an (H, W, 3) uint8 image
    mapped affinely from the source set's mean and std to the target set's. It changes colours
    only, so every edge stays where it was; it cannot change textures, noise or blur."""
    (mean_s, std_s), (mean_t, std_t) = source_stats, target_stats
    moved = (torch.from_numpy(image).double() - mean_s) / std_s * std_t + mean_t
    return moved.round().clamp(0, 255).byte().numpy()


def colour_statistics(rgb):
    """Per-image channel means and standard deviations, (B, 6), in [0, 1] units."""
    return torch.cat([rgb.mean(dim=(2, 3)), rgb.std(dim=(2, 3))], dim=1)


@torch.no_grad()
def stylization_scores(style, x_s, x_t, mean, std):
    """How G(x_s) keeps the scene and takes on the target's look, on a fixed set of images:

    structure_ssim: mean SSIM between the grey levels of x_s and G(x_s) (1: the same structure);
    appearance_dist: distance of G(x_s)'s per-channel colour means and stds to the target set's
    average ones (0-255 units), and appearance_dist_source the same for x_s itself, the
    distance G has to close."""
    fake = style.translate(x_s)
    source, stylized, target = ((denormalize(x.float(), mean, std) / 255.0).clamp(0, 1) for x in (x_s, fake, x_t))
    target_stats = colour_statistics(target).mean(0)
    return {
        "style/structure_ssim": float(structure_similarity(source, stylized).mean()),
        "style/appearance_dist": float(255 * (colour_statistics(stylized) - target_stats).norm(dim=1).mean()),
        "style/appearance_dist_source": float(255 * (colour_statistics(source) - target_stats).norm(dim=1).mean()),
    }


@torch.no_grad()
def ideal_translation_scores(style, x_s, ideal, mean, std):
    """G(x_s) against the ideal translation of the same scenes (the demo renders each scene in
    both looks): style/ideal_{psnr,ssim,edge}, and style/ideal_{...}_source for x_s itself, the
    scores of not translating at all."""
    fake = style.translate(x_s)
    source, stylized, target = ((denormalize(x.float(), mean, std) / 255.0).clamp(0, 1) for x in (x_s, fake, ideal))
    scores = {f"style/ideal_{k}": v for k, v in paired_scores(stylized, target).items()}
    scores.update({f"style/ideal_{k}_source": v for k, v in paired_scores(source, target).items()})
    return scores
