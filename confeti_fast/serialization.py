"""Files on disk: atomic writes, safe reads, and telling one kind of checkpoint from another.

A leaf module (it imports nothing of the package but the errors), so models/, the trainer,
the style transfer and the CLIs can all read and write files without import circles.
Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain literals only,
plus, for the authors' mmcv files, numpy's scalar and array rebuilders (`read_mmcv_checkpoint`).
"""
import os
import re
import zipfile
from pathlib import Path

import torch

from .errors import ConfetiError, write_failure

TRAINING_FORMAT = "confeti_fast/1"  # the "format" entry of every checkpoint the trainer writes


def save_atomic(payload, path):
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path`:
    an interrupted or failed write leaves the previous file intact. A failure (no space left,
    permission denied, read-only filesystem) removes the temporary file and raises one line
    naming the path and the reason."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per process: ranks may write at once
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        reason = write_failure(err, path.parent)  # before the temporary file frees its space
        tmp.unlink(missing_ok=True)
        kept = f"; the previous {path.name} is intact: once that is fixed, --resume auto continues from it" \
            if path.is_file() else ""
        raise ConfetiError(f"cannot write {path}: {reason}{kept}") from None
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


def _numpy_safe_globals():
    """The numpy reconstructors mmcv checkpoints need under weights_only=True: mmseg's
    evaluation hook stores `meta.hook_msgs.best_score` as a numpy float64. Only data types and
    the scalar/array rebuilders, listed under their numpy 1.x and 2.x pickle names."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch installs
        return []
    core = getattr(np, "_core", None) or np.core
    found = [(core.multiarray.scalar, "numpy.core.multiarray.scalar"),
             (core.multiarray.scalar, "numpy._core.multiarray.scalar"),
             (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
             (core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
             (np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [(cls, f"numpy.dtypes.{name}") for name, cls in vars(dtypes).items()
                  if isinstance(cls, type) and name.endswith("DType")]
    return found


def read_mmcv_checkpoint(path, what="checkpoint"):
    """`read_checkpoint` (weights_only=True, one-line errors) that also accepts numpy
    scalars/arrays/dtypes, which mmcv checkpoints carry in 'meta'; the allowance is scoped
    to this read."""
    allowed = _numpy_safe_globals()
    if not allowed or not hasattr(torch.serialization, "safe_globals"):
        return read_checkpoint(path, what)
    with torch.serialization.safe_globals(allowed):
        return read_checkpoint(path, what)


def checkpoint_kind(ckpt):
    """What a loaded checkpoint is: "training" (written by the trainer), "mmseg" (the authors'
    mmseg/DACS file), or "state_dict" (anything else, e.g. CUT's latest_net_G.pth)."""
    if isinstance(ckpt, dict) and ckpt.get("format") == TRAINING_FORMAT:
        return "training"
    if is_mmseg_checkpoint(ckpt):
        return "mmseg"
    return "state_dict"


def load_training_checkpoint(path):
    """A checkpoint written by the trainer, or a one-line error naming the file."""
    ckpt = read_checkpoint(path)
    if checkpoint_kind(ckpt) != "training":
        raise ConfetiError(f"checkpoint {path} is not a confeti_fast training checkpoint (format {TRAINING_FORMAT})")
    return ckpt


def is_mmseg_checkpoint(ckpt):
    """True when `ckpt` looks like the authors' mmseg checkpoint: no 'model' entry, and a
    'state_dict' (or the dict itself) with `model.backbone.*` keys."""
    if not isinstance(ckpt, dict) or "model" in ckpt:
        return False
    sd = ckpt.get("state_dict", ckpt)
    return isinstance(sd, dict) and any(
        isinstance(k, str) and k.startswith(("model.backbone.", "module.model.backbone.")) for k in sd)
