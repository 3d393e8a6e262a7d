"""Fused PatchNCE (docs/method.md §6) in Triton; `confeti_fast.reference.patch_nce` is the contract.

    loss = patch_nce(q_layers, k_layers, batch_size, tau=0.07)

Each layer gives q, k as (B*P, C) rows grouped by image. q is used as given: it arrives
L2-normalized from the CUT PatchSampleF, and, like the reference, this op does not
renormalize it. k is detached; the gradient reaches q only.

Three launches for forward + backward when the layers share shape, dtypes and strides (CUT's
five layers do), with no stacked copy: the custom ops take the layers as lists and the kernels
get them as tuples of pointers, the program picking its layer's by a static chain of ifs.

* `confeti_fast::patch_nce_forward(q[], k[], batch_size, tau) -> (loss, grad_q[])`:
  `_patch_nce_rows_kernel` over a (layer, image, row block) grid, one launch per group of at
  most MAX_LAYERS layers with the same (shape, dtypes, strides): each program computes its rows'
  logits against all P keys of the same image (q k^T / tau by tl.dot over C chunks, P padded to
  a power of two and masked), the softmax-CE with the diagonal as target, its rows' losses
  already scaled by 1 / (num_layers * B * P), and in the same pass the gradient of the final
  loss w.r.t. its q rows (fp32, q's layout). Then `_patch_nce_sum_kernel`, one program, sums
  all row losses in a fixed order into the 0-d loss (deterministic, no atomics).
* `confeti_fast::patch_nce_backward(grad_q[], grad_loss, dtype codes) -> grads[]`:
  `_patch_nce_scale_kernel`, one launch: grad_loss * each saved gradient, written in that
  layer's dtype and layout. grad_loss is read on the device (no host sync).

Dots (constexpr, `_dot_mode`): on the GPU bf16/fp16 q, k are dotted as they are (exact
products, fp32 accumulation; the probabilities enter the gradient dot split into hi + lo in
k's dtype), fp32 as tf32x3 on the tensor cores (~fp32 accuracy; plain fp32 FMA past 256
padded patches, where tf32x3 spills); under the interpreter (wrong bf16 dot, input_precision
ignored) everything is cast to fp32.

Block sizes: all P keys per program (P padded to >= 16), 16 query rows per program when the
padded P >= 128 (more programs for the SMs) else 32, C in chunks of 16 (8 for tf32x3); 8 warps
for P >= 256. No register spills on sm_90 at P <= 256 (ptxas -v on the triton 3.8 PTX). P up
to 1024 (256 in training).
"""
import torch

from confeti_fast import reference

from ._triton_common import (AVAILABLE, INTERPRET, LOAD_ERROR, NAMESPACE, can_run, cdiv, device_guard,
                             launch, next_pow2, nonempty, op_registered, tl, triton)

__all__ = ["patch_nce", "AVAILABLE", "LOAD_ERROR", "INTERPRET"]

MAX_PATCHES = 1024
MAX_LAYERS = 8  # layer pointers per launch (the kernels unroll a chain of that many ifs)
SUM_BLOCK = 1024
SCALE_BLOCK = 1024
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # backward op's dtype codes
_BLOCK_OVERRIDE = {}  # tests force other block sizes through this


def _blocks(patches, channels, precision="ieee"):
    keys = max(16, next_pow2(patches))
    # C chunks of 16 (8 for tf32x3, whose split operands spill at 16): no register spills on
    # sm_90 at P = 256 (ptxas -v on the triton 3.8 PTX: 106 registers bf16, 182 tf32x3).
    blocks = {"keys": keys, "rows": min(keys, 16 if keys >= 128 else 32), "c": 8 if precision == "tf32x3" else 16,
              "warps": 8 if keys >= 256 else 4}
    blocks.update(_BLOCK_OVERRIDE)
    return blocks


