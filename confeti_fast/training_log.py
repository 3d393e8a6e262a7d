"""The losses' way into the log, and the guard that stops a run on a NaN or infinite loss.

Losses are summed on the device each iteration and read back once per `log_interval` (one
device-to-host copy), averaged over iterations and ranks, checked, and written by rank 0 as
one JSON object per line in `log.jsonl`. With runtime.check_finite 'step' every loss is also
checked before its backward (a host sync per term); with 'log' (the CUDA default) the check
happens when the log reads the values anyway.

Where `tensorboard` is installed (`pip install .[tensorboard]`), rank 0 also writes every
logged number (losses, lr, speed, q, mIoU) as a TensorBoard scalar, and the trainer's panels
as images, into WORK_DIR/stage<N>/tb/ (`tensorboard --logdir WORK_DIR`).
"""
import json
import math
import time
from pathlib import Path

import torch

from .errors import ConfetiError
from .errors import writing


class NonFiniteLoss(ConfetiError):
    """A loss term became NaN or infinite; training stops before it touches any weight."""


def read_log(path, partial=False):
    """The records (dicts) of a `log.jsonl`, in file order: the one reader of that file.

    `partial` is for a run that may still be writing or was killed: a missing file reads as no
    records and a line that is not JSON (cut short) is skipped. Without it both raise, for
    readers of a finished run, where either means something went wrong."""
    path = Path(path)
    if partial and not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if not partial:
                raise
    return records


def open_tensorboard(log_dir):
    """A torch.utils.tensorboard SummaryWriter into `log_dir`, or None without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an extra: pip install .[tensorboard]
        return None
    return SummaryWriter(log_dir=str(log_dir))


def tensorboard_tag(key):
    """The TensorBoard tag of a log record key: losses under loss/, metrics under val/, the rest
    (lr, it_per_s, q) under train/."""
    if "/" in key:
        return key
    return f"val/{key}" if key.startswith("mIoU") else f"train/{key}"


class TrainingLog:
    def __init__(self, path, interval, dist, check_every_step, work_dir):
        self.path, self.interval, self.dist = path, interval, dist
        self.check_every_step, self.work_dir = check_every_step, work_dir
        self._tensorboard = None  # opened on rank 0's first record; False: not installed
        self._reset()

    @property
    def tensorboard(self):
        """Rank 0's TensorBoard writer (WORK_DIR/stage<N>/tb), or None (another rank, or no
        tensorboard installed)."""
        if self._tensorboard is None and self.dist.is_main:
            self._tensorboard = open_tensorboard(Path(self.work_dir) / "tb") or False
        return self._tensorboard or None

    def close(self):
        if self._tensorboard:
            self._tensorboard.close()
        self._tensorboard = None

    def _reset(self):
        self.sums, self.counts, self.started, self.done = {}, {}, time.perf_counter(), 0

    def check_finite(self, losses, t):
        """Stop before the update on a NaN/inf loss (on every rank, when any rank sees one)."""
        if not self.check_every_step:
            return
        bad = [(name, float(value.detach())) for name, value in losses.items() if not torch.isfinite(value)]
        if self.dist.any(bool(bad)):
            what = f"loss '{bad[0][0]}' is {bad[0][1]}" if bad else "a loss is not finite on another rank"
            raise NonFiniteLoss(f"{what} at iteration {t}; training stopped before the update, the last "
                                f"checkpoint in {self.work_dir} is intact")

    def add(self, losses):
        for name, value in losses.items():  # summed on the device: read back once per log
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
            self.counts[name] = self.counts.get(name, 0) + 1
        self.done += 1

    def due(self, t, max_iters):
        """Whether the log is written after iteration t - 1 (t iterations done)."""
        return t % self.interval == 0 or t == max_iters

    def flush(self, t, lr):
        """Write the means since the last flush (iterations t - done .. t - 1); returns them."""
        first = t - self.done
        values = torch.stack([torch.as_tensor(v).reshape(()) for v in self.sums.values()]).tolist()
        values = self.dist.sum_values(values)  # the mean over ranks too
        means = {name: value / (self.counts[name] * self.dist.world_size) for name, value in zip(self.sums, values)}
        for name, value in means.items():
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"loss '{name}' became {value} between iterations {first} and {t - 1}; training stopped, "
                    f"the last checkpoint in {self.work_dir} is intact (set runtime.check_finite 'step' to stop "
                    f"before the first bad update)")
        record = {"iter": t, "lr": lr, "it_per_s": self.done / (time.perf_counter() - self.started)}
        # a name with its own group ("grad_G/cut_gan") keeps it; the rest are losses
        record.update({k if k == "q" or "/" in k else f"loss/{k}": v for k, v in means.items()})
        self.write(record)
        self._reset()
        return means

    def write(self, record):
        """One record (a dict with 'iter'): a line of log.jsonl and, with tensorboard, one
        scalar per number; rank 0 only."""
        if not self.dist.is_main:
            return
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self.tensorboard
        if writer is not None:
            for key, value in record.items():
                if key != "iter" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(tensorboard_tag(key), value, record["iter"])
            writer.flush()
