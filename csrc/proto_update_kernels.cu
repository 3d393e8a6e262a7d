// CUDA kernels of the prototype EMA update. No torch headers: the binding
// (proto_update_cuda.cpp) checks the tensors, allocates the scratch through torch's caching
// allocator and calls cf::launch_proto_update on the current stream.
//
// 1. l1_kernel, one block per 2048-pixel chunk: key per pixel (class, weight, index), bitonic
//    sort in shared memory, per-class count and top_k keys.
// 2. reduce_kernel, block (group, class): sorts G chunk lists of a class, keeps the top_k;
//    repeated until one list per class is left.
// 3. centroid_kernel, block (class, 128 channels): mu = sum w v / sum w, v sampled on the fly.
// 4. finish_kernel, block per class: |mu|, EMA, count, row normalization (fixed-order trees).
// The DDP path replaces 3-4 by stats_kernel (3 without the division: sum w v, sum w, kept)
// and, after the caller's cross-rank reduction, apply_kernel (mu = sum w v / sum w, then 4).
// The key is a total order and every sum has a fixed order: no atomics, bitwise deterministic.
#include <cuda_runtime.h>

#include "proto_update_core.h"

namespace {

extern __shared__ __align__(16) unsigned char cf_smem[];

__device__ __forceinline__ void block_sort(uint64_t* keys, int P) {
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      cf::bitonic_pass(keys, P, size, stride, threadIdx.x, blockDim.x);
      __syncthreads();
    }
  }
}

template <typename TC>
__global__ void __launch_bounds__(cf::kSortThreads) l1_kernel(cf::SelectArgs a, uint64_t* out_keys,
                                                              int64_t* out_counts) {
  uint64_t* keys = reinterpret_cast<uint64_t*>(cf_smem);
  int* lo = reinterpret_cast<int*>(keys + cf::kL1Chunk);
  int* hi = lo + a.K;
  const int64_t ch = blockIdx.x;
  cf::l1_load<TC>(a, ch, keys, lo, hi, threadIdx.x, blockDim.x);
  __syncthreads();
  block_sort(keys, cf::kL1Chunk);
  cf::l1_segments(keys, a.K, lo, hi, threadIdx.x, blockDim.x);
  __syncthreads();
  cf::l1_emit(keys, lo, hi, ch, a.K, a.top_k, out_keys, out_counts, threadIdx.x, blockDim.x);
}

__global__ void __launch_bounds__(cf::kSortThreads) reduce_kernel(const uint64_t* src, const int64_t* src_counts,
                                                                  int64_t L, int K, int k, int G, int P,
                                                                  uint64_t* dst, int64_t* dst_counts) {
  uint64_t* keys = reinterpret_cast<uint64_t*>(cf_smem);
  __shared__ int64_t count;
  const int64_t g = blockIdx.x;
  const int c = blockIdx.y;
  cf::lr_load(src, src_counts, L, K, k, G, P, g, c, keys, &count, threadIdx.x, blockDim.x);
  __syncthreads();
  block_sort(keys, P);
  cf::lr_emit(keys, count, g, K, k, c, dst, dst_counts, threadIdx.x, blockDim.x);
}

__global__ void select_kernel(const uint64_t* lists, const int64_t* counts, int k, int64_t* out_idx,
                              int64_t* out_cnt) {
  const int c = blockIdx.x;
  cf::select_emit(lists + static_cast<int64_t>(c) * k, counts[c], k, c, out_idx, out_cnt, threadIdx.x, blockDim.x);
}

template <typename TF>
__global__ void __launch_bounds__(cf::kRedThreads) centroid_kernel(cf::UpdateArgs a, const uint64_t* lists,
                                                                   const int64_t* counts, float* mu) {
  const int c = blockIdx.x;
  const uint64_t* list = lists + static_cast<int64_t>(c) * a.top_k;
  const int m = cf::kept_count(counts[c], a.top_k);
  const float wsum = cf::class_wsum(list, m);
  if (m == 0 || wsum == 0.0f) return;  // uniform over the block; finish_kernel skips the row too
  cf::Tap* taps = reinterpret_cast<cf::Tap*>(cf_smem);
  float* w = reinterpret_cast<float*>(taps + a.top_k);
  cf::centroid_decode(a, list, m, taps, w, threadIdx.x, blockDim.x);
  __syncthreads();
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d < a.D) mu[c * a.D + d] = cf::centroid_component<TF>(a, taps, w, m, wsum, d);
}

