// The prototype EMA update (docs/method.md §4), the parts shared by the CPU and the CUDA kernels.
//
// Plain C++ (no torch): compiled by g++ into the CPU op and by nvcc into the CUDA kernels, so
// the CPU tests run the very arithmetic the GPU runs. Block-level phases are written as
// per-thread bodies `(tid, nthreads)`; the CUDA kernels put __syncthreads() between phases and
// the CPU emulates a block by looping over tid between the same phase boundaries.
//
// Floating point: products, sums and FMAs go through cf_mul / cf_add / cf_fma so that neither
// compiler contracts them differently (CPU: -ffp-contract=off; CUDA: __f*_rn intrinsics).
#pragma once

#include <stdint.h>

#include <cmath>
#include <cstring>

#ifdef __CUDACC__
#define CF_HD __host__ __device__ __forceinline__
#else
#define CF_HD inline
#endif

namespace cf {

// ------------------------------------------------------------------ constants

constexpr int kIgnore = 255;
constexpr int kL1Chunk = 2048;     // pixels per level-1 block (one sort of kL1Chunk keys)
constexpr int kSortCap = 2048;     // most keys one block sorts
constexpr int kSortThreads = 256;  // threads of the sorting blocks
constexpr int kRedThreads = 128;   // threads (real or emulated) of the per-class blocks
constexpr int kMaxClasses = 1024;  // class id must fit the level-1 key
constexpr uint64_t kNoKey = ~0ull; // padding: sorts after every real key
constexpr float kNormEps = 1e-12f; // F.normalize's eps

// ------------------------------------------------------------------ float helpers

CF_HD float cf_mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

CF_HD float cf_add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

CF_HD float cf_fma(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

CF_HD float cf_div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

CF_HD float cf_sqrt(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

CF_HD float cf_bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

CF_HD uint32_t cf_float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// 16-bit storage types, read by bit pattern (layout-compatible with c10::BFloat16 / c10::Half).
struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };

CF_HD float cf_load(float v) { return v; }
CF_HD float cf_load(bf16_t v) { return cf_bits_to_float(static_cast<uint32_t>(v.x) << 16); }
CF_HD float cf_load(f16_t v) {
  const uint32_t sign = static_cast<uint32_t>(v.x & 0x8000u) << 16;
  const uint32_t exp = (v.x >> 10) & 0x1fu;
  const uint32_t mant = v.x & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24 is exact in float
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
  }
  if (exp == 31) return cf_bits_to_float(sign | 0x7f800000u | (mant << 13));
  return cf_bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// ------------------------------------------------------------------ bilinear, align_corners=True

// One axis of the interpolation, exactly as ATen's CPU upsample computes it.
struct Lerp {
  int32_t i0, i1;
  float l0, l1;
};

CF_HD float src_scale(int64_t in, int64_t out) {
  return out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.0f;
}

CF_HD Lerp lerp_at(float scale, int64_t in, int64_t out, int64_t dst) {
  Lerp r;
  if (in == out) {  // ATen's identity shortcut
    r.i0 = r.i1 = static_cast<int32_t>(dst);
    r.l0 = 1.0f;
    r.l1 = 0.0f;
    return r;
  }
  const float src = cf_mul(scale, static_cast<float>(dst));
  int64_t i0 = static_cast<int64_t>(src);  // src >= 0: truncation == floor
  if (i0 > in - 1) i0 = in - 1;
  float l1 = src - static_cast<float>(i0);
  l1 = l1 < 0.0f ? 0.0f : (l1 > 1.0f ? 1.0f : l1);
  r.i0 = static_cast<int32_t>(i0);
  r.i1 = static_cast<int32_t>(i0 + (i0 < in - 1 ? 1 : 0));
  r.l1 = l1;
  r.l0 = 1.0f - l1;
  return r;
}

// 4-tap sample of one plane. ATen's generic CPU kernel (contiguous input, H + W > 128) is
// compiled with FMA contraction; this order reproduces its float32 result bit for bit.
template <typename T>
CF_HD float bilinear(const T* plane, int64_t sy, int64_t sx, const Lerp& ly, const Lerp& lx) {
  const T* r0 = plane + ly.i0 * sy;
  const T* r1 = plane + ly.i1 * sy;
  const float t0 = cf_fma(cf_load(r0[lx.i0 * sx]), lx.l0, cf_mul(cf_load(r0[lx.i1 * sx]), lx.l1));
  const float t1 = cf_fma(cf_load(r1[lx.i0 * sx]), lx.l0, cf_mul(cf_load(r1[lx.i1 * sx]), lx.l1));
  return cf_fma(t0, ly.l0, cf_mul(t1, ly.l1));
}

// ------------------------------------------------------------------ candidate order

// Weight -> 32-bit key, ascending key = larger weight. torch.sort(descending, stable) order:
// NaN first, -0.0 == +0.0 (ties then go to the lower index).
CF_HD uint32_t weight_key(float w) {
  uint32_t u = cf_float_to_bits(w);
  if ((u & 0x7fffffffu) == 0) u = 0;                                       // -0 -> +0
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) u = 0x7fc00000u;  // one NaN
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);     // ascending in w
  return ~ordered;
}

