// CUDA wrappers of stencil_batch, random_stencil_batch and stencil_batch_backward: validate,
// then run the shared bodies of op_bodies.h on the current stream (kernels in
// stencil_kernels.cu).

#include <torch/library.h>

#include <string_view>

#include "checks.h"
#include "cuda/cuda_common.h"

namespace fdsm {
namespace {

at::Tensor stencil_batch_cuda(const at::Tensor& x, const at::Tensor& v,
                              at::ArrayRef<double> offsets) {
  const StencilLayout L = check_stencil_batch(x, v, offsets);
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return run_stencil_batch(x, v, L, current_stream(), check_launch);
}

std::tuple<at::Tensor, at::Tensor> random_stencil_batch_cuda(const at::Tensor& x,
                                                             const at::Tensor& seed,
                                                             at::ArrayRef<double> offsets,
                                                             int64_t n_projections,
                                                             c10::string_view noise_name,
                                                             double eps) {
  const StencilLayout L = check_random_stencil_batch(x, seed, offsets, n_projections, eps);
  const Noise noise = parse_noise(std::string_view(noise_name.data(), noise_name.size()));
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return run_random_stencil_batch(x, seed, L, noise, eps, current_stream(), check_launch);
}

std::tuple<at::Tensor, at::Tensor> stencil_batch_backward_cuda(const at::Tensor& grad,
                                                               at::ArrayRef<double> offsets,
                                                               int64_t n_projections,
                                                               bool compute_grad_v) {
  const StencilLayout L = check_stencil_batch_backward(grad, offsets, n_projections);
  check_cuda(grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  return run_stencil_batch_backward(grad, L, compute_grad_v, current_stream(), check_launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm, CUDA, m) {
  m.impl("stencil_batch", &stencil_batch_cuda);
  m.impl("random_stencil_batch", &random_stencil_batch_cuda);
  m.impl("stencil_batch_backward", &stencil_batch_backward_cuda);
}

}  // namespace fdsm
