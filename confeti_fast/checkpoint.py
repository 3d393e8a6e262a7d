"""Checkpoint files: written atomically, read with `weights_only=True` and one-line errors."""
import os
import re
import zipfile
from pathlib import Path

import torch

from .errors import ConfetiError

FORMAT = "confeti_fast/1"


def save_atomic(payload, path):
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path`:
    an interrupted write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _load_failure(path, err):
    """Why torch.load(weights_only=True) failed, in a few words (never 'use weights_only=False')."""
    text = str(err)
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if match:
        return (f"holds a {match.group(1)} object; checkpoints are read with torch.load(weights_only=True), "
                f"which accepts only tensors and plain Python literals")
    if not zipfile.is_zipfile(path):
        return "cannot be read: it is not a PyTorch checkpoint (torch.save file)"
    reason = " ".join(text.split())
    reason = reason.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
    return f"cannot be read with torch.load(weights_only=True): {type(err).__name__}: {reason[:160]}"


def read_checkpoint(path, what="checkpoint"):
    """torch.load(weights_only=True) of `path` on the CPU; a one-line ConfetiError naming the
    file when it is missing or unreadable. `what` names the kind of file in the message."""
    path = Path(path)
    if not path.exists():
        raise ConfetiError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ConfetiError(f"{what} {path} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling / zip / format errors come in many types
        raise ConfetiError(f"{what} {path} {_load_failure(path, err)}") from None


def load_training_checkpoint(path):
    """A checkpoint written by the trainer, or a one-line error naming the file."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConfetiError(f"checkpoint {path} is not a confeti_fast training checkpoint (format {FORMAT})")
    return ckpt


def _heads(net):
    return {"segmentor": net.segmentor.state_dict(), "cam_head": net.cam_head.state_dict(),
            "proj_head": net.proj_head.state_dict()}


def training_state(trainer):
    """Everything a bit-for-bit resume needs (docs/method.md §7), as one dict of tensors and
    literals. `model` repeats the student segmentor alone, the file test.py reads first."""
    return {
        "format": FORMAT, "stage": trainer.stage, "iteration": trainer.t, "config": trainer.cfg,
        "model": trainer.student.segmentor.state_dict(), "student": _heads(trainer.student),
        "teacher": _heads(trainer.teacher), "imnet": trainer.imnet.state_dict(),
        "reg_proj": trainer.reg_proj.state_dict(), "prototypes": trainer.prototypes,
        "proto_counts": trainer.proto_counts, "optimizer": trainer.optimizer.state_dict(),
        "best": dict(trainer.best), "rng": {"torch": torch.get_rng_state()},
        "style": None if trainer.style is None else trainer.style.state_dict(),
    }


def restore_training_state(trainer, path):
    """Fill `trainer` from a checkpoint written by `training_state`, or a one-line error."""
    from .models import load_model_weights

    ckpt = load_training_checkpoint(path)
    if ckpt["stage"] != trainer.stage:
        raise ConfetiError(f"checkpoint {path} is from stage {ckpt['stage']}, not stage {trainer.stage}")
    for net, key in ((trainer.student, "student"), (trainer.teacher, "teacher")):
        for part in ("segmentor", "cam_head", "proj_head"):
            load_model_weights(getattr(net, part), ckpt[key][part], f"{path} [{key}.{part}]")
    load_model_weights(trainer.imnet, ckpt["imnet"], f"{path} [imnet]")
    load_model_weights(trainer.reg_proj, ckpt["reg_proj"], f"{path} [reg_proj]")
    trainer.prototypes.copy_(ckpt["prototypes"])
    trainer.proto_counts.copy_(ckpt["proto_counts"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.t = ckpt["iteration"]
    trainer.best = ckpt["best"]
    torch.set_rng_state(ckpt["rng"]["torch"])
    if (trainer.style is None) != (ckpt.get("style") is None):
        raise ConfetiError(f"checkpoint {path} {'lacks' if ckpt.get('style') is None else 'holds'} a style "
                           f"transfer, unlike this config (cut.enabled, method)")
    if trainer.style is not None:
        trainer.style.load_state_dict(ckpt["style"], str(path), with_optimizers=trainer.stage < 2)
