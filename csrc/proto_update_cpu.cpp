// confeti_fast._C: the schemas of the prototype-update ops and their CPU kernels.
//
// Selection: pixel chunks in parallel, each keeping per-class top-k lists (cf::topk_insert),
// then per class the chunk lists are merged in chunk order (cf::topk_merge). The key is a total
// order, so the result does not depend on the chunking or the thread count.
// Update: per class, the CUDA block code of proto_update_core.h run with emulated threads, so
// the CPU and the GPU do the same float operations in the same order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "proto_update_torch.h"

namespace {

using cf::SelectArgs;
using cf::UpdateArgs;

constexpr int64_t kCpuChunk = 16384;  // pixels per parallel task

// Final per-class lists (K, top_k) as int64 storage of cf keys, and candidate counts (K,).
struct Selection {
  at::Tensor keys;
  at::Tensor counts;
};

uint64_t* key_ptr(const at::Tensor& t) { return reinterpret_cast<uint64_t*>(t.data_ptr<int64_t>()); }

template <typename TC>
Selection select_cpu(const SelectArgs& a, const at::Tensor& labels) {
  const int64_t K = a.K, k = a.top_k;
  const int64_t nch = std::max<int64_t>(1, (a.N + kCpuChunk - 1) / kCpuChunk);
  const auto i64 = labels.options().dtype(at::kLong);
  at::Tensor part = at::empty({nch, K, k}, i64);
  at::Tensor part_counts = at::zeros({nch, K}, i64);
  at::Tensor bad_label = at::empty({nch}, i64);  // per chunk: first out-of-range label, or 255
  uint64_t* part_p = key_ptr(part);
  int64_t* pc = part_counts.data_ptr<int64_t>();
  int64_t* bad_p = bad_label.data_ptr<int64_t>();
  const int64_t HW = a.H * a.W;

  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      uint64_t* lists = part_p + ch * K * k;
      int64_t* cnt = pc + ch * K;
      bad_p[ch] = cf::kIgnore;
      const int64_t p0 = ch * kCpuChunk, p1 = std::min(a.N, p0 + kCpuChunk);
      if (p0 >= p1) continue;
      int64_t b = p0 / HW, y = (p0 - b * HW) / a.W, x = p0 - b * HW - y * a.W;
      for (int64_t p = p0; p < p1; ++p) {
        bool bad = false;
        const int c = cf::pixel_class(a, b, y, x, &bad);
        if (bad && bad_p[ch] == cf::kIgnore) bad_p[ch] = a.labels[b * a.lb + y * a.ly + x * a.lx];
        if (c >= 0) {
          const float w = cf::pixel_weight<TC>(a, c, b, y, x);
          const int64_t n = cnt[c];
          cf::topk_insert(lists + c * k, static_cast<int>(std::min(n, k)), static_cast<int>(k),
                          cf::cand_key(w, static_cast<uint32_t>(p)));
          cnt[c] = n + 1;
        }
        if (++x == a.W) {
          x = 0;
          if (++y == a.H) {
            y = 0;
            ++b;
          }
        }
      }
    }
  });
  for (int64_t ch = 0; ch < nch; ++ch) {
    TORCH_CHECK(bad_p[ch] == cf::kIgnore, "labels must be in [0, ", K, ") or ", cf::kIgnore,
                " (ignored), found ", bad_p[ch]);
  }

  Selection s{at::empty({K, k}, i64), at::zeros({K}, i64)};
  uint64_t* out = key_ptr(s.keys);
  int64_t* out_n = s.counts.data_ptr<int64_t>();
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t c = k0; c < k1; ++c) {
      uint64_t* acc = out + c * k;
      int len = 0;
      int64_t n = 0;
      for (int64_t ch = 0; ch < nch; ++ch) {
        const int64_t m = pc[ch * K + c];
        n += m;
        len = cf::topk_merge(acc, len, part_p + (ch * K + c) * k, static_cast<int>(std::min(m, k)),
                             static_cast<int>(k));
      }
      std::fill(acc + len, acc + k, cf::kNoKey);
      out_n[c] = n;
    }
  });
  return s;
}