__device__ __forceinline__ float block_tree_sum(float* part, float mine) {
  part[threadIdx.x] = mine;
  __syncthreads();
  for (int s = cf::kRedThreads / 2; s > 0; s >>= 1) {
    cf::tree_step(part, s, threadIdx.x);
    __syncthreads();
  }
  const float total = part[0];
  __syncthreads();  // part is reused by the next sum
  return total;
}

// The finish phases of class c's row, given its plan and mu row.
__device__ __forceinline__ void finish_row(const cf::UpdateArgs& a, const cf::ClassPlan& plan, const float* mu_row,
                                           int c, int64_t n_before, float* part) {
  const int tid = threadIdx.x, nt = cf::kRedThreads;
  const float mu_norm = cf::norm_denominator(block_tree_sum(part, cf::finish_mu_sumsq(a, plan, mu_row, tid, nt)));
  const float row_norm =
      cf::norm_denominator(block_tree_sum(part, cf::finish_ema(a, plan, mu_row, mu_norm, c, tid, nt)));
  cf::finish_normalize(a, row_norm, c, tid, nt);  // each thread rescales the channels it wrote
  if (tid == 0 && plan.present) a.counts[c * a.cs] = n_before + plan.kept;
}

__global__ void __launch_bounds__(cf::kRedThreads) finish_kernel(cf::UpdateArgs a, const uint64_t* lists,
                                                                 const int64_t* counts, const float* mu) {
  __shared__ float part[cf::kRedThreads];
  const int c = blockIdx.x;
  const int64_t n_before = a.counts[c * a.cs];
  const cf::ClassPlan plan = cf::class_plan(a, lists + static_cast<int64_t>(c) * a.top_k, counts[c], n_before);
  finish_row(a, plan, mu + c * a.D, c, n_before, part);
}

// Block (class, 128 channels): the centroid block without the division; every class is
// written (zeros when nothing is kept), so the outputs need no memset.
template <typename TF>
__global__ void __launch_bounds__(cf::kRedThreads) stats_kernel(cf::UpdateArgs a, const uint64_t* lists,
                                                                const int64_t* counts, cf::StatsOut out) {
  const int c = blockIdx.x;
  const uint64_t* list = lists + static_cast<int64_t>(c) * a.top_k;
  const int m = cf::kept_count(counts[c], a.top_k);
  cf::Tap* taps = reinterpret_cast<cf::Tap*>(cf_smem);
  float* w = reinterpret_cast<float*>(taps + a.top_k);
  cf::centroid_decode(a, list, m, taps, w, threadIdx.x, blockDim.x);
  __syncthreads();
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d < a.D) out.weighted_sum[c * a.D + d] = cf::weighted_component<TF>(a, taps, w, m, d);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    out.weight_sum[c] = cf::class_wsum(list, m);
    out.kept[c] = m;
  }
}

// Block per class: mu from the (reduced) statistics, then the finish phases.
__global__ void __launch_bounds__(cf::kRedThreads) apply_kernel(cf::UpdateArgs a, const float* ws,
                                                                const float* wsum, const int64_t* kept, float* mu) {
  __shared__ float part[cf::kRedThreads];
  const int c = blockIdx.x;
  const int64_t n_before = a.counts[c * a.cs];
  const cf::ClassPlan plan = cf::class_plan_stats(kept[c], wsum[c], n_before, a.momentum);
  float* mu_row = mu + c * a.D;
  cf::stats_mu(a, plan, ws + c * a.D, wsum[c], mu_row, threadIdx.x, cf::kRedThreads);
  finish_row(a, plan, mu_row, c, n_before, part);
}

template <typename TC>
void launch_l1(const cf::SelectArgs& a, int64_t L1, uint64_t* keys, int64_t* counts, cudaStream_t st) {
  const size_t smem = cf::kL1Chunk * sizeof(uint64_t) + 2 * a.K * sizeof(int);
  l1_kernel<TC><<<static_cast<unsigned>(L1), cf::kSortThreads, smem, st>>>(a, keys, counts);
}

