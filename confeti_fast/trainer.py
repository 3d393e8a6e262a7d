"""The adaptation trainer: one iteration of SPEC 3, and the loop around it.

Every random choice of an iteration comes from a generator seeded with (seed, t), and the
loader's samples from (seed, step); so a checkpoint plus the iteration number resumes a run
bit for bit.
"""
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed, ops, runtime
from .checkpoint import FORMAT, load_training_checkpoint, save_atomic
from .config import dump_config, merge
from .data.augment import class_mix_masks, mix, strong_augment
from .data.datasets import build_dataset
from .data.labels import THING_CLASSES
from .data.loader import PairedSteps, paired_loader
from .errors import ConfetiError
from .evaluation import evaluate
from .losses import cam_loss, feature_distance, nearest_downsample, seg_ce
from .models import load_model_weights, upsample_logits
from .models.heads import ConfetiNet, reg_proj
from .ops.reference import sample_pixels
from .optim import build_optimizer, copy_state, set_lr, update_teacher
from .visualize import denormalize, label_picture, plot_curves, save_panel, weight_picture


class NonFiniteLoss(ConfetiError):
    """A loss term became NaN or infinite; training stops before it touches any weight."""


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


class Trainer:
    def __init__(self, cfg, stage, work_dir, device=None, resume=None, progress=True, cut_checkpoint=None):
        self.stage, self.progress = stage, progress
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dist = distributed.from_environment(device.type)
        if self.dist.enabled and device.type == "cuda":
            device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
        self.device = device
        self.runtime = runtime.resolve(cfg.get("runtime"), self.device.type)
        runtime.configure_backends(self.runtime, self.device.type)
        self.cfg = cfg = merge(cfg, {"runtime": self.runtime})  # the run's config.py records the choices
        self.work_dir = Path(work_dir) / f"stage{stage}"
        self.max_iters = cfg["stages"][str(stage)]["iters"]
        tcfg, num_classes = cfg["train"], cfg["num_classes"]

        torch.manual_seed(cfg["seed"])
        self.student = ConfetiNet(cfg["model"], num_classes, tcfg["proto_dim"]).to(self.device)
        if self.runtime["sync_bn"] and self.dist.enabled:
            if self.device.type != "cuda":
                raise ConfetiError("runtime.sync_bn needs CUDA (torch's SyncBatchNorm); on CPU the ranks "
                                   "share rank 0's BN statistics after every step instead")
            self.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        self.teacher = self._frozen_copy(self.student)
        self.imnet = self._frozen_copy(self.student.segmentor).eval()
        self.reg_proj = reg_proj(tcfg["proto_dim"]).to(self.device)
        self.prototypes = torch.zeros(num_classes, tcfg["proto_dim"], device=self.device)
        self.proto_counts = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        head_ids = {id(p) for m in self.student.head_modules() for p in m.parameters()}
        self.optimizer = build_optimizer(
            (p for p in self.student.parameters() if id(p) not in head_ids),
            [p for m in self.student.head_modules() for p in m.parameters()] + list(self.reg_proj.parameters()),
            cfg["optimizer"], fused=self.runtime["fused_optimizer"])
        self.style = self._build_style(cut_checkpoint)
        # Stage 1's consistency term runs f and h frozen: a copy refreshed from the student each
        # step (a module of its own, so its compiled backbone never sees swapped weights).
        self.frozen_student = self._frozen_copy(self.student) if self.style and stage == 1 else None
        # The backbones hold nearly all the compute: they are what gets compiled.
        for net in (self.student, self.teacher, self.frozen_student):
            if net is not None:
                runtime.prepare_module(net, self.runtime, compiled=net.segmentor.backbone)
        runtime.prepare_module(self.imnet, self.runtime, compiled=self.imnet.backbone)
        self.steps = PairedSteps(cfg, stage, self.dist.rank, self.dist.world_size, progress=progress and self.dist.is_main)
        self.val_set = build_dataset(cfg["target"], "val")
        self.t = 0
        self.best = {"metric": None, "value": -1.0, "iter": None}
        if resume:
            self.load(resume)

    def _build_style(self, cut_checkpoint):
        """CUT for the confeti method: trained in stages 0 and 1, frozen in stage 2. Its start:
        `cut_checkpoint` if given, else stage 0's output (stage 1) or stage 1's (stage 2)."""
        if self.cfg["method"] != "confeti" or not self.cfg["cut"]["enabled"]:
            if self.stage == 0:
                raise ConfetiError("--stage 0 pre-trains the style transfer: it needs method 'confeti' "
                                   "and cut.enabled True")
            return None
        from .style import StyleTransfer, load_style

        style = StyleTransfer(self.cfg["cut"], self.device, self.cfg["pipeline"]["mean"], self.cfg["pipeline"]["std"],
                              fused=self.runtime["fused_optimizer"], grad_sync=self.dist.average_gradients,
                              prepare=lambda x: runtime.prepare_input(x, self.runtime))
        source = cut_checkpoint
        if source is None and self.stage > 0:
            previous = self.work_dir.parent / f"stage{self.stage - 1}" / "last.pth"
            if previous.is_file():
                source = previous
            elif self.stage == 2:
                raise ConfetiError(
                    f"stage 2 needs the style transfer trained in stage 1: no {previous}; run "
                    f"`python train.py --stage 1` with the same --work-dir first, or pass --cut-checkpoint PATH")
        if source is not None:
            load_style(style, source, with_optimizers=False)
            print(f"style transfer: G/D/F from {source}", flush=True)
        if self.stage == 2:
            style.freeze()
        for net in (style.G, style.D):
            runtime.prepare_module(net, self.runtime)
        return style

    @staticmethod
    def _frozen_copy(module):
        clone = copy.deepcopy(module)
        for p in clone.parameters():
            p.requires_grad_(False)
        return clone

    # ------------------------------------------------------------------ one iteration
    def step(self, batch, t):
        """Run iteration t on a loader batch; returns the loss values (tensors) by name."""
        with runtime.autocast(self.runtime, self.device.type):
            losses, debug = self._step(batch, t)
        self.dist.broadcast_buffers(self.student, self.teacher)
        if self.dist.check_ranks:
            self.dist.assert_identical({"student": list(self.student.state_dict().values()),
                                        "teacher": list(self.teacher.state_dict().values()),
                                        "prototypes": [self.prototypes, self.proto_counts],
                                        "style": [] if self.style is None else
                                        [p for net in self.style.modules().values() for p in net.parameters()]}, t)
        return losses, debug

    def _step(self, batch, t):
        cfg, tcfg = self.cfg, self.cfg["train"]
        gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + t)
        x_s = runtime.prepare_input(batch["source_image"].to(self.device, non_blocking=True), self.runtime)
        y_s = batch["source_label"].to(self.device, non_blocking=True)
        x_t = runtime.prepare_input(batch["target_image"].to(self.device, non_blocking=True), self.runtime)
        runtime.mark_step_begin(self.runtime)
        set_lr(self.optimizer, t, self.max_iters, cfg["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
        self.student.train()
        self.teacher.train()  # as in DAFormer: the teacher runs with batch statistics
        losses = {}

        if cfg["method"] == "source_only":
            losses["src_ce"] = seg_ce(self.student.segmentor(x_s), y_s)
            self._backward(losses, ["src_ce"], t)
            self._optimizer_step()
            return losses, {}
        if self.stage == 0:
            return self._cut_only_step(x_s, x_t, gen)

        # 1. teacher EMA
        update_teacher(self.teacher, self.student, t, tcfg["teacher_momentum"])
        # 2. stylize (G trains in stage 1, frozen in stage 2; no style: the identity)
        style, cut = self.style, {}
        if style is None:
            x_st = x_s
        elif self.stage == 2:
            with torch.no_grad():
                x_st = style.to_imagenet(style.stylize(style.to_cut(x_s)))
        else:
            cut = {"real_source": style.to_cut(x_s), "real_target": style.to_cut(x_t)}
            cut["fake"] = style.stylize(cut["real_source"])
            cut["identity"] = style.stylize(cut["real_target"])
            x_st = style.to_imagenet(cut["fake"])
        # 3. pseudo labels on the target
        with torch.no_grad():
            teacher_t = self.teacher(x_t)
        y_t, w_t, q = pseudo_labels(teacher_t["logits"], x_t.shape[-2:], tcfg["pseudo_threshold"],
                                    tcfg["pseudo_ignore_top"], tcfg["pseudo_ignore_bottom"])
        # 4. ClassMix + strong augmentation
        mask = class_mix_masks(y_s, gen)
        x_m = mix(mask, x_st.detach(), x_t)
        y_m = mix(mask, y_s, y_t)
        w_m = torch.where(mask, torch.ones_like(w_t), w_t)
        x_m = strong_augment(x_m, cfg["pipeline"]["mean"], cfg["pipeline"]["std"], gen,
                             tcfg["color_jitter"]["strength"], tcfg["color_jitter"]["prob"], tcfg["blur"])
        x_m = runtime.prepare_input(x_m, self.runtime)  # the augmentations may change its layout
        # 5. prototype EMA update from the teacher on the mixed image
        warmup = t <= tcfg["contrast_after"]
        with torch.no_grad():
            teacher_m = self.teacher(x_m)
            ops.proto_ema_update(self.prototypes, self.proto_counts, teacher_m["proj"],
                                 None if warmup else F.relu(teacher_m["cam"]), y_m,
                                 valid=mask if warmup else None,
                                 momentum=tcfg["proto_momentum"], top_k=tcfg["proto_top_k"],
                                 reduce=self.dist.all_reduce_ if self.dist.enabled else None)
        # 6. source losses
        out_s = self.student(x_st.detach())
        losses["src_ce"] = seg_ce(out_s["logits"], y_s)
        losses["src_cam"] = tcfg["cam_weight"] * cam_loss(out_s["cam"], y_s)
        if tcfg["fdist_weight"] > 0:
            with torch.no_grad():
                imnet_features = self.imnet.extract_features(x_s)
            losses["fdist"] = tcfg["fdist_weight"] * feature_distance(
                out_s["features"], imnet_features, y_s, THING_CLASSES, cfg["num_classes"], tcfg["fdist_min_ratio"])
        if not warmup:
            losses["src_contrast"], losses["src_reg"] = self._contrast(out_s["proj"], y_s, gen)
        self._backward(losses, list(losses), t)
        # 6 (stage 1) consistency, and 7. the CUT step: D, then G and F
        if cut:
            consistency = self._consistency(x_s, x_st)
            self._check_finite({"consistency": consistency}, t)
            losses["consistency"] = consistency.detach()
            check = lambda values: self._check_finite(values, t)  # noqa: E731
            losses["cut_d"] = style.d_step(cut["real_target"], cut["fake"], check)
            losses.update(style.g_step(cut["real_source"], cut["fake"], cut["real_target"], cut["identity"],
                                       gen, check, consistency))
        # 8. mixed losses
        out_m = self.student(x_m)
        mixed = {"mix_ce": seg_ce(out_m["logits"], y_m, w_m)}
        if t > tcfg["mix_cam_after"]:
            mixed["mix_cam"] = tcfg["cam_weight"] * cam_loss(out_m["cam"], y_m)
        if not warmup:
            mixed["mix_contrast"], mixed["mix_reg"] = self._contrast(out_m["proj"], y_m, gen)
        self._backward(mixed, list(mixed), t)
        losses.update(mixed)
        # 9. stage 1: contrast on the target with all its pseudo labels, scaled by q
        if cut and not warmup:
            out_t = self.student(x_t)
            target = dict(zip(("tgt_contrast", "tgt_reg"), self._contrast(out_t["proj"], y_t, gen)))
            target = {name: q * value for name, value in target.items()}
            self._backward(target, list(target), t)
            losses.update(target)
        # 10. optimizer step
        self._optimizer_step()
        debug = {"x_s": x_s, "x_t": x_t, "x_m": x_m, "y_m": y_m, "y_t": y_t, "w_m": w_m, "x_st": x_st}
        losses["q"] = q
        return losses, debug

    def _contrast(self, proj, labels, gen):
        ccfg = self.cfg["train"]["contrast"]
        small = nearest_downsample(labels, proj.shape[-2:])
        sample_idx = sample_pixels(small, ccfg["num_samples"], gen)
        return ops.pixel_proto_contrast(proj, small, self.prototypes, tau=ccfg["tau"],
                                        num_samples=ccfg["num_samples"], sample_idx=sample_idx,
                                        ce_weight=ccfg["ce_weight"], reg_weight=ccfg["reg_weight"])

    def _consistency(self, x_s, x_st):
        """Prototypical semantic consistency: w * MSE(reg_proj(h(f(x_st))) . P^T, stopgrad(h(f(x_s)) . P^T))
        with f and h frozen for this term (the student's weights and BN buffers copied into
        `frozen_student`, whose parameters take no gradient); its gradient reaches G through
        x_st, and reg_proj."""
        frozen = self.frozen_student
        copy_state(frozen, self.student)
        protos = self.prototypes.detach()
        stylized = frozen(x_st)["proj"]
        with torch.no_grad():
            original = frozen(x_s)["proj"]
        target = torch.einsum("bdhw,kd->bkhw", original.float(), protos)
        similarity = torch.einsum("bdhw,kd->bkhw", self.reg_proj(stylized).float(), protos)
        return self.cfg["cut"]["consistency_weight"] * F.mse_loss(similarity, target)

    def _cut_only_step(self, x_s, x_t, gen):
        """Stage 0: the CUT D and G/F steps alone."""
        style = self.style
        real_source, real_target = style.to_cut(x_s), style.to_cut(x_t)
        fake, identity = style.stylize(real_source), style.stylize(real_target)
        check = lambda values: self._check_finite(values, self.t)  # noqa: E731
        losses = {"cut_d": style.d_step(real_target, fake, check)}
        losses.update(style.g_step(real_source, fake, real_target, identity, gen, check))
        return losses, {"x_s": x_s, "x_t": x_t, "x_st": style.to_imagenet(fake)}

    def _check_finite(self, losses, t):
        """Stop before the update on a NaN/inf loss (on every rank, when any rank sees one). With
        runtime.check_finite 'log' (the CUDA default) this per-step check, a host sync, is
        skipped: `_read_means` checks instead."""
        if self.runtime["check_finite"] != "step":
            return
        bad = [(name, float(value.detach())) for name, value in losses.items() if not torch.isfinite(value)]
        if self.dist.any(bool(bad)):
            what = f"loss '{bad[0][0]}' is {bad[0][1]}" if bad else "a loss is not finite on another rank"
            raise NonFiniteLoss(f"{what} at iteration {t}; training stopped before the update, the last "
                                f"checkpoint in {self.work_dir} is intact")

    def _optimizer_step(self):
        self.dist.average_gradients([p for group in self.optimizer.param_groups for p in group["params"]])
        self.optimizer.step()
        # Released now, not at the next step's start: under CUDA graphs the gradients are graph
        # outputs that the next replay (an evaluation's included) would overwrite.
        self.optimizer.zero_grad(set_to_none=True)

    def _read_means(self, sums, counts, first, last):
        """The mean of each loss over iterations first..last-1, in one device-to-host copy; a
        non-finite mean stops the run (the per-step check is off in check_finite 'log' mode)."""
        values = torch.stack([torch.as_tensor(v).reshape(()) for v in sums.values()]).tolist()
        values = self.dist.sum_values(values)  # the mean over ranks too
        means = {name: value / (counts[name] * self.dist.world_size) for name, value in zip(sums, values)}
        for name, value in means.items():
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"loss '{name}' became {value} between iterations {first} and {last - 1}; training stopped, "
                    f"the last checkpoint in {self.work_dir} is intact (set runtime.check_finite 'step' to stop "
                    f"before the first bad update)")
        return means

    def _backward(self, losses, names, t):
        self._check_finite({name: losses[name] for name in names}, t)
        sum(losses[name] for name in names).backward()

    # ------------------------------------------------------------------ the loop
    def train(self):
        from tqdm import tqdm

        main = self.dist.is_main  # rank 0 alone writes
        if main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.work_dir / "config.py")
        log_path = self.work_dir / "log.jsonl"
        tcfg, interval = self.cfg["train"], self.cfg["evaluation"]["interval"]
        loader = paired_loader(self.steps, self.t, self.cfg["data_loader"]["workers"], self.device.type == "cuda")
        bar = tqdm(total=self.max_iters, initial=self.t, desc=f"stage {self.stage}", unit="it",
                   disable=not (self.progress and main), dynamic_ncols=True)
        result, sums, counts, started, done = None, {}, {}, time.perf_counter(), 0
        for batch in loader:
            t = batch["step"]
            losses, debug = self.step(batch, t)
            self.t = t + 1
            for name, value in losses.items():  # summed on the device: read back once per log
                sums[name] = sums.get(name, 0.0) + value.detach().float()
                counts[name] = counts.get(name, 0) + 1
            done += 1
            if self.t % tcfg["log_interval"] == 0 or self.t == self.max_iters:
                means = self._read_means(sums, counts, self.t - done, self.t)
                record = {"iter": self.t, "lr": self.optimizer.param_groups[0]["lr"],
                          "it_per_s": done / (time.perf_counter() - started)}
                record.update({k if k == "q" else f"loss/{k}": v for k, v in means.items()})
                if main:
                    self._log(log_path, record)
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if k in ("src_ce", "mix_ce", "q")})
                sums, counts, started, done = {}, {}, time.perf_counter(), 0
            bar.update(1)
            if self.t % interval == 0 or self.t == self.max_iters:
                result = self.evaluate()
                if main:
                    self._pictures(debug)
                    self._log(log_path, {"iter": self.t, **{k: 100 * result[k] for k in self._metrics(result)}})
                    self.save(result)
                else:
                    self._note_best(result)
        bar.close()
        if result is None:  # resumed at the end: nothing left to run
            result = self.evaluate()
        if main:
            plot_curves(log_path, self.work_dir / "curves.png")
        return result

    def evaluate(self):
        if self.stage == 0:  # CUT alone: no segmentor to evaluate
            return {}
        return evaluate(self.student.segmentor, self.val_set, self.cfg, device=self.device, progress=False,
                        shard=(self.dist.rank, self.dist.world_size), reduce=self.dist.all_reduce_)

    @staticmethod
    def _metrics(result):
        return [k for k in ("mIoU", "mIoU16", "mIoU13") if k in result]

    @staticmethod
    def _log(path, record):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _pictures(self, debug):
        """The ClassMix debug panel and, with style transfer, the source / stylized / target panel
        and the stylized images themselves."""
        mean, std = self.cfg["pipeline"]["mean"], self.cfg["pipeline"]["std"]
        if "x_st" in debug and self.style is not None:
            stylized = [denormalize(x, mean, std) for x in debug["x_st"]]
            save_panel([("source", denormalize(debug["x_s"][0], mean, std)), ("stylized", stylized[0]),
                        ("target", denormalize(debug["x_t"][0], mean, std))],
                       self.work_dir / "panels" / f"style_{self.t:06d}.png")
            for j, image in enumerate(stylized):
                save_panel([(f"stylized {self.t}", image)], self.work_dir / "stylized" / f"{self.t:06d}_{j}.png", 1)
        if "x_m" not in debug:
            return
        save_panel([
            ("source", denormalize(debug["x_s"][0], mean, std)),
            ("target", denormalize(debug["x_t"][0], mean, std)),
            ("mixed", denormalize(debug["x_m"][0], mean, std)),
            ("mixed label", label_picture(debug["y_m"][0])),
            ("pseudo label", label_picture(debug["y_t"][0])),
            ("weights", weight_picture(debug["w_m"][0])),
        ], self.work_dir / "panels" / f"classmix_{self.t:06d}.png")

    # ------------------------------------------------------------------ checkpoints
    def state(self):
        def split(net):
            return {"segmentor": net.segmentor.state_dict(), "cam_head": net.cam_head.state_dict(),
                    "proj_head": net.proj_head.state_dict()}

        return {
            "format": FORMAT, "stage": self.stage, "iteration": self.t, "config": self.cfg,
            "model": self.student.segmentor.state_dict(), "student": split(self.student),
            "teacher": split(self.teacher), "imnet": self.imnet.state_dict(),
            "reg_proj": self.reg_proj.state_dict(), "prototypes": self.prototypes,
            "proto_counts": self.proto_counts, "optimizer": self.optimizer.state_dict(),
            "loader": {"next_step": self.t}, "best": dict(self.best),
            "rng": {"torch": torch.get_rng_state()},
            "style": None if self.style is None else self.style.state_dict(),
        }

    def _note_best(self, result):
        """Whether `result` improves on the best so far (and remember it if so)."""
        metrics = self._metrics(result)
        metric = metrics[0] if metrics else None
        value = result[metric] if metric else float("nan")
        improved = not math.isnan(value) and value > self.best["value"]
        if improved:
            self.best = {"metric": metric, "value": value, "iter": self.t}
        return improved

    def save(self, result):
        improved = self._note_best(result)
        state = self.state()
        save_atomic(state, self.work_dir / "last.pth")
        if improved:
            save_atomic(state, self.work_dir / "best.pth")

    def load(self, path):
        ckpt = load_training_checkpoint(path)
        if ckpt["stage"] != self.stage:
            raise ConfetiError(f"checkpoint {path} is from stage {ckpt['stage']}, not stage {self.stage}")
        for net, key in ((self.student, "student"), (self.teacher, "teacher")):
            for part in ("segmentor", "cam_head", "proj_head"):
                load_model_weights(getattr(net, part), ckpt[key][part], f"{path} [{key}.{part}]")
        load_model_weights(self.imnet, ckpt["imnet"], f"{path} [imnet]")
        load_model_weights(self.reg_proj, ckpt["reg_proj"], f"{path} [reg_proj]")
        self.prototypes.copy_(ckpt["prototypes"])
        self.proto_counts.copy_(ckpt["proto_counts"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.t = ckpt["loader"]["next_step"]
        self.best = ckpt["best"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if (self.style is None) != (ckpt.get("style") is None):
            raise ConfetiError(f"checkpoint {path} {'lacks' if ckpt.get('style') is None else 'holds'} a style "
                               f"transfer, unlike this config (cut.enabled, method)")
        if self.style is not None:
            self.style.load_state_dict(ckpt["style"], str(path), with_optimizers=self.stage < 2)
