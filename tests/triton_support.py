"""What the Triton kernel tests share: the devices they run on and the dtype tolerances
(the reasoning behind each tolerance is in the test files' docstrings)."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 / training-size checks)")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU runs need TRITON_INTERPRET=1 "
                                                                         "(set by conftest without a GPU)")),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU")),
]
FP32 = dict(rtol=1e-5, atol=1e-6)
BF16_LOSS = dict(rtol=1e-4, atol=1e-5)
BF16_GRAD_RTOL, BF16_GRAD_ATOL_FRAC = 1e-2, 1e-3



@pytest.fixture(autouse=True)
def exact_fp32_matmul():
    # The reference's matmuls must be true fp32 on the GPU too (TF32 would loosen it to 1e-3).
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old

