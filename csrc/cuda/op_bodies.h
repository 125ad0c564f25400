#pragma once

// Tensor-level bodies of the CUDA ops, after validation: make the inputs contiguous,
// allocate the outputs, call the launcher on `stream` and hand its status to `check`.
// Shared by the registered CUDA ops (check = C10_CUDA_CHECK on the current stream) and the
// host emulation test (python_tests/cuda_emulation), which runs these very bodies and the
// kernels on CPU tensors. g++ only: ATen, but no CUDA runtime calls.

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda/launchers.h"

namespace fdsm {

using LaunchCheck = void (*)(cudaError_t);

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::Float;
    case at::kDouble:
      return DType::Double;
    case at::kHalf:
      return DType::Half;
    case at::kBFloat16:
      return DType::BFloat16;
    default:
      TORCH_CHECK(false, "fdsm CUDA kernels support float16, bfloat16, float32 and float64, got ",
                  t);
  }
}

inline Weights to_weights(at::ArrayRef<double> weights) {
  Weights w{};
  w.n = static_cast<int>(weights.size());
  for (int k = 0; k < w.n; ++k) w.w[k] = weights[k];
  return w;
}

inline at::Tensor run_stencil_batch(const at::Tensor& x_in, const at::Tensor& v_in,
                                    const StencilLayout& L, cudaStream_t stream,
                                    LaunchCheck check) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const int64_t d = x.size(1);
  at::Tensor out = at::empty({L.total_rows, d}, x.options());
  check(launch_stencil_batch(to_dtype(x.scalar_type()), x.const_data_ptr(), v.const_data_ptr(),
                             out.mutable_data_ptr(), L, d, stream));
  return out;
}

inline std::tuple<at::Tensor, at::Tensor> run_random_stencil_batch(
    const at::Tensor& x_in, const at::Tensor& seed, const StencilLayout& L, Noise noise,
    double eps, cudaStream_t stream, LaunchCheck check) {
  const at::Tensor x = x_in.contiguous();
  // The kernel dereferences the seed on the device: no host synchronisation, graph-safe.
  const at::Tensor seed_c = seed.reshape({1}).contiguous();
  const int64_t d = x.size(1);
  at::Tensor out = at::empty({L.total_rows, d}, x.options());
  at::Tensor v = at::empty({L.n_proj * L.batch, d}, x.options());
  check(launch_random_stencil_batch(to_dtype(x.scalar_type()), x.const_data_ptr(),
                                    seed_c.const_data_ptr<int64_t>(), out.mutable_data_ptr(),
                                    v.mutable_data_ptr(), L, d, noise, eps, stream));
  return {out, v};
}

inline std::tuple<at::Tensor, at::Tensor> run_stencil_batch_backward(
    const at::Tensor& grad_in, const StencilLayout& L, bool compute_grad_v, cudaStream_t stream,
    LaunchCheck check) {
  const at::Tensor grad = grad_in.contiguous();
  const int64_t d = grad.size(1);
  at::Tensor grad_x = at::empty({L.batch, d}, grad.options());
  at::Tensor grad_v = compute_grad_v ? at::empty({L.n_proj * L.batch, d}, grad.options())
                                     : at::empty({0}, grad.options());
  check(launch_stencil_batch_backward(to_dtype(grad.scalar_type()), grad.const_data_ptr(),
                                      grad_x.mutable_data_ptr(),
                                      compute_grad_v ? grad_v.mutable_data_ptr() : nullptr, L, d,
                                      stream));
  return {grad_x, grad_v};
}

inline at::Tensor run_fd_combine(const at::Tensor& y_in, at::ArrayRef<double> weights,
                                 cudaStream_t stream, LaunchCheck check) {
  const at::Tensor y = y_in.contiguous();
  std::vector<int64_t> out_shape(y.sizes().begin(), y.sizes().end());
  out_shape[0] /= static_cast<int64_t>(weights.size());
  at::Tensor out = at::empty(out_shape, y.options().dtype(acc_dtype(y.scalar_type())));
  check(launch_fd_combine(to_dtype(y.scalar_type()), y.const_data_ptr(), out.mutable_data_ptr(),
                          to_weights(weights), out.numel(), stream));
  return out;
}

inline at::Tensor run_fd_combine_backward(const at::Tensor& grad_in,
                                          at::ArrayRef<double> weights, cudaStream_t stream,
                                          LaunchCheck check) {
  const at::Tensor grad = grad_in.contiguous();
  std::vector<int64_t> out_shape(grad.sizes().begin(), grad.sizes().end());
  out_shape[0] *= static_cast<int64_t>(weights.size());
  at::Tensor out = at::empty(out_shape, grad.options());
  check(launch_fd_combine_backward(to_dtype(grad.scalar_type()), grad.const_data_ptr(),
                                   out.mutable_data_ptr(), to_weights(weights), grad.numel(),
                                   stream));
  return out;
}

