#pragma once

// Argument validation and layout computation shared by the CPU and CUDA wrappers (g++ only:
// this header pulls in ATen). Every message names the offending argument.

#include <ATen/ATen.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <string>
#include <string_view>

#include "stencil_layout.h"

namespace fdsm {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name,
              " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
              t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D with shape ", shape, ", got shape ",
              t.sizes());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_projections(int64_t n_projections) {
  TORCH_CHECK(n_projections >= 1, "n_projections must be >= 1, got ", n_projections);
}

inline void check_offsets(at::ArrayRef<double> offsets) {
  TORCH_CHECK(!offsets.empty(), "offsets must not be empty");
  TORCH_CHECK(offsets.size() <= static_cast<size_t>(kMaxOffsets), "offsets may hold at most ",
              kMaxOffsets, " values, got ", offsets.size());
  for (double g : offsets) {
    TORCH_CHECK(std::isfinite(g), "offsets must be finite, got ", g);
  }
}

inline StencilLayout make_layout(at::ArrayRef<double> offsets, int64_t batch, int64_t n_proj) {
  check_offsets(offsets);
  StencilLayout L{};
  L.n_offsets = static_cast<int>(offsets.size());
  L.batch = batch;
  L.n_proj = n_proj;
  int64_t row = 0;
  for (int k = 0; k < L.n_offsets; ++k) {
    L.gamma[k] = offsets[k];
    L.start[k] = row;
    row += block_rows(L, k);
  }
  L.total_rows = row;
  return L;
}

// Blocks per sample: 1 for a zero offset, P for any other.
inline int64_t blocks_per_sample(at::ArrayRef<double> offsets, int64_t n_proj) {
  int64_t n = 0;
  for (double g : offsets) n += g == 0.0 ? 1 : n_proj;
  return n;
}

inline Noise parse_noise(std::string_view noise) {
  if (noise == "sphere") return Noise::Sphere;
  if (noise == "gaussian") return Noise::Gaussian;
  if (noise == "rademacher") return Noise::Rademacher;
  TORCH_CHECK(false, "noise must be one of 'sphere', 'gaussian', 'rademacher', got '",
              std::string(noise), "'");
}

inline void check_seed(const at::Tensor& seed, const at::Tensor& x) {
  TORCH_CHECK(seed.scalar_type() == at::kLong, "seed must be an int64 tensor of shape (1,), got ",
              seed.scalar_type());
  TORCH_CHECK(seed.numel() == 1, "seed must be an int64 tensor of shape (1,), got shape ",
              seed.sizes());
  TORCH_CHECK(seed.device() == x.device(), "seed must be on the same device as x (",
              x.device(), "), got ", seed.device(),
              "; create it with fdsm_ext.draw_seed(x.device)");
}

// Accumulation dtype of the FD reductions: float32 for 16-bit inputs, else the input's.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}


// ---- per-op validation, identical for every device --------------------------------------

inline StencilLayout check_stencil_batch(const at::Tensor& x, const at::Tensor& v,
                                         at::ArrayRef<double> offsets) {
  check_floating(x, "x");
  check_dim(x, 2, "x", "(B, d)");
  check_dim(v, 2, "v", "(P*B, d)");
  check_same(v, x, "v", "x");
  const int64_t batch = x.size(0);
  TORCH_CHECK(batch >= 1, "x must have at least one row, got shape ", x.sizes());
  TORCH_CHECK(v.size(1) == x.size(1), "v must have as many columns as x (", x.size(1),
              "), got shape ", v.sizes());
  TORCH_CHECK(v.size(0) >= batch && v.size(0) % batch == 0,
              "v must have P*B rows (a positive multiple of x's ", batch, " rows), got ",
              v.size(0));
  return make_layout(offsets, batch, v.size(0) / batch);
}

inline StencilLayout check_random_stencil_batch(const at::Tensor& x, const at::Tensor& seed,
                                                at::ArrayRef<double> offsets,
                                                int64_t n_projections, double eps) {
  check_floating(x, "x");
  check_dim(x, 2, "x", "(B, d)");
  TORCH_CHECK(x.size(0) >= 1 && x.size(1) >= 1, "x must have shape (B, d) with B, d >= 1, got ",
              x.sizes());
  check_seed(seed, x);
  check_projections(n_projections);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "eps must be a finite number > 0, got ", eps);
  return make_layout(offsets, x.size(0), n_projections);
}

inline StencilLayout check_stencil_batch_backward(const at::Tensor& grad,
                                                  at::ArrayRef<double> offsets,
                                                  int64_t n_projections) {
  check_floating(grad, "grad");
  check_dim(grad, 2, "grad", "(rows of the stencil batch, d)");
  check_projections(n_projections);
  check_offsets(offsets);
  const int64_t per_sample = blocks_per_sample(offsets, n_projections);
  TORCH_CHECK(grad.size(0) >= per_sample && grad.size(0) % per_sample == 0, "grad must have ",
              per_sample, "*B rows for these offsets and n_projections, got ", grad.size(0));
  return make_layout(offsets, grad.size(0) / per_sample, n_projections);
}

