"""The networks and tensors one stage trains or reads (docs/method.md §2), built in one place.

    student        segmentor + CAM head + projection head h (trained)
    teacher        their EMA copy (step 1), run in train mode as in DAFormer
    imnet          the frozen ImageNet-initialised segmentor of the feature distance
    reg_proj       the consistency term's 1x1 projection (stage 1)
    prototypes     P (K x D) and the per-class counts of their EMA (§4)
    style          CUT's G, D, F with their optimizers, or None without style transfer
    frozen_student stage 1: the consistency term's f and h, a copy refreshed every step

The build order is the order of random draws: changing it changes every seeded run.
"""
import copy
from dataclasses import dataclass
from typing import Optional

import torch

from . import runtime
from .errors import ConfetiError
from .models.heads import ConfetiNet, reg_proj
from .style import StyleTransfer


def frozen_copy(module):
    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


@dataclass
class Networks:
    student: torch.nn.Module
    teacher: torch.nn.Module
    imnet: torch.nn.Module
    reg_proj: torch.nn.Module
    prototypes: torch.Tensor
    proto_counts: torch.Tensor
    style: Optional[StyleTransfer]
    frozen_student: Optional[torch.nn.Module]

    def trained_parameters(self):
        """(backbone parameters, head parameters): the segmentor optimizer's two lr groups
        (the heads and reg_proj at 10x)."""
        head_ids = {id(p) for m in self.student.head_modules() for p in m.parameters()}
        backbone = [p for p in self.student.parameters() if id(p) not in head_ids]
        heads = [p for m in self.student.head_modules() for p in m.parameters()] + list(self.reg_proj.parameters())
        return backbone, heads

    def prepare(self, run):
        """channels_last and torch.compile as the run asks; the backbones hold nearly all the
        compute, so they are what gets compiled (and G and D whole)."""
        for net in (self.student, self.teacher, self.frozen_student):
            if net is not None:
                runtime.prepare_module(net, run, compiled=net.segmentor.backbone)
        runtime.prepare_module(self.imnet, run, compiled=self.imnet.backbone)
        if self.style is not None:
            for net in (self.style.G, self.style.D):
                runtime.prepare_module(net, run)


def uses_style_transfer(cfg):
    return cfg["method"] == "confeti" and cfg["cut"]["enabled"]


def build_networks(cfg, stage, device, run, dist):
    """Every network of the stage at its seeded initial weights (`run`: the resolved runtime)."""
    tcfg, num_classes = cfg["train"], cfg["num_classes"]
    torch.manual_seed(cfg["seed"])
    student = ConfetiNet(cfg["model"], num_classes, tcfg["proto_dim"], verbose=dist.is_main).to(device)
    if run["sync_bn"] and dist.enabled:
        if device.type != "cuda":
            raise ConfetiError("runtime.sync_bn needs CUDA (torch's SyncBatchNorm); on CPU the ranks "
                               "share rank 0's BN statistics after every step instead")
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    teacher = frozen_copy(student)
    imnet = frozen_copy(student.segmentor).eval()
    projection = reg_proj(tcfg["proto_dim"]).to(device)
    prototypes = torch.zeros(num_classes, tcfg["proto_dim"], device=device)
    proto_counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    style = None
    if uses_style_transfer(cfg):
        style = StyleTransfer(cfg["cut"], device, cfg["pipeline"]["mean"], cfg["pipeline"]["std"],
                              fused=run["fused_optimizer"], prepare=lambda x: runtime.prepare_input(x, run))
    elif stage == 0:
        raise ConfetiError("--stage 0 pre-trains the style transfer: it needs method 'confeti' and cut.enabled True")
    # Stage 1's consistency term runs f and h frozen: a copy refreshed from the student each
    # step (a module of its own, so its compiled backbone never sees swapped weights).
    frozen_student = frozen_copy(student) if style is not None and stage == 1 else None
    return Networks(student, teacher, imnet, projection, prototypes, proto_counts, style, frozen_student)