// The CUDA selection (level-1 chunk sorts, then reduce levels) with emulated blocks and
// threads; only for tests, which check that it equals select_cpu.
template <typename TC>
Selection select_cuda_emulated(const SelectArgs& a, const at::Tensor& labels) {
  const int K = a.K, k = a.top_k;
  const int T = cf::kSortThreads;
  const auto i64 = labels.options().dtype(at::kLong);
  int64_t L, L2;
  cf::cuda_levels(a.N, k, &L, &L2);
  at::Tensor keys = at::empty({L, K, k}, i64);
  at::Tensor counts = at::empty({L, K}, i64);
  at::parallel_for(0, L, 1, [&](int64_t c0, int64_t c1) {
    std::vector<uint64_t> sh(cf::kL1Chunk);
    std::vector<int> lo(K), hi(K);
    for (int64_t ch = c0; ch < c1; ++ch) {
      for (int t = 0; t < T; ++t) cf::l1_load<TC>(a, ch, sh.data(), lo.data(), hi.data(), t, T);
      for (int size = 2; size <= cf::kL1Chunk; size <<= 1)
        for (int stride = size / 2; stride > 0; stride >>= 1)
          for (int t = 0; t < T; ++t) cf::bitonic_pass(sh.data(), cf::kL1Chunk, size, stride, t, T);
      for (int t = 0; t < T; ++t) cf::l1_segments(sh.data(), K, lo.data(), hi.data(), t, T);
      for (int t = 0; t < T; ++t)
        cf::l1_emit(sh.data(), lo.data(), hi.data(), ch, K, k, key_ptr(keys), counts.data_ptr<int64_t>(), t, T);
    }
  });
  const int G = cf::reduce_group(k);
  while (L > 1) {
    const int64_t Ln = (L + G - 1) / G;
    const int P = cf::reduce_sort_size(G, L, k);
    at::Tensor nkeys = at::empty({Ln, K, k}, i64);
    at::Tensor ncounts = at::empty({Ln, K}, i64);
    std::vector<uint64_t> sh(P);
    for (int64_t g = 0; g < Ln; ++g) {
      for (int c = 0; c < K; ++c) {
        int64_t n = 0;
        for (int t = 0; t < T; ++t)
          cf::lr_load(key_ptr(keys), counts.data_ptr<int64_t>(), L, K, k, G, P, g, c, sh.data(), &n, t, T);
        for (int size = 2; size <= P; size <<= 1)
          for (int stride = size / 2; stride > 0; stride >>= 1)
            for (int t = 0; t < T; ++t) cf::bitonic_pass(sh.data(), P, size, stride, t, T);
        for (int t = 0; t < T; ++t)
          cf::lr_emit(sh.data(), n, g, K, k, c, key_ptr(nkeys), ncounts.data_ptr<int64_t>(), t, T);
      }
    }
    keys = nkeys;
    counts = ncounts;
    L = Ln;
  }
  return Selection{keys.view({K, k}), counts.view({K})};
}

template <template <typename> class Fn>
Selection dispatch_select(const SelectArgs& a, const std::optional<at::Tensor>& cam, const at::Tensor& labels) {
  const int tag = cam.has_value() ? cf::dtype_tag(*cam, "proto_update", "cam") : cf::kF32;
  if (tag == cf::kBF16) return Fn<cf::bf16_t>::run(a, labels);
  if (tag == cf::kF16) return Fn<cf::f16_t>::run(a, labels);
  return Fn<float>::run(a, labels);
}

template <typename TC>
struct SelectCpu {
  static Selection run(const SelectArgs& a, const at::Tensor& l) { return select_cpu<TC>(a, l); }
};
template <typename TC>
struct SelectEmulated {
  static Selection run(const SelectArgs& a, const at::Tensor& l) { return select_cuda_emulated<TC>(a, l); }
};

