import os

import torch as _torch

# Without a CUDA GPU the Triton kernel tests run on CPU under the Triton interpreter, which
# must be switched on before anything imports triton (torch.cuda.is_available() does not).
if not _torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

# Test helpers (pngwriter) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
