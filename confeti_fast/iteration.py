"""One training iteration of the method (docs/method.md §3), one method per step.

The trainer picks one variant when it is built:

    SourceOnly   the baseline: the source cross-entropy alone;
    StyleOnly    stage 0: CUT's D and G/F steps alone;
    Adaptation   stages 1 and 2: steps 1-10 (stage 1 also trains the style transfer).

Every random choice of iteration t comes from a generator seeded with (seed, t), so a
checkpoint and t resume a run bit for bit. An iteration returns its losses; the images it
saw stay in `images` for the pictures.
"""
import torch
import torch.nn.functional as F

from . import ops, runtime
from .data.augment import class_mix_masks, mix, strong_augment
from .data.labels import THING_CLASSES
from .losses import cam_loss, feature_distance, nearest_downsample, seg_ce
from .models import upsample_logits
from .ops.sampling import sample_pixels
from .optim import copy_state, set_lr, update_teacher


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
    and the optimizer step. `check_finite(losses, t)` is the run's NaN guard."""

    def __init__(self, trainer, check_finite):
        self.cfg, self.train_cfg = trainer.cfg, trainer.cfg["train"]
        self.device, self.runtime, self.dist = trainer.device, trainer.runtime, trainer.dist
        self.student, self.teacher, self.imnet = trainer.student, trainer.teacher, trainer.imnet
        self.frozen_student, self.reg_proj = trainer.frozen_student, trainer.reg_proj
        self.prototypes, self.proto_counts = trainer.prototypes, trainer.proto_counts
        self.optimizer, self.style, self.max_iters = trainer.optimizer, trainer.style, trainer.max_iters
        self.check_finite = check_finite
        self.images = {}

    def __call__(self, batch, t):
        with runtime.autocast(self.runtime, self.device.type):
            gen = torch.Generator().manual_seed(self.cfg["seed"] * 1_000_003 + t)
            x_s = runtime.prepare_input(batch["source_image"].to(self.device, non_blocking=True), self.runtime)
            y_s = batch["source_label"].to(self.device, non_blocking=True)
            x_t = runtime.prepare_input(batch["target_image"].to(self.device, non_blocking=True), self.runtime)
            runtime.mark_step_begin(self.runtime)
            set_lr(self.optimizer, t, self.max_iters, self.cfg["optimizer"])
            self.optimizer.zero_grad(set_to_none=True)
            self.student.train()
            self.teacher.train()  # as in DAFormer: the teacher runs with batch statistics
            return self.run(x_s, y_s, x_t, t, gen)

    def run(self, x_s, y_s, x_t, t, gen):
        raise NotImplementedError

    def backward(self, losses, t):
        self.check_finite(losses, t)
        sum(losses.values()).backward()

    def optimizer_step(self):
        self.dist.average_gradients([p for group in self.optimizer.param_groups for p in group["params"]])
        self.optimizer.step()
        # Released now, not at the next iteration's start: under CUDA graphs the gradients are
        # graph outputs that the next replay (an evaluation's included) would overwrite.
        self.optimizer.zero_grad(set_to_none=True)


class SourceOnly(Iteration):
    def run(self, x_s, y_s, x_t, t, gen):
        losses = {"src_ce": seg_ce(self.student.segmentor(x_s), y_s)}
        self.backward(losses, t)
        self.optimizer_step()
        return losses


class StyleOnly(Iteration):
    """Stage 0: CUT trained alone (steps 2 and 7), before stage 1 starts from it."""

    def run(self, x_s, y_s, x_t, t, gen):
        style = self.style
        real_source, real_target = style.to_cut(x_s), style.to_cut(x_t)
        fake, identity = style.stylize(real_source), style.stylize(real_target)
        check = lambda values: self.check_finite(values, t)  # noqa: E731
        losses = {"cut_d": style.d_step(real_target, fake, check)}
        losses.update(style.g_step(real_source, fake, real_target, identity, gen, check))
        self.images = {"x_s": x_s, "x_t": x_t, "x_st": style.to_imagenet(fake)}
        return losses


