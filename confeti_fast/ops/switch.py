"""The switch between the fused kernels and the plain-PyTorch reference (what `--kernels`,
`ops.kernels()` and CONFETI_KERNELS select), and the loader of the fused modules.

The per-op modules (ops/contrast.py, ops/patch_nce.py, ops/proto_update.py) import this, and
this imports the kernels lazily; the kernels import only `confeti_fast.reference` and
`confeti_fast.sampling`, never `confeti_fast.ops`, so the package has no import circle.
"""
import contextlib
import os
import sys

from .. import reference
from ..distributed import launched_as_main
from ..errors import ConfetiError

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


def load_fused(module, op, available="AVAILABLE", error="LOAD_ERROR"):
    """(function `op` of `confeti_fast.kernels.<module>`, None), or (None, why it is missing):
    importing the module failed (not installed, syntax error, ...) or its flag `available` is
    false, the reason then being its `error`. `module` is "contrast", "patch_nce" or
    "proto_update". (Import statements, not importlib: torch.compile traces through them.)"""
    try:
        if module == "contrast":
            from ..kernels import contrast as loaded
        elif module == "patch_nce":
            from ..kernels import patch_nce as loaded
        else:
            from ..kernels import proto_update as loaded
    except Exception as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        return None, f"importing it failed: {type(exc).__name__}: {first_line}"
    if not getattr(loaded, available):
        return None, getattr(loaded, error)
    return getattr(loaded, op), None


def choose(name, device_type, fused):
    """What op `name` runs for tensors on `device_type` under the current selection. `fused`
    is the op module's `fused(device_type)`: (implementation, None) or (None, why it is missing);
    missing gives one warning line per (op, device) and the reference."""
    if get_kernels() == "fused":
        function, missing = fused(device_type)
        if function is not None:
            return function
        if (name, device_type) not in _warned:
            _warned.add((name, device_type))
            if launched_as_main():  # one line per run, not per rank
                print(f"warning: confeti_fast has no fused {name} for {device_type} on this install ({missing}); "
                      "using the reference op", file=sys.stderr)
    return getattr(reference, name)