CF_HD float key_weight(uint32_t k) {
  const uint32_t ordered = ~k;
  return cf_bits_to_float((ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered);
}

// Candidate key: weight first, then the flat pixel index (b, y, x); ascending = preferred.
// A total order over distinct pixels, so the top-k of any set is unique.
CF_HD uint64_t cand_key(float w, uint32_t flat) {
  return (static_cast<uint64_t>(weight_key(w)) << 32) | flat;
}
CF_HD uint32_t cand_index(uint64_t key) { return static_cast<uint32_t>(key); }
CF_HD float cand_weight(uint64_t key) { return key_weight(static_cast<uint32_t>(key >> 32)); }

// Insert into a list sorted ascending holding min(count, cap) keys; `len` is its length
// before the insert. Returns the new length.
CF_HD int topk_insert(uint64_t* list, int len, int cap, uint64_t key) {
  if (len == cap) {
    if (cap == 0 || key >= list[cap - 1]) return len;
    len = cap - 1;  // the last one drops out
  }
  int j = len;
  while (j > 0 && list[j - 1] > key) {
    list[j] = list[j - 1];
    --j;
  }
  list[j] = key;
  return len + 1;
}

// acc := the first `cap` of merge(acc, src), both ascending; in place, from the back.
CF_HD int topk_merge(uint64_t* acc, int alen, const uint64_t* src, int slen, int cap) {
  const int total = alen + slen < cap ? alen + slen : cap;
  int na = 0, nb = 0;  // how many of each survive
  while (na + nb < total) {
    if (nb == slen || (na < alen && acc[na] < src[nb])) ++na; else ++nb;
  }
  int ia = na - 1, ib = nb - 1;
  for (int out = total - 1; out >= 0; --out) {
    if (ib < 0 || (ia >= 0 && acc[ia] > src[ib])) acc[out] = acc[ia--];
    else acc[out] = src[ib--];
  }
  return total;
}

// ------------------------------------------------------------------ selection inputs

// Geometry and raw pointers of the selection inputs; strides in elements.
struct SelectArgs {
  const int64_t* labels;
  int64_t lb, ly, lx;
  const uint8_t* valid;  // nullptr: all valid
  int64_t vb, vy, vx;
  const void* cam;  // nullptr: every weight is 1
  int64_t cb, cc, cy, cx;
  int64_t hc, wc;
  float cscale_y, cscale_x;
  int64_t B, H, W;
  int64_t N;  // B * H * W, < 2^32
  int32_t K, top_k;
};

// The pixel's class if it is a candidate (kept, label in [0, K)), else -1. Labels outside
// [0, K) other than 255 are reported through *bad (the CPU op raises on them).
CF_HD int pixel_class(const SelectArgs& a, int64_t b, int64_t y, int64_t x, bool* bad) {
  const int64_t lab = a.labels[b * a.lb + y * a.ly + x * a.lx];
  if (lab == kIgnore) return -1;
  if (a.valid && !a.valid[b * a.vb + y * a.vy + x * a.vx]) return -1;
  if (lab < 0 || lab >= a.K) {
    *bad = true;
    return -1;
  }
  return static_cast<int>(lab);
}

template <typename TC>
CF_HD float pixel_weight(const SelectArgs& a, int c, int64_t b, int64_t y, int64_t x) {
  if (!a.cam) return 1.0f;
  const TC* plane = static_cast<const TC*>(a.cam) + b * a.cb + c * a.cc;
  const Lerp ly = lerp_at(a.cscale_y, a.hc, a.H, y);
  const Lerp lx = lerp_at(a.cscale_x, a.wc, a.W, x);
  return bilinear(plane, a.cy, a.cx, ly, lx);
}

// ------------------------------------------------------------------ level 1 (CUDA path)
// Block `ch` sorts the keys of pixels [ch * kL1Chunk, (ch + 1) * kL1Chunk) by
// (class, weight key, pixel) and emits, per class, the count and the first top_k keys.

constexpr int kL1LocalBits = 11;  // kL1Chunk == 1 << 11
constexpr int kL1ClassShift = 32 + kL1LocalBits;
constexpr uint64_t kL1NoClass = (1ull << (64 - kL1ClassShift)) - 1;

template <typename TC>
CF_HD uint64_t l1_key(const SelectArgs& a, int64_t ch, int local) {
  const int64_t p = ch * kL1Chunk + local;
  uint64_t cls = kL1NoClass;
  uint32_t wk = 0;
  if (p < a.N) {
    const uint32_t up = static_cast<uint32_t>(p);
    const uint32_t hw = static_cast<uint32_t>(a.H * a.W);
    const uint32_t b = up / hw, rem = up - b * hw;
    const uint32_t y = rem / static_cast<uint32_t>(a.W), x = rem - y * static_cast<uint32_t>(a.W);
    bool bad = false;
    const int c = pixel_class(a, b, y, x, &bad);
    if (c >= 0) {
      cls = static_cast<uint64_t>(c);
      wk = weight_key(pixel_weight<TC>(a, c, b, y, x));
    }
  }
  return (cls << kL1ClassShift) | (static_cast<uint64_t>(wk) << kL1LocalBits) | static_cast<uint64_t>(local);
}

// Phase 1: fill the keys, clear the class segments.
template <typename TC>
CF_HD void l1_load(const SelectArgs& a, int64_t ch, uint64_t* keys, int* seg_lo, int* seg_hi, int tid, int nt) {
  for (int i = tid; i < kL1Chunk; i += nt) keys[i] = l1_key<TC>(a, ch, i);
  for (int c = tid; c < a.K; c += nt) seg_lo[c] = seg_hi[c] = 0;
}

// One compare-exchange pass of a bitonic sort (ascending) of P = 2^n keys. Run it for
// size = 2, 4, ..., P and, inside, stride = size / 2, ..., 1, with a barrier after each.
CF_HD void bitonic_pass(uint64_t* keys, int P, int size, int stride, int tid, int nt) {
  for (int t = tid; t < P / 2; t += nt) {
    const int lo = 2 * t - (t & (stride - 1));
    const int hi = lo + stride;
    const bool ascending = (lo & size) == 0;
    const uint64_t x = keys[lo], y = keys[hi];
    if ((x > y) == ascending) {
      keys[lo] = y;
      keys[hi] = x;
    }
  }
}

// Phase 3 (after the sort): where each class's run starts and ends.
CF_HD void l1_segments(const uint64_t* keys, int K, int* seg_lo, int* seg_hi, int tid, int nt) {
  for (int i = tid; i < kL1Chunk; i += nt) {
    const uint64_t c = keys[i] >> kL1ClassShift;
    if (c >= static_cast<uint64_t>(K)) continue;
    if (i == 0 || (keys[i - 1] >> kL1ClassShift) != c) seg_lo[c] = i;
    if (i == kL1Chunk - 1 || (keys[i + 1] >> kL1ClassShift) != c) seg_hi[c] = i + 1;
  }
}

// Phase 4: per class, the candidate count and the top_k global keys (padded with kNoKey).
CF_HD void l1_emit(const uint64_t* keys, const int* seg_lo, const int* seg_hi, int64_t ch, int K, int k,
                   uint64_t* out_keys, int64_t* out_counts, int tid, int nt) {
  for (int c = tid; c < K; c += nt) out_counts[ch * K + c] = seg_hi[c] - seg_lo[c];
  for (int s = tid; s < K * k; s += nt) {
    const int c = s / k, r = s - c * k;
    uint64_t out = kNoKey;
    if (r < seg_hi[c] - seg_lo[c]) {
      const uint64_t key = keys[seg_lo[c] + r];
      const uint32_t local = static_cast<uint32_t>(key & ((1u << kL1LocalBits) - 1));
      const uint32_t wk = static_cast<uint32_t>(key >> kL1LocalBits);
      out = (static_cast<uint64_t>(wk) << 32) | static_cast<uint32_t>(ch * kL1Chunk + local);
    }
    out_keys[(ch * K + c) * k + r] = out;
  }
}

// ------------------------------------------------------------------ reduce levels (CUDA path)
// Block (g, c) merges lists [g * G, (g + 1) * G) of class c (each k keys, ascending) into one.

CF_HD int reduce_group(int k) { return k >= kSortCap / 2 ? 2 : kSortCap / k; }

CF_HD int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Keys one block of a level sorts: its (at most G) lists, padded to a power of two.
CF_HD int reduce_sort_size(int G, int64_t L, int k) { return pow2_at_least((L < G ? static_cast<int>(L) : G) * k); }

CF_HD void lr_load(const uint64_t* src, const int64_t* src_counts, int64_t L, int K, int k, int G, int P,
                   int64_t g, int c, uint64_t* keys, int64_t* count_out, int tid, int nt) {
  for (int i = tid; i < P; i += nt) {
    const int64_t j = g * G + i / k;
    keys[i] = (i < G * k && j < L) ? src[(j * K + c) * k + i % k] : kNoKey;
  }
  if (tid == 0) {
    int64_t n = 0;
    for (int64_t j = g * G; j < L && j < (g + 1) * G; ++j) n += src_counts[j * K + c];
    *count_out = n;
  }
}

CF_HD void lr_emit(const uint64_t* keys, int64_t count, int64_t g, int K, int k, int c, uint64_t* dst,
                   int64_t* dst_counts, int tid, int nt) {
  for (int r = tid; r < k; r += nt) dst[(g * K + c) * k + r] = keys[r];
  if (tid == 0) dst_counts[g * K + c] = count;
}

// ------------------------------------------------------------------ per-class update
// Input of both backends: per class c the final list keys[c * k ..] (ascending, kNoKey
// padded) and the candidate count counts[c].

struct UpdateArgs {
  float* protos;
  int64_t ps0, ps1;
  int64_t* counts;
  int64_t cs;
  const void* feats;
  int64_t fb, fd, fy, fx;
  int64_t hf, wf;
  float fscale_y, fscale_x;
  int64_t H, W, D;
  int32_t K, top_k;
  double momentum;
};

struct Tap {
  int32_t b;
  Lerp ly, lx;
};

CF_HD Tap make_tap(const UpdateArgs& a, uint32_t flat) {
  const uint32_t hw = static_cast<uint32_t>(a.H * a.W);
  const uint32_t b = flat / hw, rem = flat - b * hw;
  const uint32_t y = rem / static_cast<uint32_t>(a.W), x = rem - y * static_cast<uint32_t>(a.W);
  Tap t;
  t.b = static_cast<int32_t>(b);
  t.ly = lerp_at(a.fscale_y, a.hf, a.H, y);
  t.lx = lerp_at(a.fscale_x, a.wf, a.W, x);
  return t;
}

CF_HD int kept_count(int64_t n, int k) { return n < k ? static_cast<int>(n) : k; }

// Sum of the kept weights, in list order (every thread computes the same value).
CF_HD float class_wsum(const uint64_t* list, int m) {
  float s = 0.0f;
  for (int r = 0; r < m; ++r) s = cf_add(s, cand_weight(list[r]));
  return s;
}

CF_HD double ema_alpha(int64_t n, double momentum) {
  if (n == 0) return 1.0;
  const double a = 1.0 - 1.0 / static_cast<double>(n + 1);
  const double b = 1.0 - momentum;
  return a < b ? a : b;
}

// sum_r w_r v_r[d] for one channel d, in list order (the class-statistics output).
template <typename TF>
CF_HD float weighted_component(const UpdateArgs& a, const Tap* taps, const float* w, int m, int64_t d) {
  const TF* base = static_cast<const TF*>(a.feats) + d * a.fd;
  float acc = 0.0f;
  for (int r = 0; r < m; ++r) {
    const float v = bilinear(base + taps[r].b * a.fb, a.fy, a.fx, taps[r].ly, taps[r].lx);
    acc = cf_add(acc, cf_mul(w[r], v));
  }
  return acc;
}

// mu_d = sum_r w_r v_r[d] / wsum; the stats path divides the same two floats, so with an
// identity reduction it is bitwise the one-shot op.
template <typename TF>
CF_HD float centroid_component(const UpdateArgs& a, const Tap* taps, const float* w, int m, float wsum, int64_t d) {
  return cf_div(weighted_component<TF>(a, taps, w, m, d), wsum);
}

// Centroid block phase 1: decode the kept entries (list order) of class c.
CF_HD void centroid_decode(const UpdateArgs& a, const uint64_t* list, int m, Tap* taps, float* w, int tid, int nt) {
  for (int r = tid; r < m; r += nt) {
    taps[r] = make_tap(a, cand_index(list[r]));
    w[r] = cand_weight(list[r]);
  }
}

// Fixed-order tree over kRedThreads partial sums: step s for s = kRedThreads/2, ..., 1, with a
// barrier after each; the total ends in part[0].
template <typename T>
CF_HD void tree_step(T* part, int s, int tid) {
  if (tid < s) part[tid] = part[tid] + part[tid + s];
}
CF_HD void tree_step(float* part, int s, int tid) {
  if (tid < s) part[tid] = cf_add(part[tid], part[tid + s]);
}

// Whether class c's row moves, and its EMA coefficients.
struct ClassPlan {
  bool present, update;
  int64_t kept;  // int64: after a cross-rank reduction it can exceed top_k
  float keep_old, take_new;  // (1 - alpha) and alpha, as torch casts the Python scalars
};

// From a class's (possibly reduced) statistics: kept pixels and their weight sum.
CF_HD ClassPlan class_plan_stats(int64_t kept, float wsum, int64_t n_before, double momentum) {
  ClassPlan p;
  p.present = kept > 0;
  p.kept = kept;
  p.update = p.present && wsum != 0.0f;
  const double alpha = ema_alpha(n_before, momentum);
  p.take_new = static_cast<float>(alpha);
  p.keep_old = static_cast<float>(1.0 - alpha);
  return p;
}

CF_HD ClassPlan class_plan(const UpdateArgs& a, const uint64_t* list, int64_t n_cand, int64_t n_before) {
  const int m = kept_count(n_cand, a.top_k);
  return class_plan_stats(m, class_wsum(list, m), n_before, a.momentum);
}

// Apply phase 0: mu_d = weighted_sum[d] / weight_sum for the channels this thread owns in the
// finish phases (same d = tid, tid + nt, ...), so no barrier is needed before them.
CF_HD void stats_mu(const UpdateArgs& a, const ClassPlan& p, const float* ws_row, float wsum, float* mu_row,
                    int tid, int nt) {
  if (!p.update) return;
  for (int64_t d = tid; d < a.D; d += nt) mu_row[d] = cf_div(ws_row[d], wsum);
}

// Finish phase 1: this thread's share of |mu|^2.
CF_HD float finish_mu_sumsq(const UpdateArgs& a, const ClassPlan& p, const float* mu_row, int tid, int nt) {
  float acc = 0.0f;
  if (!p.update) return acc;
  for (int64_t d = tid; d < a.D; d += nt) acc = cf_add(acc, cf_mul(mu_row[d], mu_row[d]));
  return acc;
}

CF_HD float norm_denominator(float sumsq) {
  const float n = cf_sqrt(sumsq);
  return n > kNormEps ? n : kNormEps;
}

// Finish phase 2: EMA of the row (if it moves); returns this thread's share of |row|^2.
CF_HD float finish_ema(const UpdateArgs& a, const ClassPlan& p, const float* mu_row, float mu_norm, int c,
                       int tid, int nt) {
  float acc = 0.0f;
  float* row = a.protos + c * a.ps0;
  for (int64_t d = tid; d < a.D; d += nt) {
    float v = row[d * a.ps1];
    if (p.update) {
      v = cf_add(cf_mul(p.keep_old, v), cf_mul(p.take_new, cf_div(mu_row[d], mu_norm)));
      row[d * a.ps1] = v;
    }
    acc = cf_add(acc, cf_mul(v, v));
  }
  return acc;
}

// Finish phase 3: L2-normalize the row (a zero row stays zero).
CF_HD void finish_normalize(const UpdateArgs& a, float row_norm, int c, int tid, int nt) {
  float* row = a.protos + c * a.ps0;
  for (int64_t d = tid; d < a.D; d += nt) row[d * a.ps1] = cf_div(row[d * a.ps1], row_norm);
}

// Selection output: chosen flat indices (list order, -1 padded) and the candidate count.
CF_HD void select_emit(const uint64_t* list, int64_t n_cand, int k, int c, int64_t* out_idx, int64_t* out_cnt,
                       int tid, int nt) {
  const int m = kept_count(n_cand, k);
  for (int r = tid; r < k; r += nt) {
    out_idx[static_cast<int64_t>(c) * k + r] = r < m ? static_cast<int64_t>(cand_index(list[r])) : int64_t{-1};
  }
  if (tid == 0) out_cnt[c] = n_cand;
}

}  // namespace cf

