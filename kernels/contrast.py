"""Fused pixel-to-prototype contrast (SPEC 5) in Triton; `confeti_fast.ops.reference` is the contract.

    loss_ce, loss_reg = pixel_proto_contrast(feats, labels, prototypes, sample_idx=idx)

Same signature, semantics and results as `reference.pixel_proto_contrast`, built from two
torch custom ops so torch.compile traces through without graph breaks:

* `confeti_fast::contrast_forward(feats, labels, prototypes, sample_idx, tau, ce_weight,
  reg_weight) -> (loss_ce, loss_reg, row_grad, mean_grad)`. Two launches: one over the sampled
  pixels (gather by strides, normalize, logits by tl.dot, softmax-CE, and in the same pass
  d(ce_weight * mean CE)/d(raw row) -> row_grad (N, D) fp32), one over all pixels (sum of the
  normalized kept vectors in per-program partials, reduced in torch: deterministic). The
  regulariser on vbar (K x D) and its gradient direction mean_grad (D,) (already / n) are
  plain torch.
* `confeti_fast::contrast_backward(grad_ce, grad_reg, feats, labels, sample_idx, row_grad,
  mean_grad) -> grad_feats` (feats' dtype and strides, via empty_like): one launch over all
  pixels, the regulariser's gradient through each pixel's normalization plus the saved CE row
  gradient of the sampled pixels.

feats may have any strides (NCHW, channels_last, slices): it is read by strides, never copied.
No host syncs: when every pixel is ignored (n = 0) the losses are 0 through torch.where and
the gradient is 0. An empty `sample_idx` (N = 0) gives loss_ce = 0 (the reference would give
nan there). Gradient flows to feats only; prototypes are detached. On a device the kernels
cannot run on (CPU without TRITON_INTERPRET=1, or no Triton) the wrapper runs the reference.

Block sizes (no autotune; a heuristic in `_blocks`, checked for zero register spills with
ptxas on sm_90): sampled rows 32 per program, K padded to a power of two >= 16 (masked
logits), D in chunks of 32 (64 and 8 warps when D >= 128); the all-pixel kernels hold a whole
row when D <= 512 (each pixel read once per kernel), 16..64 pixels and ~4096-8192 elements per
program with 8 warps, else D chunks of 128 with 32 pixels.
"""
import math

import torch

from confeti_fast.ops import reference

from ._triton_common import (AVAILABLE, EPS, INTERPRET, LOAD_ERROR, NAMESPACE, can_run, cdiv,
                             device_guard, launch, next_pow2, nonempty, op_registered, tl, triton)

__all__ = ["pixel_proto_contrast", "AVAILABLE", "LOAD_ERROR", "INTERPRET"]

IGNORE_INDEX = reference.IGNORE_INDEX

# Tests set entries here to force other block sizes (e.g. multi-chunk D in the pixel kernels).
_BLOCK_OVERRIDE = {}


