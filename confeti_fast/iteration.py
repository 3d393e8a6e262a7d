"""One training iteration of the method (docs/method.md §3).

The trainer picks one variant when it is built:

    SourceOnly   the baseline: the source cross-entropy alone;
    StyleOnly    stage 0: CUT's D and G/F steps alone;
    Adaptation   stages 1 and 2: steps 1-10 (stage 1 also trains the style transfer).

Each step of the method is a method that returns its losses; `run` calls backward and the
optimizer steps itself, in the method's order, so one screen shows what happens when.
Autocast covers the forward passes only (PyTorch's AMP guide: backward and optimizer steps
outside it). Every random choice of iteration t comes from a generator seeded with (seed, t),
so a checkpoint and t resume a run bit for bit. An iteration returns (losses, images): the
images it saw, for the pictures.
"""
import torch
import torch.nn.functional as F

from . import ops, runtime
from .data.augment import class_mix_masks, mix, strong_augment
from .data.labels import THING_CLASSES
from .losses import cam_loss, feature_distance, nearest_downsample, seg_ce
from .models import upsample_logits
from .optim import copy_state, set_lr, update_teacher
from .sampling import sample_pixels


def pseudo_labels(teacher_logits, size, threshold, ignore_top, ignore_bottom):
    """Teacher argmax labels at `size`, and pixel weights: the confident fraction q everywhere
    except the top and bottom rows, which get 0. Returns (labels, weights, q)."""
    probs = torch.softmax(upsample_logits(teacher_logits.detach(), size).float(), dim=1)
    confidence, labels = probs.max(dim=1)
    q = (confidence >= threshold).float().mean()
    weights = q * torch.ones_like(confidence)
    weights[:, :ignore_top] = 0
    if ignore_bottom:
        weights[:, -ignore_bottom:] = 0
    return labels, weights, q


