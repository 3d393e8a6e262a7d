// Torch-side argument checks shared by the CPU and the CUDA bindings of the prototype update:
// validate the tensors (messages name the argument) and turn them into the raw-pointer
// structs of proto_update_core.h.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "proto_update_core.h"

namespace cf {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline int dtype_tag(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return kF32;
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but labels are on ",
              ref.device());
}

inline SelectArgs select_args(const std::optional<at::Tensor>& cam, const at::Tensor& labels,
                              const std::optional<at::Tensor>& valid, int64_t K, int64_t top_k, const char* op) {
  TORCH_CHECK(labels.dim() == 3, op, ": labels must be (B, H, W), got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(K >= 1 && K <= kMaxClasses, op, ": the number of classes must be in [1, ", kMaxClasses, "], got ", K);
  TORCH_CHECK(top_k >= 1, op, ": top_k must be >= 1, got ", top_k);
  TORCH_CHECK(top_k <= (int64_t{1} << 30), op, ": top_k is too large: ", top_k);
  SelectArgs a{};
  a.B = labels.size(0);
  a.H = labels.size(1);
  a.W = labels.size(2);
  a.N = a.B * a.H * a.W;
  TORCH_CHECK(a.N < (int64_t{1} << 32), op, ": labels have ", a.N, " pixels; at most 2^32 - 1 are supported");
  a.labels = labels.data_ptr<int64_t>();
  a.lb = labels.stride(0);
  a.ly = labels.stride(1);
  a.lx = labels.stride(2);
  a.K = static_cast<int32_t>(K);
  a.top_k = static_cast<int32_t>(top_k);
  if (valid.has_value()) {
    const at::Tensor& v = *valid;
    TORCH_CHECK(v.scalar_type() == at::kBool, op, ": valid must be bool, got ", v.scalar_type());
    TORCH_CHECK(v.sizes() == labels.sizes(), op, ": valid must have the shape of labels ", labels.sizes(),
                ", got ", v.sizes());
    check_device(v, labels, op, "valid");
    a.valid = reinterpret_cast<const uint8_t*>(v.data_ptr<bool>());
    a.vb = v.stride(0);
    a.vy = v.stride(1);
    a.vx = v.stride(2);
  }
  if (cam.has_value()) {
    const at::Tensor& c = *cam;
    TORCH_CHECK(c.dim() == 4, op, ": cam must be (B, K, h, w), got shape ", c.sizes());
    dtype_tag(c, op, "cam");
    TORCH_CHECK(c.size(0) == a.B, op, ": cam has batch ", c.size(0), " but labels have ", a.B);
    TORCH_CHECK(c.size(1) == K, op, ": cam has ", c.size(1), " channels but there are ", K, " classes");
    TORCH_CHECK(c.size(2) >= 1 && c.size(3) >= 1, op, ": cam must have a non-empty spatial size, got ", c.sizes());
    check_device(c, labels, op, "cam");
    a.cam = c.data_ptr();
    a.cb = c.stride(0);
    a.cc = c.stride(1);
    a.cy = c.stride(2);
    a.cx = c.stride(3);
    a.hc = c.size(2);
    a.wc = c.size(3);
    a.cscale_y = src_scale(a.hc, a.H);
    a.cscale_x = src_scale(a.wc, a.W);
  }
  return a;
}

// The prototype table: prototypes (K, D) float32 and counts (K,) int64, both written in place.
inline void table_args(UpdateArgs& a, const at::Tensor& prototypes, const at::Tensor& counts, double momentum,
                       const char* op) {
  TORCH_CHECK(prototypes.dim() == 2, op, ": prototypes must be (K, D), got shape ", prototypes.sizes());
  TORCH_CHECK(prototypes.scalar_type() == at::kFloat, op, ": prototypes must be float32, got ",
              prototypes.scalar_type());
  TORCH_CHECK(prototypes.size(1) >= 1, op, ": prototypes must have D >= 1, got shape ", prototypes.sizes());
  TORCH_CHECK(at::has_internal_overlap(prototypes) != at::MemOverlap::Yes, op,
              ": prototypes is updated in place and must not have overlapping elements");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == prototypes.size(0), op, ": counts must be (K,) = (",
              prototypes.size(0), ",), got shape ", counts.sizes());
  TORCH_CHECK(counts.scalar_type() == at::kLong, op, ": counts must be int64, got ", counts.scalar_type());
  TORCH_CHECK(at::has_internal_overlap(counts) != at::MemOverlap::Yes, op,
              ": counts is updated in place and must not have overlapping elements");
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, op, ": momentum must be in [0, 1], got ", momentum);
  TORCH_CHECK(counts.device() == prototypes.device(), op, ": counts is on ", counts.device(),
              " but prototypes are on ", prototypes.device());
  a.protos = prototypes.data_ptr<float>();
  a.ps0 = prototypes.stride(0);
  a.ps1 = prototypes.stride(1);
  a.counts = counts.data_ptr<int64_t>();
  a.cs = counts.stride(0);
  a.D = prototypes.size(1);
  a.K = static_cast<int32_t>(prototypes.size(0));
  a.momentum = momentum;
}

