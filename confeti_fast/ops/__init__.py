"""The method's hot ops behind one switch: fused kernels or the plain-PyTorch reference.

    from confeti_fast import ops
    ops.pixel_proto_contrast(...)          # whichever is selected
    with ops.kernels("reference"): ...     # force the reference for a block

The choice comes from `set_kernels` / the `kernels` context manager, else the environment
variable CONFETI_KERNELS, else "fused". What "fused" runs depends on the tensors' device (the
table is in docs/kernels.md, "The switch").

Each op's dispatch is in its own module (ops/contrast.py, ops/patch_nce.py,
ops/proto_update.py), the selection and the fused loader in ops/switch.py. The
implementations: the reference in confeti_fast/reference.py, the Triton kernels in
`confeti_fast.kernels` (kernels/ in the checkout), the C++/CUDA extension in csrc/. The
sampler the trainer uses is confeti_fast/sampling.py.

A fused implementation that is missing on this install (no compiled extension, no usable
Triton, a fused module that fails to import) gives a one-line warning and the reference, never
a crash or different numbers. The Triton kernels run on CPU tensors only under
TRITON_INTERPRET=1, called directly from `confeti_fast.kernels` (the tests do that).
"""
from . import contrast, patch_nce as _patch_nce_module, proto_update
from .contrast import pixel_proto_contrast
from .patch_nce import patch_nce
from .proto_update import proto_ema_update
from .switch import MODES, OP_NAMES, choose, get_kernels, kernels, load_fused, set_kernels

__all__ = ["MODES", "OP_NAMES", "choose", "get_kernels", "implementation", "kernels", "load_fused",
           "patch_nce", "pixel_proto_contrast", "proto_ema_update", "set_kernels"]

_modules = {"pixel_proto_contrast": contrast, "patch_nce": _patch_nce_module, "proto_ema_update": proto_update}


def _fused(name, device_type):
    """(implementation, None) or (None, why it is missing) for op `name` on `device_type`."""
    return _modules[name].fused(device_type)


def implementation(name, device_type="cpu"):
    """The function `name` runs under the current selection for tensors on `device_type`."""
    return _modules[name].implementation(device_type)
