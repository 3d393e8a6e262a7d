"""The op benchmark cases, shared by `test_ops.py` (pytest-benchmark) and the GPU suite (`suite/op_steps.py`).

A case is one op at one shape, dtype and memory format: `make_case(op, device, ...)` gives
its inputs (`setup()`, called before every timed call: the prototype update works in place)
and `case.call(fn, *args)`, one forward + backward (or one update) through implementation
`fn`, which `implementation(op, device, impl)` picks:

* "reference": `confeti_fast.reference`;
* "compiled": `torch.compile(reference)`; not for the prototype update (COMPILE_SKIPPED);
* "fused": what `--kernels fused` runs on that device (`confeti_fast.ops._fused`); on the CPU
  PatchNCE's fused op is the reference itself. Unavailable(reason) when it is missing.

Sizes: "paper" (K = 19, D = 512): contrast on feats 2 x 512 x 81 x 81 (640 crops at stride 8)
with 4096 samples; PatchNCE over 5 layers x 4 images x 256 patches x 256; the prototype update
with labels 2 x 640 x 640, feats 2 x 512 x 81 x 81 (on the CPU 2 x 512 x 512 with feats
65 x 65: the reference takes seconds per call there). "tiny": the same ops at a few hundred
elements, for dry runs (Triton under TRITON_INTERPRET=1 on the CPU). `dtype` / `channels_last`
set the inputs' dtype and memory format, and `autocast=True` runs each call under
torch.autocast(dtype), as a bf16 training step does (test_ops.py: fp32, contiguous).
"""
import torch
import torch.nn.functional as F

from confeti_fast import ops, reference
from confeti_fast.sampling import sample_kept_pixels
from timing import sync

GEN_SEED = 0
OPS = ("contrast", "patch_nce", "proto_update")
FUNCTION = {"contrast": "pixel_proto_contrast", "patch_nce": "patch_nce", "proto_update": "proto_ema_update"}
IMPLS = {"contrast": ("reference", "compiled", "fused"), "patch_nce": ("reference", "compiled", "fused"),
         "proto_update": ("reference", "fused")}
COMPILE_SKIPPED = {"proto_update": "the reference loops over the present classes with data-dependent shapes "
                                   "(nonzero, per-class top-k): torch.compile does not apply"}

# op -> size -> parameters; "cpu_paper" overrides "paper" on the CPU.
SIZES = {
    "contrast": {"paper": dict(classes=19, dim=512, batch=2, side=81, samples=4096, ignored_rows=10),
                 "tiny": dict(classes=5, dim=16, batch=2, side=6, samples=24, ignored_rows=1)},
    "patch_nce": {"paper": dict(layers=5, images=4, patches=256, channels=256),
                  "tiny": dict(layers=2, images=2, patches=16, channels=16)},
    "proto_update": {"paper": dict(classes=19, dim=512, label_side=640, feat_side=81, top_k=32, ignored_rows=40),
                     "cpu_paper": dict(classes=19, dim=512, label_side=512, feat_side=65, top_k=32, ignored_rows=40),
                     "tiny": dict(classes=5, dim=16, label_side=16, feat_side=4, top_k=4, ignored_rows=1)},
}


class Unavailable(Exception):
    """This implementation does not exist here (the reason is the message)."""


class Case:
    def __init__(self, op, device, size, dtype, channels_last, shape, setup, call, autocast=False):
        self.op, self.device, self.size, self.shape = op, device, size, shape
        self.dtype, self.channels_last, self.autocast = dtype, channels_last, autocast
        self.setup, self._call = setup, call

    def call(self, fn, *args):
        """One forward + backward (or update) through `fn`; under autocast to the case's dtype
        when `autocast` (as in a bf16 training step, which runs the ops inside autocast)."""
        if not self.autocast:
            return self._call(fn, *args)
        with torch.autocast(torch.device(self.device).type, dtype=self.dtype):
            return self._call(fn, *args)

    @property
    def name(self):
        layout = "-channels_last" if self.channels_last else ""
        return f"{self.op}-{self.device}-{str(self.dtype).replace('torch.', '')}{layout}-{self.size}"

    def info(self):
        return {"op": self.op, "device": self.device, "size": self.size, "shape": self.shape,
                "dtype": str(self.dtype).replace("torch.", ""), "channels_last": self.channels_last,
                "autocast": self.autocast}


def sizes(op, device, size):
    table = SIZES[op]
    if size == "paper" and device == "cpu" and "cpu_paper" in table:
        return table["cpu_paper"]
    return table[size]


