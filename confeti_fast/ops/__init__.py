"""The method's hot ops behind one switch: fused kernels or the plain-PyTorch reference.

    from confeti_fast import ops
    ops.pixel_proto_contrast(...)          # whichever is selected
    with ops.kernels("reference"): ...     # force the reference for a block

The choice comes from `set_kernels` / the `kernels` context manager, else the environment
variable CONFETI_KERNELS, else "fused". What "fused" runs depends on the tensors' device:

    op                      CUDA                         CPU
    pixel_proto_contrast    Triton kernel                torch_fast (cheapest torch path)
    patch_nce               Triton kernel                reference (already the cheapest)
    proto_ema_update        CUDA extension op            C++ extension op

A fused implementation that is missing on this install (no compiled extension, no usable
Triton) gives a one-line warning and the reference, never a crash or different numbers.
The Triton kernels run on CPU tensors only under TRITON_INTERPRET=1, called directly from
`confeti_fast.kernels` (the tests do that).
"""
import contextlib
import os
import sys

from ..errors import ConfetiError
from . import reference, torch_fast

MODES = ("fused", "reference")
OP_NAMES = ("pixel_proto_contrast", "proto_ema_update", "patch_nce")
_selected = None
_warned = set()


def _check(mode, origin):
    if mode not in MODES:
        raise ConfetiError(f"{origin} must be 'fused' or 'reference', got {mode!r}")
    return mode


def get_kernels():
    if _selected is not None:
        return _selected
    return _check(os.environ.get("CONFETI_KERNELS", "fused"), "CONFETI_KERNELS")


def set_kernels(mode):
    global _selected
    _selected = None if mode is None else _check(mode, "--kernels")


@contextlib.contextmanager
def kernels(mode):
    global _selected
    previous, _selected = _selected, _check(mode, "kernels()")
    try:
        yield
    finally:
        _selected = previous


def _fused(name, device_type):
    """(implementation, None) or (None, why it is missing) for op `name` on `device_type`.
    A fused module that fails to import counts as missing: the caller warns and runs the reference."""
    if device_type != "cuda" and name != "proto_ema_update":
        return getattr(torch_fast, name, getattr(reference, name)), None
    try:
        if name == "proto_ema_update":
            from ..kernels import proto_update as module
        elif name == "pixel_proto_contrast":
            from ..kernels import contrast as module
        else:
            from ..kernels import patch_nce as module
    except Exception as exc:  # a missing or broken fused module (not installed, syntax error, ...)
        first_line = (str(exc).splitlines() or [""])[0]
        return None, f"importing it failed: {type(exc).__name__}: {first_line}"
    if name == "proto_ema_update":
        if device_type == "cuda":
            return (module.proto_ema_update, None) if module.CUDA_AVAILABLE else (None, module.CUDA_LOAD_ERROR)
        return (module.proto_ema_update, None) if module.AVAILABLE else (None, module.LOAD_ERROR)
    return (getattr(module, name), None) if module.AVAILABLE else (None, module.LOAD_ERROR)


def implementation(name, device_type="cpu"):
    """The function `name` runs under the current selection for tensors on `device_type`."""
    if get_kernels() == "fused":
        function, missing = _fused(name, device_type)
        if function is not None:
            return function
        if (name, device_type) not in _warned:
            _warned.add((name, device_type))
            print(f"warning: confeti_fast has no fused {name} for {device_type} on this install ({missing}); "
                  "using the reference op", file=sys.stderr)
    return getattr(reference, name)


def pixel_proto_contrast(feats, *args, **kwargs):
    return implementation("pixel_proto_contrast", feats.device.type)(feats, *args, **kwargs)


def proto_ema_update(prototypes, *args, **kwargs):
    return implementation("proto_ema_update", prototypes.device.type)(prototypes, *args, **kwargs)


def patch_nce(q_layers, *args, **kwargs):
    return implementation("patch_nce", q_layers[0].device.type)(q_layers, *args, **kwargs)


pixel_proto_contrast.__doc__ = reference.pixel_proto_contrast.__doc__
proto_ema_update.__doc__ = reference.proto_ema_update.__doc__
patch_nce.__doc__ = reference.patch_nce.__doc__
