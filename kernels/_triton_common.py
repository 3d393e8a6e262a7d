"""Shared bits of the Triton kernels: the guarded import and small launch helpers.

Importing this never fails: where Triton is missing or broken, AVAILABLE is False and
LOAD_ERROR says why, and the kernel modules define no kernels and register no ops.
TRITON_INTERPRET=1 must be in the environment before the first `import triton` for the
kernels to run on CPU tensors (the tests' conftest sets it on machines without a GPU).
"""
import contextlib
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

try:
    import triton
    import triton.language as tl
except Exception as exc:  # missing wheel, unsupported platform, broken driver stub...
    triton = None
    tl = None
    AVAILABLE = False
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
else:
    AVAILABLE = True
    LOAD_ERROR = None

EPS = 1e-12  # F.normalize's default eps
NAMESPACE = "confeti_fast"


def next_pow2(n):
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def cdiv(a, b):
    return (int(a) + b - 1) // b


def can_run(device):
    """Whether the Triton kernels can run on tensors of `device`."""
    device = torch.device(device)
    if not AVAILABLE:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and INTERPRET


def op_registered(name):
    """True when `confeti_fast::name` already exists (e.g. this file was imported under a
    second module name), so the second definition is skipped instead of raising."""
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def device_guard(device):
    """Triton launches on the current CUDA device; make it the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def nonempty(t, fallback):
    """`t`, or a 1-element stand-in when `t` is empty, so no kernel receives a null pointer
    (its loads are masked off anyway)."""
    return t if t.numel() > 0 else fallback


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, marked in the profiler as `triton::<name>` so that
    `confeti_fast.profiling.count_launches` counts it once (with what the interpreter does inside)."""
    with torch.profiler.record_function(f"triton::{kernel.__name__}"):
        return kernel[grid](*args, **kwargs)
