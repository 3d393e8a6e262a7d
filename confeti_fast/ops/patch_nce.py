"""PatchNCE (docs/method.md §6): its switch.

fused: `confeti_fast.kernels.patch_nce` (Triton) on CUDA, the reference on other devices (one
batched matmul per layer is already the cheapest CPU path: stacking the layers into one matmul
measured no faster and copies them); reference: `reference.patch_nce`.
"""
from .. import reference
from .switch import choose, load_fused

NAME = "patch_nce"


def fused(device_type):
    """(implementation, None) or (None, why it is missing) for tensors on `device_type`."""
    if device_type != "cuda":
        return reference.patch_nce, None
    return load_fused("patch_nce", "patch_nce")


def implementation(device_type="cpu"):
    return choose(NAME, device_type, fused)


def patch_nce(q_layers, *args, **kwargs):
    return implementation(q_layers[0].device.type)(q_layers, *args, **kwargs)


patch_nce.__doc__ = reference.patch_nce.__doc__