// The finish block of class c with emulated threads: |mu|, EMA, row normalization, count.
void finish_cpu(const UpdateArgs& a, const cf::ClassPlan& plan, const float* mu_row, int64_t c, int64_t n_before) {
  const int T = cf::kRedThreads;
  float part[cf::kRedThreads];
  for (int t = 0; t < T; ++t) part[t] = cf::finish_mu_sumsq(a, plan, mu_row, t, T);
  for (int st = T / 2; st > 0; st >>= 1)
    for (int t = 0; t < st; ++t) cf::tree_step(part, st, t);
  const float mu_norm = cf::norm_denominator(part[0]);
  for (int t = 0; t < T; ++t) part[t] = cf::finish_ema(a, plan, mu_row, mu_norm, static_cast<int>(c), t, T);
  for (int st = T / 2; st > 0; st >>= 1)
    for (int t = 0; t < st; ++t) cf::tree_step(part, st, t);
  const float row_norm = cf::norm_denominator(part[0]);
  for (int t = 0; t < T; ++t) cf::finish_normalize(a, row_norm, static_cast<int>(c), t, T);
  if (plan.present) a.counts[c * a.cs] = n_before + plan.kept;
}

// The per-class update: the CUDA centroid and finish blocks, threads emulated in a loop.
template <typename TF>
void update_cpu(const UpdateArgs& a, const Selection& s) {
  const int64_t K = a.K, k = a.top_k, D = a.D;
  const uint64_t* keys = key_ptr(s.keys);
  const int64_t* ncand = s.counts.data_ptr<int64_t>();
  at::Tensor mu = at::empty({K, D}, s.counts.options().dtype(at::kFloat));
  float* mu_p = mu.data_ptr<float>();
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<cf::Tap> taps(k);
    std::vector<float> w(k);
    for (int64_t c = k0; c < k1; ++c) {
      const uint64_t* list = keys + c * k;
      const int64_t n_before = a.counts[c * a.cs];
      const cf::ClassPlan plan = cf::class_plan(a, list, ncand[c], n_before);
      float* mu_row = mu_p + c * D;
      if (plan.update) {  // centroid blocks
        const int m = static_cast<int>(plan.kept);
        cf::centroid_decode(a, list, m, taps.data(), w.data(), 0, 1);
        const float wsum = cf::class_wsum(list, m);
        for (int64_t d = 0; d < D; ++d) mu_row[d] = cf::centroid_component<TF>(a, taps.data(), w.data(), m, wsum, d);
      }
      finish_cpu(a, plan, mu_row, c, n_before);
    }
  });
}

// Per-class statistics of the selection (the CUDA stats blocks): weighted_sum (K, D),
// weight_sum (K,), kept (K,), contiguous; the sums in list order, as update_cpu's.
template <typename TF>
void stats_cpu(const UpdateArgs& a, const Selection& s, float* ws, float* wsum, int64_t* kept) {
  const int64_t K = a.K, k = a.top_k, D = a.D;
  const uint64_t* keys = key_ptr(s.keys);
  const int64_t* ncand = s.counts.data_ptr<int64_t>();
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<cf::Tap> taps(k);
    std::vector<float> w(k);
    for (int64_t c = k0; c < k1; ++c) {
      const uint64_t* list = keys + c * k;
      const int m = cf::kept_count(ncand[c], static_cast<int>(k));
      cf::centroid_decode(a, list, m, taps.data(), w.data(), 0, 1);
      for (int64_t d = 0; d < D; ++d) ws[c * D + d] = cf::weighted_component<TF>(a, taps.data(), w.data(), m, d);
      wsum[c] = cf::class_wsum(list, m);
      kept[c] = m;
    }
  });
}

