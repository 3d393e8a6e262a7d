"""Data-parallel training under torchrun: one process per GPU (NCCL) or per CPU worker (gloo).

    torchrun --nproc_per_node 8 train.py --config gta2cs

Each rank draws its own source/target samples (the loader shards by rank), and after every
step all ranks hold bitwise-identical weights, teacher, prototypes and BN statistics:

* gradients are averaged over ranks once per step, just before each optimizer step, in one
  all-reduce of all gradients. This is what DDP does; it is done explicitly because a step
  runs three forward/backward passes through the student (DDP would all-reduce three times),
  some heads only join the loss after a gate (DDP would need find_unused_parameters), and the
  consistency term calls the student with swapped-in weights;
* the per-class prototype statistics are summed over ranks before the EMA;
* BN running statistics (student, and the teacher, which runs in train mode) are broadcast
  from rank 0 after the step, as DDP's broadcast_buffers would; with runtime.sync_bn the
  statistics are synchronized in the forward instead (CUDA only);
* rank 0 alone writes logs, pictures and checkpoints; evaluation is split across ranks and
  the confusion matrices are summed.

CONFETI_CHECK_RANKS=1 makes every step assert that all ranks hold identical student, teacher
and prototypes (a debugging aid; the tests use it).
"""
import hashlib
import os

import torch
import torch.distributed as dist

from .errors import ConfetiError


class Context:
    """Where this process stands: rank, world size, local rank (its GPU)."""

    def __init__(self, rank=0, world_size=1, local_rank=0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.check_ranks = self.enabled and os.environ.get("CONFETI_CHECK_RANKS") == "1"

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def all_reduce_(self, *tensors):
        """Sum each tensor over ranks, in place (the prototype statistics' reduce hook)."""
        if self.enabled:
            for tensor in tensors:
                dist.all_reduce(tensor)

    def average_gradients(self, params):
        """Average the gradients of `params` over ranks in one all-reduce; every rank gets the
        same bits, so the optimizer steps stay identical."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_buffers(self, *modules):
        """Rank 0's buffers (BN running statistics and step counters) to every rank, in one
        collective: all of them flattened into one float64 tensor, which holds float32 values and
        the int64 counters (far below 2^53) exactly."""
        if not self.enabled:
            return
        buffers = [buffer for module in modules for buffer in module.buffers()]
        if not buffers:
            return
        flat = torch.cat([buffer.reshape(-1).double() for buffer in buffers])
        dist.broadcast(flat, 0)
        for buffer, chunk in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.copy_(chunk.view_as(buffer))

    def after_step(self, t, nets):
        """Rank 0's BN statistics to every rank, and with CONFETI_CHECK_RANKS=1 the check that all
        ranks hold the same student, teacher, prototypes and style transfer after iteration t."""
        self.broadcast_buffers(nets.student, nets.teacher)
        if self.check_ranks:
            style = nets.style
            self.assert_identical({
                "student": list(nets.student.state_dict().values()),
                "teacher": list(nets.teacher.state_dict().values()),
                "prototypes": [nets.prototypes, nets.proto_counts],
                "style": [] if style is None else [p for net in style.modules().values() for p in net.parameters()],
            }, t)

    def any(self, flag):
        """True on every rank when `flag` is True on any rank (so all ranks stop together)."""
        if not self.enabled:
            return bool(flag)
        device = f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"  # NCCL takes GPU tensors only
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum_values(self, values):
        """Sum a list of floats over ranks (the logged loss sums)."""
        if not self.enabled:
            return values
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total)
        return total.tolist()

    def assert_identical(self, tensors_by_name, t):
        """ConfetiError unless every rank holds bit-identical tensors under each name."""
        digests = {}
        for name, tensors in tensors_by_name.items():
            digest = hashlib.sha256()
            for tensor in tensors:
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            digests[name] = digest.hexdigest()
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, digests)
        differing = sorted(name for name in digests if len({g[name] for g in gathered}) > 1)
        if differing:
            raise ConfetiError(f"iteration {t}: ranks hold different {', '.join(differing)}")


def launched_as_main():
    """Whether this process is rank 0 of its launch (torchrun's RANK; a plain process is), before
    any process group exists: what prints a line once per run rather than once per rank asks."""
    return int(os.environ.get("RANK", "0")) == 0


def from_environment(device_type):
    """The Context torchrun's environment describes; joins the process group on first use."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    context = Context(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if context.enabled and not dist.is_initialized():
        if device_type == "cuda":
            if context.local_rank >= torch.cuda.device_count():
                raise ConfetiError(f"LOCAL_RANK {context.local_rank} but only {torch.cuda.device_count()} GPU(s): "
                                   "start at most one process per GPU (torchrun --nproc_per_node)")
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return context


def shutdown():
    """Leave the process group once every rank is done: a rank that tears gloo down while
    rank 0 still writes its last checkpoint aborts ("terminate called without an active
    exception", seen 1 run in 3 on a 2-core CPU)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
