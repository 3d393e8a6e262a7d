// confeti_fast._C_cuda: CUDA implementations of the ops defined by confeti_fast._C. Checks the
// tensors, allocates the scratch (~2 MB at 2 x 640 x 640, K = 19) through torch's caching
// allocator and enqueues the kernels of proto_update_kernels.cu on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "proto_update_torch.h"

namespace {

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor here, got ", t.device());
}

struct Scratch {
  at::Tensor keys_a, counts_a, keys_b, counts_b, mu;
  cf::CudaScratch ptrs{};
};

Scratch make_scratch(const cf::SelectArgs& a, int64_t D, const at::Tensor& like) {
  int64_t L1, L2;
  cf::cuda_levels(a.N, a.top_k, &L1, &L2);
  const auto i64 = like.options().dtype(at::kLong);
  Scratch s;
  s.keys_a = at::empty({L1 * a.K * a.top_k}, i64);
  s.counts_a = at::empty({L1 * a.K}, i64);
  s.ptrs.keys_a = reinterpret_cast<uint64_t*>(s.keys_a.data_ptr<int64_t>());
  s.ptrs.counts_a = s.counts_a.data_ptr<int64_t>();
  if (L2 > 0) {
    s.keys_b = at::empty({L2 * a.K * a.top_k}, i64);
    s.counts_b = at::empty({L2 * a.K}, i64);
    s.ptrs.keys_b = reinterpret_cast<uint64_t*>(s.keys_b.data_ptr<int64_t>());
    s.ptrs.counts_b = s.counts_b.data_ptr<int64_t>();
  }
  if (D > 0) {
    s.mu = at::empty({a.K * D}, like.options().dtype(at::kFloat));
    s.ptrs.mu = s.mu.data_ptr<float>();
  }
  return s;
}

void check_top_k(int64_t top_k, const char* op) {
  TORCH_CHECK(top_k <= cf::kCudaMaxTopK, op, ": the CUDA kernel supports top_k <= ", cf::kCudaMaxTopK, ", got ",
              top_k);
}

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void launch(const cf::SelectArgs& sa, const std::optional<at::Tensor>& cam, const cf::UpdateArgs* ua,
            const at::Tensor* feats, int64_t* sel_idx, int64_t* sel_cnt, const Scratch& s, const char* op,
            const cf::StatsOut* stats = nullptr) {
  const int cam_tag = cam.has_value() ? cf::dtype_tag(*cam, op, "cam") : cf::kF32;
  const int feats_tag = feats ? cf::dtype_tag(*feats, op, "feats") : cf::kF32;
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(cf::launch_proto_update(sa, cam_tag, ua, feats_tag, sel_idx, sel_cnt, stats, s.ptrs, stream), op);
}

void proto_ema_update_cuda(at::Tensor prototypes, at::Tensor counts, const at::Tensor& feats,
                           const std::optional<at::Tensor>& cam, const at::Tensor& labels,
                           const std::optional<at::Tensor>& valid, double momentum, int64_t top_k) {
  const char* op = "proto_ema_update_";
  check_cuda(labels, op, "labels");
  check_top_k(top_k, op);
  const c10::cuda::CUDAGuard guard(labels.device());
  const cf::UpdateArgs ua = cf::update_args(prototypes, counts, feats, labels, momentum, top_k, op);
  const cf::SelectArgs sa = cf::select_args(cam, labels, valid, prototypes.size(0), top_k, op);
  const Scratch s = make_scratch(sa, ua.D, labels);
  launch(sa, cam, &ua, &feats, nullptr, nullptr, s, op);
}

std::tuple<at::Tensor, at::Tensor> proto_select_cuda(const std::optional<at::Tensor>& cam, const at::Tensor& labels,
                                                     const std::optional<at::Tensor>& valid, int64_t num_classes,
                                                     int64_t top_k) {
  const char* op = "proto_select";
  check_cuda(labels, op, "labels");
  check_top_k(top_k, op);
  const c10::cuda::CUDAGuard guard(labels.device());
  const cf::SelectArgs sa = cf::select_args(cam, labels, valid, num_classes, top_k, op);
  const Scratch s = make_scratch(sa, 0, labels);
  at::Tensor idx = at::empty({num_classes, top_k}, labels.options().dtype(at::kLong));
  at::Tensor cand = at::empty({num_classes}, labels.options().dtype(at::kLong));
  launch(sa, cam, nullptr, nullptr, idx.data_ptr<int64_t>(), cand.data_ptr<int64_t>(), s, op);
  return {idx, cand};
}

// Outputs are written for every class by the kernels; nothing here reads device memory, so the
// host never waits.
std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_class_stats_cuda(const at::Tensor& feats,
                                                                      const std::optional<at::Tensor>& cam,
                                                                      const at::Tensor& labels,
                                                                      const std::optional<at::Tensor>& valid,
                                                                      int64_t num_classes, int64_t top_k) {
  const char* op = "proto_class_stats";
  check_cuda(labels, op, "labels");
  check_top_k(top_k, op);
  const c10::cuda::CUDAGuard guard(labels.device());
  const cf::SelectArgs sa = cf::select_args(cam, labels, valid, num_classes, top_k, op);
  cf::UpdateArgs fa{};
  cf::feats_args(fa, feats, labels, -1, num_classes, top_k, op);
  const Scratch s = make_scratch(sa, 0, labels);
  const auto f32 = feats.options().dtype(at::kFloat);
  at::Tensor ws = at::empty({num_classes, fa.D}, f32);
  at::Tensor wsum = at::empty({num_classes}, f32);
  at::Tensor kept = at::empty({num_classes}, labels.options().dtype(at::kLong));
  const cf::StatsOut out{ws.data_ptr<float>(), wsum.data_ptr<float>(), kept.data_ptr<int64_t>()};
  launch(sa, cam, &fa, &feats, nullptr, nullptr, s, op, &out);
  return {ws, wsum, kept};
}

void proto_ema_apply_cuda(at::Tensor prototypes, at::Tensor counts, const at::Tensor& weighted_sum,
                          const at::Tensor& weight_sum, const at::Tensor& kept, double momentum) {
  const char* op = "proto_ema_apply_";
  check_cuda(prototypes, op, "prototypes");
  const c10::cuda::CUDAGuard guard(prototypes.device());
  cf::UpdateArgs ta{};
  cf::table_args(ta, prototypes, counts, momentum, op);
  const cf::StatsIn st = cf::stats_args(ta, prototypes, weighted_sum, weight_sum, kept, op);
  if (ta.K == 0) return;  // an empty grid is a launch error
  at::Tensor mu = at::empty({ta.K, ta.D}, prototypes.options());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(cf::launch_proto_ema_apply(ta, st.weighted_sum.data_ptr<float>(), st.weight_sum.data_ptr<float>(),
                                          st.kept.data_ptr<int64_t>(), mu.data_ptr<float>(), stream),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(confeti_fast, CUDA, m) {
  m.impl("proto_ema_update_", &proto_ema_update_cuda);
  m.impl("proto_select", &proto_select_cuda);
  m.impl("proto_class_stats", &proto_class_stats_cuda);
  m.impl("proto_ema_apply_", &proto_ema_apply_cuda);
}

// A plain extension module: importing confeti_fast._C_cuda runs the registration above.
#define CF_CONCAT_(a, b) a##b
#define CF_CONCAT(a, b) CF_CONCAT_(a, b)
static PyModuleDef cf_module = {PyModuleDef_HEAD_INIT, "confeti_fast._C_cuda", nullptr, -1, nullptr};
PyMODINIT_FUNC CF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&cf_module); }
