"""Fused PatchNCE (SPEC 6) in Triton; `confeti_fast.ops.reference.patch_nce` is the contract.

    loss = patch_nce(q_layers, k_layers, batch_size, tau=0.07)

Each layer gives q, k as (B*P, C) rows grouped by image. q is used as given: it arrives
L2-normalized from the CUT PatchSampleF, and, like the reference, this op does not
renormalize it. k is detached; the gradient reaches q only.

Layers with the same (q shape, k shape, dtypes) are stacked into (L, B*P, C) and run in ONE
launch over a (layer, image, row block) grid: each program computes its rows' logits against
all P keys of the same image (q k^T / tau via tl.dot over C chunks, P padded to a power of two
and masked), the softmax-CE with the diagonal as target, and in the same pass the gradient of
the final loss w.r.t. its q rows (fp32, already scaled by 1 / (num_layers * B * P)). So a
forward is one launch per shape group (one in training: CUT's five layers share a shape), and
backward only multiplies the saved gradient by grad_output. Per-row losses are summed in torch
(deterministic). P up to 1024 (256 in training).

Custom op: `confeti_fast::patch_nce_forward(q (L, R, C), k (L, R, C), batch_size, tau, scale)
-> (loss, grad_q (L, R, C) fp32)` with loss = scale * sum of all row losses; its autograd
returns grad_output * grad_q in q's dtype.

Block sizes: all P keys per program (P padded to >= 16), 16 query rows per program when the
padded P >= 128 (more programs for the SMs) else 32, C in chunks of 16; 8 warps for P >= 256
(no register spills on sm_90 per ptxas -v).
"""
import torch

from confeti_fast.ops import reference

from ._triton_common import (AVAILABLE, INTERPRET, LOAD_ERROR, NAMESPACE, can_run, cdiv, device_guard,
                             launch, next_pow2, op_registered, tl, triton)

__all__ = ["patch_nce", "AVAILABLE", "LOAD_ERROR", "INTERPRET"]

MAX_PATCHES = 1024
_BLOCK_OVERRIDE = {}  # tests force other block sizes through this


def _blocks(patches, channels):
    keys = max(16, next_pow2(patches))
    # C chunks of 16: with 32 the 16 x 256 fp32 dot spills registers on sm_90 (ptxas -v).
    blocks = {"keys": keys, "rows": min(keys, 16 if keys >= 128 else 32), "c": 16,
              "warps": 8 if keys >= 256 else 4}
    blocks.update(_BLOCK_OVERRIDE)
    return blocks


