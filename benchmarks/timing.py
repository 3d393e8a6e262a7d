"""The benchmarks' one clock: `sync(device)` and `time_ms(fn, rounds, device, setup)`, shared by
cases.py, the pytest-benchmark files and the GPU suite (benchmarks/suite/)."""
import time

import torch


def sync(device):
    """Wait for the work queued on `device` (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, rounds, device, setup=None):
    """Wall milliseconds of each of `rounds` calls fn(*setup()): `setup` runs untimed before each
    call, and the device is synchronized before and after it, so a time covers the call's work."""
    times = []
    for _ in range(rounds):
        args = setup() if setup is not None else ()
        sync(device)
        t0 = time.perf_counter()
        fn(*args)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times
