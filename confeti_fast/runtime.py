"""How a run executes (not what it computes): precision, memory format, compilation, optimizer
implementation, finiteness checks and logging cadence.

Every choice is "auto" unless the config's `runtime` section or the CLI sets it; `resolve`
turns "auto" into the device's default (`DEFAULTS`), and the trainer writes the resolved
values into the run's config.py. What each choice does and why its defaults are what they are:
the table in docs/training.md, "Runtime choices".

Compiled modules: each gets its own dynamo code cache (`compile_module`), is compiled with
`dynamic=False` (the crops have fixed shapes), and a module that would exceed dynamo's
recompile limit raises instead of quietly running eager.
"""
import contextlib
import types

import torch

from .config import RUNTIME_CHOICES
from .errors import ConfetiError

DEFAULTS = {
    "cpu": {"amp": "fp32", "channels_last": False, "compile": None, "fused_optimizer": False, "check_finite": "step",
            "sync_bn": False, "deterministic": False},
    "cuda": {"amp": "bf16", "channels_last": True, "compile": "reduce-overhead", "fused_optimizer": True,
             "check_finite": "log", "sync_bn": False, "deterministic": False},
}


def resolve_device(device=None):
    """The torch.device to run on: `device` ("cpu", "cuda" or None: CUDA when usable), or one
    line saying what was found and what to pass instead."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            found = f"this torch ({torch.__version__}) is a CPU-only build"
        else:
            found = f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver"
        raise ConfetiError(f"--device cuda: {found}; pass --device cpu (or leave --device out)")
    return device


def check_precision(runtime, device):
    """bf16 on a GPU that has no bf16 arithmetic (before Ampere) fails inside the first
    kernel; say so at the start instead."""
    if runtime["amp"] == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ConfetiError(f"runtime.amp bf16: {name} has no bf16 support; pass --amp fp32 "
                           f"(or --cfg-options runtime.amp=fp32)")


def resolve(runtime, device_type, announce=True):
    """The `runtime` config section (validated by the config package) with every "auto" or missing
    choice replaced by the device's default. `announce`: print the notes (rank 0 only)."""
    runtime = runtime or {}
    defaults = DEFAULTS["cuda" if device_type == "cuda" else "cpu"]
    resolved = {key: defaults[key] if runtime.get(key, "auto") == "auto" else runtime[key] for key in RUNTIME_CHOICES}
    if resolved["amp"] == "bf16" and device_type == "cpu" and announce:
        print("note: bf16 autocast on a CPU without bf16 units is much slower than fp32", flush=True)
    return resolved


def configure_backends(runtime, device_type):
    """Process-wide backend switches the run asks for (cuDNN autotuning, recompile policy)."""
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = not runtime["deterministic"]
        torch.backends.cudnn.deterministic = runtime["deterministic"]
    if runtime["compile"]:
        torch._dynamo.config.fail_on_recompile_limit_hit = True


def autocast(runtime, device_type):
    """bf16 autocast when the run asks for it, else a no-op context."""
    if runtime["amp"] == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_module(module, runtime, compiled=None):
    """channels_last for `module`, and torch.compile for its part `compiled` (default: all of
    it), in place; the state-dict keys do not change, so neither do checkpoints."""
    if runtime["channels_last"]:
        module.to(memory_format=torch.channels_last)
    if runtime["compile"]:
        compile_module(compiled or module, runtime["compile"])
    return module


def compile_module(module, mode):
    """Compile `module.forward` with a dynamo code cache of its own.

    dynamo keeps its compiled entries on the code object, and its recompile limit counts per
    code object: `nn.Module.compile` compiles the shared `Module._call_impl`, and even
    `torch.compile(module.forward)` shares the class's `forward` code between the student,
    teacher and ImageNet backbones. A copy of the code object gives each module its own cache."""
    forward = type(module).forward
    own = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__,
                             forward.__defaults__, forward.__closure__)
    own.__kwdefaults__ = forward.__kwdefaults__
    module.forward = torch.compile(types.MethodType(own, module), mode=mode, dynamic=False)
    return module


def prepare_input(x, runtime):
    return x.contiguous(memory_format=torch.channels_last) if runtime["channels_last"] else x


def mark_step_begin(runtime):
    """CUDA graphs (compile mode reduce-overhead) must know where one iteration ends."""
    if runtime["compile"] in ("reduce-overhead", "max-autotune"):
        torch.compiler.cudagraph_mark_step_begin()


def constant(values, device, dtype=None):
    """A small tensor of Python values on `device`, copied without blocking the host (a
    blocking host-to-device copy counts as a sync under torch.cuda.set_sync_debug_mode)."""
    return torch.as_tensor(values, dtype=dtype).to(device, non_blocking=True)
