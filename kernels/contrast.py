"""Fused pixel-to-prototype contrast (docs/method.md §5) in Triton; `confeti_fast.reference` is the contract.

    loss_ce, loss_reg = pixel_proto_contrast(feats, labels, prototypes, sample_idx=idx)

Same signature, semantics and results as `reference.pixel_proto_contrast`, built from two
torch custom ops so torch.compile traces through without graph breaks. Everything between the
kernels (counts, the regulariser, the CE scale) is computed inside them, so forward plus
backward is four launches and no torch op:

* `confeti_fast::contrast_forward(feats, labels, prototypes, sample_idx, tau, ce_weight,
  reg_weight) -> (loss_ce, loss_reg, counts, saved)`, three launches:
  A `_kept_sum_kernel`, over all pixels: per program the sum of the normalized kept vectors
    (a row of D partials) and the kept count; it also zeroes counts (int32 per pixel).
  B `_sample_kernel`: programs over the sampled rows (gather by strides, normalize, logits by
    tl.dot, softmax-CE; per program the CE sum and the number of valid samples; an integer
    atomic +1 on each valid sample's pixel count, so repeated indices count as often as they
    occur) and programs that sum A's partials column-wise and multiply by P^T: the kept sum
    reaches the finalize as (K,) logit partials, never as a D-wide reduction in one program.
  C `_finalize_kernel`, one program: the partials reduced in a fixed order (deterministic),
    both losses (0 when every pixel is ignored), and saved = [ce_weight / num_valid, the
    regulariser's dlogits (K,), its gradient direction mean_grad (D,)] (all 0 then).
* `confeti_fast::contrast_backward(grad_ce, grad_reg, feats, labels, prototypes, sample_idx,
  counts, saved, tau) -> grad_feats` (feats' dtype and strides, via empty_like), one launch:
  programs over the sample rows write the whole gradient of each sampled pixel, CE (recomputed
  from the logits, times the pixel's count) and regulariser through one dot; pixel-block
  programs write every other pixel (the regulariser through its normalization, 0 where
  ignored). Each element is written by one program (repeats of an index write the same value
  again), so no N x D row gradient is stored and nothing is accumulated. Recomputing costs two
  N x K x D dots, a fraction of the all-pixel traffic; recomputing over all pixels would not.

feats may have any strides (NCHW, channels_last, slices): it is read by strides, never copied.
No host syncs. An empty `sample_idx` (N = 0) gives loss_ce = 0 (the reference would give nan
there); samples at ignored pixels are skipped. Gradient flows to feats only; prototypes are
detached. A loss whose gradient is unused gets none (no zero-filled gradient is made). On a
device the kernels cannot run on (CPU without TRITON_INTERPRET=1, or no Triton) the wrapper
runs the reference.

Block sizes (no autotune; a heuristic in `_blocks`, checked with ptxas -v on sm_90 for D=512,
K=19: no spills, bf16 channels_last A 64 / B 52 / C 64 / backward 80 registers): sampled rows
32 per program, K padded to a power of two >= 16 (masked logits), D in chunks of 32 (64 and 8
warps when D >= 128); the all-pixel work holds a whole row when D <= 512 (each pixel read
once), 16..64 pixels and ~4096-8192 elements per program with 8 warps, else D chunks of 128
with 32 pixels; B's column sums 16 columns x 256 partial rows at a time.
"""
import math
from typing import Optional

import torch