def _dot_mode(q, k, patches):
    """(CAST_F32, PRECISION) of the kernel's dots. The interpreter gets fp32 operands (its bf16
    dot is wrong; it ignores input_precision). On the GPU 16-bit q, k are dotted as they are
    (exact products, fp32 accumulation); fp32 (or mixed) as fp32 with 3-pass TF32 on the tensor
    cores, except past 256 (padded) patches where tf32x3 spills registers: plain fp32 FMA there."""
    if INTERPRET or q.device.type != "cuda":
        return True, "ieee"
    if q.dtype == k.dtype and q.dtype in (torch.bfloat16, torch.float16):
        return False, "ieee"
    return True, ("tf32x3" if next_pow2(patches) <= 256 else "ieee")


if AVAILABLE:

    @triton.jit
    def _patch_nce_rows_kernel(qs, ks, grads, loss_ptr, P, C, R, sq_r, sq_c, sk_r, sk_c, sg_r, sg_c, inv_tau, scale,
                               NUM_LAYERS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_KEYS: tl.constexpr,
                               BLOCK_C: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
        layer = tl.program_id(0)
        # The layer's tensors from the pointer tuples (a static chain of ifs; no stacked copy).
        q_ptr = qs[0]
        k_ptr = ks[0]
        grad_ptr = grads[0]
        for i in tl.static_range(1, NUM_LAYERS):
            if layer == i:
                q_ptr = qs[i]
                k_ptr = ks[i]
                grad_ptr = grads[i]
        image = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        rmask = rows < P
        cols = tl.arange(0, BLOCK_KEYS)
        cmask = cols < P
        qrow = image * P + rows
        q_base = q_ptr + qrow * sq_r
        k_base = k_ptr + (image * P + cols) * sk_r

        acc = tl.zeros([BLOCK_P, BLOCK_KEYS], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cm = cs < C
            qt = tl.load(q_base[:, None] + cs[None, :] * sq_c, mask=rmask[:, None] & cm[None, :], other=0.0)
            kt = tl.load(k_base[None, :] + cs[:, None] * sk_c, mask=cmask[None, :] & cm[:, None], other=0.0)
            if CAST_F32:
                qt = qt.to(tl.float32)
                kt = kt.to(tl.float32)
            acc = tl.dot(qt, kt, acc, input_precision=PRECISION)
        logits = tl.where(cmask[None, :], acc * inv_tau, float("-inf"))
        mx = tl.max(logits, axis=1)
        e = tl.exp(logits - mx[:, None])
        se = tl.sum(e, axis=1)
        diag = cols[None, :] == rows[:, None]
        target = tl.sum(tl.where(diag, logits, 0.0), axis=1)
        tl.store(loss_ptr + layer * R + qrow, (mx + tl.log(se) - target) * scale, mask=rmask)

        # d(scale * CE)/dlogit = scale * (softmax - onehot), then dlogit/dq = k / tau.
        g = e / se[:, None] - diag.to(tl.float32)
        if not CAST_F32:  # 16-bit k: g as hi + lo in k's dtype, so the products stay ~fp32-exact
            g_hi = g.to(k_ptr.dtype.element_ty)
            g_lo = (g - g_hi.to(tl.float32)).to(k_ptr.dtype.element_ty)
        out_base = grad_ptr + qrow * sg_r
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cm = cs < C
            kt = tl.load(k_base[:, None] + cs[None, :] * sk_c, mask=cmask[:, None] & cm[None, :], other=0.0)
            if CAST_F32:
                gq = tl.dot(g, kt.to(tl.float32), input_precision=PRECISION)
            else:
                gq = tl.dot(g_lo, kt, tl.dot(g_hi, kt))
            tl.store(out_base[:, None] + cs[None, :] * sg_c, gq * (scale * inv_tau), mask=rmask[:, None] & cm[None, :])

    @triton.jit
    def _patch_nce_sum_kernel(row_loss_ptr, loss_ptr, N, BLOCK: tl.constexpr):
        # One program, fixed order: deterministic.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(row_loss_ptr + offs, mask=offs < N, other=0.0)
        tl.store(loss_ptr, tl.sum(acc, axis=0))

    @triton.jit
    def _patch_nce_scale_kernel(grads, outs, numels, grad_loss_ptr, NUM_LAYERS: tl.constexpr,
                                BLOCK: tl.constexpr):
        layer = tl.program_id(0)
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(grad_loss_ptr).to(tl.float32)
        for i in tl.static_range(NUM_LAYERS):
            if layer == i:  # the body per layer: each output has its own dtype
                m = offs < numels[i]
                v = tl.load(grads[i] + offs, mask=m)
                tl.store(outs[i] + offs, (v * g).to(outs[i].dtype.element_ty), mask=m)


def _check(q_layers, k_layers, batch_size):
    if len(q_layers) != len(k_layers) or not q_layers:
        raise ValueError(f"need as many q as k layers (at least one), got {len(q_layers)} and {len(k_layers)}")
    device = q_layers[0].device
    for q, k in zip(q_layers, k_layers):
        if q.dim() != 2 or k.shape != q.shape:
            raise ValueError(f"q and k must both be (B*P, C), got {tuple(q.shape)} and {tuple(k.shape)}")
        if q.device != device or k.device != device:
            raise ValueError(f"all layers must be on {device}, got {q.device} and {k.device}")
        if batch_size <= 0 or q.shape[0] % batch_size:
            raise ValueError(f"{q.shape[0]} rows do not split into {batch_size} images")
        if q.shape[0] // batch_size > MAX_PATCHES:
            raise ValueError(f"at most {MAX_PATCHES} patches per image, got {q.shape[0] // batch_size}")
        if q.dtype not in _GRAD_DTYPES:
            raise ValueError(f"q must be floating point ({_GRAD_DTYPES}), got {q.dtype}")


def _launch_groups(q_layers, k_layers):
    """Lists of layer indices that share one launch: same shape, dtypes and strides, at most
    MAX_LAYERS each (CUT's five layers are one)."""
    groups = {}
    for i, (q, k) in enumerate(zip(q_layers, k_layers)):
        groups.setdefault((tuple(q.shape), q.dtype, k.dtype, q.stride(), k.stride()), []).append(i)
    return [ids[j:j + MAX_LAYERS] for ids in groups.values() for j in range(0, len(ids), MAX_LAYERS)]


def _forward_impl(q_layers, k_layers, batch_size, tau):
    _check(q_layers, k_layers, batch_size)
    device = q_layers[0].device
    # q's layout (empty_like), so the backward's outputs match q and autograd copies nothing.
    grads = [torch.empty_like(q, dtype=torch.float32) for q in q_layers]
    row_loss = torch.empty(sum(q.shape[0] for q in q_layers), device=device, dtype=torch.float32)
    loss = torch.empty((), device=device, dtype=torch.float32)
    scale_den = len(q_layers)  # mean over a layer's rows, then over all layers
    start = 0
    with device_guard(device):
        for ids in _launch_groups(q_layers, k_layers):
            q0, k0 = q_layers[ids[0]], k_layers[ids[0]]
            R, C = q0.shape
            if R == 0:
                continue
            P = R // batch_size
            cast_f32, precision = _dot_mode(q0, k0, P)
            blocks = _blocks(P, C, precision)
            launch(_patch_nce_rows_kernel, (len(ids), batch_size, cdiv(P, blocks["rows"])),
                   tuple(q_layers[i] for i in ids), tuple(k_layers[i] for i in ids),
                   tuple(nonempty(grads[i], row_loss) for i in ids), row_loss[start:],
                   P, C, R, *q0.stride(), *k0.stride(), *grads[ids[0]].stride(), 1.0 / tau, 1.0 / (scale_den * R),
                   NUM_LAYERS=len(ids), BLOCK_P=blocks["rows"], BLOCK_KEYS=blocks["keys"],
                   BLOCK_C=blocks["c"], CAST_F32=cast_f32, PRECISION=precision, num_warps=blocks["warps"])
            start += len(ids) * R
        launch(_patch_nce_sum_kernel, (1,), nonempty(row_loss, loss), loss, row_loss.numel(), BLOCK=SUM_BLOCK)
    return loss, grads


def _backward_impl(grads, grad_loss, dtype_codes):
    # Dense outputs in the saved gradient's layout (empty_like), both walked as flat memory; a
    # non-dense gradient (never from the forward op) is first copied into that layout.
    outs = [torch.empty_like(g, dtype=_GRAD_DTYPES[code]) for g, code in zip(grads, dtype_codes)]
    grads = [g if g.stride() == o.stride() else torch.empty_like(g).copy_(g) for g, o in zip(grads, outs)]
    live = [i for i, g in enumerate(grads) if g.numel() > 0]
    with device_guard(grad_loss.device):
        for j in range(0, len(live), MAX_LAYERS):
            ids = live[j:j + MAX_LAYERS]
            numels = tuple(grads[i].numel() for i in ids)
            launch(_patch_nce_scale_kernel, (len(ids), cdiv(max(numels), SCALE_BLOCK)),
                   tuple(grads[i] for i in ids), tuple(outs[i] for i in ids), numels, grad_loss,
                   NUM_LAYERS=len(ids), BLOCK=SCALE_BLOCK)
    return outs


if AVAILABLE and not op_registered("patch_nce_forward"):

    @torch.library.custom_op(f"{NAMESPACE}::patch_nce_forward", mutates_args=())
    def patch_nce_forward(q: list[torch.Tensor], k: list[torch.Tensor], batch_size: int,
                          tau: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(PatchNCE averaged over layers, its gradient w.r.t. each q layer in fp32)."""
        return _forward_impl(q, k, batch_size, tau)

    @patch_nce_forward.register_fake
    def _(q, k, batch_size, tau):
        _check(q, k, batch_size)
        return q[0].new_empty((), dtype=torch.float32), [torch.empty_like(x, dtype=torch.float32) for x in q]

    @torch.library.custom_op(f"{NAMESPACE}::patch_nce_backward", mutates_args=())
    def patch_nce_backward(grads: list[torch.Tensor], grad_loss: torch.Tensor,
                           dtypes: list[int]) -> list[torch.Tensor]:
        """grad_loss * each saved fp32 gradient, in that layer's dtype (codes index _GRAD_DTYPES)."""
        return _backward_impl(grads, grad_loss, dtypes)

    @patch_nce_backward.register_fake
    def _(grads, grad_loss, dtypes):
        return [torch.empty_like(g, dtype=_GRAD_DTYPES[code]) for g, code in zip(grads, dtypes)]

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output[1])
        ctx.mark_non_differentiable(*output[1])
        ctx.set_materialize_grads(False)  # no zeros for the gradient buffers' (unused) grads
        ctx.dtype_codes = [_GRAD_DTYPES.index(q.dtype) for q in inputs[0]]

    def _backward(ctx, grad_loss, _grad_bufs):
        none = [None] * len(ctx.dtype_codes)  # k gets no gradient
        if grad_loss is None:
            return none, none, None, None
        grads = torch.ops.confeti_fast.patch_nce_backward(list(ctx.saved_tensors), grad_loss, ctx.dtype_codes)
        return grads, none, None, None

    patch_nce_forward.register_autograd(_backward, setup_context=_setup_context)


def patch_nce(q_layers, k_layers, batch_size, tau=0.07):
    """Fused `reference.patch_nce`: PatchNCE averaged over layers, forward in one launch per
    group of layers sharing shape/dtypes/strides plus one, backward in one. q is not
    renormalized (it comes normalized from PatchSampleF)."""
    q_layers, k_layers = list(q_layers), list(k_layers)
    if len(q_layers) != len(k_layers) or not q_layers:
        raise ValueError(f"need as many q as k layers (at least one), got {len(q_layers)} and {len(k_layers)}")
    if not can_run(q_layers[0].device):
        return reference.patch_nce(q_layers, k_layers, batch_size, tau=tau)
    loss, _ = torch.ops.confeti_fast.patch_nce_forward(q_layers, [k.detach() for k in k_layers],
                                                       int(batch_size), float(tau))
    return loss
