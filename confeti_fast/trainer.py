"""The trainer: builds the networks of a stage, then runs the loop around the iteration.

    for each batch t:   losses = iteration(batch, t)        the method (iteration.py)
                        log the losses                      training_log.py
                        every interval: evaluate, pictures, checkpoint

`t` counts iterations from 0; `Trainer.t` is the next one to run (what a checkpoint stores).
The trainer owns its state: `state_dict()` is the checkpoint, `load_state_dict()` resumes it
bit for bit (in the style of torchtitan's Stateful).
"""
import contextlib
import math
import signal
import sys
from pathlib import Path

import torch

from . import distributed, runtime
from .config import dump_config, merge
from .data.check import BadSampleError, bad_samples_policy
from .data.datasets import build_dataset
from .data.loader import PairedSteps, paired_loader
from .errors import ConfetiError
from .evaluation import evaluate, metric_names
from .iteration import build_iteration
from .models.weights import load_model_weights
from .networks import build_networks
from .optim import build_optimizer
from .preemption import SignalFlag, StopRequested, resume_command
from .serialization import TRAINING_FORMAT, load_training_checkpoint, save_atomic
from .style import ideal_translation_scores, load_style, stylization_scores
from .training_log import NonFiniteLoss, TrainingLog  # noqa: F401  (NonFiniteLoss: the run's NaN stop)
from .visualize import plot_curves, save_iteration_pictures

# Config sections that change how a run executes or reports, not what it computes: a resume
# may change them without a warning.
NOT_METHOD_KEYS = ("name", "runtime", "data_loader", "evaluation", "train.log_interval", "train.log_style_gradients")