// The EMA from (reduced) statistics: per class the stats_mu phase, then the finish block.
void apply_cpu(const UpdateArgs& a, const cf::StatsIn& st) {
  const int64_t K = a.K, D = a.D;
  const float* ws = st.weighted_sum.data_ptr<float>();
  const float* wsum = st.weight_sum.data_ptr<float>();
  const int64_t* kept = st.kept.data_ptr<int64_t>();
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> mu(D);
    for (int64_t c = k0; c < k1; ++c) {
      const int64_t n_before = a.counts[c * a.cs];
      const cf::ClassPlan plan = cf::class_plan_stats(kept[c], wsum[c], n_before, a.momentum);
      cf::stats_mu(a, plan, ws + c * D, wsum[c], mu.data(), 0, 1);
      finish_cpu(a, plan, mu.data(), c, n_before);
    }
  });
}

void dispatch_update(const UpdateArgs& a, const at::Tensor& feats, const Selection& s) {
  const int tag = cf::dtype_tag(feats, "proto_ema_update_", "feats");
  if (tag == cf::kBF16) update_cpu<cf::bf16_t>(a, s);
  else if (tag == cf::kF16) update_cpu<cf::f16_t>(a, s);
  else update_cpu<float>(a, s);
}

void dispatch_stats(const UpdateArgs& a, const at::Tensor& feats, const Selection& s, float* ws, float* wsum,
                    int64_t* kept) {
  const int tag = cf::dtype_tag(feats, "proto_class_stats", "feats");
  if (tag == cf::kBF16) stats_cpu<cf::bf16_t>(a, s, ws, wsum, kept);
  else if (tag == cf::kF16) stats_cpu<cf::f16_t>(a, s, ws, wsum, kept);
  else stats_cpu<float>(a, s, ws, wsum, kept);
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ", t.device());
}

void proto_ema_update_cpu(at::Tensor prototypes, at::Tensor counts, const at::Tensor& feats,
                          const std::optional<at::Tensor>& cam, const at::Tensor& labels,
                          const std::optional<at::Tensor>& valid, double momentum, int64_t top_k) {
  const char* op = "proto_ema_update_";
  check_cpu(labels, op, "labels");
  const UpdateArgs ua = cf::update_args(prototypes, counts, feats, labels, momentum, top_k, op);
  const SelectArgs sa = cf::select_args(cam, labels, valid, prototypes.size(0), top_k, op);
  const Selection s = dispatch_select<SelectCpu>(sa, cam, labels);
  dispatch_update(ua, feats, s);
}

at::Tensor selected_indices(const Selection& s, int64_t K, int64_t k, at::Tensor& cand_counts) {
  at::Tensor idx = at::empty({K, k}, s.counts.options());
  cand_counts = at::empty({K}, s.counts.options());
  for (int c = 0; c < K; ++c)
    cf::select_emit(key_ptr(s.keys) + c * k, s.counts.data_ptr<int64_t>()[c], static_cast<int>(k), c,
                    idx.data_ptr<int64_t>(), cand_counts.data_ptr<int64_t>(), 0, 1);
  return idx;
}

