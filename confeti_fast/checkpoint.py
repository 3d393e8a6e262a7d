"""Training checkpoints: written atomically, read with `weights_only=True`."""
import os
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


def load_training_checkpoint(path):
    """A checkpoint written by the trainer, or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfetiError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise ConfetiError(f"checkpoint {path} cannot be read ({type(err).__name__}); "
                           f"is it a confeti_fast training checkpoint?") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConfetiError(f"checkpoint {path} is not a confeti_fast training checkpoint (format {FORMAT})")
    return ckpt