inline void check_weights(at::ArrayRef<double> weights) {
  TORCH_CHECK(!weights.empty(), "weights must not be empty");
  TORCH_CHECK(weights.size() <= static_cast<size_t>(kMaxOffsets), "weights may hold at most ",
              kMaxOffsets, " values, got ", weights.size());
  for (double w : weights) TORCH_CHECK(std::isfinite(w), "weights must be finite, got ", w);
}

inline void check_fd_combine(const at::Tensor& y, at::ArrayRef<double> weights) {
  check_floating(y, "y");
  check_weights(weights);
  TORCH_CHECK(y.dim() >= 1, "y must have shape (K*B, ...), got a 0-D tensor");
  const int64_t k = static_cast<int64_t>(weights.size());
  TORCH_CHECK(y.size(0) >= k && y.size(0) % k == 0, "y must have K*B rows with K = len(weights) = ",
              k, ", got ", y.size(0), " rows");
}

inline void check_fd_combine_backward(const at::Tensor& grad, at::ArrayRef<double> weights) {
  check_floating(grad, "grad");
  check_weights(weights);
  TORCH_CHECK(grad.dim() >= 1, "grad must have shape (B, ...), got a 0-D tensor");
}

inline int64_t check_fd_ssm_scalar(const at::Tensor& f, int64_t n_projections) {
  check_floating(f, "f");
  check_dim(f, 1, "f", "((1 + 2P) * B,)");
  check_projections(n_projections);
  const int64_t blocks = 1 + 2 * n_projections;
  TORCH_CHECK(f.size(0) >= blocks && f.size(0) % blocks == 0, "f must have (1 + 2P)*B = ",
              blocks, "*B entries, got ", f.size(0));
  return f.size(0) / blocks;
}

inline void check_reduction_grad(const at::Tensor& grad, const at::Tensor& ref, int64_t batch,
                                 const char* ref_name) {
  check_floating(grad, "grad");
  check_dim(grad, 1, "grad", "(B,)");
  TORCH_CHECK(grad.size(0) == batch, "grad must have B = ", batch, " entries (from ", ref_name,
              "), got ", grad.size(0));
  TORCH_CHECK(grad.device() == ref.device(), "grad must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", grad.device());
}

inline int64_t check_fd_ssm_score(const at::Tensor& s, const at::Tensor& v,
                                  int64_t n_projections) {
  check_floating(s, "s");
  check_dim(s, 2, "s", "(2*P*B, d)");
  check_dim(v, 2, "v", "(P*B, d)");
  check_same(v, s, "v", "s");
  check_projections(n_projections);
  TORCH_CHECK(v.size(0) >= n_projections && v.size(0) % n_projections == 0,
              "v must have P*B rows with P = n_projections = ", n_projections, ", got ",
              v.size(0));
  TORCH_CHECK(s.size(0) == 2 * v.size(0) && s.size(1) == v.size(1),
              "s must have shape (2*P*B, d) = (", 2 * v.size(0), ", ", v.size(1),
              ") to match v, got ", s.sizes());
  return v.size(0) / n_projections;
}

inline int64_t check_fd_dsm_scalar(const at::Tensor& f, const at::Tensor& v,
                                   const at::Tensor& target) {
  check_floating(f, "f");
  check_dim(f, 1, "f", "(2*B,)");
  check_dim(v, 2, "v", "(B, d)");
  check_dim(target, 2, "target", "(B, d)");
  check_same(v, f, "v", "f");
  check_same(target, f, "target", "f");
  TORCH_CHECK(v.size(0) >= 1, "v must have at least one row, got shape ", v.sizes());
  TORCH_CHECK(f.size(0) == 2 * v.size(0), "f must have 2*B = ", 2 * v.size(0),
              " entries to match v, got ", f.size(0));
  TORCH_CHECK(target.sizes() == v.sizes(), "target must have the shape of v (", v.sizes(),
              "), got ", target.sizes());
  return v.size(0);
}

inline void check_fd_dsm_scalar_backward(const at::Tensor& grad, const at::Tensor& residual) {
  TORCH_CHECK(residual.scalar_type() == at::kFloat || residual.scalar_type() == at::kDouble,
              "residual must be float32 or float64 (fd_dsm_scalar's second output), got ",
              residual.scalar_type());
  check_dim(residual, 1, "residual", "(B,)");
  check_reduction_grad(grad, residual, residual.size(0), "residual");
}

}  // namespace fdsm