if AVAILABLE:

    @triton.jit
    def _patch_nce_kernel(q_ptr, k_ptr, loss_ptr, grad_ptr, P, C, R,
                          sq_l, sq_r, sq_c, sk_l, sk_r, sk_c, inv_tau, scale,
                          BLOCK_P: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK_C: tl.constexpr):
        layer = tl.program_id(0).to(tl.int64)
        image = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        rmask = rows < P
        cols = tl.arange(0, BLOCK_KEYS)
        cmask = cols < P
        qrow = image * P + rows
        q_base = q_ptr + layer * sq_l + qrow * sq_r
        k_base = k_ptr + layer * sk_l + (image * P + cols) * sk_r

        acc = tl.zeros([BLOCK_P, BLOCK_KEYS], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cm = cs < C
            qt = tl.load(q_base[:, None] + cs[None, :] * sq_c, mask=rmask[:, None] & cm[None, :],
                         other=0.0).to(tl.float32)
            kt = tl.load(k_base[None, :] + cs[:, None] * sk_c, mask=cmask[None, :] & cm[:, None],
                         other=0.0).to(tl.float32)
            acc += tl.dot(qt, kt, input_precision="ieee")
        logits = tl.where(cmask[None, :], acc * inv_tau, float("-inf"))
        mx = tl.max(logits, axis=1)
        e = tl.exp(logits - mx[:, None])
        se = tl.sum(e, axis=1)
        diag = cols[None, :] == rows[:, None]
        target = tl.sum(tl.where(diag, logits, 0.0), axis=1)
        tl.store(loss_ptr + layer * R + qrow, mx + tl.log(se) - target, mask=rmask)

        # d(scale * CE)/dlogit, then dlogit/dq = k / tau.
        g = (e / se[:, None] - diag.to(tl.float32)) * scale
        out_base = grad_ptr + (layer * R + qrow) * C
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cm = cs < C
            kt = tl.load(k_base[:, None] + cs[None, :] * sk_c, mask=cmask[:, None] & cm[None, :],
                         other=0.0).to(tl.float32)
            gq = tl.dot(g, kt, input_precision="ieee") * inv_tau
            tl.store(out_base[:, None] + cs[None, :], gq, mask=rmask[:, None] & cm[None, :])


def _check(q, k, batch_size):
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (L, B*P, C), got {tuple(q.shape)} and {tuple(k.shape)}")
    if batch_size <= 0 or q.shape[1] % batch_size:
        raise ValueError(f"{q.shape[1]} rows do not split into {batch_size} images")
    if q.shape[1] // batch_size > MAX_PATCHES:
        raise ValueError(f"at most {MAX_PATCHES} patches per image, got {q.shape[1] // batch_size}")


def _forward_impl(q, k, batch_size, tau, scale):
    _check(q, k, batch_size)
    L, R, C = q.shape
    P = R // batch_size
    blocks = _blocks(P, C)
    row_loss = torch.empty(L, R, device=q.device, dtype=torch.float32)
    grad = torch.empty(L, R, C, device=q.device, dtype=torch.float32)
    if row_loss.numel() > 0:
        grid = (L, batch_size, cdiv(P, blocks["rows"]))
        with device_guard(q.device):
            launch(_patch_nce_kernel, grid,
                q, k, row_loss, grad, P, C, R, *q.stride(), *k.stride(), 1.0 / tau, scale,
                BLOCK_P=blocks["rows"], BLOCK_KEYS=blocks["keys"], BLOCK_C=blocks["c"],
                num_warps=blocks["warps"])
    return scale * row_loss.sum(), grad


if AVAILABLE and not op_registered("patch_nce_forward"):

    @torch.library.custom_op(f"{NAMESPACE}::patch_nce_forward", mutates_args=())
    def patch_nce_forward(q: torch.Tensor, k: torch.Tensor, batch_size: int, tau: float,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale * sum of per-patch CE over all layers and images, its gradient w.r.t. q in fp32)."""
        return _forward_impl(q, k, batch_size, tau, scale)

    @patch_nce_forward.register_fake
    def _(q, k, batch_size, tau, scale):
        _check(q, k, batch_size)
        return q.new_empty((), dtype=torch.float32), q.new_empty(q.shape, dtype=torch.float32)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.q_dtype = inputs[0].dtype

    def _backward(ctx, grad_loss, _grad_buf):
        (grad,) = ctx.saved_tensors
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        return (grad * grad_loss).to(ctx.q_dtype), None, None, None, None

    patch_nce_forward.register_autograd(_backward, setup_context=_setup_context)


def patch_nce(q_layers, k_layers, batch_size, tau=0.07):
    """Fused `reference.patch_nce`: PatchNCE averaged over layers, one launch per group of
    layers sharing a shape. q is not renormalized (it comes normalized from PatchSampleF)."""
    q_layers, k_layers = list(q_layers), list(k_layers)
    if len(q_layers) != len(k_layers) or not q_layers:
        raise ValueError(f"need as many q as k layers (at least one), got {len(q_layers)} and {len(k_layers)}")
    if not can_run(q_layers[0].device):
        return reference.patch_nce(q_layers, k_layers, batch_size, tau=tau)
    groups = {}
    for i, (q, k) in enumerate(zip(q_layers, k_layers)):
        groups.setdefault((tuple(q.shape), tuple(k.shape), q.dtype, k.dtype), []).append(i)
    total = None
    for ids in groups.values():
        if len(ids) == 1:  # a view, no copy
            qs, ks = q_layers[ids[0]].unsqueeze(0), k_layers[ids[0]].detach().unsqueeze(0)
        else:
            qs = torch.stack([q_layers[i] for i in ids])
            ks = torch.stack([k_layers[i].detach() for i in ids])
        scale = 1.0 / (len(q_layers) * qs.shape[1])  # mean over rows, then over all layers
        loss, _ = torch.ops.confeti_fast.patch_nce_forward(qs, ks, int(batch_size), float(tau), scale)
        total = loss if total is None else total + loss
    return total
