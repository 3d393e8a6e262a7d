"""Fused Triton kernels, installed as `confeti_fast.kernels` (see the kernel issue).

Empty until the fused ops land; `confeti_fast.ops` will dispatch between these and the
plain-PyTorch reference.
"""
