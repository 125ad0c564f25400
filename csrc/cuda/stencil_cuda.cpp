// CUDA wrappers of stencil_batch, random_stencil_batch and stencil_batch_backward: validate,
// allocate, launch on the current stream (kernels in stencil_kernels.cu).

#include <torch/library.h>

#include <string_view>

#include "checks.h"
#include "cuda/cuda_common.h"

namespace fdsm {
namespace {

at::Tensor stencil_batch_cuda(const at::Tensor& x_in, const at::Tensor& v_in,
                              at::ArrayRef<double> offsets) {
  const StencilLayout L = check_stencil_batch(x_in, v_in, offsets);
  check_cuda(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const int64_t d = x.size(1);
  at::Tensor out = at::empty({L.total_rows, d}, x.options());
  C10_CUDA_CHECK(launch_stencil_batch(to_dtype(x.scalar_type()), x.const_data_ptr(),
                                      v.const_data_ptr(), out.mutable_data_ptr(), L, d,
                                      current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> random_stencil_batch_cuda(const at::Tensor& x_in,
                                                             const at::Tensor& seed,
                                                             at::ArrayRef<double> offsets,
                                                             int64_t n_projections,
                                                             c10::string_view noise_name,
                                                             double eps) {
  const StencilLayout L = check_random_stencil_batch(x_in, seed, offsets, n_projections, eps);
  const Noise noise = parse_noise(std::string_view(noise_name.data(), noise_name.size()));
  check_cuda(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  // The kernel dereferences the seed on the device: no host synchronisation, graph-safe.
  const at::Tensor seed_c = seed.reshape({1}).contiguous();
  const int64_t d = x.size(1);
  at::Tensor out = at::empty({L.total_rows, d}, x.options());
  at::Tensor v = at::empty({L.n_proj * L.batch, d}, x.options());
  C10_CUDA_CHECK(launch_random_stencil_batch(
      to_dtype(x.scalar_type()), x.const_data_ptr(), seed_c.const_data_ptr<int64_t>(),
      out.mutable_data_ptr(), v.mutable_data_ptr(), L, d, noise, eps, current_stream()));
  return {out, v};
}

std::tuple<at::Tensor, at::Tensor> stencil_batch_backward_cuda(const at::Tensor& grad_in,
                                                               at::ArrayRef<double> offsets,
                                                               int64_t n_projections,
                                                               bool compute_grad_v) {
  const StencilLayout L = check_stencil_batch_backward(grad_in, offsets, n_projections);
  check_cuda(grad_in, "grad");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t d = grad.size(1);
  at::Tensor grad_x = at::empty({L.batch, d}, grad.options());
  at::Tensor grad_v = compute_grad_v ? at::empty({L.n_proj * L.batch, d}, grad.options())
                                     : at::empty({0}, grad.options());
  C10_CUDA_CHECK(launch_stencil_batch_backward(
      to_dtype(grad.scalar_type()), grad.const_data_ptr(), grad_x.mutable_data_ptr(),
      compute_grad_v ? grad_v.mutable_data_ptr() : nullptr, L, d, current_stream()));
  return {grad_x, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm, CUDA, m) {
  m.impl("stencil_batch", &stencil_batch_cuda);
  m.impl("random_stencil_batch", &random_stencil_batch_cuda);
  m.impl("stencil_batch_backward", &stencil_batch_backward_cuda);
}

}  // namespace fdsm