def implementation(op, device, impl):
    """The function `impl` runs for `op` on `device`; Unavailable(reason) where there is none."""
    name = FUNCTION[op]
    if impl == "reference":
        return getattr(reference, name)
    if impl == "compiled":
        if op in COMPILE_SKIPPED:
            raise Unavailable(COMPILE_SKIPPED[op])
        return torch.compile(getattr(reference, name))
    fn, missing = ops._fused(name, device)
    if fn is None:
        raise Unavailable(f"no fused {name} for {device} on this install: {missing}")
    if fn is getattr(reference, name):
        raise Unavailable(f"on {device} the fused {name} is the reference itself")
    return fn


def _layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def make_case(op, device, size="paper", dtype=torch.float32, channels_last=False, autocast=False):
    """The case `op` on `device` at `size`, its float inputs in `dtype` and (4-d ones) in
    channels_last when asked; `autocast`: every call runs under torch.autocast(dtype)."""
    p = sizes(op, device, size)
    gen = torch.Generator().manual_seed(GEN_SEED)
    if op == "contrast":
        feats = torch.randn(p["batch"], p["dim"], p["side"], p["side"], generator=gen)
        feats = _layout(feats.to(device=device, dtype=dtype), channels_last).requires_grad_(True)
        labels = torch.randint(0, p["classes"], (p["batch"], p["side"], p["side"]), generator=gen)
        labels[:, : p["ignored_rows"]] = 255
        labels = labels.to(device)
        protos = F.normalize(torch.randn(p["classes"], p["dim"], generator=gen), dim=1).to(device)
        idx = sample_kept_pixels(labels, p["samples"], gen)

        def call(fn, feats, labels, protos, idx):
            feats.grad = None
            ce, reg = fn(feats, labels, protos, sample_idx=idx)
            (ce + reg).backward()

        shape = (f"feats {p['batch']}x{p['dim']}x{p['side']}x{p['side']}, {p['samples']} samples, "
                 f"K={p['classes']}")
        return Case(op, device, size, dtype, channels_last, shape, lambda: (feats, labels, protos, idx), call, autocast)
    if op == "patch_nce":
        rows = p["images"] * p["patches"]
        qs = [F.normalize(torch.randn(rows, p["channels"], generator=gen), dim=1).to(device=device, dtype=dtype)
              .requires_grad_(True) for _ in range(p["layers"])]
        ks = [F.normalize(torch.randn(rows, p["channels"], generator=gen), dim=1).to(device=device, dtype=dtype)
              for _ in range(p["layers"])]
        images = p["images"]

        def call(fn, qs, ks):
            for q in qs:
                q.grad = None
            fn(qs, ks, images).backward()

        shape = f"{p['layers']} layers x {images} images x {p['patches']} patches x {p['channels']}"
        return Case(op, device, size, dtype, channels_last, shape, lambda: (qs, ks), call, autocast)
    if op == "proto_update":
        k, side, fside = p["classes"], p["label_side"], p["feat_side"]
        protos = F.normalize(torch.randn(k, p["dim"], generator=gen), dim=1).to(device)
        counts = torch.randint(0, 100, (k,), generator=gen).to(device)
        feats = _layout(torch.randn(2, p["dim"], fside, fside, generator=gen).to(device=device, dtype=dtype),
                        channels_last)
        cam = _layout(torch.rand(2, k, fside, fside, generator=gen).to(device=device, dtype=dtype), channels_last)
        labels = torch.randint(0, k, (2, side, side), generator=gen)
        labels[:, : p["ignored_rows"]] = 255
        labels = labels.to(device)
        top_k = p["top_k"]

        def call(fn, protos, counts):
            fn(protos, counts, feats, cam, labels, momentum=0.999, top_k=top_k)

        shape = f"labels 2x{side}x{side}, feats 2x{p['dim']}x{fside}x{fside}, cam 2x{k}x{fside}x{fside}, K={k}"
        return Case(op, device, size, dtype, channels_last, shape, lambda: (protos.clone(), counts.clone()), call,
                    autocast)
    raise ValueError(f"unknown op {op!r}; known: {OPS}")


def peak_extra_mb(case, fn):
    """The most memory one call holds beyond its inputs: on CUDA max_memory_allocated above the
    allocation before the call; on the CPU the running total of the allocator events the torch
    profiler records (profile_memory=True), so it counts tensors, not Python objects."""
    args = case.setup()
    if case.device == "cuda":
        sync(case.device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        case.call(fn, *args)
        sync(case.device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from confeti_fast.profiling import cpu_peak_allocated_mb

    return cpu_peak_allocated_mb(lambda: case.call(fn, *args))
