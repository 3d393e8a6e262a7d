"""The method's hot ops behind one switch: fused kernels or the plain-PyTorch reference.

    from confeti_fast import ops
    ops.pixel_proto_contrast(...)          # whichever is selected
    with ops.kernels("reference"): ...     # force the reference for a block

The choice comes from `set_kernels` / the `kernels` context manager, else the environment
variable CONFETI_KERNELS, else "fused". What "fused" runs depends on the tensors' device (the
table is in docs/kernels.md, "The switch").

Each op's dispatch is in its own module (ops/contrast.py, ops/patch_nce.py,
ops/proto_update.py); the implementations stay where they are: the reference in
ops/reference.py, the Triton kernels in `confeti_fast.kernels` (kernels/ in the checkout), the
C++/CUDA extension in csrc/. The sampler the trainer uses is ops/sampling.py.

A fused implementation that is missing on this install (no compiled extension, no usable
Triton, a fused module that fails to import) gives a one-line warning and the reference, never
a crash or different numbers. The Triton kernels run on CPU tensors only under
TRITON_INTERPRET=1, called directly from `confeti_fast.kernels` (the tests do that).
"""
import contextlib
import os
import sys

from ..errors import ConfetiError
from . import reference

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
            print(f"warning: confeti_fast has no fused {name} for {device_type} on this install ({missing}); "
                  "using the reference op", file=sys.stderr)
    return getattr(reference, name)


# The op modules, which use the helpers above, and their public ops. (`ops.patch_nce` is the
# op; its module is sys.modules["confeti_fast.ops.patch_nce"].)
from . import contrast, proto_update  # noqa: E402
from . import patch_nce as _patch_nce_module  # noqa: E402
from .contrast import pixel_proto_contrast  # noqa: E402,F401  (the public ops)
from .patch_nce import patch_nce  # noqa: E402,F401  (the public ops)
from .proto_update import proto_ema_update  # noqa: E402,F401  (the public ops)

_modules = {"pixel_proto_contrast": contrast, "patch_nce": _patch_nce_module, "proto_ema_update": proto_update}


def _fused(name, device_type):
    """(implementation, None) or (None, why it is missing) for op `name` on `device_type`."""
    return _modules[name].fused(device_type)


def implementation(name, device_type="cpu"):
    """The function `name` runs under the current selection for tensors on `device_type`."""
    return _modules[name].implementation(device_type)
