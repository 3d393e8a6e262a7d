"""The prototype EMA update (docs/method.md §4): its switch.

fused: the compiled extension's op through `confeti_fast.kernels.proto_update` (csrc/: C++ on
the CPU, CUDA on CUDA); reference: `reference.proto_ema_update`. The class statistics and the
EMA of the `reduce` hook (`proto_class_stats`, `proto_ema_apply`) are not dispatched on their
own: `proto_ema_update(..., reduce=f)` runs both inside whichever update is selected.
"""
from .. import reference
from .switch import choose, load_fused

NAME = "proto_ema_update"


def fused(device_type):
    """(implementation, None) or (None, why it is missing) for tensors on `device_type`."""
    if device_type == "cuda":
        return load_fused("proto_update", "proto_ema_update", "CUDA_AVAILABLE", "CUDA_LOAD_ERROR")
    return load_fused("proto_update", "proto_ema_update")


def implementation(device_type="cpu"):
    return choose(NAME, device_type, fused)


def proto_ema_update(prototypes, *args, **kwargs):
    return implementation(prototypes.device.type)(prototypes, *args, **kwargs)


proto_ema_update.__doc__ = reference.proto_ema_update.__doc__