class Adaptation(Iteration):
    """Steps 1-10. Stage 1 trains G (steps 6's consistency term, 7 and 9 run); stage 2 uses it
    frozen; a config without style transfer uses x_s itself."""

    def __init__(self, trainer, check_finite):
        super().__init__(trainer, check_finite)
        self.trains_style = self.style is not None and trainer.stage == 1
        if self.trains_style:
            self.stylize = self._stylize_and_keep_cut_inputs
        elif self.style is not None:
            self.stylize = self._stylize_frozen
        else:
            self.stylize = lambda x_s, x_t: (x_s, None)

    def run(self, x_s, y_s, x_t, t, gen):
        warmup = t <= self.train_cfg["contrast_after"]  # prototypes from M only, no contrast yet
        update_teacher(self.teacher, self.student, t, self.train_cfg["teacher_momentum"])  # 1
        x_st, cut = self.stylize(x_s, x_t)  # 2
        y_t, w_t, q = self.pseudo_label(x_t)  # 3
        mask, x_m, y_m, w_m = self.class_mix(x_st, y_s, x_t, y_t, w_t, gen)  # 4
        self.update_prototypes(x_m, y_m, mask, warmup)  # 5
        losses = self.source_losses(x_s, x_st, y_s, warmup, gen, t)  # 6
        if cut:
            losses.update(self.style_step(x_s, x_st, cut, gen, t))  # 6 (consistency) and 7
        losses.update(self.mixed_losses(x_m, y_m, w_m, warmup, gen, t))  # 8
        if cut and not warmup:
            losses.update(self.target_contrast(x_t, y_t, q, gen, t))  # 9
        self.optimizer_step()  # 10
        losses["q"] = q
        self.images = {"x_s": x_s, "x_t": x_t, "x_m": x_m, "y_m": y_m, "y_t": y_t, "w_m": w_m}
        if self.style is not None:
            self.images["x_st"] = x_st
        return losses

    # 2. stylize
    def _stylize_and_keep_cut_inputs(self, x_s, x_t):
        style = self.style
        cut = {"real_source": style.to_cut(x_s), "real_target": style.to_cut(x_t)}
        cut["fake"] = style.stylize(cut["real_source"])
        cut["identity"] = style.stylize(cut["real_target"])
        return style.to_imagenet(cut["fake"]), cut

    def _stylize_frozen(self, x_s, x_t):
        with torch.no_grad():
            return self.style.to_imagenet(self.style.stylize(self.style.to_cut(x_s))), None

    # 3. pseudo labels
    def pseudo_label(self, x_t):
        with torch.no_grad():
            teacher_t = self.teacher(x_t)
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
        teacher_m = self.teacher(x_m)
        ops.proto_ema_update(self.prototypes, self.proto_counts, teacher_m["proj"],
                             None if warmup else F.relu(teacher_m["cam"]), y_m,
                             valid=mask if warmup else None, momentum=self.train_cfg["proto_momentum"],
                             top_k=self.train_cfg["proto_top_k"],
                             reduce=self.dist.all_reduce_ if self.dist.enabled else None)

    # 6. source losses
    def source_losses(self, x_s, x_st, y_s, warmup, gen, t):
        tcfg = self.train_cfg
        out_s = self.student(x_st.detach())
        losses = {"src_ce": seg_ce(out_s["logits"], y_s),
                  "src_cam": tcfg["cam_weight"] * cam_loss(out_s["cam"], y_s)}
        if tcfg["fdist_weight"] > 0:
            with torch.no_grad():
                imnet_features = self.imnet.extract_features(x_s)
            losses["fdist"] = tcfg["fdist_weight"] * feature_distance(
                out_s["features"], imnet_features, y_s, THING_CLASSES, self.cfg["num_classes"], tcfg["fdist_min_ratio"])
        if not warmup:
            losses["src_contrast"], losses["src_reg"] = self.contrast(out_s["proj"], y_s, gen)
        self.backward(losses, t)
        return losses

    # 6 (stage 1) the consistency term, then 7. the CUT step: D, then G and F
    def style_step(self, x_s, x_st, cut, gen, t):
        consistency = self.consistency(x_s, x_st)
        self.check_finite({"consistency": consistency}, t)
        check = lambda values: self.check_finite(values, t)  # noqa: E731
        losses = {"consistency": consistency.detach(),
                  "cut_d": self.style.d_step(cut["real_target"], cut["fake"], check)}
        losses.update(self.style.g_step(cut["real_source"], cut["fake"], cut["real_target"], cut["identity"],
                                        gen, check, consistency))
        return losses

    def consistency(self, x_s, x_st):
        """w * MSE(reg_proj(h(f(x_st))) . P^T, stopgrad(h(f(x_s)) . P^T)) with f and h frozen for this
        term (the student's weights and BN buffers copied into `frozen_student`, whose
        parameters take no gradient); its gradient reaches G through x_st, and reg_proj."""
        frozen = self.frozen_student
        copy_state(frozen, self.student)
        protos = self.prototypes.detach()
        stylized = frozen(x_st)["proj"]
        with torch.no_grad():
            original = frozen(x_s)["proj"]
        target = torch.einsum("bdhw,kd->bkhw", original.float(), protos)
        similarity = torch.einsum("bdhw,kd->bkhw", self.reg_proj(stylized).float(), protos)
        return self.cfg["cut"]["consistency_weight"] * F.mse_loss(similarity, target)

    # 8. mixed losses
    def mixed_losses(self, x_m, y_m, w_m, warmup, gen, t):
        out_m = self.student(x_m)
        losses = {"mix_ce": seg_ce(out_m["logits"], y_m, w_m)}
        if t > self.train_cfg["mix_cam_after"]:
            losses["mix_cam"] = self.train_cfg["cam_weight"] * cam_loss(out_m["cam"], y_m)
        if not warmup:
            losses["mix_contrast"], losses["mix_reg"] = self.contrast(out_m["proj"], y_m, gen)
        self.backward(losses, t)
        return losses

    # 9. stage 1: contrast on the target with all its pseudo labels, scaled by q
    def target_contrast(self, x_t, y_t, q, gen, t):
        out_t = self.student(x_t)
        losses = {name: q * value for name, value in
                  zip(("tgt_contrast", "tgt_reg"), self.contrast(out_t["proj"], y_t, gen))}
        self.backward(losses, t)
        return losses

    def contrast(self, proj, labels, gen):
        ccfg = self.train_cfg["contrast"]
        small = nearest_downsample(labels, proj.shape[-2:])
        sample_idx = sample_pixels(small, ccfg["num_samples"], gen)
        return ops.pixel_proto_contrast(proj, small, self.prototypes, tau=ccfg["tau"],
                                        num_samples=ccfg["num_samples"], sample_idx=sample_idx,
                                        ce_weight=ccfg["ce_weight"], reg_weight=ccfg["reg_weight"])


def build_iteration(trainer, check_finite):
    """The variant for this run, chosen once."""
    if trainer.cfg["method"] == "source_only":
        return SourceOnly(trainer, check_finite)
    if trainer.stage == 0:
        return StyleOnly(trainer, check_finite)
    return Adaptation(trainer, check_finite)
