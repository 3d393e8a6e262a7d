"""The method's hot ops behind one switch: fused kernels or the plain-PyTorch reference.

    from confeti_fast import ops
    ops.pixel_proto_contrast(...)          # whichever is selected
    with ops.kernels("reference"): ...     # force the reference for a block

The choice comes from `set_kernels` / the `kernels` context manager, else the environment
variable CONFETI_KERNELS, else "fused". An op without a fused implementation on this
machine falls back to the reference with a one-line warning, never to wrong numbers.
"""
import contextlib
import os
import sys

from ..errors import ConfetiError
from . import reference

MODES = ("fused", "reference")
OP_NAMES = ("pixel_proto_contrast", "proto_ema_update", "patch_nce")
_FUSED = {}  # op name -> implementation, registered by the kernel modules when they load
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


def implementation(name):
    """The function `name` runs under the current selection."""
    if get_kernels() == "fused":
        if name in _FUSED:
            return _FUSED[name]
        if name not in _warned:
            _warned.add(name)
            print(f"warning: confeti_fast has no fused {name} on this install; using the reference op",
                  file=sys.stderr)
    return getattr(reference, name)


def pixel_proto_contrast(*args, **kwargs):
    return implementation("pixel_proto_contrast")(*args, **kwargs)


def proto_ema_update(*args, **kwargs):
    return implementation("proto_ema_update")(*args, **kwargs)


def patch_nce(*args, **kwargs):
    return implementation("patch_nce")(*args, **kwargs)


pixel_proto_contrast.__doc__ = reference.pixel_proto_contrast.__doc__
proto_ema_update.__doc__ = reference.proto_ema_update.__doc__
patch_nce.__doc__ = reference.patch_nce.__doc__
