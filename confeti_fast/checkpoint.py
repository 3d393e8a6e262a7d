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