inline at::Tensor run_fd_ssm_scalar(const at::Tensor& f_in, int64_t B, int64_t n_projections,
                                    double scale, double sign, cudaStream_t stream,
                                    LaunchCheck check) {
  const at::Tensor f = f_in.contiguous();
  at::Tensor loss = at::empty({B}, f.options().dtype(acc_dtype(f.scalar_type())));
  check(launch_fd_ssm_scalar(to_dtype(f.scalar_type()), f.const_data_ptr(),
                             loss.mutable_data_ptr(), B, n_projections, scale, sign, stream));
  return loss;
}

inline at::Tensor run_fd_ssm_scalar_backward(const at::Tensor& grad_in, const at::Tensor& f_in,
                                             int64_t B, int64_t n_projections, double scale,
                                             double sign, cudaStream_t stream,
                                             LaunchCheck check) {
  const at::Tensor f = f_in.contiguous();
  const at::Tensor grad = grad_in.to(acc_dtype(f.scalar_type())).contiguous();
  at::Tensor grad_f = at::empty_like(f);
  check(launch_fd_ssm_scalar_backward(to_dtype(f.scalar_type()), grad.const_data_ptr(),
                                      f.const_data_ptr(), grad_f.mutable_data_ptr(), B,
                                      n_projections, scale, sign, stream));
  return grad_f;
}

inline at::Tensor run_fd_ssm_score(const at::Tensor& s_in, const at::Tensor& v_in, int64_t B,
                                   int64_t n_projections, bool variance_reduction, double scale,
                                   cudaStream_t stream, LaunchCheck check) {
  const at::Tensor s = s_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const auto acc_options = s.options().dtype(acc_dtype(s.scalar_type()));
  at::Tensor terms = at::empty({n_projections * B}, acc_options);
  at::Tensor loss = at::empty({B}, acc_options);
  check(launch_fd_ssm_score(to_dtype(s.scalar_type()), s.const_data_ptr(), v.const_data_ptr(),
                            terms.mutable_data_ptr(), loss.mutable_data_ptr(), B, n_projections,
                            s.size(1), variance_reduction, scale, stream));
  return loss;
}

inline at::Tensor run_fd_ssm_score_backward(const at::Tensor& grad_in, const at::Tensor& s_in,
                                            const at::Tensor& v_in, int64_t B,
                                            int64_t n_projections, bool variance_reduction,
                                            double scale, cudaStream_t stream,
                                            LaunchCheck check) {
  const at::Tensor s = s_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const at::Tensor grad = grad_in.to(acc_dtype(s.scalar_type())).contiguous();
  at::Tensor grad_s = at::empty_like(s);
  check(launch_fd_ssm_score_backward(to_dtype(s.scalar_type()), grad.const_data_ptr(),
                                     s.const_data_ptr(), v.const_data_ptr(),
                                     grad_s.mutable_data_ptr(), B, n_projections, s.size(1),
                                     variance_reduction, scale, stream));
  return grad_s;
}

inline std::tuple<at::Tensor, at::Tensor> run_fd_dsm_scalar(
    const at::Tensor& f_in, const at::Tensor& v_in, const at::Tensor& target_in, int64_t B,
    double scale, double sign, cudaStream_t stream, LaunchCheck check) {
  const at::Tensor f = f_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const auto acc_options = f.options().dtype(acc_dtype(f.scalar_type()));
  at::Tensor loss = at::empty({B}, acc_options);
  at::Tensor residual = at::empty({B}, acc_options);
  check(launch_fd_dsm_scalar(to_dtype(f.scalar_type()), f.const_data_ptr(), v.const_data_ptr(),
                             target.const_data_ptr(), loss.mutable_data_ptr(),
                             residual.mutable_data_ptr(), B, v.size(1), scale, sign, stream));
  return {loss, residual};
}

inline at::Tensor run_fd_dsm_scalar_backward(const at::Tensor& grad_in,
                                             const at::Tensor& residual_in, double scale,
                                             double sign, cudaStream_t stream,
                                             LaunchCheck check) {
  const at::Tensor residual = residual_in.contiguous();
  const at::Tensor grad = grad_in.to(residual.scalar_type()).contiguous();
  const int64_t B = residual.size(0);
  at::Tensor grad_f = at::empty({2 * B}, residual.options());
  check(launch_fd_dsm_scalar_backward(to_dtype(residual.scalar_type()), grad.const_data_ptr(),
                                      residual.const_data_ptr(), grad_f.mutable_data_ptr(), B,
                                      scale, sign, stream));
  return grad_f;
}

}  // namespace fdsm