class Iteration:
    """What every variant shares: the batch on the device, the schedule, the guarded backward
    and the optimizer step (the one place gradients are averaged over ranks).
    `check_finite(losses, t)` is the run's NaN guard."""

    def __init__(self, cfg, stage, nets, optimizer, run, dist, max_iters, check_finite):
        self.cfg, self.train_cfg, self.stage = cfg, cfg["train"], stage
        self.nets, self.optimizer, self.max_iters = nets, optimizer, max_iters
        self.runtime, self.dist, self.check_finite = run, dist, check_finite
        self.device = nets.prototypes.device

    def __call__(self, batch, t):
        gen = torch.Generator().manual_seed(self.cfg["seed"] * 1_000_003 + t)
        x_s = runtime.prepare_input(batch["source_image"].to(self.device, non_blocking=True), self.runtime)
        y_s = batch["source_label"].to(self.device, non_blocking=True)
        x_t = runtime.prepare_input(batch["target_image"].to(self.device, non_blocking=True), self.runtime)
        runtime.mark_step_begin(self.runtime)
        set_lr(self.optimizer, t, self.max_iters, self.cfg["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
        self.nets.student.train()
        self.nets.teacher.train()  # as in DAFormer: the teacher runs with batch statistics
        return self.run(x_s, y_s, x_t, t, gen)

    def run(self, x_s, y_s, x_t, t, gen):
        raise NotImplementedError

    def forward(self):
        """The context of every forward pass: bf16 autocast when the run asks for it."""
        return runtime.autocast(self.runtime, self.device.type)

    def backward(self, losses, t):
        self.check_finite(losses, t)
        sum(losses.values()).backward()

    def optimizer_step(self, optimizer):
        self.dist.average_gradients([p for group in optimizer.param_groups for p in group["params"]])
        optimizer.step()
        # Released now, not at the next iteration's start: under CUDA graphs the gradients are
        # graph outputs that the next replay (an evaluation's included) would overwrite.
        optimizer.zero_grad(set_to_none=True)

    def style_step(self, cut, gen, t, consistency=None):
        """Step 7: D first, then G and F (with the consistency term of step 6, which shares G's
        graph). Returns the losses, detached."""
        style = self.nets.style
        with self.forward():
            d_losses = {"cut_d": style.d_loss(cut["real_target"], cut["fake"])}
        self.backward(d_losses, t)
        self.optimizer_step(style.opt_D)
        with self.forward():
            g_losses = style.g_losses(cut["real_source"], cut["fake"], cut["real_target"], cut["identity"], gen)
        if consistency is not None:
            g_losses["consistency"] = consistency
        norms = style.gradient_norms(g_losses) if self.logs_style_gradients(t) else {}
        self.backward(g_losses, t)
        self.optimizer_step(style.opt_G)
        return {name: value.detach() for name, value in {**d_losses, **g_losses, **norms}.items()}

    def logs_style_gradients(self, t):
        """train.log_style_gradients: each G loss term's gradient norm, at the log's interval."""
        return self.train_cfg["log_style_gradients"] and t % self.train_cfg["log_interval"] == 0


class SourceOnly(Iteration):
    def run(self, x_s, y_s, x_t, t, gen):
        with self.forward():
            losses = {"src_ce": seg_ce(self.nets.student.segmentor(x_s), y_s)}
        self.backward(losses, t)
        self.optimizer_step(self.optimizer)
        return losses, {}


class StyleOnly(Iteration):
    """Stage 0: CUT trained alone (steps 2 and 7), before stage 1 starts from it."""

    def run(self, x_s, y_s, x_t, t, gen):
        with self.forward():
            cut = stylize_keeping_cut_inputs(self.nets.style, x_s, x_t)
        losses = self.style_step(cut, gen, t)
        return losses, {"x_s": x_s, "x_t": x_t, "x_st": self.nets.style.to_imagenet(cut["fake"])}


def stylize_keeping_cut_inputs(style, x_s, x_t):
    """Step 2 when G trains: G(x_s) and the identity branch G(x_t), in CUT's range, with the
    CUT-range inputs that the CUT step needs again."""
    cut = {"real_source": style.to_cut(x_s), "real_target": style.to_cut(x_t)}
    cut["fake"] = style.stylize(cut["real_source"])
    cut["identity"] = style.stylize(cut["real_target"])
    return cut


class Adaptation(Iteration):
    """Steps 1-10. Stage 1 trains G (step 6's consistency term, 7 and 9 run); stage 2 uses it
    frozen; a config without style transfer uses x_s itself."""

    def __init__(self, *args):
        super().__init__(*args)
        self.trains_style = self.nets.style is not None and self.stage == 1

    def run(self, x_s, y_s, x_t, t, gen):
        warmup = t <= self.train_cfg["contrast_after"]  # prototypes from M only, no contrast yet
        update_teacher(self.nets.teacher, self.nets.student, t, self.train_cfg["teacher_momentum"])  # 1
        with self.forward():
            x_st, cut = self.stylize(x_s, x_t)  # 2
            y_t, w_t, q = self.pseudo_label(x_t)  # 3
            mask, x_m, y_m, w_m = self.class_mix(x_st, y_s, x_t, y_t, w_t, gen)  # 4
            self.update_prototypes(x_m, y_m, mask, warmup)  # 5
            losses = self.source_losses(x_s, x_st, y_s, warmup, gen)  # 6
        # Each group of losses runs its own backward as soon as it is known: only one graph
        # through the segmentor is alive at a time, which is what fits 640 crops in memory.
        self.backward(losses, t)
        if cut:
            with self.forward():
                consistency = self.consistency(x_s, x_st)  # 6, stage 1
            losses.update(self.style_step(cut, gen, t, consistency))  # 7
        with self.forward():
            mixed = self.mixed_losses(x_m, y_m, w_m, warmup, gen, t)  # 8
        self.backward(mixed, t)
        losses.update(mixed)
        if cut and not warmup:
            with self.forward():
                target = self.target_contrast(x_t, y_t, q, gen)  # 9
            self.backward(target, t)
            losses.update(target)
        self.optimizer_step(self.optimizer)  # 10
        losses["q"] = q
        images = {"x_s": x_s, "x_t": x_t, "x_m": x_m, "y_m": y_m, "y_t": y_t, "w_m": w_m}
        if self.nets.style is not None:
            images["x_st"] = x_st
        return losses, images

    # 2. stylize: stage 1 keeps CUT's inputs for step 7; stage 2 runs G frozen
    def stylize(self, x_s, x_t):
        style = self.nets.style
        if style is None:
            return x_s, None
        if self.trains_style:
            cut = stylize_keeping_cut_inputs(style, x_s, x_t)
            return style.to_imagenet(cut["fake"]), cut
        with torch.no_grad():
            return style.translate(x_s), None

    # 3. pseudo labels
    def pseudo_label(self, x_t):
        with torch.no_grad():
            teacher_t = self.nets.teacher(x_t)
        tcfg = self.train_cfg
        return pseudo_labels(teacher_t["logits"], x_t.shape[-2:], tcfg["pseudo_threshold"],
                             tcfg["pseudo_ignore_top"], tcfg["pseudo_ignore_bottom"])

    # 4. ClassMix and strong augmentation
    def class_mix(self, x_st, y_s, x_t, y_t, w_t, gen):
        tcfg, pipeline = self.train_cfg, self.cfg["pipeline"]
        mask = class_mix_masks(y_s, gen)
        x_m = mix(mask, x_st.detach(), x_t)
        y_m = mix(mask, y_s, y_t)
        w_m = torch.where(mask, torch.ones_like(w_t), w_t)
        x_m = strong_augment(x_m, pipeline["mean"], pipeline["std"], gen, tcfg["color_jitter"]["strength"],
                             tcfg["color_jitter"]["prob"], tcfg["blur"])
        x_m = runtime.prepare_input(x_m, self.runtime)  # the augmentations may change its layout
        return mask, x_m, y_m, w_m

    # 5. prototype EMA update from the teacher on the mixed image
    @torch.no_grad()
    def update_prototypes(self, x_m, y_m, mask, warmup):
        teacher_m = self.nets.teacher(x_m)
        ops.proto_ema_update(self.nets.prototypes, self.nets.proto_counts, teacher_m["proj"],
                             None if warmup else F.relu(teacher_m["cam"]), y_m,
                             valid=mask if warmup else None, momentum=self.train_cfg["proto_momentum"],
                             top_k=self.train_cfg["proto_top_k"],
                             reduce=self.dist.all_reduce_ if self.dist.enabled else None)

    # 6. source losses
    def source_losses(self, x_s, x_st, y_s, warmup, gen):
        tcfg = self.train_cfg
        out_s = self.nets.student(x_st.detach())
        losses = {"src_ce": seg_ce(out_s["logits"], y_s),
                  "src_cam": tcfg["cam_weight"] * cam_loss(out_s["cam"], y_s)}
        if tcfg["fdist_weight"] > 0:
            with torch.no_grad():
                imnet_features = self.nets.imnet.extract_features(x_s)
            losses["fdist"] = tcfg["fdist_weight"] * feature_distance(
                out_s["features"], imnet_features, y_s, THING_CLASSES, self.cfg["num_classes"], tcfg["fdist_min_ratio"])
        if not warmup:
            losses["src_contrast"], losses["src_reg"] = self.contrast(out_s["proj"], y_s, gen)
        return losses

    # 6 (stage 1) the prototypical consistency term
    def consistency(self, x_s, x_st):
        """w * MSE(reg_proj(h(f(x_st))) . P^T, stopgrad(h(f(x_s)) . P^T)) with f and h frozen for this
        term (the student's weights and BN buffers copied into `frozen_student`, whose
        parameters take no gradient); its gradient reaches G through x_st, and reg_proj."""
        frozen = self.nets.frozen_student
        copy_state(frozen, self.nets.student)
        protos = self.nets.prototypes.detach()
        stylized = frozen(x_st)["proj"]
        with torch.no_grad():
            original = frozen(x_s)["proj"]
        target = torch.einsum("bdhw,kd->bkhw", original.float(), protos)
        similarity = torch.einsum("bdhw,kd->bkhw", self.nets.reg_proj(stylized).float(), protos)
        return self.cfg["cut"]["consistency_weight"] * F.mse_loss(similarity, target)

    # 8. mixed losses
    def mixed_losses(self, x_m, y_m, w_m, warmup, gen, t):
        out_m = self.nets.student(x_m)
        losses = {"mix_ce": seg_ce(out_m["logits"], y_m, w_m)}
        if t > self.train_cfg["mix_cam_after"]:
            losses["mix_cam"] = self.train_cfg["cam_weight"] * cam_loss(out_m["cam"], y_m)
        if not warmup:
            losses["mix_contrast"], losses["mix_reg"] = self.contrast(out_m["proj"], y_m, gen)
        return losses

    # 9. stage 1: contrast on the target with all its pseudo labels, scaled by q
    def target_contrast(self, x_t, y_t, q, gen):
        out_t = self.nets.student(x_t)
        return {name: q * value for name, value in
                zip(("tgt_contrast", "tgt_reg"), self.contrast(out_t["proj"], y_t, gen))}

    def contrast(self, proj, labels, gen):
        ccfg = self.train_cfg["contrast"]
        small = nearest_downsample(labels, proj.shape[-2:])
        sample_idx = sample_pixels(small, ccfg["num_samples"], gen)
        return ops.pixel_proto_contrast(proj, small, self.nets.prototypes, tau=ccfg["tau"],
                                        num_samples=ccfg["num_samples"], sample_idx=sample_idx,
                                        ce_weight=ccfg["ce_weight"], reg_weight=ccfg["reg_weight"])


def build_iteration(cfg, stage, nets, optimizer, run, dist, max_iters, check_finite):
    """The variant for this run, chosen once."""
    variant = SourceOnly if cfg["method"] == "source_only" else StyleOnly if stage == 0 else Adaptation
    return variant(cfg, stage, nets, optimizer, run, dist, max_iters, check_finite)