from confeti_fast import reference
from confeti_fast.sampling import sample_kept_pixels

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
        # kernel B's reduction of kernel A's partial rows: red_d columns, red_rows rows at a time
        "red_d": 16,
        "red_rows": 256,
    }
    blocks.update(_BLOCK_OVERRIDE)
    # kernel C (one program): partials fin_p at a time, B's (K,) partials fin_r rows at a time,
    # mean_grad fin_d columns at a time
    blocks.setdefault("fin_p", 1024)
    blocks.setdefault("fin_r", max(16, min(64, next_pow2(cdiv(dim, blocks["red_d"])))))
    blocks.setdefault("fin_d", min(128, max(16, next_pow2(dim))))
    blocks.setdefault("fin_warps", 4)
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
    def _sample_logits(feat_ptr, idx_ptr, lab_ptr, proto_ptr, rows, N, D, K, HW, W, s_b, s_d, s_y, s_x,
                       inv_tau, eps, IGNORE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        """For sample rows `rows`: (pixel, offset, label, valid, |x|, 1 / max(|x|, eps), logits
        v . P^T / tau with -inf in the padded classes), the logits by tl.dot over D chunks."""
        rmask = rows < N
        flat = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        base = _pixel_offset(flat, HW, W, s_b, s_y, s_x)
        lab = tl.load(lab_ptr + flat, mask=rmask, other=IGNORE)
        valid = rmask & (lab != IGNORE)  # samples at ignored pixels are skipped
        ks = tl.arange(0, BLOCK_K)
        kmask = ks < K
        sumsq = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            xt = tl.load(feat_ptr + base[:, None] + ds[None, :].to(tl.int64) * s_d,
                         mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            pt = tl.load(proto_ptr + ks[None, :] * D + ds[:, None],
                         mask=kmask[None, :] & dmask[:, None], other=0.0)
            sumsq += tl.sum(xt * xt, axis=1)
            acc += tl.dot(xt, pt, input_precision="ieee")
        norm = tl.sqrt(sumsq)
        inv = 1.0 / tl.maximum(norm, eps)
        logits = tl.where(kmask[None, :], acc * (inv * inv_tau)[:, None], float("-inf"))
        return flat, base, lab, valid, norm, inv, logits

    @triton.jit
    def _kept_sum_kernel(feat_ptr, lab_ptr, count_ptr, part_ptr, kept_ptr, M, D, HW, W, s_b, s_d, s_y, s_x,
                         eps, IGNORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         ONE_CHUNK: tl.constexpr):
        """Kernel A, over all pixels: per program the sum of the normalized kept vectors (a row of
        part) and the kept count; zeroes these pixels' sample counts for kernel B's atomics."""
        pid = tl.program_id(0)
        pix = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        pmask = pix < M
        lab = tl.load(lab_ptr + pix, mask=pmask, other=IGNORE)
        keep = pmask & (lab != IGNORE)
        tl.store(count_ptr + pix, tl.zeros([BLOCK_M], dtype=tl.int32), mask=pmask)
        tl.store(kept_ptr + pid, tl.sum(keep.to(tl.int32), axis=0))
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
    def _sample_kernel(feat_ptr, idx_ptr, lab_ptr, proto_ptr, count_ptr, ce_ptr, valid_ptr,
                       part_ptr, num_parts, plog_ptr, N, D, K, HW, W, s_b, s_d, s_y, s_x, inv_tau, eps,
                       sample_progs, IGNORE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_K: tl.constexpr, RED_ROWS: tl.constexpr, RED_D: tl.constexpr):
        """Kernel B (after A). Programs < sample_progs: BLOCK_N sample rows each, softmax-CE
        partial sum and valid-sample count per program, +1 on each valid sample's pixel count.
        The others: D columns RED_D at a time, A's partial rows summed in order, then times P^T:
        a partial (K,) of the kept-sum logits (sum_i v_i) . P^T per program."""
        pid = tl.program_id(0)
        ks = tl.arange(0, BLOCK_K)
        if pid < sample_progs:
            rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            flat, base, lab, valid, norm, inv, logits = _sample_logits(
                feat_ptr, idx_ptr, lab_ptr, proto_ptr, rows, N, D, K, HW, W, s_b, s_d, s_y, s_x,
                inv_tau, eps, IGNORE, BLOCK_N, BLOCK_D, BLOCK_K)
            mx = tl.max(logits, axis=1)
            lse = mx + tl.log(tl.sum(tl.exp(logits - mx[:, None]), axis=1))
            target = tl.sum(tl.where(ks[None, :] == lab[:, None], logits, 0.0), axis=1)
            tl.store(ce_ptr + pid, tl.sum(tl.where(valid, lse - target, 0.0), axis=0))
            tl.store(valid_ptr + pid, tl.sum(valid.to(tl.int32), axis=0))
            # Integer atomics: exact in any order, and repeated indices count once each.
            tl.atomic_add(count_ptr + flat, tl.full([BLOCK_N], 1, tl.int32), mask=valid,
                          sem="relaxed")
        else:
            cols = (pid - sample_progs) * RED_D + tl.arange(0, RED_D)
            cmask = cols < D
            acc = tl.zeros([RED_ROWS, RED_D], dtype=tl.float32)
            for r0 in range(0, num_parts, RED_ROWS):
                r = r0 + tl.arange(0, RED_ROWS)
                acc += tl.load(part_ptr + r[:, None].to(tl.int64) * D + cols[None, :],
                               mask=(r < num_parts)[:, None] & cmask[None, :], other=0.0)
            colsum = tl.sum(acc, axis=0)
            pt = tl.load(proto_ptr + ks[None, :] * D + cols[:, None],
                         mask=(ks < K)[None, :] & cmask[:, None], other=0.0)
            tl.store(plog_ptr + (pid - sample_progs) * BLOCK_K + ks, tl.sum(colsum[:, None] * pt, axis=0))

    @triton.jit
    def _finalize_kernel(kept_ptr, num_parts, ce_ptr, valid_ptr, sample_progs, plog_ptr, red_progs,
                         proto_ptr, loss_ce_ptr, loss_reg_ptr, saved_ptr, D, K, inv_tau, ce_weight, reg_coef,
                         BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        """Kernel C, one program: the partials reduced in a fixed order, both losses, and what the
        backward needs: saved = [scale, dlogit_reg (K,), mean_grad (D,)], zero when n = 0."""
        offs = tl.arange(0, BLOCK_P)
        kept = tl.zeros([BLOCK_P], dtype=tl.int32)
        for p0 in range(0, num_parts, BLOCK_P):
            kept += tl.load(kept_ptr + p0 + offs, mask=p0 + offs < num_parts, other=0)
        ce = tl.zeros([BLOCK_P], dtype=tl.float32)
        nvalid = tl.zeros([BLOCK_P], dtype=tl.int32)
        for p0 in range(0, sample_progs, BLOCK_P):
            m = p0 + offs < sample_progs
            ce += tl.load(ce_ptr + p0 + offs, mask=m, other=0.0)
            nvalid += tl.load(valid_ptr + p0 + offs, mask=m, other=0)
        ks = tl.arange(0, BLOCK_K)
        kmask = ks < K
        rs = tl.arange(0, BLOCK_R)
        plog = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        for r0 in range(0, red_progs, BLOCK_R):
            plog += tl.load(plog_ptr + (r0 + rs)[:, None] * BLOCK_K + ks[None, :],
                            mask=(r0 + rs < red_progs)[:, None], other=0.0)
        n = tl.sum(kept, axis=0)
        present = n > 0
        nf = tl.maximum(n, 1).to(tl.float32)
        inv_valid = 1.0 / tl.maximum(tl.sum(nvalid, axis=0), 1).to(tl.float32)
        tl.store(loss_ce_ptr, tl.where(present, ce_weight * (tl.sum(ce, axis=0) * inv_valid), 0.0))
        scale = tl.where(present, ce_weight * inv_valid, 0.0)
        # Regulariser on vbar: reg_coef * sum_c log_softmax(vbar . P^T / tau)_c.
        logits = tl.where(kmask, tl.sum(plog, axis=0) / nf * inv_tau, float("-inf"))
        mx = tl.max(logits, axis=0)
        e = tl.exp(logits - mx)
        se = tl.sum(e, axis=0)
        logp = logits - mx - tl.log(se)
        tl.store(loss_reg_ptr, tl.where(present, reg_coef * tl.sum(tl.where(kmask, logp, 0.0), axis=0), 0.0))
        # d loss_reg / d v_i for each kept pixel: d/dlogits sum_c log_softmax_c = 1 - K softmax,
        # and dlogits / dv_i = P^T / (tau n).
        dlog = tl.where(kmask & present, reg_coef * (1.0 - K * (e / se)) / nf, 0.0)
        tl.store(saved_ptr, scale)
        tl.store(saved_ptr + 1 + ks, dlog, mask=kmask)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            pt = tl.load(proto_ptr + ks[:, None] * D + ds[None, :], mask=kmask[:, None] & dmask[None, :],
                         other=0.0)
            tl.store(saved_ptr + 1 + K + ds, tl.sum(dlog[:, None] * pt, axis=0) * inv_tau, mask=dmask)

    @triton.jit
    def _backward_rows(feat_ptr, lab_ptr, idx_ptr, count_ptr, proto_ptr, saved_ptr, out_ptr, g_ce, g_reg,
                       pid, N, D, K, HW, W, s_b, s_d, s_y, s_x, o_b, o_d, o_y, o_x, inv_tau, eps,
                       IGNORE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        """The full gradient at the pixels of BLOCK_N sample rows (those with a valid label)."""
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        flat, base, lab, valid, norm, inv, logits = _sample_logits(
            feat_ptr, idx_ptr, lab_ptr, proto_ptr, rows, N, D, K, HW, W, s_b, s_d, s_y, s_x,
            inv_tau, eps, IGNORE, BLOCK_N, BLOCK_D, BLOCK_K)
        ks = tl.arange(0, BLOCK_K)
        kmask = ks < K
        count = tl.load(count_ptr + flat, mask=valid, other=0).to(tl.float32)
        mx = tl.max(logits, axis=1)
        e = tl.exp(logits - mx[:, None])
        prob = e / tl.sum(e, axis=1)[:, None]
        onehot = (ks[None, :] == lab[:, None]).to(tl.float32)
        # dL/dlogit: the CE of each of the pixel's `count` samples, plus the regulariser's
        # dlogit (its mean_grad is dlog @ P / tau, so both go through the one dot below).
        dlog = tl.load(saved_ptr + 1 + ks, mask=kmask, other=0.0)
        g = (prob - onehot) * (count * (tl.load(saved_ptr) * g_ce))[:, None] + (g_reg * dlog)[None, :]
        g = tl.where(valid[:, None], g, 0.0)
        # Through v = x / max(|x|, eps): dL/dx = (g_v - v (v . g_v)) / |x| with
        # v . g_v = sum_k g_k logit_k; below eps the norm carries no gradient: g_v / eps.
        vg = tl.sum(g * tl.where(kmask[None, :], logits, 0.0), axis=1)
        coef = inv * inv * tl.where(norm >= eps, vg, 0.0)
        obase = _pixel_offset(flat, HW, W, o_b, o_y, o_x)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            m2 = valid[:, None] & dmask[None, :]
            xt = tl.load(feat_ptr + base[:, None] + ds[None, :].to(tl.int64) * s_d,
                         mask=m2, other=0.0).to(tl.float32)
            pt = tl.load(proto_ptr + ks[:, None] * D + ds[None, :],
                         mask=kmask[:, None] & dmask[None, :], other=0.0)
            gv = tl.dot(g, pt, input_precision="ieee") * inv_tau
            grad = gv * inv[:, None] - xt * coef[:, None]
            tl.store(out_ptr + obase[:, None] + ds[None, :].to(tl.int64) * o_d,
                     grad.to(out_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _backward_pixels(feat_ptr, lab_ptr, count_ptr, mg_ptr, out_ptr, g_reg, pid, M, D, HW, W,
                         s_b, s_d, s_y, s_x, o_b, o_d, o_y, o_x, eps, IGNORE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr):
        """A block of BLOCK_M pixels, all but those with a valid sample (count > 0): the
        regulariser's mean_grad through each kept pixel's normalization, 0 at ignored pixels."""
        pix = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        pmask = pix < M
        lab = tl.load(lab_ptr + pix, mask=pmask, other=IGNORE)
        mine = pmask & (tl.load(count_ptr + pix, mask=pmask, other=0) == 0)
        keep = mine & (lab != IGNORE)
        w_reg = tl.where(keep, g_reg, 0.0)
        base = _pixel_offset(pix, HW, W, s_b, s_y, s_x)
        obase = _pixel_offset(pix, HW, W, o_b, o_y, o_x)
        if ONE_CHUNK:
            ds = tl.arange(0, BLOCK_D)
            dmask = ds < D
            xt = tl.load(feat_ptr + base[:, None] + ds[None, :].to(tl.int64) * s_d,
                         mask=keep[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            mg = tl.load(mg_ptr + ds, mask=dmask, other=0.0)
            norm = tl.sqrt(tl.sum(xt * xt, axis=1))
            inv = 1.0 / tl.maximum(norm, eps)
            xg = tl.where(norm >= eps, tl.sum(xt * mg[None, :], axis=1), 0.0)
            grad = (mg[None, :] * inv[:, None] - xt * (inv * inv * inv * xg)[:, None]) * w_reg[:, None]
            tl.store(out_ptr + obase[:, None] + ds[None, :].to(tl.int64) * o_d,
                     grad.to(out_ptr.dtype.element_ty), mask=mine[:, None] & dmask[None, :])
        else:
            sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
            xg = tl.zeros([BLOCK_M], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dmask = ds < D
                xt = tl.load(feat_ptr + base[:, None] + ds[None, :].to(tl.int64) * s_d,
                             mask=keep[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                mg = tl.load(mg_ptr + ds, mask=dmask, other=0.0)
                sumsq += tl.sum(xt * xt, axis=1)
                xg += tl.sum(xt * mg[None, :], axis=1)
            norm = tl.sqrt(sumsq)
            inv = 1.0 / tl.maximum(norm, eps)
            coef = inv * inv * inv * tl.where(norm >= eps, xg, 0.0)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dmask = ds < D
                xt = tl.load(feat_ptr + base[:, None] + ds[None, :].to(tl.int64) * s_d,
                             mask=keep[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                mg = tl.load(mg_ptr + ds, mask=dmask, other=0.0)
                grad = (mg[None, :] * inv[:, None] - xt * coef[:, None]) * w_reg[:, None]
                tl.store(out_ptr + obase[:, None] + ds[None, :].to(tl.int64) * o_d,
                         grad.to(out_ptr.dtype.element_ty), mask=mine[:, None] & dmask[None, :])

    @triton.jit
    def _backward_kernel(feat_ptr, lab_ptr, idx_ptr, count_ptr, proto_ptr, saved_ptr, gce_ptr, greg_ptr,
                         out_ptr, N, M, D, K, HW, W, s_b, s_d, s_y, s_x, o_b, o_d, o_y, o_x, inv_tau, eps,
                         sample_progs, IGNORE: tl.constexpr, HAS_GCE: tl.constexpr, HAS_GREG: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_SD: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
                         SAME_STRIDES: tl.constexpr):
        """d(g_ce loss_ce + g_reg loss_reg)/d feats, each element written by one program (a
        repeated sample index writes the same value again). Programs < sample_progs: the sampled
        pixels (`_backward_rows`); the others: pixel blocks, the rest (`_backward_pixels`)."""
        pid = tl.program_id(0)
        if SAME_STRIDES:  # out = empty_like(feats), feats dense: one set of offsets for both
            o_b, o_d, o_y, o_x = s_b, s_d, s_y, s_x
        g_ce = tl.load(gce_ptr) if HAS_GCE else 0.0
        g_reg = tl.load(greg_ptr) if HAS_GREG else 0.0
        if pid < sample_progs:
            _backward_rows(feat_ptr, lab_ptr, idx_ptr, count_ptr, proto_ptr, saved_ptr, out_ptr, g_ce, g_reg,
                           pid, N, D, K, HW, W, s_b, s_d, s_y, s_x, o_b, o_d, o_y, o_x, inv_tau, eps,
                           IGNORE, BLOCK_N, BLOCK_SD, BLOCK_K)
        else:
            _backward_pixels(feat_ptr, lab_ptr, count_ptr, saved_ptr + 1 + K, out_ptr, g_reg, pid - sample_progs,
                             M, D, HW, W, s_b, s_d, s_y, s_x, o_b, o_d, o_y, o_x, eps, IGNORE,
                             BLOCK_M, BLOCK_D, ONE_CHUNK)


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
    protos = prototypes.detach().float().contiguous()  # a no-op for the fp32 table
    flat_labels = labels.reshape(-1)
    num_parts = max(1, cdiv(M, blocks["pixel_m"]))
    sample_progs = cdiv(N, blocks["sample_n"])
    red_progs = cdiv(D, blocks["red_d"])
    f32, i32 = dict(device=dev, dtype=torch.float32), dict(device=dev, dtype=torch.int32)
    counts = torch.empty(M, **i32)  # samples per pixel; zeroed by kernel A
    parts = torch.empty(num_parts, D, **f32)
    kept = torch.empty(num_parts, **i32)
    ce_parts = torch.empty(max(1, sample_progs), **f32)
    valid_parts = torch.empty(max(1, sample_progs), **i32)
    plogits = torch.empty(red_progs, blocks["sample_k"], **f32)
    loss_ce = torch.empty((), **f32)
    loss_reg = torch.empty((), **f32)
    saved = torch.empty(1 + K + D, **f32)
    s_b, s_d, s_y, s_x = feats.stride()
    with device_guard(dev):
        launch(_kept_sum_kernel, (num_parts,),
            feats, flat_labels, counts, parts, kept, M, D, H * W, W, s_b, s_d, s_y, s_x, EPS,
            IGNORE=IGNORE_INDEX, BLOCK_M=blocks["pixel_m"], BLOCK_D=blocks["pixel_d"],
            ONE_CHUNK=blocks["one_chunk"], num_warps=blocks["pixel_warps"])
        launch(_sample_kernel, (sample_progs + red_progs,),
            feats, nonempty(sample_idx, flat_labels), flat_labels, protos, counts, ce_parts, valid_parts,
            parts, num_parts, plogits, N, D, K, H * W, W, s_b, s_d, s_y, s_x, 1.0 / tau, EPS, sample_progs,
            IGNORE=IGNORE_INDEX, BLOCK_N=blocks["sample_n"], BLOCK_D=blocks["sample_d"],
            BLOCK_K=blocks["sample_k"], RED_ROWS=blocks["red_rows"], RED_D=blocks["red_d"],
            num_warps=blocks["sample_warps"])
        launch(_finalize_kernel, (1,),
            kept, num_parts, ce_parts, valid_parts, sample_progs, plogits, red_progs, protos,
            loss_ce, loss_reg, saved, D, K, 1.0 / tau, ce_weight, reg_weight / (K * math.log(K)),
            BLOCK_P=blocks["fin_p"], BLOCK_K=blocks["sample_k"], BLOCK_R=blocks["fin_r"], BLOCK_D=blocks["fin_d"],
            num_warps=blocks["fin_warps"])
    return loss_ce, loss_reg, counts, saved


def _backward_impl(grad_ce, grad_reg, feats, labels, prototypes, sample_idx, counts, saved, tau):
    B, D, H, W = feats.shape
    M, N, K = B * H * W, sample_idx.shape[0], prototypes.shape[0]
    dev = feats.device
    blocks = _blocks(K, D)
    protos = prototypes.detach().float().contiguous()
    flat_labels = labels.reshape(-1)
    sample_progs = cdiv(N, blocks["sample_n"])
    out = torch.empty_like(feats)
    gce = saved if grad_ce is None else grad_ce.detach().float().reshape(())
    greg = saved if grad_reg is None else grad_reg.detach().float().reshape(())
    s_b, s_d, s_y, s_x = feats.stride()
    o_b, o_d, o_y, o_x = out.stride()
    with device_guard(dev):
        launch(_backward_kernel, (sample_progs + max(1, cdiv(M, blocks["pixel_m"])),),
            feats, flat_labels, nonempty(sample_idx, flat_labels), counts, protos, saved, gce, greg, out,
            N, M, D, K, H * W, W, s_b, s_d, s_y, s_x, o_b, o_d, o_y, o_x, 1.0 / tau, EPS, sample_progs,
            IGNORE=IGNORE_INDEX, HAS_GCE=grad_ce is not None, HAS_GREG=grad_reg is not None,
            BLOCK_N=blocks["sample_n"], BLOCK_SD=blocks["sample_d"], BLOCK_K=blocks["sample_k"],
            BLOCK_M=blocks["pixel_m"], BLOCK_D=blocks["pixel_d"], ONE_CHUNK=blocks["one_chunk"],
            SAME_STRIDES=out.stride() == feats.stride(), num_warps=blocks["pixel_warps"])
    return out


if AVAILABLE and not op_registered("contrast_forward"):

    @torch.library.custom_op(f"{NAMESPACE}::contrast_forward", mutates_args=())
    def contrast_forward(feats: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                         sample_idx: torch.Tensor, tau: float, ce_weight: float,
                         reg_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss_ce, loss_reg, counts (B*h*w,) int32, saved (1 + K + D,) fp32); see the module doc."""
        return _forward_impl(feats, labels, prototypes, sample_idx, tau, ce_weight, reg_weight)

    @contrast_forward.register_fake
    def _(feats, labels, prototypes, sample_idx, tau, ce_weight, reg_weight):
        _check_inputs(feats, labels, prototypes, sample_idx)
        B, D, H, W = feats.shape
        f32 = dict(device=feats.device, dtype=torch.float32)
        return (feats.new_empty((), **f32), feats.new_empty((), **f32),
                feats.new_empty((B * H * W,), device=feats.device, dtype=torch.int32),
                feats.new_empty((1 + prototypes.shape[0] + D,), **f32))

    @torch.library.custom_op(f"{NAMESPACE}::contrast_backward", mutates_args=())
    def contrast_backward(grad_ce: Optional[torch.Tensor], grad_reg: Optional[torch.Tensor],
                          feats: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                          sample_idx: torch.Tensor, counts: torch.Tensor, saved: torch.Tensor,
                          tau: float) -> torch.Tensor:
        """d(grad_ce * loss_ce + grad_reg * loss_reg)/d feats, dtype and strides of feats (a
        missing grad counts as 0)."""
        return _backward_impl(grad_ce, grad_reg, feats, labels, prototypes, sample_idx, counts, saved, tau)

    @contrast_backward.register_fake
    def _(grad_ce, grad_reg, feats, labels, prototypes, sample_idx, counts, saved, tau):
        return torch.empty_like(feats)

    def _setup_context(ctx, inputs, output):
        feats, labels, prototypes, sample_idx, tau = inputs[:5]
        _, _, counts, saved = output
        ctx.save_for_backward(feats, labels, prototypes, sample_idx, counts, saved)
        ctx.tau = tau
        ctx.mark_non_differentiable(counts, saved)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nobody used

    def _backward(ctx, grad_ce, grad_reg, _grad_counts, _grad_saved):
        grad = None
        if ctx.needs_input_grad[0] and (grad_ce is not None or grad_reg is not None):
            feats, labels, prototypes, sample_idx, counts, saved = ctx.saved_tensors
            grad = torch.ops.confeti_fast.contrast_backward(grad_ce, grad_reg, feats, labels, prototypes,
                                                            sample_idx, counts, saved, ctx.tau)
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
        sample_idx = sample_kept_pixels(labels.reshape(-1), num_samples)
    sample_idx = sample_idx.to(device=feats.device, dtype=torch.int64)
    loss_ce, loss_reg, _, _ = torch.ops.confeti_fast.contrast_forward(
        feats, labels, prototypes.detach(), sample_idx, float(tau), float(ce_weight), float(reg_weight))
    return loss_ce, loss_reg
