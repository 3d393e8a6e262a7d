"""The fused implementations: Triton kernels for the contrast and PatchNCE, and the loader of
the compiled prototype-update op (csrc/). Installed as `confeti_fast.kernels`; used in place
through the finder in `confeti_fast/__init__.py`. `confeti_fast.ops` chooses between these and
the reference."""