class Trainer:
    def __init__(self, cfg, stage, work_dir, device=None, resume=None, progress=True, cut_checkpoint=None):
        self.stage, self.progress = stage, progress
        self._place(device)
        self.runtime = runtime.resolve(cfg.get("runtime"), self.device.type, announce=self.dist.is_main)
        runtime.check_precision(self.runtime, self.device)
        runtime.configure_backends(self.runtime, self.device.type)
        self.cfg = cfg = merge(cfg, {"runtime": self.runtime})  # the run's config.py records the choices
        self.work_dir = Path(work_dir) / f"stage{stage}"
        self.max_iters = cfg["stages"][str(stage)]["iters"]

        self.nets = build_networks(cfg, stage, self.device, self.runtime, self.dist)
        self.optimizer = build_optimizer(*self.nets.trained_parameters(), cfg["optimizer"],
                                         fused=self.runtime["fused_optimizer"])
        if self.nets.style is not None:
            self._start_style_transfer(cut_checkpoint)
        self.nets.prepare(self.runtime)

        # One start-up check of all three sets (data/check), its list of bad pairs in the work dir.
        self.val_set = build_dataset(cfg["target"], "val", check=False, bad_samples=bad_samples_policy(cfg))
        self.steps = PairedSteps(cfg, stage, self.dist.rank, self.dist.world_size,
                                 progress=progress and self.dist.is_main,
                                 bad_samples_file=self.work_dir / "bad_samples.txt", also_check=[self.val_set])
        self.log = TrainingLog(self.work_dir / "log.jsonl", cfg["train"]["log_interval"], self.dist,
                               self.runtime["check_finite"] == "step", self.work_dir)
        self.iteration = build_iteration(cfg, stage, self.nets, self.optimizer, self.runtime, self.dist,
                                         self.max_iters, self.log.check_finite)
        self.images = {}  # what the last iteration saw, for the pictures
        self._probe = self._ideal = None  # the stylization scores' images, made at the first evaluation
        self.t = 0
        self.best = {"metric": None, "value": -1.0, "iter": None}
        if resume:
            self.load_state_dict(load_training_checkpoint(resume), resume)

    def _place(self, device):
        """The device and, under torchrun, this process's rank (one GPU per process)."""
        device = runtime.resolve_device(device)
        self.dist = distributed.from_environment(device.type)
        if self.dist.enabled and device.type == "cuda":
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device

    def _say(self, line):
        if self.dist.is_main:
            print(line, flush=True)

    def _start_style_transfer(self, cut_checkpoint):
        """CUT's starting weights: `cut_checkpoint` if given, else stage 0's output (stage 1) or
        stage 1's (stage 2); trained in stages 0 and 1, frozen in stage 2."""
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
            else:
                self._say(f"style transfer: no {previous}, G/D/F start from random weights")
        if source is not None:
            loaded = load_style(self.nets.style, source, with_optimizers=False)
            fresh = [name for name in ("G", "D", "F") if name not in loaded]
            self._say(f"style transfer: {'/'.join(loaded)} from {source}" +
                      (f" ({'/'.join(fresh)} from random weights: no file beside it)" if fresh else ""))
        if self.stage == 2:
            self.nets.style.freeze()

    def step(self, batch, t):
        """Run iteration t on a loader batch; returns its losses (tensors) by name."""
        losses, self.images = self.iteration(batch, t)
        self.dist.after_step(t, self.nets)
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
        with self._state_saved_on_bad_sample(), SignalFlag(announce=main) as signals:
            for batch in loader:
                # Between iterations: all ranks agree whether a signal came (one collective under torchrun).
                if self.dist.any(signals.received is not None):
                    self._stop(signals.received or signal.SIGTERM)
                if batch.get("replaced"):  # data.bad_samples=skip: what stood in for a bad file
                    self.log.write({"iter": batch["t"], "replaced": batch["replaced"]})
                self.log.add(self.step(batch, batch["t"]))
                self.t = batch["t"] + 1
                if self.log.due(self.t, self.max_iters):
                    trained = self.nets.style.opt_G if self.stage == 0 else self.optimizer  # stage 0: CUT alone
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
        self.log.close()
        return result

    def evaluate(self):
        if self.stage == 0:  # CUT alone: no segmentor to evaluate
            return {}
        return evaluate(self.nets.student.segmentor, self.val_set, self.cfg, device=self.device, progress=False,
                        shard=(self.dist.rank, self.dist.world_size), reduce=self.dist.all_reduce_)

    def evaluate_and_save(self):
        """The evaluation at an interval: its line in the log, the pictures and the checkpoints."""
        result = self.evaluate()
        if not self.dist.is_main:
            self._note_best(result)
            return result
        pipeline = self.cfg["pipeline"]
        save_iteration_pictures(self.images, self.work_dir, self.t, pipeline["mean"], pipeline["std"],
                                writer=self.log.tensorboard)
        record = {"iter": self.t, **{k: 100 * result[k] for k in metric_names(result)}}
        if self.nets.style is not None:
            record.update(stylization_scores(self.nets.style, *self._style_probe(), pipeline["mean"], pipeline["std"]))
            if self.cfg["source"].get("generate") == "demo":
                record.update(ideal_translation_scores(self.nets.style, *self._ideal_probe(), pipeline["mean"],
                                                       pipeline["std"]))
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

    def _ideal_probe(self, count=8):
        """Demo only: held-out source scenes and their ideal translations (the same scenes in
        the target's look), whole images, the same at every evaluation."""
        if self._ideal is None:
            from .data.demo import held_out_sources, make_ideal_translation
            from .data.transforms import to_input

            pairs = [make_ideal_translation(i)[:2] for i in held_out_sources(count)]
            mean, std = self.cfg["pipeline"]["mean"], self.cfg["pipeline"]["std"]
            self._ideal = tuple(
                runtime.prepare_input(torch.stack([to_input(pair[k], mean, std) for pair in pairs]).to(self.device),
                                      self.runtime) for k in (0, 1))
        return self._ideal

    def _note_best(self, result):
        """Whether `result` improves on the best so far (and remember it if so)."""
        metric = result.get("main_metric")
        value = result[metric] if metric else float("nan")
        improved = not math.isnan(value) and value > self.best["value"]
        if improved:
            self.best = {"metric": metric, "value": value, "iter": self.t}
        return improved

    def save(self, result):
        """last.pth, and best.pth when `result` is the best so far (both written atomically)."""
        improved = self._note_best(result)
        state = self.state_dict()
        save_atomic(state, self.work_dir / "last.pth")
        if improved:
            save_atomic(state, self.work_dir / "best.pth")

    @contextlib.contextmanager
    def _state_saved_on_bad_sample(self):
        """Under data.bad_samples=error a file that fails to decode mid-run (in a batch or in an
        evaluation) stops the run, after the state of the last finished iteration is saved: by
        whichever rank met it, since all ranks hold the same state."""
        try:
            yield
        except BadSampleError:
            save_atomic(self.state_dict(), self.work_dir / "last.pth")
            raise

    def _stop(self, signum):
        """Write the state after the last finished iteration, say how to resume, and stop."""
        last = self.work_dir / "last.pth"
        if self.dist.is_main:
            save_atomic(self.state_dict(), last)
        self.log.close()
        distributed.shutdown()  # every rank waits for rank 0's write
        raise StopRequested(f"stopped by {signal.Signals(signum).name} after {self.t} iterations of stage "
                            f"{self.stage}: state saved in {last}; resume with: {resume_command()}", signum,
                            announce=self.dist.is_main)

    # ------------------------------------------------------------------ state
    def state_dict(self):
        """Everything a bit-for-bit resume needs (docs/method.md §7), as one dict of tensors and
        literals. `model` repeats the student segmentor alone, the file test.py reads first."""
        nets = self.nets
        return {
            "format": TRAINING_FORMAT, "stage": self.stage, "iteration": self.t, "config": self.cfg,
            "model": nets.student.segmentor.state_dict(), "student": _heads(nets.student),
            "teacher": _heads(nets.teacher), "imnet": nets.imnet.state_dict(),
            "reg_proj": nets.reg_proj.state_dict(), "prototypes": nets.prototypes,
            "proto_counts": nets.proto_counts, "optimizer": self.optimizer.state_dict(),
            "best": dict(self.best), "rng": {"torch": torch.get_rng_state()},
            "style": None if nets.style is None else nets.style.state_dict(),
        }

    def load_state_dict(self, ckpt, path="checkpoint"):
        """Resume from `state_dict()`'s output (read from `path`), or a one-line error."""
        nets = self.nets
        if ckpt["stage"] != self.stage:
            raise ConfetiError(f"checkpoint {path} is from stage {ckpt['stage']}, not stage {self.stage}")
        if (nets.style is None) != (ckpt.get("style") is None):
            raise ConfetiError(f"checkpoint {path} {'lacks' if ckpt.get('style') is None else 'holds'} a style "
                               f"transfer, unlike this config (cut.enabled, method)")
        self._warn_config_changes(ckpt.get("config"), path)
        for net, key in ((nets.student, "student"), (nets.teacher, "teacher")):
            for part in ("segmentor", "cam_head", "proj_head"):
                load_model_weights(getattr(net, part), ckpt[key][part], f"{path} [{key}.{part}]")
        load_model_weights(nets.imnet, ckpt["imnet"], f"{path} [imnet]")
        load_model_weights(nets.reg_proj, ckpt["reg_proj"], f"{path} [reg_proj]")
        nets.prototypes.copy_(ckpt["prototypes"])
        nets.proto_counts.copy_(ckpt["proto_counts"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.t = ckpt["iteration"]
        self.best = ckpt["best"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if nets.style is not None:
            nets.style.load_state_dict(ckpt["style"], str(path), with_optimizers=self.stage < 2)

    def _warn_config_changes(self, saved, path):
        """One warning line per method-relevant key whose value differs from the checkpoint's run."""
        if not isinstance(saved, dict) or not self.dist.is_main:
            return
        for key, before, now in config_differences(saved, self.cfg):
            if not key.startswith(NOT_METHOD_KEYS):
                print(f"warning: resuming {path} with {key} = {now!r}, but its run had {before!r}: "
                      f"the resumed run is not the one that was started", file=sys.stderr, flush=True)


def _heads(net):
    return {"segmentor": net.segmentor.state_dict(), "cam_head": net.cam_head.state_dict(),
            "proj_head": net.proj_head.state_dict()}


def config_differences(old, new, prefix=""):
    """[(dotted key, old value, new value)] where two nested config dicts differ."""
    found = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(a, b, name + ".")
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            found.append((name, a, b))
    return found