// ------------------------------------------------------------------ CUDA launcher interface
namespace cf {

// Lists per level of the CUDA selection: level 1 has L1 chunk lists; every later level fits
// in L2 (0 when one chunk is enough). Scratch: keys_a (L1, K, k), counts_a (L1, K),
// keys_b (L2, K, k), counts_b (L2, K), mu (K, D).
CF_HD void cuda_levels(int64_t N, int k, int64_t* L1, int64_t* L2) {
  *L1 = N > 0 ? (N + kL1Chunk - 1) / kL1Chunk : 1;
  const int G = reduce_group(k);
  *L2 = *L1 > 1 ? (*L1 + G - 1) / G : 0;
}

constexpr int kCudaMaxTopK = 1024;  // the centroid block keeps top_k taps in shared memory

struct CudaScratch {
  uint64_t* keys_a;
  int64_t* counts_a;
  uint64_t* keys_b;
  int64_t* counts_b;
  float* mu;
};

// Per-class statistics, contiguous: weighted_sum (K, D), weight_sum (K,), kept (K,).
struct StatsOut {
  float* weighted_sum;
  float* weight_sum;
  int64_t* kept;
};

// Enqueues the selection, then, when `update` is non-null: with stats null, the update of
// update->protos / update->counts; with stats non-null, the class statistics (update then only
// gives the features and D; protos / counts are unused). When sel_idx is non-null, writes the
// selection (K, k) and counts (K,). `stream` is a cudaStream_t. Returns a cudaError_t (0: launched).
int launch_proto_update(const SelectArgs& select, int cam_dtype, const UpdateArgs* update, int feats_dtype,
                        int64_t* sel_idx, int64_t* sel_cnt, const StatsOut* stats, const CudaScratch& scratch,
                        void* stream);

// Enqueues the EMA of table.protos / table.counts from (reduced) statistics laid out as in
// StatsOut; mu is (K, D) scratch. Returns a cudaError_t.
int launch_proto_ema_apply(const UpdateArgs& table, const float* weighted_sum, const float* weight_sum,
                           const int64_t* kept, float* mu, void* stream);

}  // namespace cf