std::tuple<at::Tensor, at::Tensor> proto_select_cpu(const std::optional<at::Tensor>& cam, const at::Tensor& labels,
                                                    const std::optional<at::Tensor>& valid, int64_t num_classes,
                                                    int64_t top_k) {
  const char* op = "proto_select";
  check_cpu(labels, op, "labels");
  const SelectArgs sa = cf::select_args(cam, labels, valid, num_classes, top_k, op);
  const Selection s = dispatch_select<SelectCpu>(sa, cam, labels);
  at::Tensor n;
  at::Tensor idx = selected_indices(s, num_classes, top_k, n);
  return {idx, n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_class_stats_cpu(const at::Tensor& feats,
                                                                     const std::optional<at::Tensor>& cam,
                                                                     const at::Tensor& labels,
                                                                     const std::optional<at::Tensor>& valid,
                                                                     int64_t num_classes, int64_t top_k) {
  const char* op = "proto_class_stats";
  check_cpu(labels, op, "labels");
  const SelectArgs sa = cf::select_args(cam, labels, valid, num_classes, top_k, op);
  UpdateArgs fa{};
  cf::feats_args(fa, feats, labels, -1, num_classes, top_k, op);
  const Selection s = dispatch_select<SelectCpu>(sa, cam, labels);
  const auto f32 = feats.options().dtype(at::kFloat);
  at::Tensor ws = at::empty({num_classes, fa.D}, f32);
  at::Tensor wsum = at::empty({num_classes}, f32);
  at::Tensor kept = at::empty({num_classes}, labels.options().dtype(at::kLong));
  dispatch_stats(fa, feats, s, ws.data_ptr<float>(), wsum.data_ptr<float>(), kept.data_ptr<int64_t>());
  return {ws, wsum, kept};
}

void proto_ema_apply_cpu(at::Tensor prototypes, at::Tensor counts, const at::Tensor& weighted_sum,
                         const at::Tensor& weight_sum, const at::Tensor& kept, double momentum) {
  const char* op = "proto_ema_apply_";
  check_cpu(prototypes, op, "prototypes");
  UpdateArgs ta{};
  cf::table_args(ta, prototypes, counts, momentum, op);
  const cf::StatsIn st = cf::stats_args(ta, prototypes, weighted_sum, weight_sum, kept, op);
  apply_cpu(ta, st);
}

// Test hook: the CUDA algorithm run on the CPU, functional (returns new tensors).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulate_cuda_cpu(
    const at::Tensor& prototypes, const at::Tensor& counts, const at::Tensor& feats,
    const std::optional<at::Tensor>& cam, const at::Tensor& labels, const std::optional<at::Tensor>& valid,
    double momentum, int64_t top_k) {
  const char* op = "_emulate_cuda_proto_update";
  check_cpu(labels, op, "labels");
  at::Tensor p = prototypes.clone();
  at::Tensor n = counts.clone();
  const UpdateArgs ua = cf::update_args(p, n, feats, labels, momentum, top_k, op);
  const SelectArgs sa = cf::select_args(cam, labels, valid, prototypes.size(0), top_k, op);
  const Selection s = dispatch_select<SelectEmulated>(sa, cam, labels);
  at::Tensor cand;
  at::Tensor idx = selected_indices(s, prototypes.size(0), top_k, cand);
  dispatch_update(ua, feats, s);
  return {p, n, idx, cand};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(confeti_fast, m) {
  m.def(
      "proto_ema_update_(Tensor(a!) prototypes, Tensor(b!) counts, Tensor feats, Tensor? cam, Tensor labels, "
      "Tensor? valid, float momentum, int top_k) -> ()");
  m.def("proto_select(Tensor? cam, Tensor labels, Tensor? valid, int num_classes, int top_k) -> (Tensor, Tensor)");
  // The DDP path: per-rank class statistics, a cross-rank SUM (by the caller), then the EMA.
  m.def(
      "proto_class_stats(Tensor feats, Tensor? cam, Tensor labels, Tensor? valid, int num_classes, int top_k) "
      "-> (Tensor weighted_sum, Tensor weight_sum, Tensor kept)");
  m.def(
      "proto_ema_apply_(Tensor(a!) prototypes, Tensor(b!) counts, Tensor weighted_sum, Tensor weight_sum, "
      "Tensor kept, float momentum) -> ()");
  m.def(
      "_emulate_cuda_proto_update(Tensor prototypes, Tensor counts, Tensor feats, Tensor? cam, Tensor labels, "
      "Tensor? valid, float momentum, int top_k) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(confeti_fast, CPU, m) {
  m.impl("proto_ema_update_", &proto_ema_update_cpu);
  m.impl("proto_select", &proto_select_cpu);
  m.impl("proto_class_stats", &proto_class_stats_cpu);
  m.impl("proto_ema_apply_", &proto_ema_apply_cpu);
  m.impl("_emulate_cuda_proto_update", &emulate_cuda_cpu);
}

// A plain extension module: importing confeti_fast._C runs the registrations above.
#define CF_CONCAT_(a, b) a##b
#define CF_CONCAT(a, b) CF_CONCAT_(a, b)
static PyModuleDef cf_module = {PyModuleDef_HEAD_INIT, "confeti_fast._C", nullptr, -1, nullptr};
PyMODINIT_FUNC CF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&cf_module); }
