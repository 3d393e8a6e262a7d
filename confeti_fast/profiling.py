"""Counting what predicts GPU time where no GPU is at hand: the launches a call issues.

A launch is a Triton kernel call (issued through `kernels._triton_common.launch`, which marks
it in the profiler as `triton::<kernel>`) or an outermost torch op that does work. Views,
metadata ops and bare allocations do not count; ops nested inside another counted op (or
inside a Triton launch, where the interpreter copies its arguments) are part of that launch.

    count = count_launches(lambda: op(x).backward())
    count.total, count.names        # e.g. 4, ['triton::_rows_kernel', ...]
"""
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

TRITON_PREFIX = "triton::"

# Ops that only make views, change metadata or allocate: no kernel runs for them on a GPU.
NO_WORK = frozenset(f"aten::{name}" for name in (
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape",
    "_reshape_alias", "as_strided", "alias", "detach", "detach_", "lift_fresh", "t", "transpose", "permute",
    "expand", "expand_as", "unsqueeze", "squeeze", "select", "slice", "narrow", "unflatten", "flatten",
    "view_as", "resolve_conj", "resolve_neg", "contiguous", "to", "_to_copy_noop", "unbind", "split",
    "chunk", "set_", "result_type", "size", "stride", "numel", "dim",
))


@dataclass
class LaunchCount:
    names: list = field(default_factory=list)

    @property
    def total(self):
        return len(self.names)

    @property
    def triton(self):
        return sum(name.startswith(TRITON_PREFIX) for name in self.names)

    @property
    def torch_ops(self):
        return self.total - self.triton


def _counted(name):
    return name.startswith(TRITON_PREFIX) or (name.startswith("aten::") and name not in NO_WORK)


def _inside_counted(event):
    parent = event.cpu_parent
    while parent is not None:
        if _counted(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def count_launches(fn):
    """Run `fn()` once under the CPU profiler and return its LaunchCount (in call order).
    A view-like op that does copy (`contiguous`, `to`) counts through its copying child."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    return LaunchCount([e.name for e in events if _counted(e.name) and not _inside_counted(e)])


def cpu_peak_allocated_mb(fn):
    """The most memory `fn()` holds at once beyond what existed before it, in MB, from the CPU
    profiler's allocator events (`profile_memory=True`): tensors, not Python objects."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