def _blocks(num_classes, dim):
    # Picked so no kernel spills registers on sm_90 (ptxas -v on the triton 3.8 PTX).
    sample_k = max(16, next_pow2(num_classes))
    sample_d = 16 if dim <= 16 else (32 if dim < 128 or sample_k >= 64 else 64)
    full = max(16, next_pow2(dim))
    blocks = {
        "sample_n": 32,
        "sample_d": sample_d,
        "sample_k": sample_k,
        "sample_warps": 8 if sample_d >= 64 else 4,
        "pixel_d": full if full <= 512 else 128,
        "pixel_warps": 8,
    }
    blocks.update(_BLOCK_OVERRIDE)
    if "pixel_m" not in blocks:
        blocks["pixel_m"] = 32 if blocks["pixel_d"] < dim else min(64, max(16, 4096 // blocks["pixel_d"]))
    blocks["one_chunk"] = blocks["pixel_d"] >= dim
    return blocks


if AVAILABLE:

    @triton.jit
    def _pixel_offset(flat, HW, W, s_b, s_y, s_x):
        """Element offset of flat pixel index (b, y, x) in a (B, D, h, w) map with these strides."""
        b = flat // HW
        rem = flat - b * HW
        y = rem // W
        return b * s_b + y * s_y + (rem - y * W) * s_x

    @triton.jit
    def _sample_rows_kernel(feat_ptr, idx_ptr, lab_ptr, proto_ptr, scale_ptr, loss_ptr, rowgrad_ptr,
                            N, D, K, HW, W, s_b, s_d, s_y, s_x, inv_tau, eps,
                            IGNORE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        flat = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        base = _pixel_offset(flat, HW, W, s_b, s_y, s_x)
        lab = tl.load(lab_ptr + flat, mask=rmask, other=-1)
        ks = tl.arange(0, BLOCK_K)
        kmask = ks < K

        # Pass 1: squared norm and raw logits x . P^T, accumulated over D chunks.
        sumsq = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            xt = tl.load(feat_ptr + base[:, None] + ds[None, :].to(tl.int64) * s_d,
                         mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            pt = tl.load(proto_ptr + ks[None, :] * D + ds[:, None],
                         mask=kmask[None, :] & dmask[:, None], other=0.0)
            sumsq += tl.sum(xt * xt, axis=1)
            acc += tl.dot(xt, pt, input_precision="ieee")
        norm = tl.sqrt(sumsq)
        inv = 1.0 / tl.maximum(norm, eps)
        logits = acc * (inv * inv_tau)[:, None]
        logits = tl.where(kmask[None, :], logits, float("-inf"))
        mx = tl.max(logits, axis=1)
        e = tl.exp(logits - mx[:, None])
        se = tl.sum(e, axis=1)
        onehot = ks[None, :] == lab[:, None]
        target = tl.sum(tl.where(onehot, logits, 0.0), axis=1)
        valid = rmask & (lab != IGNORE)  # samples at ignored pixels are skipped
        tl.store(loss_ptr + rows, tl.where(valid, mx + tl.log(se) - target, 0.0), mask=rmask)

        # dL/dlogit (L = ce_weight * mean CE), then through v = x / max(|x|, eps):
        # dL/dx = (g_v - v (v . g_v)) / |x|, with v . g_v = sum_k g_k logit_k (no extra D pass);
        # below eps the norm is clamped and carries no gradient, so dL/dx = g_v / eps.
        scale = tl.load(scale_ptr)
        g = (e / se[:, None] - onehot.to(tl.float32)) * tl.where(valid, scale, 0.0)[:, None]
        vg = tl.sum(g * tl.where(kmask[None, :], logits, 0.0), axis=1)
        vg = tl.where(norm >= eps, vg, 0.0)
        coef = inv * inv * vg
        rows64 = rows.to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            m2 = rmask[:, None] & dmask[None, :]
            xt = tl.load(feat_ptr + base[:, None] + ds[None, :].to(tl.int64) * s_d,
                         mask=m2, other=0.0).to(tl.float32)
            pt = tl.load(proto_ptr + ks[:, None] * D + ds[None, :],
                         mask=kmask[:, None] & dmask[None, :], other=0.0)
            gv = tl.dot(g, pt, input_precision="ieee") * inv_tau
            grad = gv * inv[:, None] - xt * coef[:, None]
            tl.store(rowgrad_ptr + rows64[:, None] * D + ds[None, :], grad, mask=m2)

    @triton.jit
    def _kept_sum_kernel(feat_ptr, lab_ptr, part_ptr, M, D, HW, W, s_b, s_d, s_y, s_x, eps,
                         IGNORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         ONE_CHUNK: tl.constexpr):
        pid = tl.program_id(0)
        pix = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        pmask = pix < M
        lab = tl.load(lab_ptr + pix, mask=pmask, other=IGNORE)
        keep = pmask & (lab != IGNORE)
        base = _pixel_offset(pix, HW, W, s_b, s_y, s_x)
        out = part_ptr + pid.to(tl.int64) * D
        if ONE_CHUNK:
            ds = tl.arange(0, BLOCK_D)
            dmask = ds < D
            xt = tl.load(feat_ptr + base[:, None] + ds[None, :].to(tl.int64) * s_d,
                         mask=keep[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(xt * xt, axis=1)), eps)
            tl.store(out + ds, tl.sum(xt * inv[:, None], axis=0), mask=dmask)
        else:
            sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                xt = tl.load(feat_ptr + base[:, None] + ds[None, :].to(tl.int64) * s_d,
                             mask=keep[:, None] & (ds < D)[None, :], other=0.0).to(tl.float32)
                sumsq += tl.sum(xt * xt, axis=1)
            inv = 1.0 / tl.maximum(tl.sqrt(sumsq), eps)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dmask = ds < D
                xt = tl.load(feat_ptr + base[:, None] + ds[None, :].to(tl.int64) * s_d,
                             mask=keep[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                tl.store(out + ds, tl.sum(xt * inv[:, None], axis=0), mask=dmask)

    @triton.jit
    def _backward_kernel(feat_ptr, lab_ptr, slot_ptr, rowgrad_ptr, mgrad_ptr, gce_ptr, greg_ptr, out_ptr,
                         M, D, HW, W, s_b, s_d, s_y, s_x, o_b, o_d, o_y, o_x, eps,
                         IGNORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         ONE_CHUNK: tl.constexpr):
        pid = tl.program_id(0)
        pix = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        pmask = pix < M
        lab = tl.load(lab_ptr + pix, mask=pmask, other=IGNORE)
        keep = pmask & (lab != IGNORE)
        slot = tl.load(slot_ptr + pix, mask=pmask, other=-1).to(tl.int64)
        sampled = slot >= 0
        base = _pixel_offset(pix, HW, W, s_b, s_y, s_x)
        obase = _pixel_offset(pix, HW, W, o_b, o_y, o_x)
        w_reg = tl.where(keep, tl.load(greg_ptr), 0.0)
        g_ce = tl.load(gce_ptr)
        # Regulariser: every kept pixel gets mean_grad through its own normalization.
        if ONE_CHUNK:
            ds = tl.arange(0, BLOCK_D)
            dmask = ds < D
            xt = tl.load(feat_ptr + base[:, None] + ds[None, :].to(tl.int64) * s_d,
                         mask=keep[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            mg = tl.load(mgrad_ptr + ds, mask=dmask, other=0.0)
            norm = tl.sqrt(tl.sum(xt * xt, axis=1))
            inv = 1.0 / tl.maximum(norm, eps)
            xg = tl.where(norm >= eps, tl.sum(xt * mg[None, :], axis=1), 0.0)
            grad = (mg[None, :] * inv[:, None] - xt * (inv * inv * inv * xg)[:, None]) * w_reg[:, None]
            grad += tl.load(rowgrad_ptr + slot[:, None] * D + ds[None, :],
                            mask=sampled[:, None] & dmask[None, :], other=0.0) * g_ce
            tl.store(out_ptr + obase[:, None] + ds[None, :].to(tl.int64) * o_d,
                     grad.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & dmask[None, :])
        else:
            sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
            xg = tl.zeros([BLOCK_M], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dmask = ds < D
                xt = tl.load(feat_ptr + base[:, None] + ds[None, :].to(tl.int64) * s_d,
                             mask=keep[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                mg = tl.load(mgrad_ptr + ds, mask=dmask, other=0.0)
                sumsq += tl.sum(xt * xt, axis=1)
                xg += tl.sum(xt * mg[None, :], axis=1)
            norm = tl.sqrt(sumsq)
            inv = 1.0 / tl.maximum(norm, eps)
            xg = tl.where(norm >= eps, xg, 0.0)
            coef = inv * inv * inv * xg
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dmask = ds < D
                xt = tl.load(feat_ptr + base[:, None] + ds[None, :].to(tl.int64) * s_d,
                             mask=keep[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                mg = tl.load(mgrad_ptr + ds, mask=dmask, other=0.0)
                grad = (mg[None, :] * inv[:, None] - xt * coef[:, None]) * w_reg[:, None]
                grad += tl.load(rowgrad_ptr + slot[:, None] * D + ds[None, :],
                                mask=sampled[:, None] & dmask[None, :], other=0.0) * g_ce
                tl.store(out_ptr + obase[:, None] + ds[None, :].to(tl.int64) * o_d,
                         grad.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & dmask[None, :])


def _check_inputs(feats, labels, prototypes, sample_idx):
    if feats.dim() != 4 or labels.shape != (feats.shape[0],) + tuple(feats.shape[2:]):
        raise ValueError(f"feats (B, D, h, w) and labels (B, h, w) expected, got {tuple(feats.shape)} "
                         f"and {tuple(labels.shape)}")
    if prototypes.dim() != 2 or prototypes.shape[1] != feats.shape[1]:
        raise ValueError(f"prototypes (K, {feats.shape[1]}) expected, got {tuple(prototypes.shape)}")
    if sample_idx.dim() != 1:
        raise ValueError(f"sample_idx must be 1-D, got {tuple(sample_idx.shape)}")


def _forward_impl(feats, labels, prototypes, sample_idx, tau, ce_weight, reg_weight):
    _check_inputs(feats, labels, prototypes, sample_idx)
    B, D, H, W = feats.shape
    M, N, K = B * H * W, sample_idx.shape[0], prototypes.shape[0]
    dev = feats.device
    blocks = _blocks(K, D)
    protos = prototypes.detach().float().contiguous()
    flat_labels = labels.reshape(-1)
    n = (flat_labels != IGNORE_INDEX).sum()
    present = n > 0
    # ce_weight / (samples at kept pixels), or 0 when every pixel is ignored (the reference
    # returns 0 there); samples at ignored pixels are skipped.
    num_valid = (flat_labels[sample_idx] != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
    scale = present.to(torch.float32) * ce_weight / num_valid
    ce_rows = torch.empty(N, device=dev, dtype=torch.float32)
    row_grad = torch.empty(N, D, device=dev, dtype=torch.float32)
    num_parts = max(1, cdiv(M, blocks["pixel_m"]))
    parts = torch.empty(num_parts, D, device=dev, dtype=torch.float32)
    s_b, s_d, s_y, s_x = feats.stride()
    with device_guard(dev):
        launch(_sample_rows_kernel, (max(1, cdiv(N, blocks["sample_n"])),),
            feats, nonempty(sample_idx, flat_labels), flat_labels, protos, scale,
            nonempty(ce_rows, scale), nonempty(row_grad, scale),
            N, D, K, H * W, W, s_b, s_d, s_y, s_x, 1.0 / tau, EPS,
            IGNORE=IGNORE_INDEX, BLOCK_N=blocks["sample_n"], BLOCK_D=blocks["sample_d"], BLOCK_K=blocks["sample_k"],
            num_warps=blocks["sample_warps"])
        launch(_kept_sum_kernel, (num_parts,),
            feats, flat_labels, parts, M, D, H * W, W, s_b, s_d, s_y, s_x, EPS,
            IGNORE=IGNORE_INDEX, BLOCK_M=blocks["pixel_m"], BLOCK_D=blocks["pixel_d"],
            ONE_CHUNK=blocks["one_chunk"], num_warps=blocks["pixel_warps"])
    zero = torch.zeros((), device=dev, dtype=torch.float32)
    loss_ce = torch.where(present, ce_weight * (ce_rows.sum() / num_valid), zero)
    # Regulariser on vbar (tiny, torch): reg_weight * sum_c log_softmax(vbar P^T / tau)_c / (K ln K).
    mean_v = parts.sum(0) / n.clamp(min=1)
    logits = mean_v @ protos.t() / tau
    coef = reg_weight / (K * math.log(K))
    loss_reg = torch.where(present, coef * torch.log_softmax(logits, dim=0).sum(), zero)
    # d loss_reg / d v_i for each kept pixel: d/dlogits sum_c log_softmax_c = 1 - K softmax.
    dlogits = coef * (1.0 - K * torch.softmax(logits, dim=0))
    mean_grad = torch.where(present, (dlogits @ protos) / tau / n.clamp(min=1), zero)
    return loss_ce, loss_reg, row_grad, mean_grad


def _backward_impl(grad_ce, grad_reg, feats, labels, sample_idx, row_grad, mean_grad):
    B, D, H, W = feats.shape
    M, N, K = B * H * W, sample_idx.shape[0], 1
    dev = feats.device
    blocks = _blocks(K, D)
    flat_labels = labels.reshape(-1)
    # Pixel -> its sample row (-1 if not sampled). Repeated indices (never from the sampler)
    # still sum correctly: their rows are added into whichever row won the slot.
    slot = torch.full((M,), -1, device=dev, dtype=torch.int32)
    rows = torch.arange(N, device=dev, dtype=torch.int32)
    slot[sample_idx] = rows
    row_grad = torch.zeros_like(row_grad).index_add_(0, slot[sample_idx].long(), row_grad)
    out = torch.empty_like(feats)
    gce = grad_ce.detach().float().reshape(())
    greg = grad_reg.detach().float().reshape(())
    s_b, s_d, s_y, s_x = feats.stride()
    o_b, o_d, o_y, o_x = out.stride()
    with device_guard(dev):
        launch(_backward_kernel, (max(1, cdiv(M, blocks["pixel_m"])),),
            feats, flat_labels, slot, nonempty(row_grad, mean_grad), mean_grad, gce, greg, out,
            M, D, H * W, W, s_b, s_d, s_y, s_x, o_b, o_d, o_y, o_x, EPS,
            IGNORE=IGNORE_INDEX, BLOCK_M=blocks["pixel_m"], BLOCK_D=blocks["pixel_d"],
            ONE_CHUNK=blocks["one_chunk"], num_warps=blocks["pixel_warps"])
    return out


if AVAILABLE and not op_registered("contrast_forward"):

    @torch.library.custom_op(f"{NAMESPACE}::contrast_forward", mutates_args=())
    def contrast_forward(feats: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                         sample_idx: torch.Tensor, tau: float, ce_weight: float,
                         reg_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss_ce, loss_reg, row_grad (N, D) fp32, mean_grad (D,) fp32); see the module doc."""
        return _forward_impl(feats, labels, prototypes, sample_idx, tau, ce_weight, reg_weight)

    @contrast_forward.register_fake
    def _(feats, labels, prototypes, sample_idx, tau, ce_weight, reg_weight):
        _check_inputs(feats, labels, prototypes, sample_idx)
        f32 = dict(device=feats.device, dtype=torch.float32)
        return (feats.new_empty((), **f32), feats.new_empty((), **f32),
                feats.new_empty((sample_idx.shape[0], feats.shape[1]), **f32),
                feats.new_empty((feats.shape[1],), **f32))

    @torch.library.custom_op(f"{NAMESPACE}::contrast_backward", mutates_args=())
    def contrast_backward(grad_ce: torch.Tensor, grad_reg: torch.Tensor, feats: torch.Tensor,
                          labels: torch.Tensor, sample_idx: torch.Tensor, row_grad: torch.Tensor,
                          mean_grad: torch.Tensor) -> torch.Tensor:
        """d(grad_ce * loss_ce + grad_reg * loss_reg)/d feats, dtype and strides of feats."""
        return _backward_impl(grad_ce, grad_reg, feats, labels, sample_idx, row_grad, mean_grad)

    @contrast_backward.register_fake
    def _(grad_ce, grad_reg, feats, labels, sample_idx, row_grad, mean_grad):
        return torch.empty_like(feats)

    def _setup_context(ctx, inputs, output):
        feats, labels, _, sample_idx = inputs[:4]
        _, _, row_grad, mean_grad = output
        ctx.save_for_backward(feats, labels, sample_idx, row_grad, mean_grad)
        ctx.mark_non_differentiable(row_grad, mean_grad)

    def _backward(ctx, grad_ce, grad_reg, _grad_rows, _grad_mean):
        feats, labels, sample_idx, row_grad, mean_grad = ctx.saved_tensors
        if grad_ce is None:
            grad_ce = torch.zeros((), device=feats.device)
        if grad_reg is None:
            grad_reg = torch.zeros((), device=feats.device)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.confeti_fast.contrast_backward(grad_ce, grad_reg, feats, labels, sample_idx,
                                                            row_grad, mean_grad)
        return grad, None, None, None, None, None, None

    contrast_forward.register_autograd(_backward, setup_context=_setup_context)


def pixel_proto_contrast(feats, labels, prototypes, tau=0.1, num_samples=4096, sample_idx=None,
                         ce_weight=0.5, reg_weight=2.0):
    """Fused `reference.pixel_proto_contrast`: same arguments, same (loss_ce, loss_reg)."""
    if not can_run(feats.device):
        return reference.pixel_proto_contrast(feats, labels, prototypes, tau=tau, num_samples=num_samples,
                                              sample_idx=sample_idx, ce_weight=ce_weight,
                                              reg_weight=reg_weight)
    if sample_idx is None:
        sample_idx = reference.sample_kept_pixels(labels.reshape(-1), num_samples)
    sample_idx = sample_idx.to(device=feats.device, dtype=torch.int64)
    loss_ce, loss_reg, _, _ = torch.ops.confeti_fast.contrast_forward(
        feats, labels, prototypes.detach(), sample_idx, float(tau), float(ce_weight), float(reg_weight))
    return loss_ce, loss_reg