template <typename TF>
void launch_update(const cf::UpdateArgs& a, const uint64_t* lists, const int64_t* counts, float* mu,
                   cudaStream_t st) {
  const unsigned dblocks = static_cast<unsigned>((a.D + cf::kRedThreads - 1) / cf::kRedThreads);
  const size_t smem = a.top_k * (sizeof(cf::Tap) + sizeof(float));
  centroid_kernel<TF><<<dim3(a.K, dblocks), cf::kRedThreads, smem, st>>>(a, lists, counts, mu);
  finish_kernel<<<a.K, cf::kRedThreads, 0, st>>>(a, lists, counts, mu);
}

template <typename TF>
void launch_stats(const cf::UpdateArgs& a, const uint64_t* lists, const int64_t* counts, const cf::StatsOut& out,
                  cudaStream_t st) {
  const unsigned dblocks = static_cast<unsigned>((a.D + cf::kRedThreads - 1) / cf::kRedThreads);
  const size_t smem = a.top_k * (sizeof(cf::Tap) + sizeof(float));
  stats_kernel<TF><<<dim3(a.K, dblocks), cf::kRedThreads, smem, st>>>(a, lists, counts, out);
}

}  // namespace

namespace cf {

int launch_proto_update(const SelectArgs& select, int cam_dtype, const UpdateArgs* update, int feats_dtype,
                        int64_t* sel_idx, int64_t* sel_cnt, const StatsOut* stats, const CudaScratch& scratch,
                        void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int K = select.K, k = select.top_k;
  int64_t L1, L2;
  cuda_levels(select.N, k, &L1, &L2);
  if (!select.cam || cam_dtype == 0) launch_l1<float>(select, L1, scratch.keys_a, scratch.counts_a, st);
  else if (cam_dtype == 1) launch_l1<bf16_t>(select, L1, scratch.keys_a, scratch.counts_a, st);
  else launch_l1<f16_t>(select, L1, scratch.keys_a, scratch.counts_a, st);

  uint64_t* cur_keys = scratch.keys_a;
  int64_t* cur_counts = scratch.counts_a;
  uint64_t* next_keys = scratch.keys_b;
  int64_t* next_counts = scratch.counts_b;
  const int G = reduce_group(k);
  for (int64_t L = L1; L > 1;) {
    const int64_t Ln = (L + G - 1) / G;
    const int P = reduce_sort_size(G, L, k);
    reduce_kernel<<<dim3(static_cast<unsigned>(Ln), K), kSortThreads, P * sizeof(uint64_t), st>>>(
        cur_keys, cur_counts, L, K, k, G, P, next_keys, next_counts);
    uint64_t* tk = cur_keys;
    cur_keys = next_keys;
    next_keys = tk;
    int64_t* tc = cur_counts;
    cur_counts = next_counts;
    next_counts = tc;
    L = Ln;
  }
  if (sel_idx) select_kernel<<<K, kRedThreads, 0, st>>>(cur_keys, cur_counts, k, sel_idx, sel_cnt);
  if (update && stats) {
    if (feats_dtype == 0) launch_stats<float>(*update, cur_keys, cur_counts, *stats, st);
    else if (feats_dtype == 1) launch_stats<bf16_t>(*update, cur_keys, cur_counts, *stats, st);
    else launch_stats<f16_t>(*update, cur_keys, cur_counts, *stats, st);
  } else if (update) {
    if (feats_dtype == 0) launch_update<float>(*update, cur_keys, cur_counts, scratch.mu, st);
    else if (feats_dtype == 1) launch_update<bf16_t>(*update, cur_keys, cur_counts, scratch.mu, st);
    else launch_update<f16_t>(*update, cur_keys, cur_counts, scratch.mu, st);
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_proto_ema_apply(const UpdateArgs& table, const float* weighted_sum, const float* weight_sum,
                           const int64_t* kept, float* mu, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  apply_kernel<<<table.K, kRedThreads, 0, st>>>(table, weighted_sum, weight_sum, kept, mu);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cf