// The features (B, D, h, w) sampled at the label resolution. D < 0: any D (taken from feats).
inline void feats_args(UpdateArgs& a, const at::Tensor& feats, const at::Tensor& labels, int64_t D, int64_t K,
                       int64_t top_k, const char* op) {
  TORCH_CHECK(labels.dim() == 3, op, ": labels must be (B, H, W), got shape ", labels.sizes());
  TORCH_CHECK(feats.dim() == 4, op, ": feats must be (B, D, h, w), got shape ", feats.sizes());
  dtype_tag(feats, op, "feats");
  TORCH_CHECK(feats.size(0) == labels.size(0), op, ": feats has batch ", feats.size(0), " but labels have ",
              labels.size(0));
  if (D >= 0) {
    TORCH_CHECK(feats.size(1) == D, op, ": feats has ", feats.size(1), " channels but prototypes have D = ", D);
  }
  TORCH_CHECK(feats.size(1) >= 1, op, ": feats must have D >= 1 channels, got shape ", feats.sizes());
  TORCH_CHECK(feats.size(2) >= 1 && feats.size(3) >= 1, op, ": feats must have a non-empty spatial size, got ",
              feats.sizes());
  check_device(feats, labels, op, "feats");
  a.feats = feats.data_ptr();
  a.fb = feats.stride(0);
  a.fd = feats.stride(1);
  a.fy = feats.stride(2);
  a.fx = feats.stride(3);
  a.hf = feats.size(2);
  a.wf = feats.size(3);
  a.H = labels.size(1);
  a.W = labels.size(2);
  a.fscale_y = src_scale(a.hf, a.H);
  a.fscale_x = src_scale(a.wf, a.W);
  a.D = feats.size(1);
  a.K = static_cast<int32_t>(K);
  a.top_k = static_cast<int32_t>(top_k);
}

inline UpdateArgs update_args(const at::Tensor& prototypes, const at::Tensor& counts, const at::Tensor& feats,
                              const at::Tensor& labels, double momentum, int64_t top_k, const char* op) {
  TORCH_CHECK(labels.dim() == 3, op, ": labels must be (B, H, W), got shape ", labels.sizes());
  UpdateArgs a{};
  table_args(a, prototypes, counts, momentum, op);
  check_device(prototypes, labels, op, "prototypes");
  feats_args(a, feats, labels, prototypes.size(1), prototypes.size(0), top_k, op);
  return a;
}

// Class statistics (K, D) float32, (K,) float32, (K,) int64 on the table's device, for the EMA
// apply; made contiguous (their layout is then the kernels').
struct StatsIn {
  at::Tensor weighted_sum, weight_sum, kept;
};

inline StatsIn stats_args(const UpdateArgs& table, const at::Tensor& prototypes, const at::Tensor& weighted_sum,
                          const at::Tensor& weight_sum, const at::Tensor& kept, const char* op) {
  const int64_t K = table.K, D = table.D;
  TORCH_CHECK(weighted_sum.dim() == 2 && weighted_sum.size(0) == K && weighted_sum.size(1) == D, op,
              ": weighted_sum must be (K, D) = (", K, ", ", D, "), got shape ", weighted_sum.sizes());
  TORCH_CHECK(weighted_sum.scalar_type() == at::kFloat, op, ": weighted_sum must be float32, got ",
              weighted_sum.scalar_type());
  TORCH_CHECK(weight_sum.dim() == 1 && weight_sum.size(0) == K, op, ": weight_sum must be (K,) = (", K,
              ",), got shape ", weight_sum.sizes());
  TORCH_CHECK(weight_sum.scalar_type() == at::kFloat, op, ": weight_sum must be float32, got ",
              weight_sum.scalar_type());
  TORCH_CHECK(kept.dim() == 1 && kept.size(0) == K, op, ": kept must be (K,) = (", K, ",), got shape ",
              kept.sizes());
  TORCH_CHECK(kept.scalar_type() == at::kLong, op, ": kept must be int64, got ", kept.scalar_type());
  const auto same_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == prototypes.device(), op, ": ", name, " is on ", t.device(), " but prototypes are on ",
                prototypes.device());
  };
  same_device(weighted_sum, "weighted_sum");
  same_device(weight_sum, "weight_sum");
  same_device(kept, "kept");
  return {weighted_sum.contiguous(), weight_sum.contiguous(), kept.contiguous()};
}

}  // namespace cf
