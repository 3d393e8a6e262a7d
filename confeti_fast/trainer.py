"""The trainer: builds the networks of a stage, then runs the loop around the iteration.

    for each batch t:   losses = iteration(batch, t)        the method (iteration.py)
                        log the losses                      training_log.py
                        every interval: evaluate, pictures, checkpoint

`t` counts iterations from 0; `Trainer.t` is the next one to run (what a checkpoint stores).
"""
import copy
import math
from pathlib import Path

import torch

from . import distributed, runtime
from .checkpoint import restore_training_state, save_atomic, training_state
from .config import dump_config, merge
from .data.datasets import build_dataset
from .data.loader import PairedSteps, paired_loader
from .errors import ConfetiError
from .evaluation import evaluate
from .iteration import build_iteration
from .models.heads import ConfetiNet, reg_proj
from .optim import build_optimizer
from .style import StyleTransfer, load_style, stylization_scores
from .training_log import NonFiniteLoss, TrainingLog  # noqa: F401  (NonFiniteLoss: the run's NaN stop)
from .visualize import plot_curves, save_iteration_pictures


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
        self.student = ConfetiNet(cfg["model"], num_classes, tcfg["proto_dim"],
                                  verbose=self.dist.is_main).to(self.device)  # the ImageNet load report
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
        self.steps = PairedSteps(cfg, stage, self.dist.rank, self.dist.world_size,
                                 progress=progress and self.dist.is_main)
        self.val_set = build_dataset(cfg["target"], "val")
        self.log = TrainingLog(self.work_dir / "log.jsonl", tcfg["log_interval"], self.dist,
                               self.runtime["check_finite"] == "step", self.work_dir)
        self.iteration = build_iteration(self, self.log.check_finite)
        self._probe = None  # the stylization scores' images, made at the first evaluation
        self.t = 0
        self.best = {"metric": None, "value": -1.0, "iter": None}
        if resume:
            restore_training_state(self, resume)

    def _build_style(self, cut_checkpoint):
        """CUT for the confeti method: trained in stages 0 and 1, frozen in stage 2. Its start:
        `cut_checkpoint` if given, else stage 0's output (stage 1) or stage 1's (stage 2)."""
        if self.cfg["method"] != "confeti" or not self.cfg["cut"]["enabled"]:
            if self.stage == 0:
                raise ConfetiError("--stage 0 pre-trains the style transfer: it needs method 'confeti' "
                                   "and cut.enabled True")
            return None
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
            elif self.cfg["cut"]["require_pretrained"]:
                raise ConfetiError(
                    f"stage 1 starts from a pre-trained style transfer (docs/method.md §3): no {previous}; run "
                    f"`python train.py --stage 0` with the same --work-dir first, pass --cut-checkpoint PATH, "
                    f"or --cut-random-start")
            elif self.dist.is_main:
                print(f"style transfer: no {previous}, G/D/F start from random weights", flush=True)
        if source is not None:
            load_style(style, source, with_optimizers=False)
            if self.dist.is_main:
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

    def step(self, batch, t):
        """Run iteration t on a loader batch; returns its losses (tensors) by name."""
        losses = self.iteration(batch, t)
        self.dist.after_step(t, self.student, self.teacher, self.prototypes, self.proto_counts, self.style)
        return losses

    def train(self):
        from tqdm import tqdm

        main = self.dist.is_main  # rank 0 alone writes
        if main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.work_dir / "config.py")
        loader = paired_loader(self.steps, self.t, self.cfg["data_loader"]["workers"], self.device.type == "cuda")
        bar = tqdm(total=self.max_iters, initial=self.t, desc=f"stage {self.stage}", unit="it",
                   disable=not (self.progress and main), dynamic_ncols=True)
        result = None
        for batch in loader:
            self.log.add(self.step(batch, batch["t"]))
            self.t = batch["t"] + 1
            if self.log.due(self.t, self.max_iters):
                trained = self.style.opt_G if self.stage == 0 else self.optimizer  # stage 0 trains CUT alone
                means = self.log.flush(self.t, trained.param_groups[0]["lr"])
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if k in ("src_ce", "mix_ce", "q")})
            bar.update(1)
            if self.t % self.cfg["evaluation"]["interval"] == 0 or self.t == self.max_iters:
                result = self.evaluate_and_save()
        bar.close()
        if result is None:  # resumed at the end: nothing left to run
            result = self.evaluate()
        if main:
            plot_curves(self.log.path, self.work_dir / "curves.png")
        return result

    def evaluate(self):
        if self.stage == 0:  # CUT alone: no segmentor to evaluate
            return {}
        return evaluate(self.student.segmentor, self.val_set, self.cfg, device=self.device, progress=False,
                        shard=(self.dist.rank, self.dist.world_size), reduce=self.dist.all_reduce_)

    def evaluate_and_save(self):
        """The evaluation at an interval: its line in the log, the pictures and the checkpoints."""
        result = self.evaluate()
        if not self.dist.is_main:
            self._note_best(result)
            return result
        pipeline = self.cfg["pipeline"]
        save_iteration_pictures(self.iteration.images, self.work_dir, self.t, pipeline["mean"], pipeline["std"],
                                writer=self.log.tensorboard)
        record = {"iter": self.t, **{k: 100 * result[k] for k in self._metrics(result)}}
        if self.style is not None:
            record.update(stylization_scores(self.style, *self._style_probe(), pipeline["mean"], pipeline["std"]))
        self.log.write(record)
        self.save(result)
        return result

    def _style_probe(self, batches=4):
        """A fixed set of source and target crops (those of iterations 0..3) that every
        evaluation stylizes, so the stylization scores are comparable along the run."""
        if self._probe is None:
            items = [self.steps[t] for t in range(min(batches, len(self.steps)))]
            self._probe = tuple(
                runtime.prepare_input(torch.cat([item[key] for item in items]).to(self.device), self.runtime)
                for key in ("source_image", "target_image"))
        return self._probe

    @staticmethod
    def _metrics(result):
        return [k for k in ("mIoU", "mIoU16", "mIoU13") if k in result]

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
        """last.pth, and best.pth when `result` is the best so far (both written atomically)."""
        improved = self._note_best(result)
        state = training_state(self)
        save_atomic(state, self.work_dir / "last.pth")
        if improved:
            save_atomic(state, self.work_dir / "best.pth")
